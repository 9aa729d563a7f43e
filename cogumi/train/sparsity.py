"""LoRA that keeps a pruned model pruned (recovery fine-tuning after ``cogumi prune``).

A LoRA update ``ΔW = B·A · (alpha / r)`` is dense: merged as it is, it would fill every zero
that 2:4 pruning made. With ``keep_sparsity`` the update is masked by the base weight's zeros
in the forward pass, ``y = W·x + (ΔW ⊙ [W ≠ 0])·x``, so training optimises exactly the function
that survives the merge, and the merge adds ``ΔW ⊙ [W ≠ 0]`` (zero where ``W`` is zero). The
mask is read from the frozen base weight at every step (``W != 0``: no stored masks), which
needs a full-precision base: NF4 rounding would turn small weights into extra zeros.

Cost: the masked update is materialised as a full matrix per layer and step (as DoRA does),
instead of the two thin LoRA matmuls.
"""

from __future__ import annotations

import types
from typing import Any


def _masked_lora_forward(self, x, *args: Any, **kwargs: Any):
    import torch.nn.functional as F

    result = self.base_layer(x, *args, **kwargs)
    if self.disable_adapters or self.merged:
        return result
    mask = self.base_layer.weight != 0
    for name in self.active_adapters:
        if name not in self.lora_A:
            continue
        delta = self.get_delta_weight(name) * mask
        dropped = self.lora_dropout[name](x)
        result = result + F.linear(dropped.to(delta.dtype), delta).to(result.dtype)
    return result


def mask_lora_updates(model) -> int:
    """Make every LoRA linear layer of a peft ``model`` apply its update only where its base weight
    is non-zero. Returns the number of layers changed."""
    from peft.tuners.lora import Linear as LoraLinear

    changed = 0
    for module in model.modules():
        if isinstance(module, LoraLinear) and not getattr(module, "_cogumi_masked", False):
            if getattr(module, "fan_in_fan_out", False):
                raise ValueError("keep_sparsity: Conv1D-style (fan_in_fan_out) layers are not supported")
            module.forward = types.MethodType(_masked_lora_forward, module)
            module._cogumi_masked = True
            changed += 1
    return changed


def zero_masks(model, names: list[str] | None = None) -> dict[str, Any]:
    """``{module name: weight == 0}`` for the linear layers of ``model`` (or those named)."""
    import torch

    return {name: module.weight.detach() == 0 for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and (names is None or name in names)}


def restore_zeros(model, masks: dict[str, Any]) -> int:
    """Zero again, in place, the weights that ``masks`` marks; returns how many were not zero."""
    import torch

    modules = dict(model.named_modules())
    refilled = 0
    with torch.no_grad():
        for name, mask in masks.items():
            weight = modules[name].weight
            refilled += int((weight[mask] != 0).sum())
            weight.masked_fill_(mask.to(weight.device), 0)
    return refilled


__all__ = ["mask_lora_updates", "restore_zeros", "zero_masks"]
