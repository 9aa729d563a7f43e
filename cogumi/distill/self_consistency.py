"""``cogumi distill self-consistency``: category-specific self-consistency distillation (phase 1C).

The spec's ``CATEGORY_SETTINGS`` decides, per category, how a teacher's answers become training
data without poisoning it:

* **verify** (math, code, knowledge; greedy): one answer per problem, kept only when it matches
  the ground truth — the final number for math, the tests passing in the evaluation sandbox for
  code, the gold answer appearing in the reply for knowledge. A problem with no ground truth in
  such a category is skipped and counted, never kept unverified.
* **vote** (reasoning, instruction; sampled): ``samples`` answers (10) from one batched call,
  final answers extracted, and the majority kept only when at least ``min_agreement`` (60%) of
  the samples reach it — and, when the problem has a ground truth, only when the majority
  matches it. The longest solution reaching the majority answer is the one kept. The agreement
  rate is recorded per problem: it becomes a router label later.
* **diverse** (creativity; temperature 0.7): ``samples`` answers, of which up to ``keep`` (3)
  mutually different ones are kept; near-copies (MinHash Jaccard similarity at or above
  ``max_similarity``) are dropped.

Every problem gets a record (samples, answers, agreement, kept or why not) in
``problems.jsonl``; the kept solutions go to ``train.jsonl`` as instruction/output rows.
:func:`distill_batch` is the engine; the teacher cascade (:mod:`cogumi.distill.cascade`) runs it
tier after tier.
"""

from __future__ import annotations

import copy
import json
import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cogumi.evaluate import parsing
from cogumi.io import AtomicWriter, DataError, PartialRecords, to_messages, write_json
from cogumi.stage import ConfigError, StageConfig, StageResult, option, stage

Strategy = Literal["verify", "vote", "diverse"]

#: The spec's CATEGORY_SETTINGS (seeds/003, phase 1C) with the rule each category follows.
#: ``temperature`` is the spec's ``generate_temp``; ``train_temperature`` its ``train_temp``
#: (recorded in the training rows' metadata for the trainer).
CATEGORY_SETTINGS: dict[str, dict[str, Any]] = {
    "math": {"strategy": "verify", "temperature": 0.0, "samples": 1, "train_temperature": 0.0,
             "answer": "number", "rationale": "Math needs exact answers"},
    "code": {"strategy": "verify", "temperature": 0.0, "samples": 1, "train_temperature": 0.0,
             "answer": "code", "rationale": "Code must be correct"},
    "reasoning": {"strategy": "vote", "temperature": 0.1, "samples": 10, "train_temperature": 0.0,
                  "answer": "text", "rationale": "Slight exploration, train deterministically"},
    "creativity": {"strategy": "diverse", "temperature": 0.7, "samples": 10, "train_temperature": 0.3,
                   "answer": "text", "rationale": "Generate creative, train patterns consistently"},
    "knowledge": {"strategy": "verify", "temperature": 0.0, "samples": 1, "train_temperature": 0.0,
                  "answer": "text", "rationale": "Factual precision"},
    "instruction": {"strategy": "vote", "temperature": 0.2, "samples": 10, "train_temperature": 0.0,
                    "answer": "text", "rationale": "Precise with slight variation"},
}
#: Other names for the categories (the data's ``domain`` field uses some of these).
CATEGORY_ALIASES = {"creative": "creativity", "instruction_following": "instruction", "automation": "instruction",
                    "science": "knowledge", "factual": "knowledge", "conversation": "instruction"}


@dataclass(frozen=True)
class CategoryRule:
    """How one category's answers are produced and filtered."""

    strategy: Strategy
    temperature: float
    samples: int
    train_temperature: float = 0.0
    answer: Literal["number", "code", "text"] = "text"
    rationale: str = ""

    def __post_init__(self) -> None:
        if self.strategy not in ("verify", "vote", "diverse"):
            raise ValueError(f"strategy must be verify, vote or diverse, got {self.strategy!r}")
        if self.samples < 1 or self.temperature < 0:
            raise ValueError(f"samples must be >= 1 and temperature >= 0, got {self.samples}, {self.temperature}")
        if self.samples > 1 and self.temperature == 0:
            raise ValueError("several samples need a temperature > 0 (greedy gives identical samples)")


def build_rules(overrides: dict[str, dict] | None = None) -> dict[str, CategoryRule]:
    """The spec's table with ``overrides`` (per category, any subset of the fields) applied."""
    table = copy.deepcopy(CATEGORY_SETTINGS)
    for name, fields in (overrides or {}).items():
        if not isinstance(fields, dict):
            raise ConfigError(f"categories.{name}: expected a mapping of settings, got {fields!r}")
        table.setdefault(name, {"strategy": "vote", "temperature": 0.2, "samples": 10})
        table[name].update(fields)
    rules = {}
    for name, fields in table.items():
        try:
            rules[name] = CategoryRule(**fields)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"categories.{name}: {exc}") from None
    return rules


@dataclass
class Problem:
    """One prompt to distill, with whatever ground truth it has."""

    id: str
    prompt: Any
    """Chat messages (sent through the teacher's chat template)."""
    category: str
    answer: str | None = None
    """Ground truth: the final number (math), the gold answer (knowledge, reasoning)."""
    code: dict = field(default_factory=dict)
    """Code ground truth: ``tests`` (assert lines) or ``test`` + ``entry_point`` (HumanEval style),
    optional ``setup`` and the function ``prompt`` a completion continues."""

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[-1]["content"]


def load_problems(path: str | Path, rules: dict[str, CategoryRule], default_category: str = "") -> list[Problem]:
    """Problems from JSONL (``prompt``/``instruction``/``messages``, ``category`` or
    ``metadata.domain``, ground truth in ``answer``, ``tests``/``test``+``entry_point``)."""
    from cogumi.evaluate.benchmarks import read_rows

    problems, seen = [], {}
    for index, (line, row) in enumerate(read_rows(path, ())):
        try:
            messages = to_messages(row)
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(path, line, "prompt", f"no prompt ('prompt', 'instruction' or 'messages'): {exc}") from None
        category = str(row.get("category") or (row.get("metadata") or {}).get("domain") or default_category)
        category = CATEGORY_ALIASES.get(category, category)
        if category not in rules:
            raise DataError(path, line, "category", f"{category!r} is not one of {', '.join(rules)} "
                            "(add it with --categories, or set --default-category)" if category else
                            "missing (set 'category' or metadata.domain, or --default-category)")
        ident = str(row.get("id", row.get("task_id", index)))
        if ident in seen:
            raise DataError(path, line, "id", f"duplicate id {ident!r} (first on line {seen[ident]})")
        seen[ident] = line
        answer = row.get("answer")
        if answer is not None and not isinstance(answer, (str, int, float)):
            raise DataError(path, line, "answer", f"expected text or a number, got {type(answer).__name__}")
        if answer is not None and rules[category].answer == "number" and _gold_number(str(answer)) is None:
            raise DataError(path, line, "answer", f"{category} answers must be numbers (or end in '#### n'), "
                            f"got {answer!r}")
        code = {key: row[key] for key in ("tests", "test", "entry_point", "setup", "test_setup_code") if row.get(key)}
        if isinstance(code.get("tests"), str):
            code["tests"] = [code["tests"]]
        if "test" in code and "entry_point" not in code:
            raise DataError(path, line, "entry_point", "a HumanEval-style 'test' needs the 'entry_point' it checks")
        if "test" in code:
            code["prompt"] = row.get("prompt") or messages[-1]["content"]
        prompt: Any = messages
        problems.append(Problem(id=ident, prompt=prompt, category=category,
                                answer=None if answer is None else str(answer), code=code))
    return problems


# ------------------------------------------------------------------------------- answers


def final_answer(text: str) -> str | None:
    """The final answer of a worked solution, normalised for voting.

    ``the answer is X`` (last), else ``#### n`` / ``Answer: n``, else a short last line.
    Numbers compare as numbers ("18.0" == "18").
    """
    stated = parsing.bbh_answer(text) if re.search(r"the\s+answer\s+is", text, re.I) else None
    if stated is None:
        stated = parsing.gsm8k_strict(text)
    if stated is None:
        lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
        if not lines or len(lines[-1]) > 80:
            return None
        stated = parsing.normalize_bbh(lines[-1])
    number = parsing.normalize_number(stated)
    if number is not None:
        return number
    return " ".join(re.sub(r"[^\w\s]", " ", stated.lower()).split()) or None


def number_answer(text: str) -> str | None:
    """The final number: the stated one (``####``, ``Answer:``, "the answer is"), else the last one."""
    return parsing.gsm8k_strict(text) or parsing.gsm8k_flexible(text)


def _gold_number(answer: str) -> str | None:
    return parsing.normalize_number(answer.rsplit("####", 1)[-1])


def text_matches(output: str, gold: str) -> bool:
    """Whether the gold answer appears in the output as whole words (case-insensitive)."""
    squash = lambda s: " ".join(re.sub(r"[^\w\s]", " ", s.lower()).split())  # noqa: E731
    target = squash(gold)
    return bool(target) and re.search(rf"(?:^|\s){re.escape(target)}(?:\s|$)", squash(output)) is not None


def code_program(problem: Problem, output: str) -> str | None:
    """Solution + tests as one program, or None without code."""
    spec = problem.code
    code = parsing.extract_code(output, spec.get("entry_point"))
    if code is None:
        return None
    if "test" in spec:
        entry = spec["entry_point"]
        prompt = spec.get("prompt", "")
        solution = f"{prompt}\n\n{code}" if parsing.defines(code, entry) else prompt + code
        return f"{solution}\n\n{spec['test']}\n\ncheck({entry})\n"
    setup = spec.get("setup") or spec.get("test_setup_code") or ""
    return f"{setup}\n{code}\n\n" + "\n".join(spec["tests"]) + "\n"


def has_ground_truth(problem: Problem, rule: CategoryRule) -> bool:
    if rule.answer == "code":
        return bool(problem.code.get("tests") or problem.code.get("test"))
    return problem.answer is not None and str(problem.answer).strip() != ""


def pick_diverse(texts: list[str], keep: int, max_similarity: float) -> tuple[list[int], list[dict]]:
    """Indices of up to ``keep`` mutually different texts (greedy, in order), and why others went."""
    from cogumi.data.minhash import compute_signatures, estimated_jaccard

    candidates = [i for i, t in enumerate(texts) if t.strip()]
    dropped = [{"sample": i, "reason": "empty"} for i, t in enumerate(texts) if not t.strip()]
    if not candidates:
        return [], dropped
    signatures = compute_signatures([texts[i] for i in candidates], ngram=5, mode="char")
    chosen: list[int] = []
    for position, index in enumerate(candidates):
        similar = [(c, float(estimated_jaccard(signatures[position], signatures[candidates.index(c)])))
                   for c in chosen]
        closest = max(similar, key=lambda pair: pair[1], default=None)
        if closest is not None and closest[1] >= max_similarity:
            dropped.append({"sample": index, "reason": "near_copy", "of": closest[0],
                            "similarity": round(closest[1], 3)})
        elif len(chosen) >= keep:
            dropped.append({"sample": index, "reason": "enough_kept"})
        else:
            chosen.append(index)
    return chosen, dropped


# ------------------------------------------------------------------------------- the engine


@dataclass
class Outcome:
    """What distillation made of one problem."""

    record: dict
    """For problems.jsonl."""
    kept: list[str]
    """Solutions that become training rows."""
    tokens: dict = field(default_factory=lambda: {"prompt": 0, "completion": 0})


def distill_batch(problems: list[Problem], rules: dict[str, CategoryRule], generator: Any, *, max_tokens: int,
                  min_agreement: float, keep_diverse: int, max_similarity: float, seed: int,
                  exec_timeout: float = 10.0, system_prompt: str = "", chat: bool = True) -> list[Outcome]:
    """Generate for ``problems`` (one batched call per category) and apply each category's rule."""
    from cogumi.generation import SamplingParams

    by_category: dict[str, list[Problem]] = defaultdict(list)
    for problem in problems:
        by_category[problem.category].append(problem)
    samples: dict[str, list] = {}
    for category, group in by_category.items():
        rule = rules[category]
        params = SamplingParams(max_tokens=max_tokens, temperature=rule.temperature, n=rule.samples, seed=seed,
                                top_p=1.0)
        prompts = [_with_system(p.prompt, system_prompt) if chat else "\n\n".join(m["content"] for m in p.prompt)
                   for p in group]
        for problem, completions in zip(group, generator.generate(prompts, params), strict=True):
            samples[problem.id] = completions

    programs: list[tuple[str, int, str]] = []
    for problem in problems:
        if rules[problem.category].answer == "code" and has_ground_truth(problem, rules[problem.category]):
            for i, completion in enumerate(samples[problem.id]):
                program = code_program(problem, completion.text)
                if program is not None:
                    programs.append((problem.id, i, program))
    passed: dict[tuple[str, int], Any] = {}
    if programs:
        from cogumi.evaluate.sandbox import Limits, run_programs

        results = run_programs([p for _, _, p in programs], Limits(timeout_s=exec_timeout))
        passed = {(pid, i): result for (pid, i, _), result in zip(programs, results)}

    outcomes = []
    for problem in problems:
        rule = rules[problem.category]
        completions = samples[problem.id]
        texts = [c.text for c in completions]
        record: dict[str, Any] = {"id": problem.id, "category": problem.category, "strategy": rule.strategy,
                                  "temperature": rule.temperature, "prompt": problem.text, "samples": texts,
                                  "finish_reasons": [c.finish_reason for c in completions],
                                  "ground_truth": problem.answer if rule.answer != "code" else bool(problem.code)}
        kept: list[str] = []
        if rule.strategy == "verify":
            kept, record = _verify(problem, rule, texts, passed, record)
        elif rule.strategy == "vote":
            kept, record = _vote(problem, rule, texts, min_agreement, record)
        else:
            chosen, dropped = pick_diverse(texts, keep_diverse, max_similarity)
            kept = [texts[i] for i in chosen]
            record.update(kept_samples=chosen, dropped_samples=dropped,
                          reason=None if kept else "no_usable_sample")
        record["kept"] = bool(kept)
        tokens = {"prompt": sum(c.prompt_tokens for c in completions[:1]),
                  "completion": sum(c.completion_tokens for c in completions)}
        outcomes.append(Outcome(record=record, kept=kept, tokens=tokens))
    return outcomes


def _with_system(prompt: Any, system_prompt: str) -> Any:
    if not system_prompt:
        return prompt
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def _verify(problem: Problem, rule: CategoryRule, texts: list[str], passed: dict, record: dict):
    if not has_ground_truth(problem, rule):
        record.update(reason="no_ground_truth", verified=[])
        return [], record
    verified = []
    for i, text in enumerate(texts):
        if rule.answer == "code":
            result = passed.get((problem.id, i))
            ok = bool(result and result.passed)
            verified.append({"sample": i, "ok": ok, "status": result.status if result else "no_code",
                             "error": result.error if result else "no code in the reply"})
        elif rule.answer == "number":
            got, gold = number_answer(text), _gold_number(problem.answer)
            verified.append({"sample": i, "ok": got == gold, "answer": got, "expected": gold})
        else:
            verified.append({"sample": i, "ok": text_matches(text, problem.answer), "expected": problem.answer})
    kept = [texts[v["sample"]] for v in verified if v["ok"]]
    record.update(verified=verified, reason=None if kept else "failed_verification")
    return kept[:1], record


def _vote(problem: Problem, rule: CategoryRule, texts: list[str], min_agreement: float, record: dict):
    answers = [final_answer(t) for t in texts]
    counted = Counter(a for a in answers if a is not None)
    record["answers"] = answers
    if not counted:
        record.update(majority=None, agreement=0.0, reason="no_answers")
        return [], record
    (majority, votes), *rest = counted.most_common()
    tied = bool(rest) and rest[0][1] == votes
    agreement = votes / len(texts)
    record.update(majority=majority, agreement=round(agreement, 4), votes=votes)
    if tied:
        record["reason"] = "tied_majority"
        return [], record
    # Compared with a tolerance: 6 of 10 is exactly 0.6 and must pass a 60% threshold.
    if agreement + 1e-9 < min_agreement:
        record["reason"] = "low_agreement"
        return [], record
    if problem.answer is not None:
        gold = final_answer(problem.answer) or problem.answer.strip().lower()
        if majority != gold:
            record.update(reason="majority_wrong", expected=gold)
            return [], record
    best = max((i for i, a in enumerate(answers) if a == majority), key=lambda i: len(texts[i]))
    record.update(reason=None, chosen_sample=best)
    return [texts[best]], record


# ------------------------------------------------------------------------------- the stage


@dataclass(kw_only=True)
class DistillOptions(StageConfig):
    """What the self-consistency stage and the cascade share."""

    problems: str = option(help="JSONL of problems: 'prompt'/'instruction'/'messages', 'category' (or "
                           "metadata.domain), ground truth in 'answer' (math, knowledge, optional for reasoning) or "
                           "'tests' / 'test'+'entry_point' (code).", input=True, positional=True)
    categories: dict = option(default_factory=dict, help="Overrides of the spec's CATEGORY_SETTINGS per category "
                              "(JSON), e.g. {\"reasoning\": {\"samples\": 5}}; fields: strategy (verify|vote|diverse), "
                              "temperature, samples, train_temperature, answer (number|code|text).")
    default_category: str = option("", help="Category of rows that have none (default: such rows are an error).")
    min_agreement: float = option(0.6, help="Vote: keep the majority only when at least this share of samples "
                                  "reach it (spec: 60%).")
    keep_diverse: int = option(3, help="Diverse: most samples kept per problem (spec: 3).")
    max_similarity: float = option(0.5, help="Diverse: a sample whose MinHash Jaccard similarity to a kept one is "
                                   "at least this is a near-copy and dropped.")
    max_tokens: int = option(512, help="Most new tokens per sample.")
    system_prompt: str = option("", help="A system message before every prompt.")
    chat: bool = option(True, help="Send prompts through the teacher's chat template (--no-chat: plain text).")
    seed: int = option(0, help="Sampling seed.")
    exec_timeout: float = option(10.0, help="Seconds each code solution may run in the sandbox.")
    limit: int = option(0, help="Distill only the first N problems (0: all).")
    batch_size: int = option(16, help="Problems per batch (the partial results are saved after each).", hashed=False)
    progress: bool = option(True, help="Show a progress bar.", hashed=False)

    def check(self) -> None:
        if not 0 < self.min_agreement <= 1:
            raise ConfigError(f"{type(self).__name__}.min_agreement: must be in (0, 1], got {self.min_agreement}")
        if self.keep_diverse < 1 or self.max_tokens < 1 or self.batch_size < 1:
            raise ConfigError(f"{type(self).__name__}: keep_diverse, max_tokens and batch_size must be >= 1")
        if not 0 < self.max_similarity <= 1:
            raise ConfigError(f"{type(self).__name__}.max_similarity: must be in (0, 1], got {self.max_similarity}")
        self.rules()

    def rules(self) -> dict[str, CategoryRule]:
        try:
            return build_rules(self.categories)
        except ConfigError as exc:
            raise ConfigError(f"{type(self).__name__}.{exc}") from None

    def outputs(self) -> dict[str, Path]:
        return {"train": self.out("train.jsonl"), "problems": self.out("problems.jsonl"),
                "report": self.out("report.json")}

    def engine_options(self) -> dict:
        return {"max_tokens": self.max_tokens, "min_agreement": self.min_agreement, "keep_diverse": self.keep_diverse,
                "max_similarity": self.max_similarity, "seed": self.seed, "exec_timeout": self.exec_timeout,
                "system_prompt": self.system_prompt, "chat": self.chat}


@dataclass(kw_only=True)
class SelfConsistencyConfig(DistillOptions):
    model: str = option(help="The teacher: built-in name, checkpoint dir, .gguf file (llamacpp) or served name (openai).",
                        input="maybe")
    backend: Literal["transformers", "llamacpp", "openai", "vllm"] = option("transformers", help="Generation backend.")
    provider: Literal["openai", "groq", "together", "local"] = option("local", help="OpenAI-compatible provider.")
    base_url: str = option("", help="Server URL for the openai backend.")
    api_key_env: str = option("", help="Environment variable holding the API key (never the key itself).")
    gen_batch_size: int = option(8, help="Prompts per forward batch (transformers).", hashed=False)
    extra: dict = option(default_factory=dict, help="Extra backend keyword arguments (JSON).")


def make_teacher(backend: str, model: str, *, provider: str = "local", base_url: str = "", api_key_env: str = "",
                 batch_size: int = 8, seed: int = 0, extra: dict | None = None):
    from cogumi.generation import get_generator

    kwargs = dict(extra or {})
    if backend == "transformers":
        kwargs.setdefault("batch_size", batch_size)
        kwargs.setdefault("progress", False)
    elif backend == "llamacpp":
        kwargs.setdefault("seed", seed)
    elif backend == "openai":
        kwargs["provider"] = provider
        if base_url:
            kwargs["base_url"] = base_url
        if api_key_env:
            kwargs["api_key_env"] = api_key_env
    return get_generator(backend, model, **kwargs)


def training_row(problem: Problem, solution: str, rule: CategoryRule, record: dict, teacher: str) -> dict:
    meta = {"category": problem.category, "source_id": problem.id, "strategy": rule.strategy,
            "train_temperature": rule.train_temperature, "teacher": teacher}
    if record.get("agreement") is not None:
        meta["agreement"] = record["agreement"]
    return {"instruction": problem.text, "output": solution, "metadata": meta}


def summarize_records(records: list[dict]) -> dict:
    """Per category: problems, kept, the reasons others were not, and the mean agreement."""
    table: dict[str, dict] = {}
    for record in records:
        entry = table.setdefault(record["category"], {"problems": 0, "kept": 0, "not_kept": {}, "agreements": []})
        entry["problems"] += 1
        entry["kept"] += record["kept"]
        if not record["kept"]:
            reason = record.get("reason") or "unknown"
            entry["not_kept"][reason] = entry["not_kept"].get(reason, 0) + 1
        if record.get("agreement") is not None:
            entry["agreements"].append(record["agreement"])
    for entry in table.values():
        values = entry.pop("agreements")
        entry["mean_agreement"] = round(sum(values) / len(values), 4) if values else None
    return dict(sorted(table.items()))


@stage("self-consistency", SelfConsistencyConfig,
       help="Category-specific self-consistency distillation: verify (math, code, knowledge), majority vote with "
       ">= 60% agreement (reasoning, instruction), diverse samples (creativity); writes training rows and "
       "per-problem records.")
def run(config: SelfConsistencyConfig) -> StageResult:
    from tqdm.auto import tqdm

    rules = config.rules()
    problems = load_problems(config.problems, rules, config.default_category)
    if config.limit:
        problems = problems[: config.limit]
    partial = PartialRecords(config.out("problems.partial.jsonl"), config.config_sha256())
    todo = [p for p in problems if p.id not in partial.done]
    teacher = None
    t0 = time.perf_counter()
    try:
        with tqdm(total=len(problems), initial=len(problems) - len(todo), desc="self-consistency", unit="problem",
                  disable=not config.progress) as bar:
            for start in range(0, len(todo), config.batch_size):
                part = todo[start:start + config.batch_size]
                if teacher is None:
                    teacher = make_teacher(config.backend, config.model, provider=config.provider,
                                           base_url=config.base_url, api_key_env=config.api_key_env,
                                           batch_size=config.gen_batch_size, seed=config.seed, extra=config.extra)
                outcomes = distill_batch(part, rules, teacher, **config.engine_options())
                partial.add([{"key": p.id, "record": o.record, "kept": o.kept, "tokens": o.tokens}
                             for p, o in zip(part, outcomes)])
                bar.update(len(part))
    finally:
        if teacher is not None:
            teacher.close()
    elapsed = time.perf_counter() - t0
    records, rows = [], []
    for problem in problems:
        entry = partial.done[problem.id]
        records.append(entry["record"])
        rows.extend(training_row(problem, s, rules[problem.category], entry["record"], config.model)
                    for s in entry["kept"])
    outputs = config.outputs()
    with AtomicWriter(outputs["train"]) as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    with AtomicWriter(outputs["problems"]) as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    per_category = summarize_records(records)
    counts = {"problems": len(problems), "kept_problems": sum(r["kept"] for r in records),
              "training_rows": len(rows),
              "skipped_no_ground_truth": sum(r.get("reason") == "no_ground_truth" for r in records)}
    tokens = {"prompt": sum(partial.done[p.id]["tokens"]["prompt"] for p in problems),
              "completion": sum(partial.done[p.id]["tokens"]["completion"] for p in problems)}
    metrics = {"per_category": per_category, "tokens": tokens, "resumed": len(problems) - len(todo),
               "seconds": round(elapsed, 2)}
    write_json(outputs["report"], {**counts, **metrics, "teacher": config.model, "backend": config.backend,
                                   "rules": {name: rule.__dict__ for name, rule in rules.items()}})
    partial.remove()
    return StageResult(counts=counts, metrics=metrics)


__all__ = ["CATEGORY_SETTINGS", "CategoryRule", "DistillOptions", "Outcome", "Problem", "SelfConsistencyConfig",
           "build_rules", "code_program", "distill_batch", "final_answer", "load_problems", "make_teacher",
           "pick_diverse", "run", "summarize_records", "text_matches", "training_row"]
