"""The train stage: config checks, bad input, zero-supervision guard, packing equivalence,
kill-and-resume, loss explosion and the monitoring rules. Tiny fixture for mechanics, SmolLM2
where the behaviour of a real model matters."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cogumi.io import DataError
from cogumi.stage import ConfigError, StageError, read_manifest
from cogumi.train.data import IGNORE_INDEX, ChatFormatter, encode_rows, prepare_tokenizer
from cogumi.train.sft import NoSupervisedTokensError, TrainConfig, make_trainer, run

ROOT = Path(__file__).resolve().parents[2]

FACTS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is 2 + 3?", "2 + 3 = 5."),
    ("Name a primary color.", "Red is a primary color."),
    ("What is 7 times 6?", "7 times 6 is 42."),
    ("Reverse the string 'abc'.", "The reverse of 'abc' is 'cba'."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("Write a Python function that doubles a number.", "def double(x):\n    return 2 * x"),
    ("How many days are in a week?", "A week has 7 days."),
]


def write_rows(path: Path, n: int) -> str:
    rows = [{"instruction": q, "response": a} for q, a in (FACTS[i % len(FACTS)] for i in range(n))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def tiny_config(model_dir, data: str, output_dir, **overrides) -> TrainConfig:
    """A few-second CPU run on the tiny fixture; everything else at the stage's defaults."""
    values = dict(
        data=data, model=str(model_dir), output_dir=str(output_dir), quantization="none", lora_r=8,
        max_steps=6, batch_size=2, grad_accum=1, learning_rate=5e-3, warmup_steps=0, logging_steps=1,
        save_steps=3, val_fraction=0.0, gradient_checkpointing=False, max_length=128, progress=False,
    )
    values.update(overrides)
    return TrainConfig(**values)


# ----------------------------------------------------------------------------- config and CLI


def test_config_errors_name_the_field(tmp_path):
    data = write_rows(tmp_path / "d.jsonl", 4)
    base = dict(data=data, model="tiny-llama", output_dir=str(tmp_path / "o"))
    with pytest.raises(ConfigError, match=r"TrainConfig\.lora_r: must be >= 1"):
        TrainConfig(**base, lora_r=0)
    with pytest.raises(ConfigError, match=r"TrainConfig\.lora_dropout"):
        TrainConfig(**base, lora_dropout=1.5)
    with pytest.raises(ConfigError, match=r"TrainConfig\.optimizer: 'adam'"):
        TrainConfig(**base, optimizer="adam")
    with pytest.raises(ConfigError, match=r"TrainConfig\.save_steps: must be a multiple of eval_steps"):
        TrainConfig(**base, save_steps=700, eval_steps=500)
    TrainConfig(**base, save_steps=700, eval_steps=500, val_fraction=0.0)  # no validation: no constraint
    defaults = TrainConfig(**base)
    assert (defaults.lora_r, defaults.lora_alpha, defaults.lora_dropout) == (64, 16.0, 0.05)
    assert defaults.lora_target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert (defaults.quantization, defaults.lr_scheduler, defaults.weight_decay, defaults.max_grad_norm) == \
        ("nf4", "cosine", 0.01, 1.0)
    assert (defaults.max_length, defaults.packing, defaults.learning_rate) == (1024, True, 5e-6)


def test_cli_help_shows_the_training_and_merge_options(capsys):
    from cogumi.cli import main

    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: cogumi train" in out
    for flag in ("--lora-r", "--lora-alpha", "--quantization", "--backend", "--packing", "--no-resume",
                 "--val-fraction", "--early-stopping-patience", "--loss-stop"):
        assert flag in out
    assert "(default: 64)" in out
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    out = capsys.readouterr().out
    assert "usage: cogumi merge" in out and "--base-weights" in out and "dequantized" in out


# ----------------------------------------------------------------------------- bad input


def test_bad_input_fails_before_any_training(tiny_llama_dir, tmp_path):
    data = write_rows(tmp_path / "d.jsonl", 6)

    # Every row longer than max_length, with overlong=drop: nothing left to train on.
    out = tmp_path / "empty"
    with pytest.raises(StageError, match=r"no training examples .* 6 longer than max_length 16"):
        run(tiny_config(tiny_llama_dir, data, out, max_length=16, overlong="drop"))
    assert not (out / "checkpoints").exists()

    # A file with no rows at all.
    (tmp_path / "blank.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty"):
        run(tiny_config(tiny_llama_dir, str(tmp_path / "blank.jsonl"), tmp_path / "blank"))

    # A base model that is nowhere: not a directory, not a built-in, not on a (reachable) hub.
    with pytest.raises(StageError, match="base model 'no-such-org/no-such-model' not found"):
        run(tiny_config(tiny_llama_dir, data, tmp_path / "nomodel", model="no-such-org/no-such-model"))
    (tmp_path / "notamodel").mkdir()
    with pytest.raises(StageError, match=r"has no config\.json"):
        run(tiny_config(tiny_llama_dir, data, tmp_path / "dir", model=str(tmp_path / "notamodel")))


def test_incompatible_checkpoints_are_refused_before_training(tiny_llama_dir, tmp_path):
    data = write_rows(tmp_path / "d.jsonl", 8)
    out = tmp_path / "out"
    first = run(tiny_config(tiny_llama_dir, data, out, max_steps=3))
    assert first.counts["steps"] == 3
    checkpoints = sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*"))
    metrics_before = (out / "metrics.jsonl").read_text()

    with pytest.raises(StageError, match=r"checkpoints of a different run \(learning_rate: 0.005 -> 0.001\)"):
        run(tiny_config(tiny_llama_dir, data, out, max_steps=3, learning_rate=1e-3))
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == checkpoints
    assert (out / "metrics.jsonl").read_text() == metrics_before

    (tmp_path / "d2.jsonl").write_text((tmp_path / "d.jsonl").read_text().replace("Paris", "Lyon"))
    with pytest.raises(StageError, match="the training or validation data changed"):
        run(tiny_config(tiny_llama_dir, str(tmp_path / "d2.jsonl"), out, max_steps=3))

    foreign = tmp_path / "foreign" / "checkpoints" / "checkpoint-5"
    foreign.mkdir(parents=True)
    with pytest.raises(StageError, match="did not write"):
        run(tiny_config(tiny_llama_dir, data, tmp_path / "foreign", max_steps=3))

    # --no-resume discards the old checkpoints and trains from scratch.
    fresh = run(tiny_config(tiny_llama_dir, data, out, max_steps=3, learning_rate=1e-3, resume=False))
    assert fresh.counts["steps"] == 3 and "resumed_from" not in fresh.metrics


# ----------------------------------------------------------------------------- the trainer


def _tiny_setup(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prepare_tokenizer(tokenizer)
    tokenizer.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model, tokenizer


def _args(tmp_path, **overrides):
    from trl import SFTConfig

    values = dict(output_dir=str(tmp_path / "ckpt"), per_device_train_batch_size=2, max_steps=2, packing=True,
                  max_length=256, bf16=False, use_cpu=True, gradient_checkpointing=False, report_to="none",
                  save_strategy="no", disable_tqdm=True, seed=0)
    values.update(overrides)
    return SFTConfig(**values)


def test_a_batch_without_supervised_tokens_fails_loudly(tiny_llama_dir, tmp_path):
    from datasets import Dataset

    model, tokenizer = _tiny_setup(tiny_llama_dir)
    formatter = ChatFormatter(tokenizer)
    columns, _ = encode_rows([{"instruction": q, "response": a} for q, a in FACTS], formatter, max_length=256)
    # Labels all -100, as a template that masks the answers would produce. TRL alone would train on
    # these packed rows with a loss of exactly 0 (it divides by max(count, 1)).
    columns["labels"] = [[IGNORE_INDEX] * len(ids) for ids in columns["input_ids"]]
    trainer = make_trainer(model, tokenizer, _args(tmp_path), train_dataset=Dataset.from_dict(columns))
    with pytest.raises(NoSupervisedTokensError, match="no supervised token"):
        trainer.train()


def _per_example_losses(logits, labels, starts, ends):
    """Mean next-token loss over the supervised tokens of each [start, end) segment of a row."""
    token_loss = torch.nn.functional.cross_entropy(logits[:-1], labels[1:], reduction="none",
                                                   ignore_index=IGNORE_INDEX)
    losses = []
    for start, end in zip(starts, ends):
        count = int((labels[start + 1 : end] != IGNORE_INDEX).sum())
        losses.append(float(token_loss[start : end - 1].sum()) / count)
    return losses


def test_a_packed_batch_gives_the_unpacked_per_example_losses(tiny_llama_dir, tmp_path):
    from datasets import Dataset

    model, tokenizer = _tiny_setup(tiny_llama_dir)
    formatter = ChatFormatter(tokenizer)
    columns, _ = encode_rows([{"instruction": q, "response": a} for q, a in FACTS], formatter, max_length=256)
    trainer = make_trainer(model, tokenizer, _args(tmp_path), train_dataset=Dataset.from_dict(columns))
    batch = next(iter(trainer.get_train_dataloader()))
    ids, labels, positions = batch["input_ids"][0], batch["labels"][0], batch["position_ids"][0]
    starts = (positions == 0).nonzero().flatten().tolist()
    ends = [*starts[1:], len(ids)]
    assert len(starts) >= 3, "the batch should hold several packed examples"

    model.eval()
    with torch.no_grad():
        packed = model(input_ids=ids[None], position_ids=positions[None]).logits[0]
        leaky = model(input_ids=ids[None]).logits[0]  # one causal sequence: examples see each other
        packed_losses = _per_example_losses(packed, labels, starts, ends)
        leaky_losses = _per_example_losses(leaky, labels, starts, ends)
        alone_losses, supervised = [], 0
        for start, end in zip(starts, ends):
            example = ids[start:end].tolist()
            row = columns["input_ids"].index(example)
            alone_ids = torch.tensor(example)
            alone_labels = torch.tensor(columns["labels"][row])
            logits = model(input_ids=alone_ids[None]).logits[0]
            alone_losses += _per_example_losses(logits, alone_labels, [0], [len(example)])
            supervised += int((alone_labels[1:] != IGNORE_INDEX).sum())
        # The trainer's own loss on the packed batch (TRL's fused LM head) is the token mean.
        trainer_loss = float(trainer.compute_loss(model, {k: v for k, v in batch.items()}))

    assert packed_losses == pytest.approx(alone_losses, abs=1e-4)
    # The check can fail: without per-example positions the later examples attend to earlier ones.
    assert max(abs(a - b) for a, b in zip(leaky_losses[1:], alone_losses[1:])) > 1e-3
    weights = [int((labels[s + 1 : e] != IGNORE_INDEX).sum()) for s, e in zip(starts, ends)]
    assert sum(weights) == supervised
    assert trainer_loss == pytest.approx(sum(w * x for w, x in zip(weights, alone_losses)) / supervised, abs=1e-4)


# ----------------------------------------------------------------------------- resume

KILL_SCRIPT = """
import json, os, signal, sys
from transformers import TrainerCallback
from cogumi.train.sft import TrainConfig, train

class KillAfter(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)

train(TrainConfig(**json.loads(sys.argv[1])), callbacks=[KillAfter()])
"""


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_result(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file

    data = write_rows(tmp_path / "d.jsonl", 24)
    common = dict(max_steps=16, save_steps=4, lora_dropout=0.1, learning_rate=3e-3)
    reference = run(tiny_config(tiny_llama_dir, data, tmp_path / "whole", **common))

    killed_out = tmp_path / "killed"
    config = tiny_config(tiny_llama_dir, data, killed_out, **common)
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, json.dumps(config.to_dict()), "10"], cwd=ROOT,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    checkpoints = killed_out / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    assert not (killed_out / "adapter").exists()
    # A kill in the middle of writing checkpoint-12 leaves it without trainer_state.json.
    partial = checkpoints / "checkpoint-12"
    partial.mkdir()
    (partial / "adapter_config.json").write_text((checkpoints / "checkpoint-8" / "adapter_config.json").read_text())

    resumed = run(config)
    assert resumed.metrics["resumed_from"] == "checkpoint-8"
    assert resumed.counts["steps"] == reference.counts["steps"] == 16
    assert resumed.metrics["final_train_loss"] == pytest.approx(reference.metrics["final_train_loss"], rel=1e-4)
    whole = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    again = load_file(killed_out / "adapter" / "adapter_model.safetensors")
    assert whole.keys() == again.keys()
    assert all(torch.allclose(whole[k], again[k], atol=1e-5) for k in whole)
    # The metrics log has each step once: the lines the killed run wrote past step 8 were dropped.
    steps = [json.loads(line)["step"] for line in (killed_out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, 17))
    manifest = read_manifest(killed_out)
    assert manifest["inputs"]["data"]["sha256"] and "trl" in manifest["packages"]
    report = json.loads((killed_out / "train_report.json").read_text())
    assert report["train_data"]["kept"] == 24 and report["metrics"]["grad_norm_samples"] > 0


# ----------------------------------------------------------------------------- monitoring


def test_monitoring_rules(tmp_path):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from cogumi.train.callbacks import GradNormMonitor, LossGuard, ValidationMonitor

    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=5e-6, use_cpu=True, report_to="none")

    def feed(callback, step, **logs):
        state, control = TrainerState(global_step=step), TrainerControl()
        callback.on_log(args, state, control, logs=logs)
        return control

    guard = LossGuard(stop_loss=5.0, warn_loss=3.0, warn_after=1000)
    assert not feed(guard, 1, loss=6.2).should_training_stop  # starting high is not an explosion
    assert not feed(guard, 999, loss=3.5).should_training_stop and not guard.warnings
    assert not feed(guard, 1000, loss=3.5).should_training_stop and "3e-06" in guard.warnings[0]
    control = feed(guard, 1001, loss=7.0)
    assert control.should_training_stop and not control.should_save
    assert "exploded: 7.000 > 5" in guard.stop_reason and "2e-06" in guard.stop_reason
    nan_guard = LossGuard()
    feed(nan_guard, 1, loss=2.0)
    assert feed(nan_guard, 2, loss=math.nan).should_training_stop and "nan" in nan_guard.stop_reason

    monitor = ValidationMonitor(patience=2, overfit_gap=0.5)
    for step, val, stop in [(500, 2.0, False), (1000, 1.9, False), (1500, 1.95, False), (2000, 1.91, True)]:
        feed(monitor, step, loss=1.8)
        control = TrainerControl()
        monitor.on_evaluate(args, TrainerState(global_step=step), control, metrics={"eval_loss": val})
        assert control.should_training_stop is stop
    assert "not improved for 2 evaluations (best 1.9000 at step 1000)" in monitor.stop_reason
    overfit = ValidationMonitor(patience=0, overfit_gap=0.5)
    feed(overfit, 10, loss=1.0)
    control = TrainerControl()
    overfit.on_evaluate(args, TrainerState(global_step=10), control, metrics={"eval_loss": 1.6})
    assert control.should_training_stop and "overfitting" in overfit.stop_reason

    norms = GradNormMonitor(max_grad_norm=1.0)
    for norm in (0.5, 2.0, 0.7, 0.9):
        feed(norms, 1, grad_norm=norm)
    assert norms.summary()["grad_clip_share"] == 0.25 and "too high" in norms.summary()["grad_norm_advice"]


@pytest.mark.slow
def test_a_planted_loss_explosion_stops_the_stage(smollm2_dir, tmp_path):
    data = write_rows(tmp_path / "d.jsonl", 12)
    out = tmp_path / "out"
    config = tiny_config(smollm2_dir, data, out, learning_rate=0.2, max_steps=8, save_steps=1, max_length=64)
    with pytest.raises(StageError, match=r"loss (exploded|became)") as info:
        run(config)
    assert "lower learning rate" in str(info.value)
    assert read_manifest(out) is None and not (out / "adapter").exists()
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    stopped_at = max(r["step"] for r in logged if "loss" in r)
    assert stopped_at < 8
    # The diverged weights were not checkpointed.
    assert not (out / "checkpoints" / f"checkpoint-{stopped_at}").exists()


def test_qlora_adapters_keep_learning_at_the_spec_learning_rate(tiny_llama_dir, tmp_path):
    """Every LoRA weight moves on the step after a validation pass, at lr 5e-6: neither rounded
    away in bf16 (TRL's cast for quantized bases) nor cut off from its gradient by bitsandbytes'
    CPU inference layout (which a validation pass switches on, and only a checkpoint save undoes)."""
    from transformers import TrainerCallback

    from cogumi.train.sft import train

    class Snapshot(TrainerCallback):
        def __init__(self):
            self.weights: dict[int, dict] = {}

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.weights[state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters()
                                               if p.requires_grad}

    data = write_rows(tmp_path / "d.jsonl", 12)
    snapshot = Snapshot()
    train(tiny_config(tiny_llama_dir, data, tmp_path / "out", quantization="nf4", learning_rate=5e-6,
                      max_steps=2, save_steps=2, eval_steps=1, val_fraction=0.25, lora_dropout=0.0),
          callbacks=[snapshot])
    before, after = snapshot.weights[1], snapshot.weights[2]  # step 2 follows the validation at step 1
    assert all(t.dtype == torch.float32 for t in after.values())
    # An entry whose gradient is ~0 can stay put; a weight that stopped learning is stuck whole.
    changed = {name: float((before[name] != after[name]).float().mean()) for name in after}
    assert min(changed.values()) > 0.95, {k: v for k, v in changed.items() if v <= 0.95}
