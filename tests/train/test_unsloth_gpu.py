"""The CUDA paths of the train stage (skipped without a GPU): unsloth's FastLanguageModel backend,
and the transformers backend with 8-bit AdamW and bf16 mixed precision."""

from __future__ import annotations

import json
import math

import pytest

from cogumi.train.sft import TrainConfig, run

pytestmark = pytest.mark.gpu

ROWS = [
    {"instruction": "What is the capital of France?", "response": "The capital of France is Paris."},
    {"instruction": "What is 2 + 3?", "response": "2 + 3 = 5."},
    {"instruction": "What is the capital of Italy?", "response": "The capital of Italy is Rome."},
    {"instruction": "How many days are in a week?", "response": "A week has 7 days."},
]


def _config(model_dir, tmp_path, **overrides) -> TrainConfig:
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS * 8))
    values = dict(data=str(data), model=str(model_dir), output_dir=str(tmp_path / "run"), device="cuda",
                  lora_r=16, lora_alpha=32, max_steps=10, batch_size=4, grad_accum=1, learning_rate=5e-4,
                  warmup_steps=1, logging_steps=1, save_steps=5, eval_steps=5, val_fraction=0.1,
                  max_length=256, progress=False)
    values.update(overrides)
    return TrainConfig(**values)


def test_unsloth_backend_trains_a_qlora_adapter(smollm2_dir, tmp_path):
    pytest.importorskip("unsloth")
    result = run(_config(smollm2_dir, tmp_path, backend="unsloth"))
    info = json.loads((tmp_path / "run" / "adapter" / "cogumi_train.json").read_text())
    assert info["backend"] == "unsloth" and info["quantization"] == "nf4"
    assert math.isfinite(result.metrics["final_train_loss"])
    assert result.metrics["final_train_loss"] < result.metrics["first_train_loss"]
    assert result.metrics["gpu_peak_memory_gib"] > 0


def test_transformers_backend_on_cuda_uses_8bit_adamw_and_bf16(smollm2_dir, tmp_path):
    from cogumi.train.merge import MergeConfig
    from cogumi.train.merge import run as merge

    result = run(_config(smollm2_dir, tmp_path, backend="transformers"))
    import torch

    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-10"
    args = torch.load(checkpoint / "training_args.bin", weights_only=False)
    assert str(args.optim.value if hasattr(args.optim, "value") else args.optim) in ("adamw_8bit", "adamw_bnb_8bit")
    assert args.bf16 and json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == 10
    assert result.metrics["final_train_loss"] < result.metrics["first_train_loss"]
    assert result.metrics["gpu_peak_memory_gib"] > 0
    merged = merge(MergeConfig(adapter=str(tmp_path / "run" / "adapter"), output_dir=str(tmp_path / "merged"),
                               device="cuda"))
    assert merged.metrics["saved_relative_diff"] < 1e-3
    assert merged.metrics["vs_trained_4bit_top1_agreement"] > 0.9
