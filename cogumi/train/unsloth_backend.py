"""The unsloth backend of ``cogumi train``: ``FastLanguageModel`` loading and LoRA (CUDA only).

unsloth replaces the attention, RoPE, RMSNorm and LoRA MLP kernels with fused Triton ones and
brings its own gradient checkpointing (``use_gradient_checkpointing="unsloth"``, which offloads
activations to CPU memory); the spec measured its phase 1A throughput with it. The training loop
itself stays TRL's ``SFTTrainer``, the same one the transformers backend uses, so data,
labels, packing, callbacks and checkpoints do not depend on the backend.

unsloth is imported here only, and only when this backend is chosen: it needs CUDA, patches
transformers and TRL on import, and is an optional extra (``pip install 'cogumi[gpu]'``).
"""

from __future__ import annotations

from typing import Any

from cogumi.stage import StageError


def import_unsloth():
    """The ``unsloth`` module; imported before TRL builds a trainer so its patches apply."""
    try:
        import unsloth
    except ImportError as exc:
        raise StageError(f"train: the unsloth backend needs the 'gpu' extra: pip install 'cogumi[gpu]' ({exc})") from None
    except NotImplementedError as exc:  # raised by unsloth on machines without a supported GPU
        raise StageError(f"train: unsloth cannot run here: {exc}") from None
    return unsloth


def load_base(model_path: str, *, max_length: int, quantization: str) -> Any:
    """The base model through ``FastLanguageModel.from_pretrained`` (4-bit NF4 when asked).

    The tokenizer unsloth returns is not used: ``cogumi train`` formats the data with its own
    (prepared before any model is loaded), and both backends must train on the same tokens.
    """
    import_unsloth()
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(
        model_name=model_path,
        max_seq_length=max_length,
        dtype=None,  # bf16 where the GPU supports it, else fp16
        load_in_4bit=quantization == "nf4",
    )
    return model


def add_lora(model: Any, config: Any, *, modules_to_save: list[str] | None = None) -> Any:
    """LoRA adapters with unsloth's fused kernels and gradient checkpointing; ready to train."""
    from unsloth import FastLanguageModel

    model = FastLanguageModel.get_peft_model(
        model,
        r=config.lora_r,
        target_modules=list(config.lora_target_modules),
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        bias="none",
        use_gradient_checkpointing="unsloth" if config.gradient_checkpointing else False,
        random_state=config.seed,
        modules_to_save=modules_to_save or None,
    )
    return FastLanguageModel.for_training(model)
