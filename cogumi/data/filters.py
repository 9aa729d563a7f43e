"""Rule-based curation of instruction data: length, language, format and exact duplicates.

Four stages, one per filter, because each has its own options:

* ``filter-length`` — token count by the model's tokenizer within ``[min_tokens, max_tokens]``
  (150..2048 by default, the spec's bounds); reports the token-length distribution.
* ``filter-language`` — English only, by ``py3langid`` (its model ships in the wheel; no
  download). Code is not a natural language, so by default only the prose is scored: fenced
  blocks, inline code and code-looking lines are set aside first, and a row with too little
  prose left (pure code) is kept as *undetermined* instead of being guessed at.
* ``filter-format`` — the record schema of :mod:`cogumi.io` plus content checks: a non-empty
  response, no unterminated code fence, no leftover chat-template tokens (``<|im_start|>``...).
* ``exact-dedup`` — normalised (lower-cased, whitespace-collapsed) prompt + response hash; the
  first occurrence is kept and each later copy points at it (``duplicate_of_line`` /
  ``duplicate_of_id``, the same names as the near-duplicate ``dedup`` stage uses).

Every stage writes ``kept.jsonl``, ``removed.jsonl`` (one object per removed row:
``{"line", "id", "reason", <evidence>, "row"}``, the original row untouched under ``row``),
``rejected.jsonl`` (malformed lines, with ``--on-error skip``) and ``report.json``, and
accounts for every line: ``in = kept + removed + rejected``. An empty input gives empty outputs
and a report.

The helpers here (:func:`numbered_rows`, :class:`LanguageScorer`, :class:`TokenCounter`,
:func:`run_filter`) are shared with the decontamination, quality and statistics stages.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cogumi.io import (
    AtomicWriter,
    DataError,
    OnError,
    ReadReport,
    iter_jsonl,
    record_parts,
    record_text,
    response_of,
    validate_record,
    write_json,
)
from cogumi.stage import ConfigError, StageConfig, StageResult, option, stage

# ----------------------------------------------------------------------------- reading


def count_lines(path: str | Path) -> int:
    """Non-blank lines in a file (a progress bar's total)."""
    with open(path, "rb") as handle:
        return sum(1 for line in handle if line.strip())


def numbered_rows(
    path: str | Path,
    schema: str,
    *,
    on_error: OnError,
    rejects_path: str | Path,
    report: ReadReport,
) -> Iterator[tuple[int, dict]]:
    """``(line number, record)`` for each good line of a JSONL file (see :func:`iter_jsonl`).

    Unlike ``iter_jsonl`` an empty file is not an error: it yields nothing, so a stage given
    empty input writes empty outputs and a report.
    """
    try:
        for row in iter_jsonl(path, schema, on_error=on_error, rejects_path=rejects_path, report=report):
            # iter_jsonl counts every line before it yields, so the counters add up to the line.
            yield report.records + report.rejected + report.blank_lines, row
    except DataError as exc:
        if exc.line is None and report.records == 0 and report.rejected == 0 and Path(path).is_file():
            return  # empty input
        raise


def batched(items: Iterator, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def removal(line: int, row: dict, reason: str, **evidence: Any) -> dict:
    """A ``removed.jsonl`` record: where the row was, why it went, and the row itself."""
    return {"line": line, "id": row.get("id"), "reason": reason, **evidence, "row": row}


def distribution(values: list[int] | list[float]) -> dict[str, float | int | None]:
    """min / mean / median / p95 / max of ``values`` (all ``None`` when empty)."""
    import numpy as np

    if not values:
        return {"count": 0, "min": None, "mean": None, "median": None, "p95": None, "max": None}
    array = np.asarray(values, dtype=float)
    as_int = all(isinstance(v, int) for v in values)

    def num(x: float) -> float | int:
        return int(x) if as_int and float(x).is_integer() else round(float(x), 2)

    return {"count": len(values), "min": num(array.min()), "mean": round(float(array.mean()), 2),
            "median": num(np.median(array)), "p95": num(np.percentile(array, 95)), "max": num(array.max())}


# ----------------------------------------------------------------------------- the filter runner

#: What a filter decides for a row: ``(row to write, reason or None to keep, evidence)``.
Verdict = tuple[dict, "str | None", dict]


@dataclass(kw_only=True)
class FilterConfig(StageConfig):
    """Fields every filtering stage shares."""

    input: str = option(help="JSONL file of training rows (instruction/response or messages).",
                        input=True, positional=True)
    on_error: OnError = option(
        "raise", help="Malformed lines: 'raise' stops with file:line:field; 'skip' writes them to "
        "rejected.jsonl and goes on.")
    progress: bool = option(True, help="Show a progress bar.", hashed=False)

    def outputs(self) -> dict[str, Path]:
        return {"kept": self.out("kept.jsonl"), "removed": self.out("removed.jsonl"),
                "rejected": self.out("rejected.jsonl"), "report": self.out("report.json")}

    def _require(self, name: str, ok: bool, problem: str) -> None:
        if not ok:
            raise ConfigError(f"{type(self).__name__}.{name}: {problem}, got {getattr(self, name)!r}")


def run_filter(
    config: FilterConfig,
    decide: Callable[[list[tuple[int, dict]]], list[Verdict]],
    *,
    schema: str = "sft",
    batch_size: int = 256,
    desc: str = "filter",
    summary: Callable[[], dict] | None = None,
) -> StageResult:
    """Stream ``config.input`` through ``decide`` (a batch at a time) and write the outputs.

    ``decide`` gets ``[(line, row), ...]`` and returns one :data:`Verdict` per row. ``summary``
    (called at the end) adds stage-specific entries to the report and the result's metrics.
    """
    from tqdm.auto import tqdm

    outputs = config.outputs()
    report = ReadReport(config.input)
    reasons: Counter[str] = Counter()
    kept = 0
    rows = numbered_rows(config.input, schema, on_error=config.on_error,
                         rejects_path=outputs["rejected"], report=report)
    total = count_lines(config.input) if config.progress else None
    with AtomicWriter(outputs["kept"]) as kept_out, AtomicWriter(outputs["removed"]) as removed_out, \
            tqdm(total=total, desc=desc, unit="row", disable=not config.progress) as bar:
        for batch in batched(rows, batch_size):
            verdicts = decide(batch)
            if len(verdicts) != len(batch):
                raise RuntimeError(f"{desc}: {len(verdicts)} verdicts for {len(batch)} rows")
            for (line, _), (row, reason, evidence) in zip(batch, verdicts):
                if reason is None:
                    kept += 1
                    kept_out.write(json.dumps(row, ensure_ascii=False) + "\n")
                else:
                    reasons[reason] += 1
                    removed_out.write(json.dumps(removal(line, row, reason, **evidence), ensure_ascii=False) + "\n")
            bar.update(len(batch))
    if report.rejected == 0:
        AtomicWriter(outputs["rejected"]).close()  # an empty side file says "none rejected"
    removed = sum(reasons.values())
    counts = {"in": report.lines, "kept": kept, "removed": removed, "rejected": report.rejected}
    assert counts["in"] == kept + removed + report.rejected, counts
    extra = summary() if summary else {}
    metrics = {"removed_by_reason": dict(reasons.most_common()), **extra}
    write_json(outputs["report"], {
        **counts, **metrics, "input": config.input, "empty_input": report.lines == 0,
        "blank_lines": report.blank_lines, "errors": report.errors[:100],
    })
    return StageResult(counts=counts, metrics=metrics)


# ----------------------------------------------------------------------------- length


class TokenCounter:
    """Counts the tokens of rows with a model's (fast) tokenizer, a batch at a time.

    ``mode="text"`` counts the prompt and response text joined by a blank line;
    ``mode="chat"`` counts the row rendered with the tokenizer's chat template, as training
    sees it (template tokens and any default system prompt included).
    """

    def __init__(self, model: str, mode: Literal["text", "chat"] = "text"):
        from cogumi.models.loading import load_tokenizer

        self.model = model
        self.mode = mode
        self.tokenizer = load_tokenizer(model)
        if mode == "chat" and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"{model}: the tokenizer has no chat template; count with mode 'text'")

    def texts(self, rows: list[dict]) -> list[str]:
        if self.mode == "text":
            return [record_text(row) for row in rows]
        chats = [_as_chat(row) for row in rows]
        return self.tokenizer.apply_chat_template(chats, tokenize=False)

    def count(self, rows: list[dict]) -> list[int]:
        if not rows:
            return []
        encoded = self.tokenizer(self.texts(rows), add_special_tokens=False,
                                 return_attention_mask=False, return_token_type_ids=False)
        return [len(ids) for ids in encoded["input_ids"]]


def _as_chat(row: dict) -> list[dict]:
    if "messages" in row:
        return [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    prompt, response = record_parts(row)
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def _with_metadata(row: dict, **values: Any) -> dict:
    meta = dict(row.get("metadata") or {})
    meta.update(values)
    return {**row, "metadata": meta}


@dataclass(kw_only=True)
class LengthFilterConfig(FilterConfig):
    model: str = option("smollm2-135m", help="Tokenizer to count with: a built-in model name "
                        "(smollm2-135m, tiny-llama), a checkpoint directory or a hub id.", input="maybe")
    min_tokens: int = option(150, help="Remove rows with fewer tokens than this.")
    max_tokens: int = option(2048, help="Remove rows with more tokens than this.")
    count: Literal["text", "chat"] = option(
        "text", help="'text': prompt and response joined by a blank line; 'chat': the row rendered "
        "with the tokenizer's chat template, as training sees it.")
    annotate: bool = option(True, help="Write each output row's token count to metadata.tokens.")
    batch_size: int = option(512, help="Rows per tokenizer call.", hashed=False)

    def check(self) -> None:
        self._require("min_tokens", self.min_tokens >= 0, "must be >= 0")
        self._require("max_tokens", self.max_tokens >= max(self.min_tokens, 1),
                      f"must be >= 1 and >= min_tokens ({self.min_tokens})")
        self._require("batch_size", self.batch_size >= 1, "must be >= 1")


@stage("filter-length", LengthFilterConfig,
       help="Keep rows whose token count (by the model's tokenizer) is within [min-tokens, max-tokens].")
def run_length(config: LengthFilterConfig) -> StageResult:
    counter: TokenCounter | None = None
    lengths: list[int] = []
    kept_lengths: list[int] = []

    def decide(batch: list[tuple[int, dict]]) -> list[Verdict]:
        nonlocal counter
        if counter is None:
            counter = TokenCounter(config.model, config.count)
        verdicts: list[Verdict] = []
        for (_, row), n in zip(batch, counter.count([row for _, row in batch]), strict=True):
            lengths.append(n)
            out = _with_metadata(row, tokens=n) if config.annotate else row
            if n < config.min_tokens:
                verdicts.append((out, "too_short", {"tokens": n}))
            elif n > config.max_tokens:
                verdicts.append((out, "too_long", {"tokens": n}))
            else:
                kept_lengths.append(n)
                verdicts.append((out, None, {}))
        return verdicts

    def summary() -> dict:
        return {"tokenizer": config.model, "count": config.count,
                "bounds": [config.min_tokens, config.max_tokens],
                "tokens_in": distribution(lengths), "tokens_kept": distribution(kept_lengths)}

    return run_filter(config, decide, batch_size=config.batch_size, desc="filter-length", summary=summary)


# ----------------------------------------------------------------------------- language

_FENCE_LINE = re.compile(r"^[ \t]{0,3}(`{3,}|~{3,})(.*)$")
_INLINE_CODE = re.compile(r"`[^`\n]+`")
_CODE_LINE = re.compile(
    r"""^\s*(?:
        def\s+\w+\s*\( | class\s+\w+\s*[:(] | import\s+[\w.]+ | from\s+[\w.]+\s+import\b | return\b
      | (?:if|elif|while|for|with|except|else|try|finally)\b[^\n]*:\s*$ | @\w+ | >>> | \$\s
      | \#include\b | (?:public|private|protected|static)\s | (?:func|fn)\s+\w+ | (?:let|const|var)\s+\w+\s*=
      | (?:SELECT|INSERT\s+INTO|UPDATE|DELETE\s+FROM|CREATE\s+TABLE|FROM|WHERE|GROUP\s+BY|ORDER\s+BY)\b
      | (?:print|console\.log|printf|System\.out\.\w+)\s*\( | [{}]
    )""",
    re.X,
)
_CODE_SYMBOLS = frozenset("{}[]()<>=;+*/\\|&^%$#@~_\"'")


def prose_of(text: str) -> str:
    """``text`` with the code taken out: fenced blocks, inline code and code-looking lines."""
    lines = []
    for line in _outside_fences(text):
        line = _INLINE_CODE.sub(" ", line)
        stripped = line.strip()
        if not stripped:
            continue
        visible = [c for c in stripped if not c.isspace()]
        symbols = sum(c in _CODE_SYMBOLS for c in visible) / len(visible)
        if symbols > 0.2 or _CODE_LINE.match(line) or stripped.endswith((";", "{", "}")):
            continue
        lines.append(stripped)
    return "\n".join(lines)


@dataclass(frozen=True)
class LanguageScore:
    """What :class:`LanguageScorer` says about a text."""

    english_prob: float | None
    """P(English) among py3langid's 97 languages; ``None`` when undetermined (too little prose)."""
    language: str | None
    """The most likely language (ISO 639-1), ``None`` when undetermined."""
    language_prob: float | None
    prose_chars: int
    """Letters in the text that was scored (after code was taken out)."""
    is_english: bool | None
    """``None`` when undetermined."""


@functools.lru_cache(maxsize=1)
def _langid_identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


class LanguageScorer:
    """English or not, by py3langid on the prose of a text (see the module docstring).

    A text is English when English is its most likely language and ``P(en) >= min_english_prob``.
    """

    def __init__(self, *, code_aware: bool = True, min_prose_chars: int = 20, min_english_prob: float = 0.0):
        self.code_aware = code_aware
        self.min_prose_chars = min_prose_chars
        self.min_english_prob = min_english_prob
        self.identifier = _langid_identifier()

    def score(self, text: str) -> LanguageScore:
        prose = prose_of(text) if self.code_aware else text
        letters = sum(c.isalpha() for c in prose)
        if letters < self.min_prose_chars:
            return LanguageScore(None, None, None, letters, None)
        ranked = self.identifier.rank(prose)
        english = next((float(p) for lang, p in ranked if lang == "en"), 0.0)
        top, top_prob = ranked[0]
        is_english = top == "en" and english >= self.min_english_prob
        return LanguageScore(round(english, 4), top, round(float(top_prob), 4), letters, is_english)


@dataclass(kw_only=True)
class LanguageFilterConfig(FilterConfig):
    min_english_prob: float = option(
        0.0, help="Also require P(English) >= this (0..1). At 0 a row is English when English is its "
        "most likely language (measured best on mixed prose/code/math rows).")
    code_aware: bool = option(
        True, help="Score only the prose: take out fenced code, inline code and code-looking lines "
        "first. --no-code-aware scores the raw text (code then often reads as non-English).")
    min_prose_chars: int = option(
        20, help="Rows with fewer letters of prose than this (e.g. pure code) are kept as "
        "'undetermined' rather than guessed at.")

    def check(self) -> None:
        self._require("min_english_prob", 0.0 <= self.min_english_prob <= 1.0, "must be within 0..1")
        self._require("min_prose_chars", self.min_prose_chars >= 0, "must be >= 0")


@stage("filter-language", LanguageFilterConfig,
       help="Keep English rows (py3langid on the prose; code-only rows are kept as undetermined).")
def run_language(config: LanguageFilterConfig) -> StageResult:
    scorer: LanguageScorer | None = None
    verdict_counts: Counter[str] = Counter()
    languages: Counter[str] = Counter()

    def decide(batch: list[tuple[int, dict]]) -> list[Verdict]:
        nonlocal scorer
        if scorer is None:
            scorer = LanguageScorer(code_aware=config.code_aware, min_prose_chars=config.min_prose_chars,
                                    min_english_prob=config.min_english_prob)
        verdicts: list[Verdict] = []
        for _, row in batch:
            result = scorer.score(record_text(row))
            if result.is_english is None:
                verdict_counts["undetermined"] += 1
                verdicts.append((row, None, {}))
            elif result.is_english:
                verdict_counts["english"] += 1
                verdicts.append((row, None, {}))
            else:
                verdict_counts["non_english"] += 1
                languages[result.language] += 1
                verdicts.append((row, "non_english", {
                    "english_prob": result.english_prob, "language": result.language,
                    "language_prob": result.language_prob, "prose_chars": result.prose_chars}))
        return verdicts

    def summary() -> dict:
        return {"languages": {"english": verdict_counts["english"], "non_english": verdict_counts["non_english"],
                              "undetermined": verdict_counts["undetermined"]},
                "removed_by_language": dict(languages.most_common()), "identifier": "py3langid"}

    return run_filter(config, decide, desc="filter-language", summary=summary)


# ----------------------------------------------------------------------------- format

#: Chat-template control tokens that must not survive into training text: ChatML / Llama-3 /
#: Phi style ``<|...|>``, Llama-2 ``[INST]`` and ``<<SYS>>``, Gemma ``<start_of_turn>``.
DEFAULT_TEMPLATE_PATTERN = r"<\|[A-Za-z0-9_]+\|>|\[/?INST\]|<</?SYS>>|<(?:start|end)_of_turn>"

def _fences(text: str) -> Iterator[tuple[int, str, str]]:
    """``(line number, line, kind)`` for each line; kind is "text", "open", "code" or "close".

    CommonMark rules: a fence is 3+ backticks or tildes; it closes with the same character, at
    least as many, and nothing else on the line.
    """
    open_char, open_len = None, 0
    for number, line in enumerate(text.split("\n"), start=1):
        match = _FENCE_LINE.match(line)
        if match:
            fence, rest = match.groups()
            if open_char is None and not (fence[0] == "`" and "`" in rest):  # ```x``` is no fence
                open_char, open_len = fence[0], len(fence)
                yield number, line, "open"
                continue
            if open_char is not None and fence[0] == open_char and len(fence) >= open_len and not rest.strip():
                open_char = None
                yield number, line, "close"
                continue
        yield number, line, "text" if open_char is None else "code"


def _outside_fences(text: str) -> Iterator[str]:
    return (line for _, line, kind in _fences(text) if kind == "text")


def unterminated_fence(text: str) -> int | None:
    """The line (1-based) where a code fence opens and is never closed, or ``None``."""
    opened = None
    for number, _, kind in _fences(text):
        if kind == "open":
            opened = number
        elif kind == "close":
            opened = None
    return opened


def _text_fields(row: dict) -> list[tuple[str, str]]:
    if "messages" in row:
        return [(f"messages[{i}].content", m.get("content") or "") for i, m in enumerate(row["messages"])]
    return [(name, row[name]) for name in ("instruction", "input", "response", "output") if isinstance(row.get(name), str)]


def format_problems(row: dict, schema: str, template: re.Pattern | None, check_fences: bool) -> list[dict]:
    """Everything wrong with a row's format, in order: ``[{"reason", "field", "detail"}]``."""
    from cogumi.io import FieldError

    try:
        validate_record(row, schema)
    except FieldError as exc:
        return [{"reason": "schema", "field": exc.field, "detail": exc.problem}]
    problems = []
    if "messages" in row:
        answers = [(i, m) for i, m in enumerate(row["messages"]) if m["role"] == "assistant"]
        if not answers:
            problems.append({"reason": "empty_response", "field": "messages", "detail": "no assistant turn"})
        for i, message in answers:
            if not message["content"].strip():
                problems.append({"reason": "empty_response", "field": f"messages[{i}].content",
                                 "detail": "assistant turn is empty"})
    elif not response_of(row).strip():
        field = "response" if "response" in row else "output"
        problems.append({"reason": "empty_response", "field": field, "detail": "is empty"})
    for name, text in _text_fields(row):
        if check_fences and (line := unterminated_fence(text)) is not None:
            problems.append({"reason": "unterminated_code_fence", "field": name,
                             "detail": f"code fence opened on line {line} is never closed"})
        if template is not None and (match := template.search(text)):
            problems.append({"reason": "template_tokens", "field": name,
                             "detail": f"leftover template token {match.group(0)!r}"})
    return problems


@dataclass(kw_only=True)
class FormatFilterConfig(FilterConfig):
    schema: Literal["instruction", "messages", "sft"] = option(
        "sft", help="Record schema rows must fit: 'instruction' (instruction/response/metadata, the "
        "spec's format), 'messages' (chat), 'sft' (either). Rows that are not JSON objects are "
        "malformed (see --on-error); rows that are but miss the schema are removed (reason 'schema').")
    template_pattern: str = option(
        DEFAULT_TEMPLATE_PATTERN, help="Regular expression for leftover chat-template tokens; a row "
        "containing one is removed. Empty: no check.")
    check_fences: bool = option(True, help="Remove rows with a code fence (``` or ~~~) that is never closed.")

    def check(self) -> None:
        try:
            re.compile(self.template_pattern)
        except re.error as exc:
            raise ConfigError(f"FormatFilterConfig.template_pattern: not a regular expression ({exc})") from None


@stage("filter-format", FormatFilterConfig,
       help="Remove rows that miss the schema, have an empty response, an unclosed code fence or "
       "leftover template tokens.")
def run_format(config: FormatFilterConfig) -> StageResult:
    template = re.compile(config.template_pattern) if config.template_pattern else None
    problem_counts: Counter[str] = Counter()

    def decide(batch: list[tuple[int, dict]]) -> list[Verdict]:
        verdicts: list[Verdict] = []
        for _, row in batch:
            problems = format_problems(row, config.schema, template, config.check_fences)
            problem_counts.update(p["reason"] for p in problems)
            if problems:
                first = problems[0]
                verdicts.append((row, first["reason"], {"field": first["field"], "detail": first["detail"],
                                                         "problems": problems}))
            else:
                verdicts.append((row, None, {}))
        return verdicts

    def summary() -> dict:
        return {"schema": config.schema, "problems": dict(problem_counts.most_common())}

    return run_filter(config, decide, schema="any", desc="filter-format", summary=summary)


# ----------------------------------------------------------------------------- exact duplicates


def normalize(text: str) -> str:
    """Lower-cased, whitespace runs collapsed to one space, stripped."""
    return " ".join(text.lower().split())


def exact_key(row: dict, key: Literal["text", "prompt"] = "text") -> str:
    """A hash of the row's normalised prompt (and response, for ``key="text"``)."""
    prompt, response = record_parts(row)
    material = normalize(prompt) if key == "prompt" else normalize(prompt) + "\x1e" + normalize(response)
    return hashlib.blake2b(material.encode("utf-8"), digest_size=16).hexdigest()


@dataclass(kw_only=True)
class ExactDedupConfig(FilterConfig):
    key: Literal["text", "prompt"] = option(
        "text", help="What must match: 'text' = prompt and response; 'prompt' = the prompt alone "
        "(one answer per question).")


@stage("exact-dedup", ExactDedupConfig,
       help="Remove exact duplicates (case and whitespace ignored); the first copy is kept.")
def run_exact_dedup(config: ExactDedupConfig) -> StageResult:
    first: dict[str, tuple[int, Any]] = {}
    copies: Counter[str] = Counter()

    def decide(batch: list[tuple[int, dict]]) -> list[Verdict]:
        verdicts: list[Verdict] = []
        for line, row in batch:
            digest = exact_key(row, config.key)
            if digest in first:
                kept_line, kept_id = first[digest]
                copies[digest] += 1
                verdicts.append((row, "exact_duplicate", {"duplicate_of_line": kept_line,
                                                          "duplicate_of_id": kept_id, "hash": digest}))
            else:
                first[digest] = (line, row.get("id"))
                verdicts.append((row, None, {}))
        return verdicts

    def summary() -> dict:
        return {"key": config.key, "duplicate_groups": len(copies),
                "largest_group": max(copies.values(), default=0) + (1 if copies else 0)}

    return run_filter(config, decide, desc="exact-dedup", summary=summary)


__all__ = [
    "DEFAULT_TEMPLATE_PATTERN",
    "ExactDedupConfig",
    "FilterConfig",
    "FormatFilterConfig",
    "LanguageFilterConfig",
    "LanguageScore",
    "LanguageScorer",
    "LengthFilterConfig",
    "TokenCounter",
    "count_lines",
    "distribution",
    "exact_key",
    "format_problems",
    "normalize",
    "numbered_rows",
    "prose_of",
    "removal",
    "run_exact_dedup",
    "run_filter",
    "run_format",
    "run_language",
    "run_length",
    "unterminated_fence",
]
