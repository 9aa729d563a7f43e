"""QLoRA for real on SmolLM2-135M-Instruct on the CPU: a 4-bit NF4 base with LoRA learns a small
set, the merge into the dequantized base reproduces the trained model, and the merged model
stops at its end-of-turn token."""

from __future__ import annotations

import json

import pytest

from cogumi.train.merge import MergeConfig
from cogumi.train.merge import run as merge
from cogumi.train.sft import TrainConfig
from cogumi.train.sft import run as train

FACTS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is 2 + 3?", "2 + 3 = 5."),
    ("Name a primary color.", "Red is a primary color."),
    ("What is 7 times 6?", "7 times 6 is 42."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("How many days are in a week?", "A week has 7 days."),
]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(smollm2_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qlora")
    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": q, "response": a}) + "\n" for q, a in FACTS * 3))
    config = TrainConfig(
        data=str(data), model=str(smollm2_dir), output_dir=str(tmp / "run"), quantization="nf4",
        lora_r=16, lora_alpha=32, max_steps=8, batch_size=2, grad_accum=1, learning_rate=1e-3, warmup_steps=1,
        logging_steps=1, save_steps=4, eval_steps=4, val_fraction=0.2, gradient_checkpointing=False,
        max_length=96, progress=False,
    )
    return tmp, train(config)


def test_qlora_loss_decreases_on_a_small_set(trained):
    tmp, result = trained
    info = json.loads((tmp / "run" / "adapter" / "cogumi_train.json").read_text())
    assert info["quantization"] == "nf4" and info["backend"] == "transformers"
    assert info["tokenizer"]["end_of_turn"] == "<|im_end|>" and info["tokenizer"]["pad_token"] == "<|endoftext|>"
    logged = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logged if "loss" in r]
    assert len(losses) == 8
    assert sum(losses[-2:]) / 2 < 0.6 * sum(losses[:2]) / 2
    evals = [r["eval_loss"] for r in logged if "eval_loss" in r]
    assert len(evals) >= 2 and evals[-1] < evals[0]
    assert result.counts["validation_examples"] > 0 and result.metrics["best_eval_loss"] == pytest.approx(min(evals))
    assert "grad_norm" in logged[0] and logged[0]["tokens_per_s"] > 0
    assert (tmp / "run" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_qlora_merge_reproduces_the_trained_model_and_it_stops(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cogumi.generation.base import SamplingParams
    from cogumi.generation.hf import TransformersGenerator

    tmp, _ = trained
    result = merge(MergeConfig(adapter=str(tmp / "run" / "adapter"), output_dir=str(tmp / "merged")))
    report = json.loads((tmp / "merged" / "merge_report.json").read_text())
    assert report["base_weights"] == "dequantized"
    assert result.metrics["saved_relative_diff"] < 1e-4
    # Against the model exactly as trained (NF4 weights, bf16 compute): the same predictions.
    assert result.metrics["vs_trained_4bit_top1_agreement"] > 0.95
    assert result.metrics["vs_trained_4bit_relative_diff"] < 0.05

    model = AutoModelForCausalLM.from_pretrained(tmp / "merged" / "model")
    tokenizer = AutoTokenizer.from_pretrained(tmp / "merged" / "model")
    generator = TransformersGenerator.from_loaded(model, tokenizer, progress=False)
    [[completion]] = generator.generate([[{"role": "user", "content": FACTS[0][0]}]],
                                        SamplingParams(max_tokens=48, temperature=0.0))
    assert "Paris" in completion.text
    assert completion.finish_reason == "stop"
