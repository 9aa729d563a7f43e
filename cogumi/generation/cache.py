"""A keyed, append-only JSONL cache of model replies (the judges' and reference answers).

Each line is one JSON object with a ``"key"``; a later line with the same key replaces an
earlier one when the file is read. Entries are appended and fsynced as they arrive, so a run
that is killed or whose requests fail keeps everything that did arrive; a line cut off by a
crash is ignored on the next read.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def cache_key(*parts: str) -> str:
    """SHA-256 of ``parts`` joined by a separator that does not occur in ordinary text."""
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class JSONLCache:
    """Entries by ``entry["key"]``, in an append-only JSONL file (a torn last line is ignored)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.entries: dict[str, dict] = {}
        if self.path.is_file():
            with self.path.open(encoding="utf-8") as handle:
                for line in handle:
                    try:
                        entry = json.loads(line)
                        self.entries[entry["key"]] = entry
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue  # a line cut off by a crash

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, entries: list[dict]) -> None:
        """Append ``entries`` (each with a ``"key"``) and make them durable before returning."""
        if not entries:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            for entry in entries:
                handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
                self.entries[entry["key"]] = entry
            handle.flush()
            os.fsync(handle.fileno())


__all__ = ["JSONLCache", "cache_key", "text_sha256"]
