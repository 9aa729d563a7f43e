"""``cogumi train``: QLoRA supervised fine-tuning (the spec's phase 1A), resumable.

The pipeline, and who does what:

1. **Data** (:mod:`cogumi.train.data`): phase 0's instruction/response rows or chat rows →
   chats rendered by the tokenizer's template (the spec's ChatML when it has none) → token ids
   with labels on the assistant turns only, each through its end-of-turn token; rows longer
   than ``max_length`` truncated or dropped, and counted. All before the model is loaded.
2. **Model**: the base in 4-bit NF4 with double quantization and bf16 compute (bitsandbytes;
   on CPU too), LoRA on q/k/v/o/gate/up/down (peft), or unsloth's ``FastLanguageModel`` on
   CUDA when installed.
3. **Training**: TRL's ``SFTTrainer`` on the pre-tokenized examples: best-fit-decreasing
   packing into ``max_length`` rows, trained padding-free with position ids that restart at
   every example (transformers turns them into a block-diagonal mask, or flash-attention's
   sequence boundaries), so no example attends to another.
4. **Checkpoints**: every ``save_steps`` into ``OUTPUT/checkpoints`` with optimizer, scheduler,
   RNG and data position; a rerun resumes from the last *complete* one, after checking that it
   was written by the same config, data and base model.

Outputs: ``adapter/`` (LoRA weights, tokenizer, ``cogumi_train.json`` for the merge stage),
``metrics.jsonl`` and ``train_report.json``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cogumi.io import OnError, sha256_file, write_json
from cogumi.stage import ConfigError, StageConfig, StageError, StageResult, option, stage
from cogumi.train.data import IGNORE_INDEX, LossOn, Overlong

log = logging.getLogger("cogumi.train")

Backend = Literal["auto", "unsloth", "transformers"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]
#: transformers' schedules that need no extra arguments.
Scheduler = Literal["cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts",
                    "polynomial", "inverse_sqrt"]

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

#: Files every resumable checkpoint has once Trainer finished writing it (trainer_state.json last).
CHECKPOINT_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt", "adapter_config.json")
RUN_RECORD = "cogumi_run.json"
TRAIN_INFO = "cogumi_train.json"

#: Optimizers Trainer accepts that make sense here ("auto": 8-bit AdamW on CUDA, AdamW on CPU).
OPTIMIZERS = ("auto", "adamw_8bit", "paged_adamw_8bit", "adamw_torch", "adamw_torch_fused",
              "paged_adamw_32bit", "adafactor", "sgd")


@dataclass(kw_only=True)
class TrainConfig(StageConfig):
    data: str = option(help="Training JSONL: phase 0's instruction/response rows or chat 'messages' rows.",
                       input=True, positional=True)
    model: str = option(help="Base model: checkpoint directory, built-in (smollm2-135m, tiny-llama) or hub id.",
                        input="maybe")
    val_data: str = option("", help="Validation JSONL; empty: hold out val_fraction of the training rows.",
                           input="maybe")
    val_fraction: float = option(0.02, help="Share of the rows held out for validation when val_data is empty "
                                 "(0: no validation).")
    backend: Backend = option("auto", help="auto: unsloth on CUDA when installed (the 'gpu' extra), else "
                              "transformers + bitsandbytes + peft.")
    quantization: Literal["nf4", "none"] = option(
        "nf4", help="Base weights: 4-bit NF4, double quantization, bf16 compute (QLoRA); or none (full precision).")
    device: str = option("auto", help="auto | cpu | cuda.")
    lora_r: int = option(64, help="LoRA rank.")
    lora_alpha: float = option(16.0, help="LoRA alpha (updates are scaled by alpha / r).")
    lora_dropout: float = option(0.05, help="Dropout on the LoRA input.")
    lora_target_modules: list[str] = option(default_factory=lambda: list(LORA_TARGETS),
                                            help="Linear layers that get LoRA adapters.")
    epochs: float = option(3.0, help="Passes over the training data (ignored when max_steps > 0).")
    max_steps: int = option(0, help="Stop after this many optimizer steps (0: train for `epochs`).")
    batch_size: int = option(32, help="Rows per device per micro-batch (packed rows of max_length tokens).")
    grad_accum: int = option(2, help="Micro-batches per optimizer step (effective batch = batch_size x grad_accum).")
    learning_rate: float = option(5e-6, help="Peak learning rate.")
    lr_scheduler: Scheduler = option("cosine", help="Learning-rate schedule after the warm-up.")
    warmup_steps: int = option(500, help="Linear warm-up steps.")
    weight_decay: float = option(0.01, help="AdamW weight decay.")
    max_grad_norm: float = option(1.0, help="Gradient clipping norm (0: no clipping).")
    optimizer: str = option("auto", help=f"One of {', '.join(OPTIMIZERS)}; auto: adamw_8bit on CUDA, "
                            "adamw_torch on CPU.")
    precision: Precision = option("auto", help="Mixed precision; auto: bf16 on CUDA (fp16 where bf16 is "
                                  "unsupported), fp32 on CPU.")
    gradient_checkpointing: bool = option(True, help="Recompute activations in the backward pass (less memory, "
                                          "about 30% slower).")
    attn_implementation: str = option("", help="Attention kernel (sdpa, eager, flash_attention_2); empty: "
                                      "the transformers default.")
    max_length: int = option(1024, help="Tokens per example and per packed row.")
    packing: bool = option(True, help="Pack examples into max_length rows (padding-free, no cross-attention).")
    overlong: Overlong = option("truncate", help="Rows longer than max_length: truncate (keep the start) or "
                                "drop; either is counted in the report.")
    loss_on: LossOn = option("assistant", help="Supervise the assistant turns only, or all tokens.")
    chat_template: str = option("auto", help="auto: the tokenizer's template, or the spec's ChatML when it has "
                                "none; chatml: always ChatML; or a Jinja file.")
    on_error: OnError = option("raise", help="Bad JSONL rows: raise, or skip them into rejected.jsonl.")
    eval_steps: int = option(500, help="Evaluate on the validation rows every N steps.")
    early_stopping_patience: int = option(6, help="Stop after N evaluations without a better validation loss "
                                          "(the spec's 3K steps at eval_steps 500; 0: off).")
    overfit_gap: float = option(0.5, help="Stop when validation loss exceeds training loss by this (0: off).")
    loss_stop: float = option(5.0, help="Stop with an error when the training loss exceeds this (0: off).")
    loss_warn: float = option(3.0, help="Warn (suggest a lower LR) when the loss exceeds this after "
                              "loss_warn_after steps (0: off).")
    loss_warn_after: int = option(1000, help="Steps before the loss_warn rule applies.")
    logging_steps: int = option(10, help="Log loss, gradient norm and learning rate every N steps.")
    save_steps: int = option(1000, help="Checkpoint every N steps.", hashed=False)
    save_total_limit: int = option(5, help="Checkpoints kept (the newest, and the best by validation loss).",
                                   hashed=False)
    seed: int = option(42, help="Seed for the split, LoRA initialisation, dropout and data order.")
    resume: bool = option(True, help="Continue from the last complete checkpoint in output_dir/checkpoints; "
                          "--no-resume deletes them and starts over.", hashed=False)
    dataloader_workers: int = option(0, help="Data-loader worker processes (the spec's H100 recipe: 10).",
                                     hashed=False)
    prefetch_factor: int = option(2, help="Batches each data-loader worker prepares ahead.", hashed=False)
    tensorboard: bool = option(True, help="Also write TensorBoard logs when tensorboard is installed.",
                               hashed=False)
    progress: bool = option(True, help="Show a progress bar with loss, tokens/s and ETA.", hashed=False)
    keep_sparsity: bool = option(False, help="Recovery fine-tuning of a pruned model: LoRA updates are masked by "
                                 "the base weights' zeros in training and merging, so a 2:4 model stays 2:4 "
                                 "(needs --quantization none and the transformers backend).")

    def check(self) -> None:
        name = type(self).__name__
        if self.keep_sparsity and (self.quantization != "none" or self.backend == "unsloth"):
            raise ConfigError(f"{name}.keep_sparsity: needs quantization 'none' and the transformers backend (the "
                              "mask is read from the full-precision base weights' zeros)")
        positive = ("lora_r", "batch_size", "grad_accum", "max_length", "eval_steps", "logging_steps",
                    "save_steps", "save_total_limit", "prefetch_factor")
        for field_name in positive:
            if getattr(self, field_name) < 1:
                raise ConfigError(f"{name}.{field_name}: must be >= 1, got {getattr(self, field_name)}")
        non_negative = ("max_steps", "warmup_steps", "weight_decay", "max_grad_norm", "early_stopping_patience",
                        "overfit_gap", "loss_stop", "loss_warn", "loss_warn_after", "dataloader_workers")
        for field_name in non_negative:
            if getattr(self, field_name) < 0:
                raise ConfigError(f"{name}.{field_name}: must be >= 0, got {getattr(self, field_name)}")
        if self.lora_alpha <= 0:
            raise ConfigError(f"{name}.lora_alpha: must be > 0, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"{name}.lora_dropout: must be in [0, 1), got {self.lora_dropout}")
        if not self.lora_target_modules:
            raise ConfigError(f"{name}.lora_target_modules: name at least one layer")
        if self.learning_rate <= 0:
            raise ConfigError(f"{name}.learning_rate: must be > 0, got {self.learning_rate}")
        if self.max_steps == 0 and self.epochs <= 0:
            raise ConfigError(f"{name}.epochs: must be > 0 when max_steps is 0, got {self.epochs}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"{name}.val_fraction: must be in [0, 1), got {self.val_fraction}")
        if self.max_length < 16:
            raise ConfigError(f"{name}.max_length: must be >= 16, got {self.max_length}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"{name}.optimizer: {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if self.device != "auto" and self.device != "cpu" and not self.device.startswith("cuda"):
            raise ConfigError(f"{name}.device: expected auto, cpu or cuda[:N], got {self.device!r}")
        if self.wants_validation() and self.save_steps % self.eval_steps:
            raise ConfigError(
                f"{name}.save_steps: must be a multiple of eval_steps ({self.eval_steps}) so that the best "
                f"checkpoint by validation loss is among those saved; got {self.save_steps}"
            )

    def wants_validation(self) -> bool:
        return bool(self.val_data) or self.val_fraction > 0

    def checkpoints_dir(self) -> Path:
        return self.out("checkpoints")

    def outputs(self) -> dict[str, Path]:
        return {"adapter": self.out("adapter"), "metrics": self.out("metrics.jsonl"),
                "report": self.out("train_report.json")}


class NoSupervisedTokensError(StageError):
    """A training batch in which no token carries a label: its loss would be a silent zero."""


# ----------------------------------------------------------------------------- the trainer


def make_trainer(model, tokenizer, args, *, train_dataset, eval_dataset=None, peft_config=None,
                 callbacks=(), counter=None):
    """TRL's ``SFTTrainer`` with one addition: every batch must have a supervised token.

    TRL computes ``sum(token losses) / max(supervised tokens, 1)``, so a batch whose labels are
    all ``-100`` (a broken template, a prompt filling ``max_length``) trains as a silent zero
    loss. Here it is an error naming the cause. The trainer also feeds ``counter`` (tokens,
    padded slots and supervised tokens of every training batch) for tokens/s.
    """
    from trl import SFTTrainer

    class CogumiSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs["labels"]
            supervised = int((labels[:, 1:] != IGNORE_INDEX).sum())
            if supervised == 0:
                raise NoSupervisedTokensError(
                    f"a {'training' if model.training else 'validation'} batch of {labels.numel()} tokens has no "
                    "supervised token (every label is -100): check the chat template's assistant turns and "
                    "that prompts leave room for the answer within max_length"
                )
            if model.training and counter is not None:
                if "attention_mask" in inputs:
                    tokens = int(inputs["attention_mask"].sum())
                else:  # padding-free: the examples laid end to end in one row, no padding
                    tokens = int(inputs["input_ids"].numel())
                counter.add(tokens=tokens, slots=int(inputs["input_ids"].numel()), supervised=supervised)
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    return CogumiSFTTrainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                            processing_class=tokenizer, peft_config=peft_config, callbacks=list(callbacks))


# ----------------------------------------------------------------------------- checks


def resolve_backend(config: TrainConfig, device: str) -> str:
    """The backend that will run: unsloth only with CUDA and the package installed."""
    has_unsloth = importlib.util.find_spec("unsloth") is not None
    if config.backend == "unsloth":
        if not device.startswith("cuda"):
            raise StageError("train: backend 'unsloth' needs a CUDA GPU; use backend 'transformers' on this machine")
        if not has_unsloth:
            raise StageError("train: backend 'unsloth' is not installed: pip install 'cogumi[gpu]'")
        return "unsloth"
    if config.backend == "auto" and device.startswith("cuda") and has_unsloth:
        return "unsloth"
    return "transformers"


def resolve_base_model(name: str) -> str:
    """A loadable base model path or hub id, or a :class:`StageError` before anything is trained."""
    from cogumi.models.loading import resolve_model

    try:
        resolved = resolve_model(name)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as exc:
        raise StageError(f"train: base model {name!r}: {exc}") from None
    path = Path(resolved)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise StageError(f"train: base model directory {path} has no config.json (not a checkpoint)")
        return resolved
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(resolved)
    except Exception as exc:  # OSError offline, HTTP errors online, ValueError for odd names
        raise StageError(
            f"train: base model {name!r} not found: not a checkpoint directory, a built-in "
            f"(smollm2-135m, tiny-llama) or a reachable hub id ({type(exc).__name__})"
        ) from None
    return resolved


def _model_identity(resolved: str) -> dict[str, Any]:
    """A cheap fingerprint of the base model: its config and the names and sizes of its files."""
    path = Path(resolved)
    if not path.is_dir():
        return {"hub_id": resolved}
    files = {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}
    return {"config_sha256": sha256_file(path / "config.json"), "files": files}


def _run_record(config: TrainConfig, resolved: str) -> dict[str, Any]:
    """What a checkpoint must have been trained with to be resumed by this config."""
    hashed = {f: v for f, v in config.to_dict().items()
              if config.__dataclass_fields__[f].metadata.get("hashed", True) and f != "output_dir"}
    data = {"data": sha256_file(config.data)}
    if config.val_data:
        data["val_data"] = sha256_file(config.val_data)
    record = {"config": hashed, "data_sha256": data, "model": _model_identity(resolved)}
    record["fingerprint"] = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
    return record


def _checkpoint_step(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[1])


def is_complete_checkpoint(path: Path) -> bool:
    """Trainer writes ``trainer_state.json`` last: a checkpoint without it was cut short."""
    return all((path / name).is_file() for name in CHECKPOINT_FILES)


def prepare_checkpoints(config: TrainConfig, record: dict[str, Any]) -> Path | None:
    """The checkpoint to resume from, after checking that the directory's checkpoints fit.

    Raises :class:`StageError` when ``output_dir/checkpoints`` holds checkpoints of another run
    (different hashed config, data or base model) — before any training. Incomplete checkpoints
    (a kill during saving) are removed; Trainer's own ``get_last_checkpoint`` would pick them and
    then fail to load them.
    """
    directory = config.checkpoints_dir()
    checkpoints = sorted(directory.glob("checkpoint-*"), key=_checkpoint_step) if directory.is_dir() else []
    if checkpoints and not config.resume:
        log.warning("train: --no-resume: deleting %d old checkpoint(s) in %s", len(checkpoints), directory)
        shutil.rmtree(directory)
        checkpoints = []
    if not checkpoints:
        directory.mkdir(parents=True, exist_ok=True)
        write_json(directory / RUN_RECORD, record)
        return None
    stored_path = directory / RUN_RECORD
    if not stored_path.is_file():
        raise StageError(
            f"train: {directory} holds checkpoints that this stage did not write (no {RUN_RECORD}); "
            "use another output_dir, or --no-resume to delete them"
        )
    stored = json.loads(stored_path.read_text(encoding="utf-8"))
    if stored.get("fingerprint") != record["fingerprint"]:
        differences = [
            f"{key}: {stored.get('config', {}).get(key)!r} -> {value!r}"
            for key, value in record["config"].items() if stored.get("config", {}).get(key) != value
        ]
        if stored.get("data_sha256") != record["data_sha256"]:
            differences.append("the training or validation data changed")
        if stored.get("model") != record["model"]:
            differences.append("the base model changed")
        raise StageError(
            f"train: {directory} holds checkpoints of a different run ({'; '.join(differences) or 'unknown'}); "
            "use another output_dir, or --no-resume to delete them"
        )
    for checkpoint in reversed(checkpoints):
        if is_complete_checkpoint(checkpoint):
            return checkpoint
        log.warning("train: removing incomplete checkpoint %s (the run was killed while saving it)", checkpoint)
        shutil.rmtree(checkpoint)
    return None


# ----------------------------------------------------------------------------- model


def _embedding_module_names(model) -> list[str]:
    """Short names of the input and output embedding modules (``embed_tokens``, ``lm_head``)."""
    wanted = {id(model.get_input_embeddings()), id(model.get_output_embeddings())}
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if id(module) in wanted})


def lora_config(config: TrainConfig, *, modules_to_save: list[str] | None = None):
    from peft import LoraConfig

    return LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_target_modules), bias="none", task_type="CAUSAL_LM",
        modules_to_save=modules_to_save or None, ensure_weight_tying=bool(modules_to_save),
    )


def _resize_for_added_tokens(model, tokenizer, added: list[str]) -> list[str]:
    """Grow the embeddings for added tokens; return the modules that must then be trained whole.

    New rows start at the mean embedding. They are trained through peft's ``modules_to_save``
    (input and output embeddings, kept tied when the model ties them): LoRA alone never changes
    an embedding row, so a ChatML marker new to the vocabulary would stay untrained.
    """
    if not added:
        return []
    model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    return _embedding_module_names(model)


def _precision(config: TrainConfig, device: str) -> tuple[bool, bool, bool]:
    """``(bf16, fp16, tf32)`` for the Trainer."""
    if not device.startswith("cuda"):
        if config.precision in ("bf16", "fp16"):
            log.warning("train: %s mixed precision is a CUDA feature; training in fp32 on %s", config.precision, device)
        return False, False, False
    import torch

    major, _ = torch.cuda.get_device_capability()
    bf16_ok = torch.cuda.is_bf16_supported()
    if config.precision == "auto":
        return bf16_ok, not bf16_ok, major >= 8
    return config.precision == "bf16", config.precision == "fp16", major >= 8


def _tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None


def sft_args(config: TrainConfig, *, device: str, backend: str, has_validation: bool):
    """The ``SFTConfig`` for this run (checkpoints under ``output_dir/checkpoints``)."""
    from trl import SFTConfig

    bf16, fp16, tf32 = _precision(config, device)
    optimizer = config.optimizer
    if optimizer == "auto":
        optimizer = "adamw_8bit" if device.startswith("cuda") else "adamw_torch"
    workers = config.dataloader_workers
    return SFTConfig(
        output_dir=str(config.checkpoints_dir()),
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        optim=optimizer,
        bf16=bf16,
        fp16=fp16,
        tf32=tf32 or None,
        # unsloth installs its own checkpointing with get_peft_model
        gradient_checkpointing=config.gradient_checkpointing and backend != "unsloth",
        logging_steps=config.logging_steps,
        logging_first_step=True,  # the loss the run starts from (LossGuard's reference)
        # Trainer replaces a NaN/inf step loss by the running mean by default, which would hide
        # exactly the divergence LossGuard must see.
        logging_nan_inf_filter=False,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        eval_strategy="steps" if has_validation else "no",
        eval_steps=config.eval_steps,
        load_best_model_at_end=has_validation,
        metric_for_best_model="eval_loss" if has_validation else None,
        greater_is_better=False if has_validation else None,
        seed=config.seed,
        data_seed=config.seed,
        dataloader_num_workers=workers,
        dataloader_prefetch_factor=config.prefetch_factor if workers else None,
        report_to=["tensorboard"] if config.tensorboard and _tensorboard_available() else "none",
        disable_tqdm=True,
        use_cpu=not device.startswith("cuda"),
        max_length=config.max_length,
        packing=config.packing,
        packing_strategy="bfd",
        dataset_num_proc=None,
    )


def keep_bnb_layout_trainable(model) -> None:
    """Stop bitsandbytes' CPU inference layout from breaking training and dequantization.

    bitsandbytes 0.50 on a CPU with AVX512-BF16: the first forward of a ``Linear4bit`` in eval
    mode under ``no_grad`` (any validation pass) repacks its weight in place into a layout for
    a fast inference kernel (``quant_state.packing_format_for_cpu``). From then on the layer's
    forward takes that kernel even in training, and it has no backward: gradients stop flowing
    through every 4-bit layer (measured: LoRA weights of the first layers get no gradient at
    all). ``dequantize_4bit`` also reads the repacked weight as if it were in the normal layout
    and returns garbage. The repacking is gated by this per-module flag; turning it off keeps
    the normal layout (and the normal, slower, CPU inference path).
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _load_transformers(config: TrainConfig, resolved: str, device: str):
    from cogumi.models.loading import load_model

    model, _ = load_model(resolved, quantization=config.quantization, device=device,
                          attn_implementation=config.attn_implementation or None)
    keep_bnb_layout_trainable(model)
    return model


def _keep_adapters_fp32(model) -> None:
    """Undo TRL's cast of trainable weights to bf16 for quantized models.

    TRL casts LoRA weights to bf16 for a 4-bit base (following the QLoRA paper). With plain
    bf16 weights an Adam update smaller than 2^-8 of the weight is rounded away: at the spec's
    learning rate of 5e-6, the LoRA ``A`` matrices (initialised around 1/sqrt(d)) would not
    move at all. Full-precision adapter weights cost a few hundred MB on an 8B model and train;
    on CUDA, bf16 autocast still runs the matmuls in bf16.
    """
    import torch

    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


# ----------------------------------------------------------------------------- the stage


def _read_rows(path: str, config: TrainConfig, rejects: Path) -> list[dict]:
    from cogumi.io import read_jsonl

    rows, report = read_jsonl(path, "sft", on_error=config.on_error, rejects_path=rejects)
    if report.rejected:
        log.warning("train: %s: %d bad row(s) skipped into %s", path, report.rejected, rejects)
    return rows


def _datasets(config: TrainConfig, tokenizer):
    """Training and validation datasets plus their format reports, or a StageError."""
    from datasets import Dataset

    from cogumi.train.data import ChatFormatter, TemplateError, encode_rows, split_rows

    rows = _read_rows(config.data, config, config.out("rejected.jsonl"))
    if config.val_data:
        train_rows = rows
        val_rows = _read_rows(config.val_data, config, config.out("rejected_val.jsonl"))
    else:
        train_rows, val_rows = split_rows(rows, config.val_fraction, config.seed)
    formatter = ChatFormatter(tokenizer, loss_on=config.loss_on)
    try:
        train_columns, train_report = encode_rows(train_rows, formatter, max_length=config.max_length,
                                                  overlong=config.overlong)
        val_columns, val_report = encode_rows(val_rows, formatter, max_length=config.max_length,
                                              overlong=config.overlong)
    except TemplateError as exc:
        raise StageError(f"train: {exc}") from None
    if train_report.kept == 0:
        raise StageError(
            f"train: no training examples after formatting {config.data}: {train_report.rows} row(s), "
            f"{train_report.dropped_overlong} longer than max_length {config.max_length} (dropped), "
            f"{train_report.dropped_unsupervised} with no answer token within max_length"
        )
    if config.wants_validation() and val_report.kept == 0:
        log.warning("train: no validation examples (%d rows held out); training without validation",
                    val_report.rows)
    train = Dataset.from_dict(train_columns)
    val = Dataset.from_dict(val_columns) if val_report.kept else None
    return train, val, train_report, val_report


def _save_adapter(trainer, tokenizer, target: Path, info: dict[str, Any]) -> None:
    """The adapter, the tokenizer it was trained with and the merge stage's notes, atomically."""
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    write_json(tmp / TRAIN_INFO, info)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def train(config: TrainConfig, *, callbacks=()) -> StageResult:
    """The ``train`` stage's body; ``callbacks`` are extra ``TrainerCallback`` objects
    (notebook hooks, tests) added after the built-in ones."""
    from datasets.utils import disable_progress_bars, enable_progress_bars, is_progress_bar_enabled

    # TRL's dataset preparation (packing, truncation) draws a bar per pass; the stage has its own.
    was_enabled = is_progress_bar_enabled()
    disable_progress_bars()
    try:
        return _train(config, callbacks)
    finally:
        if was_enabled:
            enable_progress_bars()


def _train(config: TrainConfig, callbacks) -> StageResult:
    from cogumi.models.loading import pick_device

    try:
        device = pick_device(config.device)
    except RuntimeError as exc:
        raise StageError(f"train: {exc}") from None
    backend = resolve_backend(config, device)
    if config.keep_sparsity and backend != "transformers":
        raise StageError("train: keep_sparsity needs the transformers backend (set backend: transformers)")
    if backend == "unsloth":  # before transformers and TRL, so that its patches apply
        from cogumi.train.unsloth_backend import import_unsloth

        import_unsloth()
    from transformers import AutoTokenizer, PrinterCallback

    from cogumi.train.callbacks import (
        GradNormMonitor,
        LossGuard,
        MetricsLog,
        ProgressBar,
        TokenCounter,
        ValidationMonitor,
    )
    from cogumi.train.data import TemplateError, prepare_tokenizer

    resolved = resolve_base_model(config.model)
    tokenizer = AutoTokenizer.from_pretrained(resolved)
    try:
        setup = prepare_tokenizer(tokenizer, config.chat_template)
    except TemplateError as exc:
        raise StageError(f"train: {exc}") from None
    tokenizer.padding_side = "right"
    train_ds, val_ds, train_report, val_report = _datasets(config, tokenizer)
    record = _run_record(config, resolved)
    resume_from = prepare_checkpoints(config, record)
    log.info("train: %d examples (%d tokens, %.0f%% supervised), %d validation; backend %s on %s%s",
             train_report.kept, train_report.tokens, 100 * train_report.supervised_share, val_report.kept,
             backend, device, f"; resuming from {resume_from.name}" if resume_from else "")

    if device.startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats()
    if backend == "unsloth":
        from cogumi.train.unsloth_backend import add_lora, load_base

        model = load_base(resolved, max_length=config.max_length, quantization=config.quantization)
        modules_to_save = _resize_for_added_tokens(model, tokenizer, setup.added_tokens)
        model = add_lora(model, config, modules_to_save=modules_to_save)
        peft_config = None
    else:
        model = _load_transformers(config, resolved, device)
        modules_to_save = _resize_for_added_tokens(model, tokenizer, setup.added_tokens)
        peft_config = lora_config(config, modules_to_save=modules_to_save)

    counter = TokenCounter()
    guard = LossGuard(stop_loss=config.loss_stop, warn_loss=config.loss_warn, warn_after=config.loss_warn_after)
    monitor = ValidationMonitor(patience=config.early_stopping_patience, overfit_gap=config.overfit_gap)
    grad_norms = GradNormMonitor(config.max_grad_norm)
    outputs = config.outputs()
    built_in = [guard, monitor, grad_norms, MetricsLog(outputs["metrics"], counter)]
    if config.progress:
        built_in.append(ProgressBar(counter))
    args = sft_args(config, device=device, backend=backend, has_validation=val_ds is not None)
    trainer = make_trainer(model, tokenizer, args, train_dataset=train_ds, eval_dataset=val_ds,
                           peft_config=peft_config, callbacks=[*built_in, *callbacks], counter=counter)
    trainer.remove_callback(PrinterCallback)
    if backend == "transformers":
        _keep_adapters_fp32(trainer.model)
    if config.keep_sparsity:
        from cogumi.train.sparsity import mask_lora_updates

        log.info("train: keep_sparsity: LoRA updates masked by the base weights' zeros in %d layers",
                 mask_lora_updates(trainer.model))
    output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    if guard.stop_reason:
        raise StageError(f"train: {guard.stop_reason} Checkpoints so far are in {config.checkpoints_dir()}.")

    history = trainer.state.log_history
    train_losses = [(h["step"], h["loss"]) for h in history if "loss" in h]
    eval_losses = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    final_eval = trainer.evaluate() if val_ds is not None else {}
    info = {
        "base_model": resolved, "model_arg": config.model, "quantization": config.quantization,
        "backend": backend, "tokenizer": setup.to_dict(), "vocab_size": len(tokenizer),
        "loss_on": config.loss_on, "max_length": config.max_length, "keep_sparsity": config.keep_sparsity,
    }
    _save_adapter(trainer, tokenizer, outputs["adapter"], info)
    metrics = {
        "global_step": trainer.state.global_step,
        "final_train_loss": train_losses[-1][1] if train_losses else None,
        "first_train_loss": train_losses[0][1] if train_losses else None,
        "train_loss_mean": output.training_loss,
        "eval_loss": final_eval.get("eval_loss"),
        "best_eval_loss": min((v for _, v in eval_losses), default=None),
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "tokens_per_s": round(counter.tokens_per_second(), 1),
        "padding_share": round(1 - counter.tokens / counter.slots, 4) if counter.slots else 0.0,
        "supervised_share": round(train_report.supervised_share, 4),
        "resumed_from": resume_from.name if resume_from else None,
        "early_stop": monitor.stop_reason,
        "loss_warnings": len(guard.warnings),
        **grad_norms.summary(),
    }
    if device.startswith("cuda"):
        import torch

        metrics["gpu_peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    report = {"backend": backend, "device": device, "base_model": resolved, "tokenizer": setup.to_dict(),
              "train_data": train_report.to_dict(), "validation_data": val_report.to_dict(), "metrics": metrics}
    write_json(outputs["report"], report)
    plot_loss_curve(outputs["metrics"], config.out("loss.png"))
    counts = {
        "rows": train_report.rows + val_report.rows,
        "train_examples": train_report.kept,
        "validation_examples": val_report.kept,
        "truncated": train_report.truncated + val_report.truncated,
        "dropped_overlong": train_report.dropped_overlong + val_report.dropped_overlong,
        "dropped_unsupervised": train_report.dropped_unsupervised + val_report.dropped_unsupervised,
        "train_tokens": train_report.tokens,
        "steps": trainer.state.global_step,
    }
    return StageResult(counts=counts, metrics={k: v for k, v in metrics.items() if v is not None})


def plot_loss_curve(metrics_path: Path, png_path: Path) -> Path | None:
    """Training (and validation) loss against step, from metrics.jsonl, as a PNG."""
    rows = [json.loads(line) for line in Path(metrics_path).read_text(encoding="utf-8").splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r and "step" in r]
    val = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r and "step" in r]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.5))
    for points, label, style in ((train, "train", "-"), (val, "validation", "o--")):
        if points:
            axes.plot(*zip(*points, strict=True), style, label=label)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    tmp = png_path.with_name(f".{png_path.name}.tmp.png")
    figure.savefig(tmp, dpi=100)
    plt.close(figure)
    os.replace(tmp, png_path)
    return png_path


@stage("train", TrainConfig, help="QLoRA supervised fine-tuning (phase 1A): LoRA on a 4-bit base, resumable.")
def run(config: TrainConfig) -> StageResult:
    return train(config)
