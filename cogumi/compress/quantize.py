"""``cogumi quantize awq|rtn MODEL -o OUT``: 4-bit weights, 16-bit activations (W4A16).

Both methods run through llm-compressor and write a compressed-tensors checkpoint (int4 weights
packed eight to an int32, with a scale — and a zero point when asymmetric — per group of
``group_size`` input weights) that transformers and vLLM load:

* ``awq``: activation-aware scaling (llm-compressor's ``AWQModifier``, the maintained successor
  of AutoAWQ): calibration text finds, per layer, the input channels that carry large
  activations and scales them up before quantization (a grid search of ``n_grid`` points), then
  the weights are rounded to the nearest step. Slow on a CPU: the grid search runs each layer
  ``n_grid`` times over the calibration set.
* ``rtn``: plain round-to-nearest per group — no calibration, seconds; the baseline AWQ must beat.

Embeddings and ``lm_head`` stay in full precision. Group sizes must divide every quantized
row (vLLM's kernels need whole groups); SmolLM2's rows of 576 are not multiples of 128, so by
default the group size shrinks to the largest power of two that divides them all (64 there),
and the report says so. ``--uneven-groups allow`` keeps the requested size with a partial last
group (compressed-tensors handles it; not every runtime does).

CPU: llm-compressor's AWQ pins its cached activations in page-locked memory for faster copies to
an accelerator, and ``Tensor.pin_memory()`` raises when there is no accelerator at all. On such
machines (only) the pinning is skipped for the duration of the call — it is a speed-up for
host-to-device copies that do not exist there (:func:`no_pinning_without_accelerator`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cogumi.compress.prune import calibration_rows
from cogumi.io import write_json
from cogumi.stage import ConfigError, StageConfig, StageError, StageResult, option, stage

log = logging.getLogger("cogumi.compress")


@dataclass(kw_only=True)
class QuantizeConfig(StageConfig):
    method: Literal["awq", "rtn"] = option(help="awq (activation-aware, calibrated) or rtn (round-to-nearest).",
                                           positional=True)
    model: str = option(help="Full-precision model to quantize (built-in name, checkpoint dir or hub id).",
                        input="maybe", positional=True)
    bits: Literal[4, 8] = option(4, help="Weight bits (W4A16 or W8A16).")
    group_size: int = option(128, help="Input weights sharing one scale (and zero point).")
    symmetric: bool = option(False, help="Symmetric int (no zero point; keeps exact zeros of a pruned model) "
                             "instead of asymmetric (AWQ's usual choice).")
    uneven_groups: Literal["shrink", "allow", "error"] = option(
        "shrink", help="When group_size does not divide a row: shrink it to the largest power of two that does, "
        "allow a partial last group, or error.")
    calibration: str = option("", help="JSONL text for AWQ's calibration (phase 0 data or any rows with text).",
                              input="maybe")
    samples: int = option(128, help="Calibration samples (AWQ).")
    seq_len: int = option(512, help="Tokens per calibration sample (AWQ).")
    n_grid: int = option(20, help="AWQ's grid-search points per layer (fewer: faster, slightly worse scales).")
    duo_scaling: bool = option(True, help="AWQ scales from activations and weights (true) or activations only.")
    dtype: str = option("auto", help="Weights dtype while quantizing: auto (bfloat16 on CUDA, float32 on CPU).")
    device: str = option("auto", help="auto | cpu | cuda.", hashed=False)

    def check(self) -> None:
        if self.group_size < 1 or self.group_size & (self.group_size - 1):
            raise ConfigError(f"QuantizeConfig.group_size: a power of two, got {self.group_size}")
        if self.method == "awq" and not self.calibration:
            raise ConfigError("QuantizeConfig.calibration: awq needs calibration text (a JSONL file)")
        if self.samples < 1 or self.seq_len < 8 or self.n_grid < 1:
            raise ConfigError("QuantizeConfig.samples/seq_len/n_grid: need samples >= 1, seq_len >= 8, n_grid >= 1")

    def outputs(self) -> dict[str, Path]:
        return {"model": self.out("model"), "report": self.out("quantize_report.json")}


def fitting_group_size(widths: list[int], requested: int) -> int:
    """The largest power of two <= ``requested`` that divides every width (0 if none >= 16)."""
    size = requested
    while size >= 16:
        if all(width % size == 0 for width in widths):
            return size
        size //= 2
    return 0


@contextlib.contextmanager
def no_pinning_without_accelerator():
    """Skip llm-compressor's page-locking of cached activations when there is no accelerator.

    ``IntermediatesCache.pin_memory`` calls ``Tensor.pin_memory()``, which raises "Cannot access
    accelerator device when none is available" on a machine without one. Page-locked memory only
    speeds up copies to an accelerator, so without one the call is skipped. The original method is
    restored on exit; with an accelerator nothing is changed.
    """
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.accelerator.is_available():
        yield
        return
    original = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = original


def _recipe(config: QuantizeConfig, group_size: int, bypass: bool) -> list:
    from llmcompressor.modifiers.quantization import QuantizationModifier

    weights = {"num_bits": config.bits, "type": "int", "symmetric": config.symmetric, "strategy": "group",
               "group_size": group_size}
    quantize = QuantizationModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
                                    ignore=["lm_head"], bypass_divisibility_checks=bypass)
    if config.method == "rtn":
        return [quantize]
    from llmcompressor.modifiers.transform.awq import AWQModifier

    return [AWQModifier(n_grid=config.n_grid, duo_scaling=config.duo_scaling), quantize]


def _quantized_widths(model: Any) -> dict[str, int]:
    import torch

    return {name: module.in_features for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")}


def check_loads(path: Path, device: str) -> dict[str, Any]:
    """Load the written checkpoint with transformers and run one forward: what users will do."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tokenizer("The capital of France is", return_tensors="pt").to(device)
    with torch.no_grad():
        logits = model(**batch).logits
    if not torch.isfinite(logits).all():
        raise StageError(f"quantize: the checkpoint in {path} loads but produces non-finite logits")
    return {"loads": True, "quantization": getattr(model.config, "quantization_config", None) is not None}


@stage("quantize", QuantizeConfig, help="W4A16 weight quantization by AWQ or round-to-nearest (llm-compressor); "
       "writes a compressed-tensors checkpoint that transformers and vLLM load.")
def run(config: QuantizeConfig) -> StageResult:
    from transformers import AutoConfig

    from cogumi.models.loading import load_model, pick_device, resolve_model

    resolved = resolve_model(config.model)
    if getattr(AutoConfig.from_pretrained(resolved), "quantization_config", None) is not None:
        raise StageError(f"quantize: {config.model} is already quantized; quantize the full-precision model")
    try:
        from datasets import Dataset
        from llmcompressor import oneshot
    except ImportError as exc:  # pragma: no cover - a core dependency
        raise StageError("quantize: needs llmcompressor (pip install llmcompressor)") from exc
    device = pick_device(config.device)
    dtype = config.dtype if config.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    model, tokenizer = load_model(resolved, dtype=dtype, device=device)

    widths = _quantized_widths(model)
    uneven = sorted({w for w in widths.values() if w % config.group_size})
    group_size, bypass = config.group_size, False
    if uneven:
        where = f"input widths {uneven} are not multiples of group_size {config.group_size}"
        if config.uneven_groups == "error":
            raise StageError(f"quantize: {where}; pick a group size that divides them or --uneven-groups shrink")
        if config.uneven_groups == "allow":
            bypass = True
            log.warning("quantize: %s; the last group of those rows is partial", where)
        else:
            group_size = fitting_group_size(list(widths.values()), config.group_size)
            if not group_size:
                raise StageError(f"quantize: {where}, and no power of two >= 16 divides them all")
            log.warning("quantize: %s; using group_size %d", where, group_size)
    rows = calibration_rows(config.calibration, tokenizer, config.samples, config.seq_len) \
        if config.method == "awq" else None

    t0 = time.perf_counter()
    recipe = _recipe(config, group_size, bypass)
    if rows is None:
        oneshot(model=model, recipe=recipe)
    else:
        with no_pinning_without_accelerator():
            oneshot(model=model, dataset=Dataset.from_dict({"input_ids": rows}), recipe=recipe,
                    num_calibration_samples=len(rows), max_seq_length=config.seq_len)
    seconds = time.perf_counter() - t0

    target = config.outputs()["model"]
    tmp = target.with_name(f".{target.name}.tmp")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, save_compressed=True)
    tokenizer.save_pretrained(tmp)
    del model
    loaded = check_loads(tmp, device)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    report = {"model": config.model, "method": config.method, "bits": config.bits, "symmetric": config.symmetric,
              "group_size_requested": config.group_size, "group_size": group_size,
              "partial_groups": bypass, "uneven_widths": uneven, "quantized_layers": len(widths),
              "calibration": {"file": config.calibration, "samples": config.samples, "seq_len": config.seq_len}
              if rows else None, "n_grid": config.n_grid if config.method == "awq" else None,
              "seconds": round(seconds, 2), "bytes": size, "device": device, **loaded}
    write_json(config.outputs()["report"], report)
    return StageResult(counts={"quantized_layers": len(widths), "bytes": size},
                       metrics={"group_size": group_size, "seconds": round(seconds, 2)})


__all__ = ["QuantizeConfig", "check_loads", "fitting_group_size", "no_pinning_without_accelerator", "run"]
