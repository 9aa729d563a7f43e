"""Load causal LMs in full precision or 4-bit NF4, on CUDA when present, else on the CPU.

A model may be named by a local checkpoint directory, a registry id (``cogumi models``), a
built-in (``smollm2-135m``, ``tiny-llama``, materialised offline) or a hub id.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

Quantization = Literal["none", "nf4"]

BUILTINS = ("smollm2-135m", "tiny-llama")


def pick_device(device: str = "auto") -> str:
    """``"cuda"`` when asked for or available (``auto``), else ``"cpu"``."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device '{device}' requested but torch sees no CUDA GPU")
    return device


def resolve_model(name_or_path: str | Path) -> str:
    """A path or hub id that ``from_pretrained`` accepts for ``name_or_path``."""
    from cogumi.models.fixtures import build_tiny_llama, materialize_smollm2
    from cogumi.models.registry import REGISTRY

    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.exists():
        if path.is_file():
            raise ValueError(
                f"{path} is a file; a transformers model is a checkpoint directory "
                "(use the llama.cpp backend for a .gguf file)"
            )
        return str(path)
    if name == "smollm2-135m":
        return str(materialize_smollm2())
    if name == "tiny-llama":
        return str(build_tiny_llama())
    if name in REGISTRY:
        return REGISTRY[name].huggingface_id
    return name


def resolve_gguf(name_or_path: str | Path) -> Path:
    """A GGUF file for ``name_or_path``: a path, or ``smollm2-135m`` (the packaged GGUF)."""
    from cogumi.models.fixtures import smollm2_gguf_path

    name = str(name_or_path)
    if name == "smollm2-135m":
        return smollm2_gguf_path()
    path = Path(name).expanduser()
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
        raise FileNotFoundError(
            f"{path}: expected exactly one .gguf file in the directory, found {len(ggufs)}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"{name}: no such GGUF file (and not a built-in model)")
    return path


def _trust_remote_code(name: str) -> bool:
    from cogumi.models.registry import REGISTRY

    for entry in REGISTRY.values():
        if name in (entry.huggingface_id,):
            return entry.trust_remote_code
    return False


def load_tokenizer(name_or_path: str | Path, *, padding_side: str = "left"):
    """The model's tokenizer, with a pad token (a distinct one when the vocabulary has one)."""
    from transformers import AutoTokenizer

    resolved = resolve_model(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(resolved, trust_remote_code=_trust_remote_code(resolved))
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None:
        # Inference only needs *a* pad id behind the attention mask; training code insists on
        # pad != eos and adds a token where the vocabulary has none.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str | Path,
    *,
    quantization: Quantization = "none",
    dtype: str = "auto",
    device: str = "auto",
    attn_implementation: str | None = None,
):
    """Load a causal LM; returns ``(model, tokenizer)``.

    Args:
        quantization: ``"nf4"`` loads weights in 4-bit NormalFloat with double quantization and
            bf16 compute (bitsandbytes; QLoRA's recipe). Works on CUDA and, for tests, on CPU.
        dtype: ``"auto"`` is bfloat16 on CUDA and float32 on the CPU; or any torch dtype name.
        device: ``"auto"``, ``"cpu"`` or ``"cuda[:N]"``.
    """
    import torch
    from transformers import AutoModelForCausalLM

    device = pick_device(device)
    resolved = resolve_model(name_or_path)
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    else:
        torch_dtype = getattr(torch, dtype)
    kwargs = {"dtype": torch_dtype, "trust_remote_code": _trust_remote_code(resolved)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization == "nf4":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        kwargs["device_map"] = {"": device if device != "cuda" else 0}
    elif quantization != "none":
        raise ValueError(f"quantization must be 'none' or 'nf4', got {quantization!r}")
    model = AutoModelForCausalLM.from_pretrained(resolved, **kwargs)
    if quantization == "none":
        model.to(device)
    model.eval()
    return model, load_tokenizer(resolved)
