"""``cogumi prune MODEL -o OUT``: 2:4 semi-structured (or unstructured) pruning.

Methods: ``sparsegpt`` (default) and ``wanda`` through llm-compressor's one-shot modifiers, both
calibrated on text from a JSONL file; ``magnitude`` (no calibration: the smallest weights go —
the baseline the others are measured against). llm-compressor's own ``MagnitudePruningModifier``
is a training-time schedule, so the one-shot magnitude baseline is done here, in a few lines of
torch.

2:4 means exactly two of every four consecutive input weights of a row are zero: 50% sparsity,
the pattern sparse tensor cores accelerate. The spec's "60% attention / 70% FFN" is
*unstructured* sparsity and is offered as such (``--structure unstructured
--attention-sparsity 0.6 --mlp-sparsity 0.7``), never under the 2:4 name.

Only the decoder layers' linear projections are pruned: embeddings and ``lm_head`` stay dense
(llm-compressor's pruners otherwise include ``lm_head`` even when told to ignore it; the targets
are therefore given as an explicit pattern). After pruning every targeted weight is checked —
each group of four holds at least two zeros for 2:4 — and the achieved sparsity per layer is
reported. The output is an ordinary Hugging Face checkpoint (dense tensors with zeros).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cogumi.io import DataError, iter_texts, write_json
from cogumi.stage import ConfigError, StageConfig, StageError, StageResult, option, stage

TARGETS = r"re:.*layers\.\d+\..*_proj$"
ATTENTION = r"re:.*layers\.\d+\.self_attn\..*_proj$"
MLP = r"re:.*layers\.\d+\.mlp\..*_proj$"
_TARGET_RE = re.compile(r".*layers\.\d+\..*_proj$")


@dataclass(kw_only=True)
class PruneConfig(StageConfig):
    model: str = option(help="The model to prune (built-in name, checkpoint dir or hub id).", input="maybe",
                        positional=True)
    method: Literal["sparsegpt", "wanda", "magnitude"] = option("sparsegpt", help="Pruning method.")
    structure: Literal["2:4", "unstructured"] = option("2:4", help="2:4 semi-structured (exactly 50%) or "
                                                       "unstructured.")
    sparsity: float = option(0.5, help="Unstructured: fraction of weights zeroed (2:4 is always 0.5).")
    attention_sparsity: float = option(0.0, help="Unstructured: sparsity of attention projections (0: --sparsity).")
    mlp_sparsity: float = option(0.0, help="Unstructured: sparsity of MLP projections (0: --sparsity).")
    calibration: str = option("", help="JSONL text for calibration (sparsegpt, wanda): phase 0 data or any rows "
                              "with text.", input="maybe")
    samples: int = option(128, help="Calibration samples.")
    seq_len: int = option(512, help="Tokens per calibration sample.")
    dtype: str = option("float32", help="Weights dtype while pruning (float32 on CPU; bfloat16 on a GPU).")
    device: str = option("auto", help="auto | cpu | cuda.", hashed=False)

    def check(self) -> None:
        if self.structure == "2:4" and (self.sparsity != 0.5 or self.attention_sparsity or self.mlp_sparsity):
            raise ConfigError("PruneConfig.sparsity: 2:4 is exactly 50%; for other targets use --structure unstructured")
        for name in ("sparsity", "attention_sparsity", "mlp_sparsity"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"PruneConfig.{name}: must be in [0, 1), got {getattr(self, name)}")
        if self.method != "magnitude" and not self.calibration:
            raise ConfigError(f"PruneConfig.calibration: {self.method} needs calibration text (a JSONL file)")
        if self.samples < 1 or self.seq_len < 8:
            raise ConfigError("PruneConfig.samples/seq_len: need samples >= 1 and seq_len >= 8")

    def outputs(self) -> dict[str, Path]:
        return {"model": self.out("model"), "report": self.out("prune_report.json")}

    def targets(self) -> list[tuple[str, float]]:
        """(layer pattern, sparsity) pairs to prune, in order."""
        if self.structure == "2:4":
            return [(TARGETS, 0.5)]
        attention = self.attention_sparsity or self.sparsity
        mlp = self.mlp_sparsity or self.sparsity
        return [(TARGETS, attention)] if attention == mlp else [(ATTENTION, attention), (MLP, mlp)]


def calibration_rows(path: str, tokenizer: Any, samples: int, seq_len: int) -> list[list[int]]:
    """``samples`` windows of ``seq_len`` tokens from the file's texts (joined by EOS)."""
    from cogumi.compress.gate import windows

    rows = windows(tokenizer, iter_texts(path), seq_len, samples * seq_len)
    if len(rows) < samples:
        raise DataError(path, None, None, f"has fewer than {(len(rows) + 1) * seq_len} tokens; {samples} "
                        f"calibration samples of {seq_len} tokens need {samples * seq_len} (lower --samples or --seq-len, or give more text)")
    return rows


def magnitude_prune(model: Any, pattern: str, sparsity: float, two_four: bool) -> None:
    """Zero the smallest-magnitude weights: two of every four inputs (2:4) or a fraction per matrix."""
    import torch

    regex = re.compile(pattern.removeprefix("re:"))
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear) or not regex.fullmatch(name):
                continue
            weight = module.weight
            if two_four:
                groups = weight.abs().reshape(-1, 4)
                drop = groups.argsort(dim=1)[:, :2]
                mask = torch.ones_like(groups, dtype=torch.bool).scatter_(1, drop, False)
                weight.mul_(mask.reshape(weight.shape))
            else:
                k = int(weight.numel() * sparsity)
                if k:
                    threshold = weight.abs().flatten().kthvalue(k).values
                    weight.mul_(weight.abs() > threshold)


def verify(model: Any, two_four: bool) -> dict:
    """Achieved sparsity per targeted layer; for 2:4 also the fewest zeros found in a group of four."""
    import torch

    layers = {}
    violations = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and _TARGET_RE.fullmatch(name):
            weight = module.weight.detach()
            entry = {"sparsity": round(float((weight == 0).float().mean()), 6)}
            if two_four:
                fewest = int((weight.reshape(-1, 4) == 0).sum(dim=1).min())
                entry["min_zeros_per_4"] = fewest
                if fewest < 2:
                    violations.append(name)
            layers[name] = entry
    return {"layers": layers, "violations": violations,
            "mean_sparsity": round(sum(e["sparsity"] for e in layers.values()) / max(len(layers), 1), 6)}


@stage("prune", PruneConfig, help="Prune a model: 2:4 semi-structured (exactly 50%) or unstructured, by SparseGPT, "
       "Wanda (llm-compressor) or magnitude; verifies the pattern on every pruned weight.")
def run(config: PruneConfig) -> StageResult:
    import torch
    from transformers import AutoConfig

    from cogumi.models.loading import load_model, resolve_model

    # Checked before loading anything: a quantized checkpoint cannot be pruned meaningfully.
    if getattr(AutoConfig.from_pretrained(resolve_model(config.model)), "quantization_config", None) is not None:
        raise StageError(f"prune: {config.model} is quantized; prune the full-precision model, then quantize")
    model, tokenizer = load_model(config.model, dtype=config.dtype, device=config.device)
    rows = None
    if config.method != "magnitude":
        rows = calibration_rows(config.calibration, tokenizer, config.samples, config.seq_len)
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and _TARGET_RE.fullmatch(n)]
    if not linear:
        raise StageError(f"prune: {config.model} ({type(model).__name__}) has no decoder projections named like "
                         "'layers.N.*_proj'; this architecture is not supported")
    two_four = config.structure == "2:4"
    bad = [n for n in linear if two_four and dict(model.named_modules())[n].weight.shape[1] % 4]
    if bad:
        raise StageError(f"prune: 2:4 needs input sizes divisible by 4; not so for {', '.join(bad[:5])}")
    t0 = time.perf_counter()
    for pattern, sparsity in config.targets():
        if config.method == "magnitude":
            magnitude_prune(model, pattern, sparsity, two_four)
            continue
        try:
            from datasets import Dataset
            from llmcompressor import oneshot
            from llmcompressor.modifiers.obcq import SparseGPTModifier
            from llmcompressor.modifiers.pruning import WandaPruningModifier
        except ImportError as exc:  # pragma: no cover - a core dependency
            raise StageError("prune: sparsegpt and wanda need llmcompressor (pip install llmcompressor)") from exc
        modifier = SparseGPTModifier if config.method == "sparsegpt" else WandaPruningModifier
        recipe = modifier(sparsity=sparsity, mask_structure="2:4" if two_four else "0:0", targets=[pattern])
        oneshot(model=model, dataset=Dataset.from_dict({"input_ids": rows}), recipe=recipe,
                num_calibration_samples=len(rows), max_seq_length=config.seq_len)
    seconds = time.perf_counter() - t0
    checked = verify(model, two_four)
    if checked["violations"]:
        raise StageError(f"prune: the 2:4 pattern does not hold in {', '.join(checked['violations'][:5])}")
    target = config.outputs()["model"]
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    report = {"model": config.model, "method": config.method, "structure": config.structure,
              "targets": [{"pattern": p, "sparsity": s} for p, s in config.targets()],
              "calibration": {"file": config.calibration, "samples": config.samples, "seq_len": config.seq_len}
              if rows else None, "seconds": round(seconds, 2), **checked}
    write_json(config.outputs()["report"], report)
    return StageResult(counts={"layers": len(checked["layers"])},
                       metrics={"mean_sparsity": checked["mean_sparsity"], "seconds": round(seconds, 2)})


__all__ = ["PruneConfig", "calibration_rows", "magnitude_prune", "run", "verify"]
