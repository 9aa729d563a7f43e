"""Phase 2 compression. :mod:`cogumi.compress.gate` — the quality gate between compression steps."""
