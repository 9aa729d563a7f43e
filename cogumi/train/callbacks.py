"""Trainer callbacks for the spec's monitoring rules (seeds/003, "Monitoring & Risk Mitigation").

* :class:`LossGuard` — loss explosion: a non-finite loss or a loss above ``stop_loss`` (5.0)
  stops the run with a message saying what to do; a loss above ``warn_loss`` (3.0) after
  ``warn_after`` (1,000) steps is reported with a lower learning rate to try.
* :class:`ValidationMonitor` — early stopping when the validation loss has not improved for
  ``patience`` evaluations, or when it exceeds the training loss by ``overfit_gap`` (0.5).
* :class:`GradNormMonitor` — how often the logged gradient norm was clipped (the spec: clipped
  more than 5% of the time, lower the LR; never clipped, the LR could go up).
* :class:`MetricsLog` — every log record as one JSON line, resumable.
* :class:`ProgressBar` — steps with loss, tokens/s and the ETA.

Callbacks that stop a run set ``stop_reason``; the stage reads it after ``trainer.train()``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import TrainerCallback

log = logging.getLogger("cogumi.train")


@dataclass
class TokenCounter:
    """Tokens the trainer has processed in this process (the trainer adds to it every batch).

    ``tokens`` are real tokens, ``slots`` the positions computed including padding, and
    ``supervised`` the tokens that carry a label; rates are over this process's time only, so a
    resumed run reports its own speed.
    """

    tokens: int = 0
    slots: int = 0
    supervised: int = 0
    started: float = field(default_factory=time.perf_counter)

    def add(self, *, tokens: int, slots: int, supervised: int) -> None:
        self.tokens += tokens
        self.slots += slots
        self.supervised += supervised

    def tokens_per_second(self) -> float:
        elapsed = time.perf_counter() - self.started
        return self.tokens / elapsed if elapsed > 0 else 0.0


class LossGuard(TrainerCallback):
    """Stop a diverging run; warn about a run that is not coming down (the spec's rules).

    The stop rule is about an *explosion*: a loss above ``stop_loss`` that is also more than
    10% above the run's first logged loss. A run that merely starts above ``stop_loss`` (a
    random-initialised model, answers far from the base model's style) and comes down is not
    stopped; a non-finite loss always is.

    Args:
        stop_loss: stop when a logged training loss exceeds this (0 turns the rule off).
        warn_loss: warn when a logged loss exceeds this at or after step ``warn_after``
            (0 turns the rule off).
    """

    def __init__(self, *, stop_loss: float = 5.0, warn_loss: float = 3.0, warn_after: int = 1000):
        self.stop_loss = stop_loss
        self.warn_loss = warn_loss
        self.warn_after = warn_after
        self.first_loss: float | None = None
        self.stop_reason: str | None = None
        self.warnings: list[str] = []

    def on_train_begin(self, args, state, control, **kwargs):
        # A resumed run judges against the run's first loss (restored with the trainer state),
        # so it takes the same decisions as an uninterrupted one.
        first = next((h["loss"] for h in state.log_history if "loss" in h), None)
        if first is not None:
            self.first_loss = first if math.isfinite(first) else math.inf

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is None or self.stop_reason:
            return
        if self.first_loss is None:
            self.first_loss = loss if math.isfinite(loss) else math.inf
        step = state.global_step
        lr = args.learning_rate
        if not math.isfinite(loss):
            self.stop_reason = (
                f"the training loss became {loss} at step {step}: the run diverged. Restart with a lower "
                f"learning rate (now {lr:g}; try {lr * 0.4:.2g}) and check the data for empty or huge rows."
            )
        elif self.stop_loss and loss > self.stop_loss and loss > 1.1 * self.first_loss:
            self.stop_reason = (
                f"the training loss exploded: {loss:.3f} > {self.stop_loss:g} at step {step}. Restart with a "
                f"lower learning rate (now {lr:g}; the spec goes from 5e-6 to 2e-6, i.e. try {lr * 0.4:.2g})."
            )
        elif self.warn_loss and step >= self.warn_after and loss > self.warn_loss:
            message = (
                f"training loss {loss:.3f} > {self.warn_loss:g} after {step} steps: consider a lower learning "
                f"rate (now {lr:g}; the spec suggests 3e-6 for 5e-6, i.e. {lr * 0.6:.2g})"
            )
            if not self.warnings:
                log.warning(message)
            self.warnings.append(message)
        if self.stop_reason:
            log.error(self.stop_reason)
            control.should_training_stop = True
            control.should_save = False  # never checkpoint the diverged weights
            control.should_evaluate = False


class ValidationMonitor(TrainerCallback):
    """Early stopping on validation loss.

    Args:
        patience: stop after this many evaluations without an improvement of more than
            ``min_delta`` (0 turns the rule off). The spec's "3K steps" at one evaluation per
            500 steps is a patience of 6.
        overfit_gap: stop when the validation loss exceeds the latest training loss by more than
            this (0 turns the rule off).
    """

    def __init__(self, *, patience: int = 6, overfit_gap: float = 0.5, min_delta: float = 0.0):
        self.patience = patience
        self.overfit_gap = overfit_gap
        self.min_delta = min_delta
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad_evaluations = 0
        self.train_loss: float | None = None
        self.stop_reason: str | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.train_loss = logs["loss"]

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        val = (metrics or {}).get("eval_loss")
        if val is None:
            return
        if self.best is None or val < self.best - self.min_delta:
            self.best, self.best_step, self.bad_evaluations = val, state.global_step, 0
        else:
            self.bad_evaluations += 1
        if self.patience and self.bad_evaluations >= self.patience:
            self.stop_reason = (
                f"early stop at step {state.global_step}: validation loss has not improved for "
                f"{self.bad_evaluations} evaluations (best {self.best:.4f} at step {self.best_step})"
            )
        elif self.overfit_gap and self.train_loss is not None and val > self.train_loss + self.overfit_gap:
            self.stop_reason = (
                f"early stop at step {state.global_step}: validation loss {val:.4f} exceeds the training "
                f"loss {self.train_loss:.4f} by more than {self.overfit_gap:g} (overfitting)"
            )
        if self.stop_reason:
            log.warning(self.stop_reason)
            control.should_training_stop = True


class GradNormMonitor(TrainerCallback):
    """Share of logged steps whose gradient norm (before clipping) exceeded ``max_grad_norm``.

    Trainer reports the norm at logging steps only, so this is a sample of one step per
    ``logging_steps``.
    """

    def __init__(self, max_grad_norm: float):
        self.max_grad_norm = max_grad_norm
        self.samples = 0
        self.clipped = 0
        self.largest = 0.0

    def on_log(self, args, state, control, logs=None, **kwargs):
        norm = (logs or {}).get("grad_norm")
        if norm is None or not math.isfinite(norm):
            return
        self.samples += 1
        self.largest = max(self.largest, norm)
        if self.max_grad_norm and norm > self.max_grad_norm:
            self.clipped += 1

    def summary(self) -> dict:
        share = self.clipped / self.samples if self.samples else 0.0
        if not self.samples or not self.max_grad_norm:
            advice = ""
        elif share > 0.05:
            advice = "gradients were clipped on more than 5% of logged steps: the learning rate may be too high"
        elif share == 0:
            advice = "gradients were never clipped: the learning rate could go up"
        else:
            advice = "gradient clipping is rare: the learning rate looks sound"
        return {"grad_norm_samples": self.samples, "grad_clip_share": round(share, 4),
                "grad_norm_max": round(self.largest, 4), "grad_norm_advice": advice}


class MetricsLog(TrainerCallback):
    """Append every log record (training and validation) to a JSONL file, one line per record.

    It also asks Trainer to log the last step, whatever ``logging_steps`` is.

    A resumed run first drops the lines past the step it resumes from: the killed run logged
    steps that are about to be trained again.
    """

    def __init__(self, path: str | os.PathLike, counter: TokenCounter | None = None):
        self.path = Path(path)
        self.counter = counter
        self._handle = None

    def on_train_begin(self, args, state, control, **kwargs):
        kept = []
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line).get("step", 0) <= state.global_step:
                        kept.append(line)
                except json.JSONDecodeError:  # a line cut short by the kill
                    continue
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
        os.replace(tmp, self.path)
        self._handle = self.path.open("a", encoding="utf-8")

    def on_step_end(self, args, state, control, **kwargs):
        # Trainer logs every logging_steps only; the last step's loss is the one a run ends on.
        if state.global_step >= state.max_steps:
            control.should_log = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._handle is None or not logs:
            return
        record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), "time": round(time.time(), 3)}
        record.update({k: v for k, v in logs.items() if isinstance(v, (int, float, str))})
        if self.counter is not None and "loss" in logs:
            record["tokens_per_s"] = round(self.counter.tokens_per_second(), 1)
        self._handle.write(json.dumps(record) + "\n")
        self._handle.flush()

    def on_train_end(self, args, state, control, **kwargs):
        if self._handle is not None:
            self._handle.close()
            self._handle = None


class ProgressBar(TrainerCallback):
    """A tqdm bar over optimizer steps showing the latest loss and tokens/s (tqdm adds the ETA)."""

    def __init__(self, counter: TokenCounter):
        self.counter = counter
        self.bar = None
        self.loss: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", unit="step",
                        dynamic_ncols=True)

    def _postfix(self):
        postfix = {"tok/s": f"{self.counter.tokens_per_second():.0f}"}
        if self.loss is not None:
            postfix = {"loss": f"{self.loss:.4f}", **postfix}
        self.bar.set_postfix(postfix, refresh=False)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self._postfix()
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs:
            return
        if "loss" in logs:
            self.loss = logs["loss"]
            self._postfix()
            self.bar.refresh()
        if "eval_loss" in logs:
            self.bar.write(f"step {state.global_step}: validation loss {logs['eval_loss']:.4f}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
