"""JSONL records: schemas, validated reading, atomic writing and hashing.

Every reader reports what it read: a malformed line fails with ``file:line: field: problem``
unless the caller opts into ``on_error="skip"``, in which case the bad line is copied verbatim
to a side file and counted. Nothing is dropped silently.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

OnError = Literal["raise", "skip"]

DOMAINS = ("code", "reasoning", "math", "science", "conversation", "creative", "automation")
DIFFICULTIES = ("easy", "medium", "hard")
ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """A record that does not fit its schema; the message names file, line and field."""

    def __init__(self, path: str | os.PathLike, line: int | None, field_name: str | None, problem: str):
        self.path = str(path)
        self.line = line
        self.field = field_name
        self.problem = problem
        where = self.path if line is None else f"{self.path}:{line}"
        what = f"field '{field_name}': " if field_name else ""
        super().__init__(f"{where}: {what}{problem}")


class FieldError(Exception):
    def __init__(self, field_name: str, problem: str):
        super().__init__(problem)
        self.field = field_name
        self.problem = problem


# ----------------------------------------------------------------------------- schemas

def _type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def _expect(row: dict, name: str, kind: type | tuple, *, required: bool, prefix: str = "") -> Any:
    full = f"{prefix}{name}"
    if name not in row:
        if required:
            raise FieldError(full, "missing required field")
        return None
    value = row[name]
    # bool is an int in Python; a JSON true is never a valid number here.
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise FieldError(full, f"expected {_kind_name(kind)}, got boolean")
    if not isinstance(value, kind):
        raise FieldError(full, f"expected {_kind_name(kind)}, got {_type_name(value)}")
    return value


def _kind_name(kind: type | tuple) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {str: "string", int: "integer", float: "number", dict: "object", list: "array", bool: "boolean"}
    return " or ".join(dict.fromkeys(names.get(k, k.__name__) for k in kinds))


def _check_metadata(row: dict) -> None:
    meta = _expect(row, "metadata", dict, required=False)
    if meta is None:
        return
    domain = _expect(meta, "domain", str, required=False, prefix="metadata.")
    if domain is not None and domain not in DOMAINS:
        raise FieldError("metadata.domain", f"'{domain}' is not one of {', '.join(DOMAINS)}")
    difficulty = _expect(meta, "difficulty", str, required=False, prefix="metadata.")
    if difficulty is not None and difficulty not in DIFFICULTIES:
        raise FieldError(
            "metadata.difficulty", f"'{difficulty}' is not one of {', '.join(DIFFICULTIES)}"
        )
    for name in ("teacher", "source"):
        _expect(meta, name, str, required=False, prefix="metadata.")
    score = _expect(meta, "quality_score", (int, float), required=False, prefix="metadata.")
    if score is not None and not 0 <= score <= 10:
        raise FieldError("metadata.quality_score", f"{score} is outside 0..10")
    tokens = _expect(meta, "tokens", int, required=False, prefix="metadata.")
    if tokens is not None and tokens < 0:
        raise FieldError("metadata.tokens", f"{tokens} is negative")


def _check_instruction(row: dict) -> None:
    instruction = _expect(row, "instruction", str, required=True)
    if not instruction.strip():
        raise FieldError("instruction", "is empty")
    # Alpaca's "output" is accepted for "response" (one of them, not both).
    if "output" in row and "response" not in row:
        _expect(row, "output", str, required=True)
    else:
        _expect(row, "response", str, required=True)
    _expect(row, "input", str, required=False)
    _expect(row, "id", (str, int), required=False)
    _check_metadata(row)


def _check_messages(row: dict, *, need_assistant: bool = False) -> None:
    messages = _expect(row, "messages", list, required=True)
    if not messages:
        raise FieldError("messages", "is an empty list")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise FieldError(where, f"expected object, got {_type_name(message)}")
        role = _expect(message, "role", str, required=True, prefix=f"{where}.")
        if role not in ROLES:
            raise FieldError(f"{where}.role", f"'{role}' is not one of {', '.join(ROLES)}")
        _expect(message, "content", str, required=True, prefix=f"{where}.")
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise FieldError("messages", "has no assistant turn to train on")
    _expect(row, "id", (str, int), required=False)
    _check_metadata(row)


def _check_prompt(row: dict) -> None:
    """A row something can be asked: ``prompt``, ``messages`` or ``instruction`` (+ ``input``)."""
    if "messages" in row:
        _check_messages(row)
    elif "instruction" in row:
        instruction = _expect(row, "instruction", str, required=True)
        if not instruction.strip():
            raise FieldError("instruction", "is empty")
        _expect(row, "input", str, required=False)
    else:
        prompt = _expect(row, "prompt", str, required=True)
        if not prompt.strip():
            raise FieldError("prompt", "is empty")
    _expect(row, "id", (str, int), required=False)


def _check_sft(row: dict) -> None:
    """A row to train on: instruction/response or messages with an assistant turn."""
    if "messages" in row:
        _check_messages(row, need_assistant=True)
    else:
        _check_instruction(row)


SCHEMAS = {
    "any": lambda row: None,
    "instruction": _check_instruction,
    "messages": _check_messages,
    "prompt": _check_prompt,
    "sft": _check_sft,
}
Schema = Literal["any", "instruction", "messages", "prompt", "sft"]


def validate_record(row: Any, schema: str) -> None:
    """Raise ``FieldError`` if ``row`` does not fit ``schema``."""
    if not isinstance(row, dict):
        raise FieldError("<record>", f"expected a JSON object, got {_type_name(row)}")
    try:
        check = SCHEMAS[schema]
    except KeyError:
        raise ValueError(f"unknown schema '{schema}'; choose one of {', '.join(SCHEMAS)}") from None
    check(row)


def to_messages(row: dict) -> list[dict[str, str]]:
    """The chat a row asks for, without its answer: messages up to the last user turn."""
    if "messages" in row:
        messages = row["messages"]
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
        if last_user is None:
            return list(messages)
        return [dict(m) for m in messages[: last_user + 1]]
    if "instruction" in row:
        text = row["instruction"]
        if row.get("input"):
            text = f"{text}\n\n{row['input']}"
        return [{"role": "user", "content": text}]
    return [{"role": "user", "content": row["prompt"]}]


def response_of(row: dict) -> str:
    """The answer of an instruction row: ``response``, or Alpaca's ``output``."""
    return row.get("response") or row.get("output") or ""


def record_parts(row: dict) -> tuple[str, str]:
    """``(prompt, response)`` text of a record, each part's pieces joined by blank lines.

    Instruction rows: instruction (+ input) and response. Chats: the contents up to and including
    the last user turn, and the contents after it. Prompt-only rows have an empty response.
    """
    if "messages" in row:
        messages = row["messages"]
        last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
        prompt = [m.get("content") or "" for m in messages[: last_user + 1]]
        response = [m.get("content") or "" for m in messages[last_user + 1 :]]
        return "\n\n".join(prompt), "\n\n".join(response)
    if "instruction" in row:
        prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        return prompt, response_of(row)
    return row.get("prompt") or "", row.get("response") or ""


def record_text(row: dict) -> str:
    """All the text of a record (prompt, then response), as one string."""
    prompt, response = record_parts(row)
    return f"{prompt}\n\n{response}" if response else prompt


def iter_texts(path: str | os.PathLike) -> Iterator[str]:
    """The texts of a file of plain text: a ``.txt`` file whole, or each JSONL row's text.

    A row's text is its ``text`` field, else the whole record (instruction/response, chat
    messages, prompt/response), else a benchmark row's ``question`` and ``answer``. A row with
    none of these is an error naming its line: it is never skipped silently.
    """
    path = Path(path)
    if path.suffix == ".txt":
        if not path.exists():
            raise DataError(path, None, None, "file does not exist")
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise DataError(path, None, None, "file is empty")
        yield text
        return
    report = ReadReport(str(path))
    for row in iter_jsonl(path, "any", report=report):
        if isinstance(row.get("text"), str):
            text = row["text"]
        elif any(key in row for key in ("messages", "instruction", "prompt")):
            text = record_text(row)
        else:
            text = "\n\n".join(str(row[key]) for key in ("question", "answer") if row.get(key))
        if not text.strip():
            raise DataError(path, report.records + report.blank_lines, "text",
                            "no text (expected 'text', 'messages', 'instruction', 'prompt' or 'question')")
        yield text


# ----------------------------------------------------------------------------- reading

@dataclass
class ReadReport:
    """What a read saw: every non-blank line is either a record or a rejected line."""

    path: str
    records: int = 0
    rejected: int = 0
    blank_lines: int = 0
    rejects_path: str | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def lines(self) -> int:
        return self.records + self.rejected


def iter_jsonl(
    path: str | os.PathLike,
    schema: str = "any",
    *,
    on_error: OnError = "raise",
    rejects_path: str | os.PathLike | None = None,
    report: ReadReport | None = None,
) -> Iterator[dict]:
    """Yield the records of a JSONL file, each checked against ``schema``.

    With ``on_error="raise"`` (default) the first bad line raises :class:`DataError`. With
    ``"skip"`` each bad line is written verbatim to ``rejects_path`` (default
    ``<file>.rejected.jsonl`` beside the input) as ``{"line", "error", "raw"}`` and counted in
    ``report``. An empty file is always an error.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    path = Path(path)
    if not path.exists():
        raise DataError(path, None, None, "file does not exist")
    report = report if report is not None else ReadReport(str(path))
    if on_error == "skip" and rejects_path is None:
        rejects_path = path.with_name(path.name + ".rejected.jsonl")
    rejects = None
    try:
        with path.open("rb") as handle:
            for number, raw in enumerate(handle, start=1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    error = DataError(
                        path, number, None,
                        f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})",
                    )
                    text = None
                else:
                    if not text.strip():
                        report.blank_lines += 1
                        continue
                    error = None
                    try:
                        row = json.loads(text)
                    except json.JSONDecodeError as exc:
                        error = DataError(path, number, None, f"invalid JSON: {exc.msg} (column {exc.colno})")
                    else:
                        try:
                            validate_record(row, schema)
                        except FieldError as exc:
                            error = DataError(path, number, exc.field, exc.problem)
                if error is None:
                    report.records += 1
                    yield row
                    continue
                if on_error == "raise":
                    raise error
                report.rejected += 1
                report.errors.append(str(error))
                if rejects is None:
                    rejects = AtomicWriter(rejects_path)
                    report.rejects_path = str(rejects_path)
                rejects.write(json.dumps(
                    {"line": number, "error": str(error),
                     "raw": text if text is not None else raw.decode("utf-8", "replace")},
                    ensure_ascii=False,
                ) + "\n")
        if report.records == 0 and report.rejected == 0:
            raise DataError(path, None, None, "file is empty (no records)")
    finally:
        if rejects is not None:
            rejects.close()


def read_jsonl(
    path: str | os.PathLike,
    schema: str = "any",
    *,
    on_error: OnError = "raise",
    rejects_path: str | os.PathLike | None = None,
) -> tuple[list[dict], ReadReport]:
    """Read a whole JSONL file; returns the records and a :class:`ReadReport`."""
    report = ReadReport(str(path))
    rows = list(iter_jsonl(path, schema, on_error=on_error, rejects_path=rejects_path, report=report))
    return rows, report


# ----------------------------------------------------------------------------- writing

class AtomicWriter:
    """A text file that appears under its final name only when closed without error."""

    def __init__(self, path: str | os.PathLike, mode: str = "w"):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        self._tmp = Path(tmp)
        encoding = None if "b" in mode else "utf-8"
        self._handle = os.fdopen(fd, mode, encoding=encoding)

    def write(self, data) -> int:
        return self._handle.write(data)

    def close(self) -> None:
        if self._handle.closed:
            return
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        if not self._handle.closed:
            self._handle.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> AtomicWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w"):
    """``with atomic_write(p) as f: ...`` — the file appears complete or not at all."""
    writer = AtomicWriter(path, mode)
    try:
        yield writer
    except BaseException:
        writer.abort()
        raise
    writer.close()


class PartialRecords:
    """Records a long stage has finished so far, appended as they come, so a killed run resumes.

    Entries are keyed by ``entry["key"]``. They are kept only when the next run has the same
    config hash (a stamp file next to ``path``); a torn last line (the one being written at the
    kill) is dropped. ``remove()`` when the stage's real outputs are written.
    """

    def __init__(self, path: str | os.PathLike, config_hash: str) -> None:
        self.path = Path(path)
        self.stamp = self.path.with_name(self.path.name.removesuffix(".jsonl") + ".config")
        self.done: dict[str, dict] = {}
        if self.path.exists() and self.stamp.exists() and self.stamp.read_text().strip() == config_hash:
            with self.path.open(encoding="utf-8") as handle:
                for line in handle:
                    try:
                        entry = json.loads(line)
                    except json.JSONDecodeError:
                        break  # the line being written when the run was killed
                    self.done[entry["key"]] = entry
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with AtomicWriter(self.path) as handle:  # rewrite without a torn line
            for entry in self.done.values():
                handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self.stamp.write_text(config_hash)

    def add(self, entries: list[dict]) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            for entry in entries:
                handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
                self.done[entry["key"]] = entry
            handle.flush()

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        self.stamp.unlink(missing_ok=True)


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    """Write rows atomically as JSONL; returns how many were written."""
    count = 0
    with atomic_write(path) as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_write(path) as handle:
        json.dump(obj, handle, indent=2, ensure_ascii=False, sort_keys=False)
        handle.write("\n")


# ----------------------------------------------------------------------------- hashing

def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_path(path: str | os.PathLike) -> str:
    """SHA-256 of a file, or of a directory's files (relative names and contents, sorted)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or directory")
    digest = hashlib.sha256()
    for child in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = child.relative_to(path).as_posix()
        if rel.startswith(".") or "/." in rel:  # temporary and hidden files are not content
            continue
        digest.update(rel.encode() + b"\0" + sha256_file(child).encode() + b"\n")
    return digest.hexdigest()
