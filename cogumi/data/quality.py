"""``cogumi quality``: score rows with an LLM judge on the spec's rubric; keep the good ones.

The rubric (spec, phase 0): factual **accuracy** 0–3, **completeness** 0–2, **coherence** 0–2,
**helpfulness** 0–3; the total (0–10) must be at least ``min_score`` (7) to keep a row. The judge
is any OpenAI-compatible endpoint (OpenAI, Groq, Together, or a local vLLM / llama.cpp server)
through :mod:`cogumi.generation.openai_http`; the API key is read from the environment variable
the config names and never written anywhere.

Every reply is cached in a JSONL file keyed by (judge, rubric version, request settings, hash
of the row's text), appended batch by batch, so a rerun — after a crash, with another
threshold, on a file that gained rows, in another output directory sharing the cache — asks
the judge only about rows it has not seen. The request settings (``max_tokens``,
``temperature``, ``extra_body``) are in the key because they change the reply: forcing JSON
output after a run whose replies did not parse must ask again. Replies are cached whether or not
they parse (the judge gave its answer; asking again at temperature 0 gives the same one);
delete the cache to ask again. Failed *requests* are not cached: the stage stops with an error
after caching what did arrive, and the next run retries just those.

Outputs: ``kept.jsonl`` (total >= min_score; ``metadata.quality_score`` and
``metadata.quality`` with the parts), ``removed.jsonl`` (reason ``low_quality`` with the
scores), ``unscored.jsonl`` (replies that could not be parsed: the error and the reply, the row
untouched — nothing is dropped silently), ``rejected.jsonl`` and ``report.json``;
``in = kept + removed + unscored + rejected``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from cogumi.data.filters import batched, count_lines, numbered_rows, removal
from cogumi.generation.cache import JSONLCache, cache_key
from cogumi.io import AtomicWriter, OnError, ReadReport, record_parts, write_json
from cogumi.stage import ConfigError, StageConfig, StageError, StageResult, option, stage

log = logging.getLogger(__name__)

#: (name, maximum points, what it measures): the spec's rubric, in its order.
RUBRIC: tuple[tuple[str, int, str], ...] = (
    ("accuracy", 3, "factual and technical correctness: 3 fully correct, 2 minor slips, 1 significant "
                    "errors, 0 wrong or misleading"),
    ("completeness", 2, "2 addresses every part of the instruction, 1 only partly, 0 misses the point"),
    ("coherence", 2, "2 clear, well organised and consistent, 1 understandable but disorganised, "
                     "0 incoherent"),
    ("helpfulness", 3, "how much the response helps the person who asked: 3 very, 2 fairly, 1 a little, "
                       "0 not at all"),
)
#: Bumped whenever the rubric or the judge prompt changes: it is part of every cache key.
RUBRIC_VERSION = "spec-rubric-v1"
MAX_SCORE = sum(points for _, points, _ in RUBRIC)

SYSTEM_PROMPT = "You grade examples for instruction tuning. You reply with a JSON object and nothing else."
USER_TEMPLATE = """Grade the RESPONSE to the INSTRUCTION below on this rubric:

{rubric}

Reply with only this JSON object, using whole numbers:
{{"accuracy": <0-3>, "completeness": <0-2>, "coherence": <0-2>, "helpfulness": <0-3>}}

### INSTRUCTION
{prompt}

### RESPONSE
{response}"""

_KEY_ALIASES = {"factual_accuracy": "accuracy", "correctness": "accuracy", "clarity": "coherence"}
_OBJECT = re.compile(r"\{[^{}]*\}", re.S)


class ScoreError(ValueError):
    """A judge reply that does not hold valid rubric scores."""


def judge_messages(prompt: str, response: str) -> list[dict[str, str]]:
    rubric = "\n".join(f"- {name} (0-{points}): {text}" for name, points, text in RUBRIC)
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": USER_TEMPLATE.format(rubric=rubric, prompt=prompt, response=response)}]


def _number(name: str, value: Any) -> float | int:
    if isinstance(value, bool):
        raise ScoreError(f"{name}: expected a number, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value.strip().split("/")[0])
        except ValueError:
            raise ScoreError(f"{name}: expected a number, got {value!r}") from None
    if not isinstance(value, (int, float)):
        raise ScoreError(f"{name}: expected a number, got {type(value).__name__}")
    return int(value) if float(value).is_integer() else float(value)


def parse_scores(reply: str) -> dict[str, float | int]:
    """The rubric scores in a judge's reply; raises :class:`ScoreError` saying what is wrong.

    Takes the first JSON object in the reply that names a rubric criterion (code fences and
    chatter around it are fine; keys are matched case-insensitively); failing that, looks for
    ``accuracy: 3`` style text with all four criteria. Every criterion must be present and in
    range.
    """
    found: dict[str, Any] | None = None
    for match in _OBJECT.finditer(reply):
        try:
            obj = json.loads(match.group(0))
        except json.JSONDecodeError:
            continue
        if not isinstance(obj, dict):
            continue
        obj = {_KEY_ALIASES.get(k, k): v for k, v in
               ((re.sub(r"[\s-]+", "_", str(k).strip().lower()), v) for k, v in obj.items())}
        if any(name in obj for name, _, _ in RUBRIC):
            found = obj
            break
    if found is None:
        loose = {name: re.search(rf"\b{name}\b\W{{0,12}}(\d+(?:\.\d+)?)", reply, re.I) for name, _, _ in RUBRIC}
        if all(loose.values()):
            found = {name: m.group(1) for name, m in loose.items()}
    if found is None:
        snippet = " ".join(reply.split())[:80]
        raise ScoreError(f"no JSON object with rubric scores in the reply ({snippet!r})" if snippet
                         else "the reply is empty")
    scores: dict[str, float | int] = {}
    for name, points, _ in RUBRIC:
        if name not in found:
            raise ScoreError(f"the reply has no '{name}' score")
        value = _number(name, found[name])
        if not 0 <= value <= points:
            raise ScoreError(f"{name}: {value} is outside 0..{points}")
        scores[name] = value
    return scores


def total(scores: dict[str, float | int]) -> float | int:
    value = sum(scores.values())
    return int(value) if float(value).is_integer() else round(float(value), 2)


class ScoreCache(JSONLCache):
    """Judge replies by key, in an append-only JSONL file (a torn last line is ignored)."""

    @staticmethod
    def key(judge: str, settings: str, text_sha256: str) -> str:
        """The cache key of one row's judgement: judge, rubric version, request settings, text."""
        return cache_key(judge, RUBRIC_VERSION, settings, text_sha256)


class JudgeRequestError(StageError):
    """Judge requests failed after the client's retries; what did arrive is cached."""


@dataclass(kw_only=True)
class QualityConfig(StageConfig):
    input: str = option(help="JSONL file of training rows (instruction/response or messages).",
                        input=True, positional=True)
    model: str = option(help="The judge: a model name the endpoint serves (e.g. gpt-4o-mini).")
    provider: Literal["openai", "groq", "together", "local"] = option(
        "local", help="OpenAI-compatible provider of the judge; 'local' needs --base-url.")
    base_url: str = option("", help="API root, e.g. http://127.0.0.1:8000/v1 (default: the provider's).")
    api_key_env: str = option(
        "", help="Name of the environment variable holding the API key (never the key itself); default: "
        "the provider's (OPENAI_API_KEY, GROQ_API_KEY, TOGETHER_API_KEY; none for local).")
    min_score: float = option(7.0, help="Keep rows whose total score (0-10) is at least this (spec: 7).")
    cache: str = option(
        "", help="JSONL file of cached judge replies (default: quality_cache.jsonl in the output directory). "
        "Share one between runs to never pay twice for a row.", hashed=False)
    max_chars: int = option(16000, help="Cut the instruction and the response to this many characters "
                            "each before judging (0: no limit).")
    max_tokens: int = option(128, help="Most tokens the judge may reply with.")
    temperature: float = option(0.0, help="Judge sampling temperature (0: greedy, reproducible).")
    extra_body: dict[str, Any] = option(
        default_factory=dict, help="Extra request fields (JSON), e.g. {\"response_format\": {\"type\": "
        "\"json_object\"}} to force JSON on servers that support it.")
    on_error: OnError = option("raise", help="Malformed lines: 'raise' stops with file:line:field; 'skip' "
                               "writes them to rejected.jsonl and goes on.")
    batch_size: int = option(32, help="Rows per batch (the cache is written after each).", hashed=False)
    max_concurrency: int = option(4, help="Judge requests in flight at once.", hashed=False)
    timeout: float = option(120.0, help="Seconds per request attempt.", hashed=False)
    max_retries: int = option(5, help="Retries per request (the client's exponential backoff).", hashed=False)
    progress: bool = option(True, help="Show a progress bar.", hashed=False)

    def check(self) -> None:
        def need(name: str, ok: bool, problem: str) -> None:
            if not ok:
                raise ConfigError(f"QualityConfig.{name}: {problem}, got {getattr(self, name)!r}")

        need("model", bool(self.model.strip()), "must name the judge model")
        need("min_score", 0 <= self.min_score <= MAX_SCORE, f"must be within 0..{MAX_SCORE}")
        need("max_chars", self.max_chars >= 0, "must be >= 0 (0: no limit)")
        need("max_tokens", self.max_tokens >= 1, "must be >= 1")
        need("temperature", self.temperature >= 0, "must be >= 0")
        need("batch_size", self.batch_size >= 1, "must be >= 1")
        need("max_concurrency", self.max_concurrency >= 1, "must be >= 1")
        if self.provider == "local" and not self.base_url:
            raise ConfigError("QualityConfig.base_url: provider 'local' needs the server's URL "
                              "(e.g. http://127.0.0.1:8000/v1)")

    @property
    def judge(self) -> str:
        return f"{self.provider}:{self.model}"

    @property
    def request_settings(self) -> str:
        """What of the request, besides the row, shapes the judge's reply (part of the cache key)."""
        return json.dumps({"max_tokens": self.max_tokens, "temperature": self.temperature,
                           "extra_body": self.extra_body}, sort_keys=True)

    def cache_path(self) -> Path:
        return Path(self.cache) if self.cache else self.out("quality_cache.jsonl")

    def outputs(self) -> dict[str, Path]:
        return {"kept": self.out("kept.jsonl"), "removed": self.out("removed.jsonl"),
                "unscored": self.out("unscored.jsonl"), "rejected": self.out("rejected.jsonl"),
                "report": self.out("report.json")}


def _clip(text: str, limit: int) -> str:
    return text if not limit or len(text) <= limit else text[:limit] + "\n[... cut ...]"


def _make_judge(config: QualityConfig):
    from cogumi.generation import get_generator

    kwargs: dict[str, Any] = {"provider": config.provider, "timeout": config.timeout,
                              "max_retries": config.max_retries, "extra_body": config.extra_body}
    if config.base_url:
        kwargs["base_url"] = config.base_url
    if config.api_key_env:
        kwargs["api_key_env"] = config.api_key_env
    return get_generator("openai", config.model, **kwargs)


def _with_scores(row: dict, scores: dict, value: float | int, judge: str) -> dict:
    meta = dict(row.get("metadata") or {})
    meta["quality_score"] = value
    meta["quality"] = {**scores, "judge": judge, "rubric": RUBRIC_VERSION}
    return {**row, "metadata": meta}


@stage("quality", QualityConfig,
       help="Score rows with an LLM judge (accuracy, completeness, coherence, helpfulness; 0-10) and keep "
       "those scoring >= min-score; replies are cached.")
def run(config: QualityConfig) -> StageResult:
    from tqdm.auto import tqdm

    from cogumi.generation import SamplingParams

    outputs = config.outputs()
    cache = ScoreCache(config.cache_path())
    params = SamplingParams(max_tokens=config.max_tokens, temperature=config.temperature, logprobs=False)
    report = ReadReport(config.input)
    rows = numbered_rows(config.input, "sft", on_error=config.on_error, rejects_path=outputs["rejected"],
                         report=report)
    judge = None
    pool = None
    tally: Counter[str] = Counter()
    totals: list[float] = []
    parts: dict[str, list[float]] = {name: [] for name, _, _ in RUBRIC}
    errors: Counter[str] = Counter()

    def ask(messages: list[dict]) -> str:
        return judge.generate([messages], params)[0][0].text

    try:
        with AtomicWriter(outputs["kept"]) as kept_out, AtomicWriter(outputs["removed"]) as removed_out, \
                AtomicWriter(outputs["unscored"]) as unscored_out, \
                tqdm(total=count_lines(config.input) if config.progress else None, desc="quality", unit="row",
                     disable=not config.progress) as bar:
            for batch in batched(rows, config.batch_size):
                keyed = []
                missing: dict[str, list[dict]] = {}
                for line, row in batch:
                    prompt, response = (_clip(part, config.max_chars) for part in record_parts(row))
                    text_sha = hashlib.sha256(f"{prompt}\x1e{response}".encode()).hexdigest()
                    key = ScoreCache.key(config.judge, config.request_settings, text_sha)
                    keyed.append((line, row, key, text_sha))
                    if cache.get(key) is None and key not in missing:
                        missing[key] = judge_messages(prompt, response)
                if missing:
                    if judge is None:
                        judge = _make_judge(config)
                        pool = ThreadPoolExecutor(max_workers=config.max_concurrency)
                    futures = {key: pool.submit(ask, messages) for key, messages in missing.items()}
                    fresh, failures = [], []
                    shas = {key: sha for _, _, key, sha in keyed}
                    for key, future in futures.items():
                        try:
                            reply = future.result()
                        except Exception as exc:  # the client already retried; report, don't cache
                            failures.append(f"{type(exc).__name__}: {exc}")
                            continue
                        try:
                            scores, error = parse_scores(reply), None
                        except ScoreError as exc:
                            scores, error = None, str(exc)
                        fresh.append({"key": key, "judge": config.judge, "rubric": RUBRIC_VERSION,
                                      "settings": config.request_settings, "text_sha256": shas[key], "reply": reply, "scores": scores, "error": error,
                                      "at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
                    cache.add(fresh)
                    tally["requests"] += len(fresh) + len(failures)
                    if failures:
                        raise JudgeRequestError(
                            f"quality: {len(failures)} of {len(futures)} judge requests failed ({failures[0]}); "
                            f"the {len(cache.entries)} replies received so far are cached in {cache.path}: "
                            "run again to retry the rest")
                for line, row, key, _ in keyed:
                    reply = cache.get(key)["reply"]
                    if key not in missing:
                        tally["cached"] += 1
                    try:
                        scores = parse_scores(reply)
                    except ScoreError as exc:
                        errors[str(exc).split(" (")[0]] += 1
                        tally["unscored"] += 1
                        unscored_out.write(json.dumps({"line": line, "id": row.get("id"), "error": str(exc),
                                                       "reply": reply, "row": row}, ensure_ascii=False) + "\n")
                        continue
                    value = total(scores)
                    totals.append(value)
                    for name, score in scores.items():
                        parts[name].append(score)
                    if value >= config.min_score:
                        tally["kept"] += 1
                        kept_out.write(json.dumps(_with_scores(row, scores, value, config.judge),
                                                  ensure_ascii=False) + "\n")
                    else:
                        tally["removed"] += 1
                        removed_out.write(json.dumps(removal(line, row, "low_quality", quality_score=value,
                                                             scores=scores), ensure_ascii=False) + "\n")
                bar.update(len(batch))
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if judge is not None:
            judge.close()
    if report.rejected == 0:
        AtomicWriter(outputs["rejected"]).close()

    counts = {"in": report.lines, "kept": tally["kept"], "removed": tally["removed"],
              "unscored": tally["unscored"], "rejected": report.rejected}
    assert counts["in"] == counts["kept"] + counts["removed"] + counts["unscored"] + counts["rejected"], counts
    histogram = Counter(int(v) for v in totals)
    metrics = {
        "judge": config.judge, "rubric": RUBRIC_VERSION, "min_score": config.min_score,
        "requests": tally["requests"], "cached": tally["cached"],
        "mean_score": round(sum(totals) / len(totals), 3) if totals else None,
        "mean_by_criterion": {k: round(sum(v) / len(v), 3) if v else None for k, v in parts.items()},
        "score_histogram": {str(k): histogram[k] for k in range(MAX_SCORE + 1)},
        "unscored_errors": dict(errors.most_common()),
    }
    write_json(outputs["report"], {**counts, **metrics, "input": config.input, "cache": str(cache.path),
                                   "empty_input": report.lines == 0, "errors": report.errors[:100]})
    return StageResult(counts=counts, metrics=metrics)


__all__ = ["MAX_SCORE", "RUBRIC", "RUBRIC_VERSION", "JudgeRequestError", "QualityConfig", "ScoreCache",
           "ScoreError", "judge_messages", "parse_scores", "run", "total"]
