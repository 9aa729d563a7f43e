"""``cogumi gate REFERENCE CANDIDATE --data FILE``: what a compression step cost, measured.

Both models read the same held-out text, cut into windows of ``seq_len`` tokens (the text's
rows joined with the tokenizer's EOS, up to ``max_tokens`` tokens). Per model: perplexity
``exp(mean next-token NLL)``. Between them, at every position: the KL divergence
``KL(reference || candidate)`` of the next-token distributions (mean over positions, in nats)
and top-1 agreement (the share of positions where both models' most likely next token is the
same).

Budgets turn the measurement into a gate: when the candidate's perplexity rises by more than
``max_ppl_increase`` (the spec's phase 2 criterion: 10%), its mean KL exceeds ``max_kl``, or
its top-1 agreement falls below ``min_top1``, the stage writes its report and then fails with
the figures, so a recipe stops there. Models with different tokenizers cannot be compared
position by position: that is an error before any work.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cogumi.io import DataError, iter_texts, write_json
from cogumi.stage import ConfigError, StageConfig, StageError, StageResult, option, stage


class GateFailed(StageError):
    """The candidate is worse than the budget allows; the message has the figures."""


@dataclass(kw_only=True)
class GateConfig(StageConfig):
    reference: str = option(help="The model before the compression step (name or checkpoint dir).",
                            input="maybe", positional=True)
    candidate: str = option(help="The model after it (checkpoint dir; compressed-tensors checkpoints load too).",
                            input="maybe", positional=True)
    data: str = option(help="Held-out text: JSONL rows (instruction/response, messages, prompt or 'text') or a "
                       "plain .txt file.", input=True)
    seq_len: int = option(512, help="Tokens per window.")
    max_tokens: int = option(16384, help="Most tokens of the text to score (whole windows).")
    batch_size: int = option(4, help="Windows per forward pass.", hashed=False)
    max_ppl_increase: float = option(0.0, help="Fail when candidate perplexity exceeds the reference's by more "
                                     "than this fraction (0.10 = 10%; 0: no budget).")
    max_kl: float = option(0.0, help="Fail when the mean KL(reference || candidate) exceeds this (nats; 0: no budget).")
    min_top1: float = option(0.0, help="Fail when top-1 agreement is below this fraction (0: no budget).")
    device: str = option("auto", help="auto | cpu | cuda.", hashed=False)
    dtype: str = option("auto", help="auto (bf16 on CUDA, fp32 on CPU) or a torch dtype name.")
    progress: bool = option(True, help="Show a progress bar.", hashed=False)

    def check(self) -> None:
        if self.seq_len < 2 or self.max_tokens < self.seq_len:
            raise ConfigError(f"GateConfig.seq_len/max_tokens: need 2 <= seq_len <= max_tokens, got "
                              f"{self.seq_len}, {self.max_tokens}")
        for name in ("max_ppl_increase", "max_kl", "min_top1"):
            if getattr(self, name) < 0:
                raise ConfigError(f"GateConfig.{name}: must be >= 0, got {getattr(self, name)}")
        if self.min_top1 > 1:
            raise ConfigError(f"GateConfig.min_top1: a fraction in [0, 1], got {self.min_top1}")

    def outputs(self) -> dict[str, Path]:
        return {"report": self.out("gate.json")}


def read_texts(path: str | Path) -> list[str]:
    """The texts of a held-out file (see :func:`cogumi.io.iter_texts`)."""
    return list(iter_texts(path))


def same_tokenizer(a: Any, b: Any) -> bool:
    return a.get_vocab() == b.get_vocab() and a.eos_token_id == b.eos_token_id


def windows(tokenizer: Any, texts: list[str], seq_len: int, max_tokens: int) -> list[list[int]]:
    """Whole windows of ``seq_len`` tokens from the texts joined by EOS, up to ``max_tokens``."""
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            stream.append(tokenizer.eos_token_id)
        if len(stream) >= max_tokens:
            break
    stream = stream[: max_tokens - max_tokens % seq_len]
    return [stream[i:i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]


def compare_models(reference: Any, candidate: Any, batches: list[list[list[int]]], *, progress: bool = False) -> dict:
    """Perplexities, mean KL(reference || candidate) and top-1 agreement over the windows."""
    import torch
    from tqdm.auto import tqdm

    totals = {"nll_reference": 0.0, "nll_candidate": 0.0, "kl": 0.0, "agree": 0, "positions": 0}
    with torch.inference_mode():
        for batch in tqdm(batches, desc="gate", unit="batch", disable=not progress):
            ids = torch.tensor(batch)
            ref = torch.log_softmax(reference(input_ids=ids.to(reference.device)).logits.float().cpu(), -1)[:, :-1]
            cand = torch.log_softmax(candidate(input_ids=ids.to(candidate.device)).logits.float().cpu(), -1)[:, :-1]
            targets = ids[:, 1:, None]
            totals["nll_reference"] -= float(ref.gather(-1, targets).sum())
            totals["nll_candidate"] -= float(cand.gather(-1, targets).sum())
            totals["kl"] += float((ref.exp() * (ref - cand)).sum())
            totals["agree"] += int((ref.argmax(-1) == cand.argmax(-1)).sum())
            totals["positions"] += targets.numel()
    n = totals["positions"]
    return {"positions": n, "ppl_reference": math.exp(totals["nll_reference"] / n),
            "ppl_candidate": math.exp(totals["nll_candidate"] / n), "kl_mean": totals["kl"] / n,
            "top1_agreement": totals["agree"] / n}


@stage("gate", GateConfig, help="Quality gate between compression steps: perplexity of both models, KL divergence "
       "and top-1 agreement on held-out text; fails (stopping a recipe) when a budget is exceeded.")
def run(config: GateConfig) -> StageResult:
    from cogumi.models.loading import load_model, load_tokenizer

    texts = read_texts(config.data)
    reference_tokenizer = load_tokenizer(config.reference)
    candidate_tokenizer = load_tokenizer(config.candidate)
    if not same_tokenizer(reference_tokenizer, candidate_tokenizer):
        raise ConfigError(f"gate: {config.reference} and {config.candidate} have different tokenizers; their "
                          "next-token distributions cannot be compared position by position")
    pieces = windows(reference_tokenizer, texts, config.seq_len, config.max_tokens)
    if not pieces:
        raise DataError(config.data, None, None, f"shorter than one window of {config.seq_len} tokens")
    batches = [pieces[i:i + config.batch_size] for i in range(0, len(pieces), config.batch_size)]
    t0 = time.perf_counter()
    reference, _ = load_model(config.reference, dtype=config.dtype, device=config.device)
    candidate, _ = load_model(config.candidate, dtype=config.dtype, device=config.device)
    figures = compare_models(reference.eval(), candidate.eval(), batches, progress=config.progress)
    figures["ppl_increase"] = figures["ppl_candidate"] / figures["ppl_reference"] - 1
    budgets = {"max_ppl_increase": config.max_ppl_increase, "max_kl": config.max_kl, "min_top1": config.min_top1}
    broken = []
    if config.max_ppl_increase and figures["ppl_increase"] > config.max_ppl_increase:
        broken.append(f"perplexity {figures['ppl_reference']:.3f} -> {figures['ppl_candidate']:.3f} "
                      f"(+{100 * figures['ppl_increase']:.1f}% > {100 * config.max_ppl_increase:.1f}%)")
    if config.max_kl and figures["kl_mean"] > config.max_kl:
        broken.append(f"mean KL {figures['kl_mean']:.4f} > {config.max_kl}")
    if config.min_top1 and figures["top1_agreement"] < config.min_top1:
        broken.append(f"top-1 agreement {figures['top1_agreement']:.3f} < {config.min_top1}")
    report = {"reference": config.reference, "candidate": config.candidate, "data": config.data,
              "windows": len(pieces), "seq_len": config.seq_len, **figures, "budgets": budgets,
              "passed": not broken, "failures": broken, "seconds": round(time.perf_counter() - t0, 2)}
    write_json(config.outputs()["report"], report)
    if broken:
        raise GateFailed(f"gate: {config.candidate} fails its budget: {'; '.join(broken)} (report: "
                         f"{config.outputs()['report']})")
    metrics = {k: round(v, 6) for k, v in figures.items() if isinstance(v, float)}
    return StageResult(counts={"windows": len(pieces), "positions": figures["positions"]},
                       metrics={**metrics, "passed": True})


__all__ = ["GateConfig", "GateFailed", "compare_models", "read_texts", "run", "same_tokenizer", "windows"]
