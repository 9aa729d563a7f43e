"""``cogumi merge``: fold a LoRA adapter into full-precision base weights, and prove it.

A QLoRA adapter was trained against the 4-bit NF4 base, i.e. against the *dequantized* NF4
weights ``W_q``, not the original ``W``. Folding it into the 4-bit weights themselves would
re-quantize ``W_q + BA`` and lose most of the update (the adapter's change is far below NF4's
step size), so the merge always goes into full-precision weights:

* ``dequantized`` (the default after 4-bit training): the base is loaded with the same NF4
  settings as in training and dequantized, so ``W_q + BA`` is exactly the function that was
  trained.
* ``original`` (the default after full-precision training): the checkpoint's own weights.

The fold is done in float32 and verified on a few chats: the merged model's logits — in memory,
and again after a save (in the target dtype) and a reload from disk, so what is checked is what
was written — must match the unmerged float32 ``base + adapter`` within ``tolerance``
(relative to the logits' scale). After 4-bit training it is also compared with the
model exactly as trained (NF4 base + adapter, bf16 compute) — how close the merged model is to
what the loss curve measured — and a merge into the dequantized base must agree with it within
:data:`TRAINED_TOLERANCE`.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cogumi.io import write_json
from cogumi.stage import ConfigError, StageConfig, StageError, StageResult, option, stage

log = logging.getLogger("cogumi.train")

#: Chats the merged model is checked on (rendered with the adapter's tokenizer and template).
VERIFY_CHATS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "The capital of France is Paris."}],
    [{"role": "user", "content": "Write a Python function that adds two numbers."},
     {"role": "assistant", "content": "def add(a, b):\n    return a + b"}],
    [{"role": "system", "content": "Answer briefly."},
     {"role": "user", "content": "A train travels 60 km in 45 minutes. What is its speed in km/h?"},
     {"role": "assistant", "content": "60 km / 0.75 h = 80 km/h."}],
]

#: Largest relative logit difference allowed between a merge into the dequantized base and the
#: 4-bit model as trained (whose bf16 compute alone differs by a few percent).
TRAINED_TOLERANCE = 0.25

BaseWeights = Literal["auto", "dequantized", "original"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass(kw_only=True)
class MergeConfig(StageConfig):
    adapter: str = option(help="Adapter directory written by `cogumi train` (its OUTPUT/adapter).",
                          input=True, positional=True)
    base_model: str = option("", help="Base checkpoint to merge into; empty: the one the adapter was trained on.",
                             input="maybe")
    base_weights: BaseWeights = option(
        "auto", help="dequantized: the NF4 weights the adapter was trained against, in full precision; "
        "original: the checkpoint's weights; auto: dequantized after 4-bit training, else original.")
    dtype: Dtype = option("auto", help="dtype of the merged weights; auto: the base checkpoint's dtype.")
    device: str = option("auto", help="auto | cpu | cuda: where the merge and the check run.")
    verify: bool = option(True, help="Check the saved merged model's logits against base + adapter.")
    tolerance: float = option(0.0, help="Largest allowed max|logit difference| / max|logit| against base + "
                              "adapter in float32; 0: 1e-3 for float32 weights, 0.15 for 16-bit ones (their "
                              "rounding alone moves the logits by a few percent).")

    def check(self) -> None:
        if self.tolerance < 0:
            raise ConfigError(f"MergeConfig.tolerance: must be >= 0, got {self.tolerance}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ConfigError(f"MergeConfig.device: expected auto, cpu or cuda[:N], got {self.device!r}")

    def outputs(self) -> dict[str, Path]:
        return {"model": self.out("model"), "report": self.out("merge_report.json")}


def read_train_info(adapter: Path) -> dict[str, Any]:
    """What ``cogumi train`` recorded next to the adapter; for other adapters, peft's config."""
    info_path = adapter / "cogumi_train.json"
    if info_path.is_file():
        return json.loads(info_path.read_text(encoding="utf-8"))
    peft_path = adapter / "adapter_config.json"
    if not peft_path.is_file():
        raise StageError(f"merge: {adapter} is not a LoRA adapter directory (no adapter_config.json)")
    peft_config = json.loads(peft_path.read_text(encoding="utf-8"))
    return {"base_model": peft_config.get("base_model_name_or_path"), "quantization": "none", "tokenizer": {}}


def compare_logits(reference, other, mask) -> dict[str, float]:
    """Max absolute and relative logit difference and top-1 agreement over unmasked positions."""
    ref = reference[mask].float()
    out = other[mask].float()
    max_abs = float((ref - out).abs().max())
    return {
        "max_abs_diff": max_abs,
        "relative_diff": max_abs / max(float(ref.abs().max()), 1e-12),
        "top1_agreement": float((ref.argmax(-1) == out.argmax(-1)).float().mean()),
    }


def _verification_batch(tokenizer, device: str):
    texts = [tokenizer.apply_chat_template(chat, tokenize=False) for chat in VERIFY_CHATS]
    tokenizer.padding_side = "right"
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return {k: v.to(device) for k, v in batch.items()}


def _logits(model, batch):
    import torch

    with torch.no_grad():
        return model(**batch).logits.float().cpu()


def _resolve_dtype(name: str, base: str):
    import torch
    from transformers import AutoConfig

    if name != "auto":
        return getattr(torch, name)
    dtype = getattr(AutoConfig.from_pretrained(base), "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype or torch.float32


def _match_vocab(model, info: dict[str, Any]) -> None:
    """Grow the base's embeddings when training added tokens (their rows come from the adapter)."""
    vocab = info.get("vocab_size")
    if vocab and model.get_input_embeddings().weight.shape[0] != vocab:
        model.resize_token_embeddings(vocab, mean_resizing=False)


@stage("merge", MergeConfig, help="Fold a LoRA adapter into full-precision base weights; verify the logits.")
def run(config: MergeConfig) -> StageResult:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cogumi.models.loading import load_model, pick_device, resolve_model
    from cogumi.train.sft import keep_bnb_layout_trainable

    adapter = Path(config.adapter)
    info = read_train_info(adapter)
    base_arg = config.base_model or info.get("base_model")
    if not base_arg:
        raise StageError("merge: the adapter does not name its base model; set base_model")
    try:
        base = resolve_model(base_arg)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as exc:
        raise StageError(f"merge: base model {base_arg!r}: {exc}") from None
    if not Path(base).is_dir():
        raise StageError(f"merge: base model {base_arg!r} is not a checkpoint directory on this machine")
    trained_4bit = info.get("quantization") == "nf4"
    weights = config.base_weights
    if weights == "auto":
        weights = "dequantized" if trained_4bit else "original"
    device = pick_device(config.device)
    dtype = _resolve_dtype(config.dtype, base)
    tolerance = config.tolerance or (1e-3 if dtype == torch.float32 else 0.15)
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    batch = _verification_batch(tokenizer, device)
    mask = batch["attention_mask"].bool().cpu()
    report: dict[str, Any] = {"adapter": str(adapter), "base_model": base, "trained_4bit": trained_4bit,
                              "base_weights": weights, "dtype": str(dtype).removeprefix("torch."),
                              "device": device, "tolerance": tolerance}

    trained_logits = None
    if trained_4bit or weights == "dequantized":
        # The NF4 settings of training (load_model is what `cogumi train` used).
        model, _ = load_model(base, quantization="nf4", device=device)
        keep_bnb_layout_trainable(model)  # else the forward below corrupts dequantize() on CPU
        _match_vocab(model, info)
        if trained_4bit:  # the model exactly as trained: NF4 base + adapter
            model = PeftModel.from_pretrained(model, adapter)
            trained_logits = _logits(model, batch)
            model = model.unload()
        if weights == "dequantized":
            model = model.dequantize(dtype=torch.float32).to(torch.float32)
        else:
            del model
            gc.collect()
    if weights == "original":
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(device)
        _match_vocab(model, info)
    model.eval()
    keep_sparsity = bool(info.get("keep_sparsity"))
    if keep_sparsity:  # the zeros of a pruned base: the adapter was trained not to touch them
        from cogumi.compress.prune import verify as verify_pruned
        from cogumi.train.sparsity import mask_lora_updates, restore_zeros, zero_masks

        zeros = {name: m for name, m in zero_masks(model).items() if bool(m.any())}
        base_pattern = verify_pruned(model, two_four=True)
        was_two_four = bool(base_pattern["layers"]) and not base_pattern["violations"]
    model = PeftModel.from_pretrained(model, adapter)
    if keep_sparsity:
        mask_lora_updates(model)
    reference = _logits(model, batch)
    merged = model.merge_and_unload()
    if keep_sparsity:
        report["sparsity"] = {"layers_with_zeros": len(zeros), "zeros": int(sum(int(m.sum()) for m in zeros.values())),
                              "update_entries_dropped": restore_zeros(merged, zeros), "base_two_four": was_two_four}
    report["in_memory"] = compare_logits(reference, _logits(merged, batch), mask)
    merged = merged.to(dtype)
    merged.config.dtype = dtype

    end_of_turn = info.get("tokenizer", {}).get("end_of_turn")
    eos_ids = [tokenizer.convert_tokens_to_ids(end_of_turn)] if end_of_turn else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos_ids:
        eos_ids.append(tokenizer.eos_token_id)
    if eos_ids:
        merged.generation_config.eos_token_id = eos_ids if len(eos_ids) > 1 else eos_ids[0]
    merged.generation_config.pad_token_id = tokenizer.pad_token_id
    merged.config.pad_token_id = tokenizer.pad_token_id

    target = config.outputs()["model"]
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    tokenizer.padding_side = "left"  # what inference (batched generation) wants
    tokenizer.save_pretrained(tmp)
    del model, merged
    gc.collect()

    if config.verify:
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).to(device).eval()
        report["saved"] = compare_logits(reference, _logits(reloaded, batch), mask)
        if trained_logits is not None:
            report["vs_trained_4bit"] = compare_logits(trained_logits, _logits(reloaded, batch), mask)
        if keep_sparsity:
            still_zero = all(not bool(dict(reloaded.named_modules())[name].weight[m].any()) for name, m in zeros.items())
            report["sparsity"]["zeros_kept"] = still_zero
            if was_two_four:
                pattern = verify_pruned(reloaded, two_four=True)
                report["sparsity"]["two_four_violations"] = pattern["violations"]
                report["sparsity"]["mean_sparsity"] = pattern["mean_sparsity"]
        del reloaded
        gc.collect()
        worst = max(report["in_memory"]["relative_diff"], report["saved"]["relative_diff"])
        problem = None
        if worst > tolerance:
            problem = (f"the merged model's logits differ from base + adapter by {worst:.2e} (relative), "
                       f"above the tolerance {tolerance:g}")
        elif weights == "dequantized" and trained_logits is not None \
                and report["vs_trained_4bit"]["relative_diff"] > max(tolerance, TRAINED_TOLERANCE):
            # bf16 compute in the 4-bit model accounts for a few percent; more means the
            # dequantized weights are not the ones the adapter was trained against.
            problem = (f"the merged model differs from the trained 4-bit model by "
                       f"{report['vs_trained_4bit']['relative_diff']:.2e} (relative): the dequantized base "
                       "does not reproduce the NF4 weights used in training")
        if keep_sparsity and not problem and (not report["sparsity"]["zeros_kept"]
                                              or report["sparsity"].get("two_four_violations")):
            problem = "the merged model lost zeros of the pruned base (2:4 pattern broken)"
        if problem:
            shutil.rmtree(tmp, ignore_errors=True)
            raise StageError(f"merge: {problem}; nothing was written")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    write_json(config.outputs()["report"], report)
    metrics = {"merge_relative_diff": report["in_memory"]["relative_diff"]}
    if "saved" in report:
        metrics["saved_relative_diff"] = report["saved"]["relative_diff"]
        metrics["saved_top1_agreement"] = report["saved"]["top1_agreement"]
    if "vs_trained_4bit" in report:
        metrics["vs_trained_4bit_relative_diff"] = report["vs_trained_4bit"]["relative_diff"]
        metrics["vs_trained_4bit_top1_agreement"] = report["vs_trained_4bit"]["top1_agreement"]
    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    return StageResult(counts={"bytes": size}, metrics=metrics)
