"""``cogumi generate``: answer a JSONL file of prompts with any backend, resumably.

Each input row (``prompt``, ``messages`` or ``instruction``) becomes one output row with its
``n`` completions, finish reasons, token counts and per-token log-probabilities. Finished
batches are appended to a partial file as they complete, so a killed run picks up where it
stopped instead of starting over.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cogumi.io import AtomicWriter, OnError, ReadReport, iter_jsonl, to_messages, write_json
from cogumi.stage import ConfigError, StageConfig, StageResult, option, stage

Backend = Literal["transformers", "llamacpp", "openai", "vllm"]


@dataclass(kw_only=True)
class GenerateConfig(StageConfig):
    prompts: str = option(help="JSONL file; each row has 'prompt', 'messages' or 'instruction'.", input=True,
                          positional=True)
    model: str = option(help="Model: built-in name, checkpoint dir, .gguf file (llamacpp) or served name (openai).",
                        input="maybe")
    backend: Backend = option("transformers", help="Which engine generates.")
    max_tokens: int = option(256, help="Most new tokens per completion.")
    temperature: float = option(0.0, help="Sampling temperature; 0 is greedy.")
    top_p: float = option(1.0, help="Nucleus sampling mass (with temperature > 0).")
    n: int = option(1, help="Completions per prompt (one batched call where the backend can).")
    stop: list[str] = option(default_factory=list, help="Strings that end a completion.")
    seed: int = option(0, help="Sampling seed.")
    system_prompt: str = option("", help="A system message put before prompts that have none.")
    chat: bool = option(True, help="Send prompts through the chat template; --no-chat sends raw text.")
    limit: int = option(0, help="Answer only the first N prompts (0: all).")
    batch_size: int = option(8, help="Prompts per forward batch (transformers).", hashed=False)
    quantization: Literal["none", "nf4"] = option("none", help="Load weights in 4-bit NF4 (transformers).")
    device: str = option("auto", help="auto | cpu | cuda (transformers).")
    n_ctx: int = option(2048, help="Context window for llama.cpp.")
    provider: Literal["openai", "groq", "together", "local"] = option("local", help="OpenAI-compatible provider.")
    base_url: str = option("", help="Server URL for the openai backend (e.g. http://127.0.0.1:8000/v1).")
    api_key_env: str = option("", help="Environment variable holding the API key (never the key itself).")
    preset: Literal["performance", "balanced", "memory_optimized"] = option(
        "balanced", help="Serving preset for vLLM (seeds/002).")
    on_error: OnError = option("raise", help="Bad prompt rows: 'raise' or 'skip' (to rejected.jsonl).")
    progress: bool = option(True, help="Show a progress bar.", hashed=False)
    extra: dict = option(default_factory=dict, help="Extra backend keyword arguments (JSON).")

    def check(self) -> None:
        for name in ("max_tokens", "n"):
            if getattr(self, name) < 1:
                raise ConfigError(f"GenerateConfig.{name}: must be >= 1, got {getattr(self, name)}")
        if self.temperature < 0:
            raise ConfigError(f"GenerateConfig.temperature: must be >= 0, got {self.temperature}")
        if self.n > 1 and self.temperature == 0:
            raise ConfigError("GenerateConfig.n: n > 1 needs temperature > 0 (greedy gives n equal answers)")
        if self.backend == "openai" and self.provider == "local" and not self.base_url:
            raise ConfigError("GenerateConfig.base_url: the openai backend with provider 'local' needs a URL")

    def outputs(self) -> dict[str, Path]:
        return {"completions": self.out("completions.jsonl"), "summary": self.out("summary.json"),
                "rejected": self.out("rejected.jsonl")}


def make_generator(config: GenerateConfig):
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
    elif config.backend == "vllm":
        kwargs.update(preset=config.preset)
    return get_generator(config.backend, config.model, **kwargs)


def _prompt_of(row: dict, config: GenerateConfig):
    messages = to_messages(row)
    if not config.chat:
        return "\n\n".join(m["content"] for m in messages)
    if config.system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": config.system_prompt}, *messages]
    return messages


@stage("generate", GenerateConfig, help="Answer a JSONL file of prompts with a model (any backend).")
def run(config: GenerateConfig) -> StageResult:
    from tqdm.auto import tqdm

    from cogumi.generation import SamplingParams

    outputs = config.outputs()
    report = ReadReport(config.prompts)
    rows = list(iter_jsonl(config.prompts, "prompt", on_error=config.on_error,
                           rejects_path=outputs["rejected"], report=report))
    if config.limit:
        rows = rows[: config.limit]
    if report.rejected == 0:
        AtomicWriter(outputs["rejected"]).close()

    partial = Path(config.output_dir) / "completions.partial.jsonl"
    stamp = Path(config.output_dir) / "completions.partial.config"
    done = _load_partial(partial, stamp, config.config_sha256())
    todo = [(i, row) for i, row in enumerate(rows) if i not in done]
    params = SamplingParams(max_tokens=config.max_tokens, temperature=config.temperature, top_p=config.top_p,
                            n=config.n, stop=list(config.stop), seed=config.seed)
    t0 = time.perf_counter()
    new_tokens = 0
    if todo:
        generator = make_generator(config)
        stamp.write_text(config.config_sha256())
        chunk = max(1, config.batch_size)
        try:
            with partial.open("a", encoding="utf-8") as sink, tqdm(
                total=len(todo), desc=f"generate ({config.backend})", unit="prompt", disable=not config.progress
            ) as bar:
                for start in range(0, len(todo), chunk):
                    part = todo[start : start + chunk]
                    results = generator.generate([_prompt_of(row, config) for _, row in part], params)
                    for (index, row), completions in zip(part, results, strict=True):
                        record = {
                            "index": index, "id": row.get("id", index), "prompt": _prompt_of(row, config),
                            "completions": [c.to_dict() for c in completions],
                        }
                        done[index] = record
                        new_tokens += sum(c.completion_tokens for c in completions)
                        sink.write(json.dumps(record, ensure_ascii=False) + "\n")
                    sink.flush()
                    bar.update(len(part))
        finally:
            generator.close()
    elapsed = time.perf_counter() - t0

    ordered = [done[i] for i in range(len(rows))]
    with AtomicWriter(outputs["completions"]) as handle:
        for record in ordered:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    partial.unlink(missing_ok=True)
    stamp.unlink(missing_ok=True)

    finish = Counter(c["finish_reason"] for r in ordered for c in r["completions"])
    completion_tokens = sum(c["completion_tokens"] for r in ordered for c in r["completions"])
    counts = {"in": report.lines, "answered": len(ordered), "rejected": report.rejected,
              "not_asked": report.records - len(ordered), "completions": sum(finish.values()),
              "completion_tokens": completion_tokens}
    metrics = {"finish_reasons": dict(finish), "resumed_from": len(rows) - len(todo),
               "tokens_per_s": round(new_tokens / elapsed, 2) if todo and elapsed > 0 else None,
               "prompts_per_s": round(len(todo) / elapsed, 3) if todo and elapsed > 0 else None}
    write_json(outputs["summary"], {"backend": config.backend, "model": config.model, **counts, **metrics})
    return StageResult(counts=counts, metrics=metrics)


def _load_partial(partial: Path, stamp: Path, config_hash: str) -> dict[int, dict]:
    """Records a killed run already wrote, if it ran with this same config."""
    if not partial.exists() or not stamp.exists() or stamp.read_text().strip() != config_hash:
        partial.unlink(missing_ok=True)
        return {}
    done = {}
    with partial.open(encoding="utf-8") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break  # the line being written when the run was killed
            done[record["index"]] = record
    # Drop a torn last line so that appended records start on a clean line.
    with AtomicWriter(partial) as handle:
        for record in done.values():
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return done


__all__ = ["GenerateConfig", "make_generator", "run"]
