"""Mask-preserving recovery fine-tuning: a 2:4-pruned model trained with ``keep_sparsity`` and
merged is still 2:4, it changed, and the merged model computes what was trained. Without the
option the same training fills the zeros (the control that shows the check can fail)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cogumi.compress.prune import PruneConfig, verify
from cogumi.compress.prune import run as prune
from cogumi.stage import ConfigError
from cogumi.train.merge import MergeConfig
from cogumi.train.merge import run as merge
from cogumi.train.sft import TrainConfig
from cogumi.train.sft import run as train
from cogumi.train.sparsity import mask_lora_updates

ROWS = [
    {"instruction": "What is the capital of France?", "response": "Paris."},
    {"instruction": "What is 2 + 3?", "response": "5."},
    {"instruction": "Name a primary color.", "response": "Red."},
    {"instruction": "What is the capital of Italy?", "response": "Rome."},
]


@pytest.fixture(scope="module")
def pruned(tiny_llama_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pruned")
    prune(PruneConfig(model=str(tiny_llama_dir), method="magnitude", output_dir=str(out)))
    return out / "model"


def _train_and_merge(model_dir: Path, tmp_path: Path, keep_sparsity: bool):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS * 4))
    train(TrainConfig(data=str(data), model=str(model_dir), output_dir=str(tmp_path / "train"), quantization="none",
                      keep_sparsity=keep_sparsity, lora_r=8, max_steps=6, batch_size=2, grad_accum=1,
                      learning_rate=2e-2, warmup_steps=0, logging_steps=1, save_steps=6, val_fraction=0.0,
                      gradient_checkpointing=False, max_length=64, progress=False))
    return merge(MergeConfig(adapter=str(tmp_path / "train" / "adapter"), output_dir=str(tmp_path / "merged")))


def test_recovery_keeps_the_2_4_pattern_through_the_merge(pruned, tmp_path):
    from transformers import AutoModelForCausalLM

    result = _train_and_merge(pruned, tmp_path, keep_sparsity=True)
    assert result.metrics["saved_relative_diff"] < 1e-5  # the merged model is what was trained
    report = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    assert report["sparsity"]["base_two_four"] and report["sparsity"]["zeros_kept"]
    assert report["sparsity"]["two_four_violations"] == []
    assert report["sparsity"]["update_entries_dropped"] > 0  # the raw LoRA delta did cover the zeros

    before = AutoModelForCausalLM.from_pretrained(pruned)
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "merged" / "model")
    checked = verify(after, two_four=True)
    assert checked["violations"] == [] and checked["mean_sparsity"] >= 0.5
    changed = [name for (name, a), (_, b) in zip(before.named_parameters(), after.named_parameters(), strict=True)
               if "_proj" in name and not torch.equal(a, b)]
    assert len(changed) >= 7  # every projection the adapter targets moved
    for (name, a), (_, b) in zip(before.named_parameters(), after.named_parameters(), strict=True):
        if "_proj" in name:
            assert torch.equal(a == 0, b == 0), name  # exactly the same zeros, no new ones


def test_without_keep_sparsity_the_merge_fills_the_zeros(pruned, tmp_path):
    from transformers import AutoModelForCausalLM

    _train_and_merge(pruned, tmp_path, keep_sparsity=False)
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "merged" / "model")
    assert verify(after, two_four=True)["violations"]


def test_masked_forward_is_the_masked_merged_weight(tiny_llama_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    layer = model.model.layers[0].mlp.down_proj
    with torch.no_grad():
        layer.weight[:, ::2] = 0
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["down_proj"],
                                                  init_lora_weights=False, lora_dropout=0.0))
    assert mask_lora_updates(peft_model) == len(model.model.layers)
    lora = peft_model.base_model.model.model.layers[0].mlp.down_proj
    x = torch.randn(3, lora.in_features)
    delta = lora.get_delta_weight("default")
    expected = x @ (layer.weight + delta * (layer.weight != 0)).T
    assert torch.allclose(lora(x), expected, atol=1e-5)
    assert not torch.allclose(lora(x), x @ (layer.weight + delta).T, atol=1e-3)  # the plain update differs


def test_keep_sparsity_needs_a_full_precision_base(tmp_path):
    with pytest.raises(ConfigError, match="keep_sparsity"):
        TrainConfig(data=str(tmp_path / "d.jsonl"), model="tiny-llama", output_dir=str(tmp_path / "o"),
                    keep_sparsity=True, quantization="nf4")
