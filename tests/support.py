"""Helpers shared by several test modules (importable because pytest's pythonpath has tests/)."""

from __future__ import annotations

import random


def words(rng: random.Random, n: int) -> str:
    """``n`` random lower-case pseudo-words: text no two calls share by chance."""
    return " ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
                    for _ in range(n))


def edit(rng: random.Random, text: str, changes: int) -> str:
    """``text`` with ``changes`` of its words replaced: a near-duplicate of a chosen closeness."""
    tokens = text.split()
    for _ in range(changes):
        tokens[rng.randrange(len(tokens))] = words(rng, 1)
    return " ".join(tokens)
