"""``cogumi judge``: pairwise LLM-as-judge of a candidate model against a reference (phase 1B).

For every prompt of a test set the judge sees the question and two responses, labelled
"Response A" and "Response B", and rates each 1–10 on the spec's four criteria —
**correctness** (factual accuracy, valid logic), **completeness** (addresses every aspect of the
question), **clarity** (clear, well structured) and **conciseness** (efficient, no fluff). The
candidate's average over the four is compared with the reference's: a **win** when it is more
than ``margin`` (0.5) above, a **loss** when more than ``margin`` below, a **tie** otherwise;
``overall_score = (wins + 0.5 * ties) / judged * 100``, overall and per category.

Position bias: each pair is judged twice, the candidate first as A and then as B; the averages
are taken over both orders, each order's own outcome is reported, and the summary counts the
pairs whose two orders disagree and how often the judge preferred whichever response came first.

Reference answers come from the prompt file (``reference``), a reference-answers file, or a
reference model asked through the OpenAI-compatible backend; generated ones are cached in a JSONL
file keyed by (reference model, request settings, prompt), so re-validating a retrained model
never asks for them again. Verdicts are cached likewise, keyed by (judge, prompt version, request
settings, question, response shown as A, response shown as B): swapping in a retrained candidate
re-judges only the pairs whose candidate text changed, and a rerun sends nothing.

A judge reply without valid ratings is answered with the problem and the required format, up to
``format_retries`` times; still invalid, that order is recorded as invalid (with the replies).
An example with both orders invalid is ``invalid`` and left out of the score (and counted).
Failed HTTP requests are not cached: the stage stops with an error after caching what arrived.
"""

from __future__ import annotations

import json
import logging
import re
import statistics
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from cogumi.generation.cache import JSONLCache, cache_key, text_sha256
from cogumi.io import AtomicWriter, DataError, ReadReport, iter_jsonl, to_messages, write_json
from cogumi.stage import ConfigError, StageConfig, StageError, StageResult, option, stage

log = logging.getLogger(__name__)

#: (criterion, what it measures): the spec's four criteria, in its order.
CRITERIA: tuple[tuple[str, str], ...] = (
    ("correctness", "factual accuracy and validity of the logic"),
    ("completeness", "addresses every aspect of the question"),
    ("clarity", "clear explanation, well structured"),
    ("conciseness", "efficient, no filler or fluff"),
)
CRITERION_NAMES = tuple(name for name, _ in CRITERIA)
LOW, HIGH = 1, 10
#: Bumped whenever the judge prompt or the retry turn changes: it is part of every verdict key.
JUDGE_PROMPT_VERSION = "pairwise-v1"
#: Written in every verdicts.jsonl row; readers (failure extraction) check it.
VERDICTS_SCHEMA = "cogumi.verdicts/1"

SYSTEM_PROMPT = ("You are an impartial judge of answers to questions. "
                 "You reply with a JSON object and nothing else.")
REPLY_FORMAT = ('{"A": {"correctness": n, "completeness": n, "clarity": n, "conciseness": n}, '
                '"B": {"correctness": n, "completeness": n, "clarity": n, "conciseness": n}}')
USER_TEMPLATE = """Rate each of the two responses to the question below on four criteria, each a whole number from 1 (very poor) to 10 (excellent):

{criteria}

Judge each response on its own merits: their order and their length say nothing about their quality.

Reply with only this JSON object, each n a whole number from 1 to 10:
{format}

### Question
{question}

### Response A
{a}
### End of Response A

### Response B
{b}
### End of Response B"""
RETRY_TEMPLATE = """Your reply could not be used: {error}.
Reply again with only this JSON object, each n a whole number from 1 to 10:
{format}"""

ORDERS: tuple[tuple[str, str], ...] = (("candidate_first", "candidate"), ("reference_first", "reference"))
"""(order name, who is shown as Response A)."""

_CRITERION_ALIASES = {"accuracy": "correctness", "factual_accuracy": "correctness", "correct": "correctness",
                      "complete": "completeness", "clear": "clarity", "concise": "conciseness",
                      "concision": "conciseness", "brevity": "conciseness"}


class VerdictError(ValueError):
    """A judge reply that does not hold valid ratings for both responses."""


class JudgeRequestError(StageError):
    """Requests failed after the client's retries; what did arrive is cached."""


# ----------------------------------------------------------------------------- the prompt

def judge_messages(question: str, a: str, b: str) -> list[dict[str, str]]:
    """The chat that asks the judge to rate responses ``a`` and ``b`` to ``question``."""
    criteria = "\n".join(f"- {name}: {text}" for name, text in CRITERIA)
    user = USER_TEMPLATE.format(criteria=criteria, format=REPLY_FORMAT, question=question, a=a, b=b)
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def retry_turns(reply: str, error: str) -> list[dict[str, str]]:
    """The judge's unusable reply and the user turn that says what was wrong with it."""
    return [{"role": "assistant", "content": reply},
            {"role": "user", "content": RETRY_TEMPLATE.format(error=error, format=REPLY_FORMAT)}]


# ----------------------------------------------------------------------------- parsing

def _norm(key: Any) -> str:
    return re.sub(r"[^a-z0-9]+", "_", str(key).strip().lower()).strip("_")


def _side(key: Any) -> str | None:
    """``"A"`` or ``"B"`` for keys like ``A``, ``Response A``, ``response_b``, ``assistant_a``."""
    key = _norm(key)
    key = re.sub(r"^(response|assistant|answer)_?", "", key)
    return key.upper() if key in ("a", "b") else None


def _pair(obj: Any, depth: int = 0) -> dict[str, Any] | None:
    """The ``{"A": ..., "B": ...}`` part of a decoded reply (at the top or one level down)."""
    if not isinstance(obj, dict):
        return None
    sides = {}
    for key, value in obj.items():
        side = _side(key)
        if side and side not in sides:
            sides[side] = value
    if len(sides) == 2:
        return sides
    if depth == 0:
        for value in obj.values():
            found = _pair(value, 1)
            if found:
                return found
    return None


def _rating(side: str, name: str, value: Any) -> int:
    where = f"{name} of Response {side}"
    if isinstance(value, str):
        text = value.strip().split("/")[0].strip()
        try:
            value = float(text)
        except ValueError:
            raise VerdictError(f"{where}: expected a whole number from {LOW} to {HIGH}, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise VerdictError(f"{where}: expected a whole number from {LOW} to {HIGH}, got {json.dumps(value)}")
    if not float(value).is_integer():
        raise VerdictError(f"{where}: {value} is not a whole number")
    value = int(value)
    if not LOW <= value <= HIGH:
        raise VerdictError(f"{where}: {value} is outside {LOW}..{HIGH}")
    return value


def parse_verdict(reply: str) -> dict[str, dict[str, int]]:
    """The ratings in a judge's reply as ``{"A": {criterion: n}, "B": {...}}``.

    Takes the first JSON object in the reply that rates both responses (code fences and chatter
    around it are fine; keys are matched case-insensitively, ``"Response A"`` is ``"A"``, and the
    pair may be nested one level, as in ``{"ratings": {"A": ..., "B": ...}}``). Every criterion of
    both responses must be a whole number from 1 to 10; otherwise raises :class:`VerdictError`
    saying what is wrong (the message is shown to the judge when it is asked again).
    """
    decoder = json.JSONDecoder()
    found = None
    for match in re.finditer(r"\{", reply):
        try:
            obj, _ = decoder.raw_decode(reply, match.start())
        except json.JSONDecodeError:
            continue
        found = _pair(obj)
        if found is not None:
            break
    if found is None:
        snippet = " ".join(reply.split())[:80]
        if not snippet:
            raise VerdictError("the reply is empty")
        raise VerdictError(f"the reply has no JSON object with ratings for both A and B ({snippet!r})")
    ratings: dict[str, dict[str, int]] = {}
    for side in ("A", "B"):
        given = found[side]
        if not isinstance(given, dict):
            raise VerdictError(f"Response {side}: expected an object with the four criteria, got {json.dumps(given)}")
        named = {}
        for key, value in given.items():
            name = _norm(key)
            named.setdefault(_CRITERION_ALIASES.get(name, name), value)
        missing = [name for name in CRITERION_NAMES if name not in named]
        if missing:
            raise VerdictError(f"Response {side} has no {', '.join(repr(m) for m in missing)} rating")
        ratings[side] = {name: _rating(side, name, named[name]) for name in CRITERION_NAMES}
    return ratings


def mean_rating(ratings: dict[str, int]) -> float:
    return sum(ratings[name] for name in CRITERION_NAMES) / len(CRITERION_NAMES)


def outcome(candidate_avg: float, reference_avg: float, margin: float) -> str:
    """``win``, ``loss`` or ``tie`` of the candidate, by the margin."""
    if candidate_avg > reference_avg + margin:
        return "win"
    if candidate_avg < reference_avg - margin:
        return "loss"
    return "tie"


# ----------------------------------------------------------------------------- config

Provider = Literal["openai", "groq", "together", "local"]


@dataclass(kw_only=True)
class JudgeConfig(StageConfig):
    prompts: str = option(
        help="JSONL test set: each row a prompt ('prompt', 'messages' or 'instruction'), an optional 'id' "
        "(default: the row's index, as `cogumi generate` numbers them), an optional 'category' (else "
        "metadata.domain) and an optional saved 'reference' answer.", input=True, positional=True)
    answers: str = option(
        help="The candidate's answers: a completions.jsonl from `cogumi generate` (rows matched by 'id', the "
        "first completion's text) or a JSONL of 'id' + 'output' (or 'response').", input=True)
    reference_answers: str = option(
        "", help="Saved reference answers: a JSONL of 'id' + 'output' (or 'response'), or a completions.jsonl "
        "from `cogumi generate`; it wins over the prompts' 'reference' field.", input=True)
    reference_model: str = option(
        "", help="Model that answers the prompts that have no saved reference (its answers are cached).")
    reference_provider: Provider = option("local", help="OpenAI-compatible provider of the reference model.")
    reference_base_url: str = option("", help="API root of the reference model (default: the provider's).")
    reference_api_key_env: str = option(
        "", help="Environment variable holding the reference provider's API key (never the key itself).")
    reference_max_tokens: int = option(1024, help="Most tokens per reference answer (sampled greedily).")
    reference_extra_body: dict[str, Any] = option(default_factory=dict,
                                        help="Extra request fields (JSON) for the reference model.")
    reference_cache: str = option(
        "", help="JSONL cache of generated reference answers (default: reference_cache.jsonl in the output "
        "directory); share it between runs to never generate a reference answer twice.", hashed=False)
    judge_model: str = option(help="The judge: a model name the endpoint serves (e.g. gpt-4o-mini).")
    judge_provider: Provider = option("local", help="OpenAI-compatible provider of the judge; 'local' "
                                      "needs --judge-base-url.")
    judge_base_url: str = option("", help="API root of the judge, e.g. http://127.0.0.1:8000/v1 "
                                 "(default: the provider's).")
    judge_api_key_env: str = option(
        "", help="Environment variable holding the judge provider's API key (never the key itself); default: "
        "the provider's (OPENAI_API_KEY, GROQ_API_KEY, TOGETHER_API_KEY; none for local).")
    cache: str = option(
        "", help="JSONL cache of verdicts (default: judge_cache.jsonl in the output directory); share it "
        "between runs so a pair is never judged twice.", hashed=False)
    margin: float = option(0.5, help="A win (loss) needs the candidate's average rating more than this "
                           "above (below) the reference's; otherwise a tie (spec: 0.5).")
    both_orders: bool = option(True, help="Judge each pair twice, the candidate shown first and then "
                               "second, to cancel position bias.")
    max_chars: int = option(16000, help="Cut the question and each response to this many characters "
                            "before judging (0: no limit).")
    max_tokens: int = option(256, help="Most tokens per judge reply.")
    temperature: float = option(0.0, help="Judge sampling temperature (0: greedy, reproducible).")
    extra_body: dict[str, Any] = option(
        default_factory=dict, help="Extra judge request fields (JSON), e.g. {\"response_format\": "
        "{\"type\": \"json_object\"}}.")
    format_retries: int = option(2, help="Times a judge reply without valid ratings is answered with the "
                                 "problem and asked again before that verdict counts as invalid.")
    price_input_per_mtok: float = option(0.0, help="Judge price in USD per million prompt tokens "
                                         "(for the cost estimate).")
    price_output_per_mtok: float = option(0.0, help="Judge price in USD per million completion tokens.")
    reference_price_input_per_mtok: float = option(0.0, help="Reference model price in USD per million "
                                                   "prompt tokens.")
    reference_price_output_per_mtok: float = option(0.0, help="Reference model price in USD per million "
                                                    "completion tokens.")
    max_concurrency: int = option(4, help="Requests in flight at once.", hashed=False)
    timeout: float = option(120.0, help="Seconds per request attempt.", hashed=False)
    max_retries: int = option(5, help="Retries per failed request (the client's exponential backoff).",
                              hashed=False)
    progress: bool = option(True, help="Show a progress bar.", hashed=False)

    def check(self) -> None:
        def need(name: str, ok: bool, problem: str) -> None:
            if not ok:
                raise ConfigError(f"JudgeConfig.{name}: {problem}, got {getattr(self, name)!r}")

        need("judge_model", bool(self.judge_model.strip()), "must name the judge model")
        need("margin", self.margin >= 0, "must be >= 0")
        need("max_chars", self.max_chars >= 0, "must be >= 0 (0: no limit)")
        need("max_tokens", self.max_tokens >= 1, "must be >= 1")
        need("reference_max_tokens", self.reference_max_tokens >= 1, "must be >= 1")
        need("temperature", self.temperature >= 0, "must be >= 0")
        need("format_retries", self.format_retries >= 0, "must be >= 0")
        need("max_concurrency", self.max_concurrency >= 1, "must be >= 1")
        need("max_retries", self.max_retries >= 0, "must be >= 0")
        for name in ("price_input_per_mtok", "price_output_per_mtok", "reference_price_input_per_mtok",
                     "reference_price_output_per_mtok"):
            need(name, getattr(self, name) >= 0, "must be >= 0")
        if self.judge_provider == "local" and not self.judge_base_url:
            raise ConfigError("JudgeConfig.judge_base_url: judge provider 'local' needs the server's URL "
                              "(e.g. http://127.0.0.1:8000/v1)")
        if self.reference_model and self.reference_provider == "local" and not self.reference_base_url:
            raise ConfigError("JudgeConfig.reference_base_url: reference provider 'local' needs the server's "
                              "URL (e.g. http://127.0.0.1:8001/v1)")

    @property
    def judge(self) -> str:
        return f"{self.judge_provider}:{self.judge_model}"

    @property
    def reference(self) -> str | None:
        return f"{self.reference_provider}:{self.reference_model}" if self.reference_model else None

    @property
    def judge_settings(self) -> str:
        """What of a judge request, besides the texts, shapes the reply (part of the verdict key)."""
        return json.dumps({"max_tokens": self.max_tokens, "temperature": self.temperature,
                           "extra_body": self.extra_body, "max_chars": self.max_chars}, sort_keys=True)

    @property
    def reference_settings(self) -> str:
        return json.dumps({"max_tokens": self.reference_max_tokens, "temperature": 0.0,
                           "extra_body": self.reference_extra_body}, sort_keys=True)

    def cache_path(self) -> Path:
        return Path(self.cache) if self.cache else self.out("judge_cache.jsonl")

    def reference_cache_path(self) -> Path:
        return Path(self.reference_cache) if self.reference_cache else self.out("reference_cache.jsonl")

    def outputs(self) -> dict[str, Path]:
        return {"verdicts": self.out("verdicts.jsonl"), "summary": self.out("summary.json")}


# ----------------------------------------------------------------------------- reading

@dataclass
class Example:
    id: Any
    line: int
    messages: list[dict[str, str]]
    question: str
    category: str
    candidate: str = ""
    reference: str | None = None
    reference_source: str = ""


def _numbered(path: str, schema: str) -> Iterator[tuple[int, dict]]:
    report = ReadReport(path)
    for row in iter_jsonl(path, schema, report=report):
        yield report.records + report.blank_lines, row


def _question(messages: list[dict[str, str]]) -> str:
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n\n".join(f"{m['role'].upper()}: {m['content']}" for m in messages)


def read_prompts(path: str) -> list[Example]:
    examples: list[Example] = []
    seen: dict[str, int] = {}
    for index, (line, row) in enumerate(_numbered(path, "prompt")):
        for name in ("category", "reference"):
            if name in row and not isinstance(row[name], str):
                raise DataError(path, line, name, f"expected string, got {type(row[name]).__name__}")
        ident = row.get("id", index)
        if str(ident) in seen:
            raise DataError(path, line, "id", f"duplicate id {ident!r} (first on line {seen[str(ident)]})")
        seen[str(ident)] = line
        meta = row.get("metadata") if isinstance(row.get("metadata"), dict) else {}
        category = row.get("category") or meta.get("domain") or "uncategorized"
        messages = to_messages(row)
        example = Example(id=ident, line=line, messages=messages, question=_question(messages),
                          category=str(category))
        if row.get("reference") is not None:
            example.reference, example.reference_source = row["reference"], "prompts"
        examples.append(example)
    return examples


def read_answers(path: str) -> dict[str, tuple[int, str]]:
    """``{str(id): (line, text)}`` from a generate completions file or an id + output JSONL."""
    answers: dict[str, tuple[int, str]] = {}
    for line, row in _numbered(path, "any"):
        if "id" not in row:
            raise DataError(path, line, "id", "missing required field (rows are matched to prompts by id)")
        ident = row["id"]
        if isinstance(ident, bool) or not isinstance(ident, (str, int)):
            raise DataError(path, line, "id", f"expected string or integer, got {json.dumps(ident)}")
        if "completions" in row:
            completions = row["completions"]
            if not isinstance(completions, list) or not completions:
                raise DataError(path, line, "completions", "expected a non-empty list of completions")
            first = completions[0]
            text = first.get("text") if isinstance(first, dict) else None
            if not isinstance(text, str):
                raise DataError(path, line, "completions[0].text", "missing or not a string")
        else:
            name = "output" if "output" in row else "response" if "response" in row else None
            if name is None:
                raise DataError(path, line, "output", "missing: each row needs 'output' (or 'response', or "
                                "'completions' as written by cogumi generate)")
            text = row[name]
            if not isinstance(text, str):
                raise DataError(path, line, name, f"expected string, got {type(text).__name__}")
        if str(ident) in answers:
            raise DataError(path, line, "id", f"duplicate id {ident!r} (first on line {answers[str(ident)][0]})")
        answers[str(ident)] = (line, text)
    return answers


def _clip(text: str, limit: int) -> str:
    return text if not limit or len(text) <= limit else text[:limit] + "\n[... cut ...]"


# ----------------------------------------------------------------------------- requests

def _make_generator(model: str, provider: str, base_url: str, api_key_env: str, extra_body: dict,
                    config: JudgeConfig):
    from cogumi.generation import get_generator

    kwargs: dict[str, Any] = {"provider": provider, "timeout": config.timeout, "max_retries": config.max_retries,
                              "extra_body": extra_body, "max_concurrency": 1}
    if base_url:
        kwargs["base_url"] = base_url
    if api_key_env:
        kwargs["api_key_env"] = api_key_env
    return get_generator("openai", model, **kwargs)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class _Usage:
    """Requests sent and their tokens (counted from the worker threads)."""

    def __init__(self) -> None:
        self.requests = self.prompt_tokens = self.completion_tokens = 0
        self._lock = threading.Lock()

    def count(self, completion) -> None:
        with self._lock:
            self.requests += 1
            self.prompt_tokens += completion.prompt_tokens
            self.completion_tokens += completion.completion_tokens


def _run_all(tasks: dict[str, Callable[[], tuple[dict | None, Exception | None]]], *, cache: JSONLCache,
             concurrency: int, desc: str, progress: bool) -> list[str]:
    """Run ``tasks`` (key -> callable returning (entry to cache or None, failure or None)) in a
    thread pool, caching each entry as it arrives; returns the failures' messages."""
    from tqdm.auto import tqdm

    failures: list[str] = []
    if not tasks:
        return failures
    with ThreadPoolExecutor(max_workers=concurrency) as pool, \
            tqdm(total=len(tasks), desc=desc, unit="req", disable=not progress) as bar:
        pending = {pool.submit(task) for task in tasks.values()}
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    entry, failure = future.result()
                    if entry is not None:
                        cache.add([entry])
                    if failure is not None:
                        failures.append(f"{type(failure).__name__}: {failure}")
                    bar.update(1)
        except BaseException:
            for future in pending:
                future.cancel()
            raise
    return failures


def _reference_key(config: JudgeConfig, messages: list[dict]) -> str:
    prompt_sha = text_sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False))
    return cache_key(config.reference or "", config.reference_settings, prompt_sha)


def _fill_references(examples: list[Example], config: JudgeConfig, usage: _Usage) -> int:
    """Answer the examples without a saved reference with the reference model (cached);
    returns how many answers came from the cache."""
    from cogumi.generation import SamplingParams

    todo = [e for e in examples if e.reference is None]
    if not todo:
        return 0
    if not config.reference_model:
        listed = ", ".join(f"{e.id!r} ({config.prompts}:{e.line})" for e in todo[:10])
        more = f" and {len(todo) - 10} more" if len(todo) > 10 else ""
        raise ConfigError(
            f"JudgeConfig.reference_model: {len(todo)} prompt(s) have no reference answer ({listed}{more}); "
            "give them a 'reference' field, pass --reference-answers, or name a --reference-model")
    cache = JSONLCache(config.reference_cache_path())
    keys = {id(e): _reference_key(config, e.messages) for e in todo}
    missing = {keys[id(e)]: e.messages for e in todo if keys[id(e)] not in cache}
    cached = sum(1 for e in todo if keys[id(e)] not in missing)
    if missing:
        params = SamplingParams(max_tokens=config.reference_max_tokens, temperature=0.0, logprobs=False)
        generator = _make_generator(config.reference_model, config.reference_provider, config.reference_base_url,
                                    config.reference_api_key_env, config.reference_extra_body, config)

        def answer(key: str, messages: list[dict]):
            try:
                [[completion]] = generator.generate([messages], params)
            except Exception as exc:  # the client already retried; report, don't cache
                return None, exc
            usage.count(completion)
            return {"key": key, "model": config.reference, "settings": config.reference_settings,
                    "prompt_sha256": text_sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False)),
                    "text": completion.text, "finish_reason": completion.finish_reason,
                    "prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
                    "at": _now()}, None

        try:
            failures = _run_all({key: (lambda k=key, m=messages: answer(k, m)) for key, messages in missing.items()},
                                cache=cache, concurrency=config.max_concurrency, desc="reference answers",
                                progress=config.progress)
        finally:
            generator.close()
        if failures:
            raise JudgeRequestError(
                f"judge: {len(failures)} of {len(missing)} reference-model requests failed ({failures[0]}); the "
                f"answers received so far are cached in {cache.path}: run again to retry the rest")
    for e in todo:
        e.reference, e.reference_source = cache.get(keys[id(e)])["text"], "reference_model"
    return cached


def _verdict_key(config: JudgeConfig, question: str, a: str, b: str) -> str:
    return cache_key(config.judge, JUDGE_PROMPT_VERSION, config.judge_settings, text_sha256(question),
                     text_sha256(a), text_sha256(b))


def _read_verdict(entry: dict) -> tuple[dict | None, str | None]:
    """(ratings, None) or (None, error) from a cached entry's last reply."""
    replies = entry.get("replies") or []
    if not replies:
        return None, "no reply"
    try:
        return parse_verdict(replies[-1]), None
    except VerdictError as exc:
        return None, str(exc)


# ----------------------------------------------------------------------------- the stage

def _rates(tally: Counter) -> dict[str, Any]:
    judged = tally["win"] + tally["loss"] + tally["tie"]

    def rate(n: int) -> float | None:
        return round(n / judged, 4) if judged else None

    return {"wins": tally["win"], "losses": tally["loss"], "ties": tally["tie"], "invalid": tally["invalid"],
            "total": judged + tally["invalid"], "judged": judged, "win_rate": rate(tally["win"]),
            "loss_rate": rate(tally["loss"]), "tie_rate": rate(tally["tie"]),
            "overall_score": round((tally["win"] + 0.5 * tally["tie"]) / judged * 100, 2) if judged else None}


def _cost(prompt_tokens: int, completion_tokens: int, price_in: float, price_out: float) -> float:
    return round((prompt_tokens * price_in + completion_tokens * price_out) / 1e6, 6)


@stage("judge", JudgeConfig,
       help="Pairwise LLM judge: rate a candidate's answers against reference answers 1-10 on correctness, "
       "completeness, clarity and conciseness, in both orders; win/loss/tie by a margin and an overall "
       "score; reference answers and verdicts are cached.")
def run(config: JudgeConfig) -> StageResult:
    from cogumi.generation import SamplingParams

    outputs = config.outputs()
    examples = read_prompts(config.prompts)
    answers = read_answers(config.answers)
    absent = [e for e in examples if str(e.id) not in answers]
    if absent:
        listed = ", ".join(f"{e.id!r} ({config.prompts}:{e.line})" for e in absent[:10])
        more = f" and {len(absent) - 10} more" if len(absent) > 10 else ""
        raise DataError(config.answers, None, "id",
                        f"no answer for {len(absent)} prompt id(s): {listed}{more}")
    unused = len(set(answers) - {str(e.id) for e in examples})
    if unused:
        log.warning("judge: %d answers in %s match no prompt in %s", unused, config.answers, config.prompts)
    for e in examples:
        e.candidate = answers[str(e.id)][1]
    if config.reference_answers:
        saved = read_answers(config.reference_answers)
        for e in examples:
            if str(e.id) in saved:
                e.reference, e.reference_source = saved[str(e.id)][1], "reference_answers"

    reference_usage = _Usage()
    reference_cached = _fill_references(examples, config, reference_usage)

    # Which orders to ask about, and which of them the cache already holds.
    cache = JSONLCache(config.cache_path())
    orders = ORDERS if config.both_orders else ORDERS[:1]
    shown: list[list[tuple[str, str, str, list[dict]]]] = []  # per example, per order: key, A, B, messages
    for e in examples:
        question = _clip(e.question, config.max_chars)
        candidate, reference = _clip(e.candidate, config.max_chars), _clip(e.reference or "", config.max_chars)
        per_order = []
        for _, first in orders:
            a, b = (candidate, reference) if first == "candidate" else (reference, candidate)
            per_order.append((_verdict_key(config, question, a, b), a, b, judge_messages(question, a, b)))
        shown.append(per_order)
    attempts_allowed = 1 + config.format_retries
    todo: dict[str, list[dict]] = {}
    for per_order in shown:
        for key, _, _, messages in per_order:
            entry = cache.get(key)
            if entry is None or (_read_verdict(entry)[0] is None and len(entry.get("replies", [])) < attempts_allowed):
                todo.setdefault(key, messages)
    judge_usage = _Usage()
    fresh_keys = set(todo)
    if todo:
        params = SamplingParams(max_tokens=config.max_tokens, temperature=config.temperature, logprobs=False)
        judge = _make_generator(config.judge_model, config.judge_provider, config.judge_base_url,
                                config.judge_api_key_env, config.extra_body, config)

        def converse(key: str, messages: list[dict]):
            """Ask, and ask again while the reply is unusable; resumes a cached conversation."""
            prior = cache.get(key) or {}
            replies, errors = list(prior.get("replies", [])), list(prior.get("errors", []))
            prompt_tokens, completion_tokens = prior.get("prompt_tokens", 0), prior.get("completion_tokens", 0)
            chat = list(messages)
            for reply, error in zip(replies, errors):
                chat += retry_turns(reply, error or "")
            failure = None
            while len(replies) < attempts_allowed:
                try:
                    [[completion]] = judge.generate([chat], params)
                except Exception as exc:  # the client already retried; keep what arrived, report
                    failure = exc
                    break
                judge_usage.count(completion)
                prompt_tokens += completion.prompt_tokens
                completion_tokens += completion.completion_tokens
                replies.append(completion.text)
                try:
                    parse_verdict(completion.text)
                except VerdictError as exc:
                    errors.append(str(exc))
                    chat += retry_turns(completion.text, str(exc))
                    continue
                errors.append(None)
                break
            if not replies or (failure is not None and len(replies) == len(prior.get("replies", []))):
                return None, failure
            return {"key": key, "judge": config.judge, "version": JUDGE_PROMPT_VERSION,
                    "settings": config.judge_settings, "replies": replies, "errors": errors,
                    "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "at": _now()}, failure

        try:
            failures = _run_all({key: (lambda k=key, m=messages: converse(k, m)) for key, messages in todo.items()},
                                cache=cache, concurrency=config.max_concurrency, desc="judge",
                                progress=config.progress)
        finally:
            judge.close()
        if failures:
            raise JudgeRequestError(
                f"judge: {len(failures)} of {len(todo)} judge conversations failed ({failures[0]}); the replies "
                f"received so far are cached in {cache.path}: run again to retry the rest")

    # Verdicts.
    overall: Counter[str] = Counter()
    by_category: dict[str, Counter[str]] = defaultdict(Counter)
    criteria: dict[str, dict[str, list[int]]] = {who: {n: [] for n in CRITERION_NAMES}
                                                 for who in ("candidate", "reference")}
    disagreements = both_valid = position_a = position_b = format_retried = invalid_orders = 0
    judge_cached = 0
    all_tokens = [0, 0]
    with AtomicWriter(outputs["verdicts"]) as sink:
        for e, per_order in zip(examples, shown):
            order_records = []
            sums = {"candidate": [], "reference": []}
            for (name, first), (key, _, _, _) in zip(orders, per_order):
                entry = cache.get(key)
                judge_cached += key not in fresh_keys
                all_tokens[0] += entry.get("prompt_tokens", 0)
                all_tokens[1] += entry.get("completion_tokens", 0)
                ratings, error = _read_verdict(entry)
                attempts = len(entry.get("replies", []))
                format_retried += attempts > 1
                record: dict[str, Any] = {"order": name, "A": first,
                                          "B": "reference" if first == "candidate" else "candidate",
                                          "valid": ratings is not None, "ratings": ratings, "error": error,
                                          "reply": (entry.get("replies") or [""])[-1], "attempts": attempts}
                if ratings is None:
                    invalid_orders += 1
                else:
                    a_avg, b_avg = mean_rating(ratings["A"]), mean_rating(ratings["B"])
                    mine = ratings["A"] if first == "candidate" else ratings["B"]
                    theirs = ratings["B"] if first == "candidate" else ratings["A"]
                    for who, given in (("candidate", mine), ("reference", theirs)):
                        sums[who].append(mean_rating(given))
                        for n in CRITERION_NAMES:
                            criteria[who][n].append(given[n])
                    record.update(candidate_avg=mean_rating(mine), reference_avg=mean_rating(theirs),
                                  outcome=outcome(mean_rating(mine), mean_rating(theirs), config.margin))
                    preferred = outcome(a_avg, b_avg, config.margin)
                    position_a += preferred == "win"
                    position_b += preferred == "loss"
                order_records.append(record)
            valid = [r for r in order_records if r["valid"]]
            row: dict[str, Any] = {"schema": VERDICTS_SCHEMA, "id": e.id, "category": e.category, "prompt": e.question,
                                   "candidate": e.candidate, "reference": e.reference,
                                   "reference_source": e.reference_source, "orders": order_records,
                                   "orders_valid": len(valid)}
            if valid:
                candidate_avg = statistics.fmean(sums["candidate"])
                reference_avg = statistics.fmean(sums["reference"])
                verdict = outcome(candidate_avg, reference_avg, config.margin)
                row.update(candidate_avg=round(candidate_avg, 4), reference_avg=round(reference_avg, 4))
            else:
                verdict = "invalid"
                row.update(candidate_avg=None, reference_avg=None)
            disagree = len(valid) == 2 and valid[0]["outcome"] != valid[1]["outcome"]
            both_valid += len(valid) == 2
            disagreements += disagree
            row.update(outcome=verdict, disagreement=disagree)
            overall[verdict] += 1
            by_category[e.category][verdict] += 1
            sink.write(json.dumps(row, ensure_ascii=False) + "\n")

    rates = _rates(overall)
    decisive = position_a + position_b
    judge_cost = _cost(judge_usage.prompt_tokens, judge_usage.completion_tokens, config.price_input_per_mtok,
                       config.price_output_per_mtok)
    reference_cost = _cost(reference_usage.prompt_tokens, reference_usage.completion_tokens,
                           config.reference_price_input_per_mtok, config.reference_price_output_per_mtok)
    sources = Counter(e.reference_source for e in examples)
    summary = {
        **rates,
        "judge": config.judge, "reference": config.reference, "prompt_version": JUDGE_PROMPT_VERSION,
        "margin": config.margin, "both_orders": config.both_orders,
        "by_category": {name: _rates(tally) for name, tally in sorted(by_category.items())},
        "order_disagreements": disagreements,
        "order_disagreement_rate": round(disagreements / both_valid, 4) if both_valid else None,
        "pairs_with_both_orders_valid": both_valid,
        "position_a_preferred": position_a, "position_b_preferred": position_b,
        "position_a_preference": round(position_a / decisive, 4) if decisive else None,
        "invalid_orders": invalid_orders, "orders_retried_for_format": format_retried,
        "criteria_mean": {who: {n: round(statistics.fmean(v), 3) if v else None for n, v in by.items()}
                          for who, by in criteria.items()},
        "reference_sources": {name: sources[name] for name in ("prompts", "reference_answers", "reference_model")},
        "usage": {
            "judge": {"requests": judge_usage.requests, "verdicts_cached": judge_cached,
                      "verdicts_new": sum(len(per_order) for per_order in shown) - judge_cached,
                      "prompt_tokens": judge_usage.prompt_tokens,
                      "completion_tokens": judge_usage.completion_tokens, "cost_usd": judge_cost},
            "reference": {"requests": reference_usage.requests, "answers_cached": reference_cached,
                          "prompt_tokens": reference_usage.prompt_tokens,
                          "completion_tokens": reference_usage.completion_tokens, "cost_usd": reference_cost},
            "cost_usd": round(judge_cost + reference_cost, 6),
            "judge_cost_usd_without_cache": _cost(*all_tokens, config.price_input_per_mtok,
                                                  config.price_output_per_mtok),
        },
        "prompts": config.prompts, "answers": config.answers, "unused_answers": unused,
        "cache": str(cache.path),
    }
    write_json(outputs["summary"], summary)
    counts = {"total": rates["total"], "wins": rates["wins"], "losses": rates["losses"], "ties": rates["ties"],
              "invalid": rates["invalid"]}
    metrics = {"overall_score": rates["overall_score"], "win_rate": rates["win_rate"],
               "loss_rate": rates["loss_rate"], "tie_rate": rates["tie_rate"],
               "order_disagreements": disagreements, "position_a_preference": summary["position_a_preference"],
               "judge_requests": judge_usage.requests, "judge_cached": judge_cached,
               "reference_requests": reference_usage.requests, "reference_cached": reference_cached,
               "prompt_tokens": judge_usage.prompt_tokens + reference_usage.prompt_tokens,
               "completion_tokens": judge_usage.completion_tokens + reference_usage.completion_tokens,
               "cost_usd": summary["usage"]["cost_usd"], "judge": config.judge, "reference": config.reference}
    return StageResult(counts=counts, metrics=metrics)


__all__ = ["CRITERIA", "JUDGE_PROMPT_VERSION", "VERDICTS_SCHEMA", "JudgeConfig", "JudgeRequestError", "VerdictError",
           "judge_messages", "mean_rating", "outcome", "parse_verdict", "read_answers", "read_prompts",
           "retry_turns", "run"]
