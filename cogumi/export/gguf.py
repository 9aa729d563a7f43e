"""``cogumi export gguf|verify|lora``: Hugging Face checkpoints and LoRA adapters as GGUF files
that llama.cpp runs, quantized by llama.cpp, with proof that the export still is the model.

* :func:`convert_hf_to_gguf` writes an F32 / F16 / BF16 GGUF with the ``gguf`` package: the
  hyperparameters, the tensors under llama.cpp's names (Llama's q/k rows reordered from
  transformers' rotate-half layout to llama.cpp's interleaved one), the tokenizer (GPT-2-style
  byte-level BPE or SentencePiece, with token types, merges, special tokens, the pre-tokenizer
  type and the chat template). Architectures: ``llama`` (Llama and Mistral checkpoints) and
  ``qwen2``. Anything else is refused with a clear error, or — when a llama.cpp checkout is
  given — handed to its ``convert_hf_to_gguf.py``.
* :func:`quantize_gguf` quantizes with llama.cpp's own quantizer (``llama_model_quantize``
  through llama-cpp-python) and reports every tensor's type: rows that are not a multiple of
  a K-quant's 256-value super-block make llama.cpp fall back to another type for that tensor,
  and the report says which tensors did and to what.
* :func:`check_llama_cpp_load` loads a GGUF (and optionally a LoRA) with llama.cpp and runs
  one forward pass — in a child process, because llama.cpp aborts the whole process on some
  malformed files. The ``export-gguf`` stage never reports success for a file that fails it.
* :func:`llama_cpp_parity` runs the same token windows through transformers and llama.cpp
  and measures top-1 agreement, KL divergence and both perplexities with the gate stage's
  metric code (:func:`cogumi.compress.gate.compare_models`).
* :func:`convert_lora_to_gguf` writes a peft LoRA adapter as a GGUF LoRA that llama.cpp
  applies at load time (``Llama(model_path=base.gguf, lora_path=adapter.gguf)``).

Every file is written under a temporary name in the target directory and renamed when
complete: a failure (including a full disk) leaves nothing under the final name.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import subprocess
import sys
import time
import typing
from collections import Counter
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any, Literal

from cogumi.io import DataError, write_json
from cogumi.stage import ConfigError, StageConfig, StageError, StageResult, option, stage

log = logging.getLogger("cogumi.export")

#: Hugging Face architectures cogumi converts itself, and the llama.cpp architecture each becomes.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
}

FloatType = Literal["F32", "F16", "BF16"]
ExportType = Literal[
    "F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S",
    "Q4_1", "Q4_0", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K", "IQ4_NL", "IQ4_XS",
]
FLOAT_TYPES: tuple[str, ...] = typing.get_args(FloatType)
EXPORT_TYPES: tuple[str, ...] = typing.get_args(ExportType)
#: llama.cpp file types (``LLAMA_FTYPE_MOSTLY_<name>``) that :func:`quantize_gguf` makes.
QUANT_TYPES: tuple[str, ...] = tuple(t for t in EXPORT_TYPES if t not in FLOAT_TYPES)
#: ggml tensor types a tensor may be forced to (output / embedding / per-tensor overrides).
TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0",
                "Q3_K", "Q2_K", "IQ4_NL", "IQ4_XS")

#: The text llama.cpp's converter tokenizes to fingerprint a BPE pre-tokenizer (its
#: ``get_vocab_base_pre``): the SHA-256 of ``str(tokenizer.encode(CHECK_TEXT))`` identifies it.
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis "
    "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure "
    "I'll make it, 'D you like some tea? We'Ve a'lL"
)

#: Fingerprints of known tokenizers (from llama.cpp's converter) -> llama.cpp pre-tokenizer type.
KNOWN_PRE_TOKENIZERS = {
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3-8B
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",  # Smaug-Llama-3-70B
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / Qwen2 / Qwen2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3-Embedding
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral-Nemo
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",
}

#: Split regexes of the byte-level BPE tokenizers recognised from their structure.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

_PROBE = "The capital of France is"
_RESULT_MARK = "COGUMI-RESULT "


class ExportError(StageError):
    """An export that cannot be done; the message says why and what to do."""


class UnsupportedModelError(ExportError):
    """An architecture, a quantized checkpoint or a setting the converter does not cover."""


class TokenizerError(ExportError):
    """Missing tokenizer files or a tokenizer whose GGUF type cannot be determined."""


class LlamaCppError(ExportError):
    """llama.cpp failed (or crashed) quantizing or loading a file; the message has its log."""


class VerifyFailed(ExportError):
    """A GGUF that is further from its checkpoint than the budget allows."""


# ----------------------------------------------------------------------------- small helpers

@contextlib.contextmanager
def _quiet_gguf():
    """The gguf package logs every file it writes at INFO; keep that out of cogumi's output."""
    logger = logging.getLogger("gguf")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _publish(tmp: Path, final: Path) -> None:
    os.replace(tmp, final)


def _sync_and_close(writer) -> None:
    """Flush a GGUFWriter's file to disk before it is renamed into place."""
    writer.flush()
    for handle in writer.fout or []:
        os.fsync(handle.fileno())
    writer.close()


def _write_failed(path: Path, exc: OSError) -> ExportError:
    reason = exc.strerror or str(exc)
    hint = " (the disk is full)" if getattr(exc, "errno", None) == 28 else ""
    return ExportError(f"cannot write {path}: {reason}{hint}; nothing was left under that name")


def read_config(model_dir: Path) -> dict:
    """``config.json`` of a checkpoint directory."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ExportError(f"{model_dir}: no config.json: not a Hugging Face checkpoint directory")
    return json.loads(path.read_text(encoding="utf-8"))


def _quantization_method(config: dict) -> str | None:
    for key in ("quantization_config", "compression_config"):
        spec = config.get(key)
        if spec:
            if isinstance(spec, dict):
                return str(spec.get("quant_method") or spec.get("format") or spec.get("quant_type") or "unknown")
            return "unknown"
    return None


def check_full_precision(model_dir: Path, config: dict) -> None:
    """Refuse quantized checkpoints (AWQ, GPTQ, compressed-tensors, bitsandbytes, ...)."""
    method = _quantization_method(config)
    if method:
        raise UnsupportedModelError(
            f"{model_dir} is a quantized checkpoint (quantization_config: quant_method={method}); a GGUF "
            "cannot be made from already-quantized weights without losing twice: export from the "
            "full-precision model (the checkpoint before `cogumi quantize`, or the merged fp32/fp16/bf16 "
            "model) and let llama.cpp quantize it with --type")


def architecture_of(config: dict) -> str:
    names = config.get("architectures") or []
    return str(names[0]) if names else str(config.get("model_type", "unknown"))


# ----------------------------------------------------------------------------- checkpoint tensors

class _Checkpoint:
    """The tensors of a checkpoint directory (safetensors, sharded or not, or PyTorch .bin),
    read one at a time."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self._stack = contextlib.ExitStack()
        self._where: dict[str, Any] = {}
        self._bin: dict[str, Any] = {}
        files = self._safetensors_files()
        if files:
            from safetensors import safe_open

            for file in files:
                handle = self._stack.enter_context(safe_open(str(file), framework="pt"))
                for name in handle.keys():
                    self._where[name] = handle
        else:
            import torch

            bins = sorted(model_dir.glob("pytorch_model*.bin"))
            if not bins:
                raise ExportError(f"{model_dir}: no model weights (model*.safetensors or pytorch_model*.bin)")
            for file in bins:
                self._bin.update(torch.load(str(file), map_location="cpu", mmap=True, weights_only=True))

    def _safetensors_files(self) -> list[Path]:
        index = self.model_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
            files = sorted({self.model_dir / name for name in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise ExportError(f"{self.model_dir}: shards named in {index.name} are missing: {', '.join(missing)}")
            return files
        return sorted(self.model_dir.glob("model*.safetensors"))

    def names(self) -> list[str]:
        return list(self._where) if self._where else list(self._bin)

    def shape(self, name: str) -> tuple[int, ...]:
        if self._where:
            return tuple(self._where[name].get_slice(name).get_shape())
        return tuple(self._bin[name].shape)

    def dtype(self, name: str) -> str:
        if self._where:
            return str(self._where[name].get_slice(name).get_dtype()).upper()
        return str(self._bin[name].dtype).removeprefix("torch.").upper()

    def load(self, name: str):
        if self._where:
            return self._where[name].get_tensor(name)
        return self._bin[name]

    def close(self) -> None:
        self._stack.close()
        self._bin.clear()


_FLOAT_DTYPES = {"F32", "F16", "BF16", "F64", "FLOAT32", "FLOAT16", "BFLOAT16", "FLOAT64", "FLOAT", "HALF"}


# ----------------------------------------------------------------------------- hyperparameters

@dataclass
class _HParams:
    arch: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ctx: int
    rms_eps: float
    n_vocab: int
    tied: bool
    rope_theta: float
    rope_type: str
    rope: dict


def _rope_settings(config: dict) -> tuple[float, str, dict]:
    params: dict = {}
    if isinstance(config.get("rope_scaling"), dict):
        params.update(config["rope_scaling"])
    parameters = config.get("rope_parameters")
    if isinstance(parameters, dict):
        if isinstance(parameters.get("full_attention"), dict):
            parameters = parameters["full_attention"]
        params.update(parameters)
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    kind = str(params.get("rope_type") or params.get("type") or "default")
    return theta, kind, params


def _hparams(config: dict, model_dir: Path) -> _HParams:
    hf_arch = architecture_of(config)
    arch = ARCHITECTURES[hf_arch]
    n_head = int(config["num_attention_heads"])
    n_embd = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or n_embd // n_head)
    theta, kind, rope = _rope_settings(config)
    if kind not in ("default", "linear", "yarn", "llama3"):
        raise UnsupportedModelError(
            f"{model_dir}: RoPE scaling '{kind}' is not covered by cogumi's converter (covered: linear, yarn, "
            "llama3); point --llama-cpp at a llama.cpp checkout to use its converter")
    # Llama, Mistral and Qwen2 configs all default to untied embeddings.
    tied = bool(config.get("tie_word_embeddings", False))
    return _HParams(
        arch=arch, n_layer=int(config["num_hidden_layers"]), n_embd=n_embd,
        n_ff=int(config["intermediate_size"]), n_head=n_head,
        n_head_kv=int(config.get("num_key_value_heads") or n_head), head_dim=head_dim,
        n_ctx=int(config.get("max_position_embeddings") or 2048),
        rms_eps=float(config.get("rms_norm_eps", 1e-6)), n_vocab=int(config["vocab_size"]),
        tied=bool(tied), rope_theta=theta, rope_type=kind, rope=rope,
    )


def _write_hparams(writer, hp: _HParams) -> dict:
    import gguf

    writer.add_context_length(hp.n_ctx)
    writer.add_embedding_length(hp.n_embd)
    writer.add_feed_forward_length(hp.n_ff)
    writer.add_block_count(hp.n_layer)
    writer.add_head_count(hp.n_head)
    writer.add_head_count_kv(hp.n_head_kv)
    writer.add_rope_freq_base(hp.rope_theta)
    writer.add_layer_norm_rms_eps(hp.rms_eps)
    writer.add_vocab_size(hp.n_vocab)
    writer.add_rope_dimension_count(hp.head_dim)
    if hp.head_dim != hp.n_embd // hp.n_head:
        writer.add_key_length(hp.head_dim)
        writer.add_value_length(hp.head_dim)
    rope = {"theta": hp.rope_theta, "type": hp.rope_type}
    if hp.rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(hp.rope["factor"]))
        rope["factor"] = float(hp.rope["factor"])
    elif hp.rope_type == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(hp.rope["factor"]))
        original = hp.rope.get("original_max_position_embeddings") or hp.n_ctx
        writer.add_rope_scaling_orig_ctx_len(int(original))
        if hp.rope.get("attention_factor") is not None:
            writer.add_rope_scaling_yarn_attn_factor(float(hp.rope["attention_factor"]))
        if hp.rope.get("beta_fast") is not None:
            writer.add_rope_scaling_yarn_beta_fast(float(hp.rope["beta_fast"]))
        if hp.rope.get("beta_slow") is not None:
            writer.add_rope_scaling_yarn_beta_slow(float(hp.rope["beta_slow"]))
        rope.update(factor=float(hp.rope["factor"]), original_context=int(original))
    elif hp.rope_type == "llama3":
        rope.update(factor=float(hp.rope["factor"]), tensor="rope_freqs.weight")
    return rope


def llama3_rope_factors(theta: float, head_dim: int, params: dict):
    """Per-frequency divisors of Llama 3's RoPE scaling (llama.cpp's ``rope_freqs`` tensor).

    Wavelengths shorter than ``original_context / high_freq_factor`` keep their frequency, those
    longer than ``original_context / low_freq_factor`` are divided by ``factor``, and the band
    between is interpolated smoothly — the same schedule transformers applies.
    """
    import numpy as np

    factor = float(params["factor"])
    low = float(params.get("low_freq_factor", 1.0))
    high = float(params.get("high_freq_factor", 4.0))
    original = float(params.get("original_max_position_embeddings", 8192))
    inv_freq = theta ** -(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelength = 2 * math.pi / inv_freq
    smooth = (original / wavelength - low) / (high - low)
    between = 1.0 / ((1.0 - smooth) / factor + smooth)
    divisors = np.where(wavelength < original / high, 1.0, np.where(wavelength > original / low, factor, between))
    return divisors.astype(np.float32)


def rotary_rows_to_gguf(weight, heads: int):
    """Reorder the rows of a q or k projection (or its LoRA B, or bias) for llama.cpp's ``llama``.

    transformers rotates each head's first half of dimensions against its second half
    ("rotate half"); llama.cpp's ``llama`` architecture rotates adjacent pairs. Per head, row
    ``i`` of the first half and row ``i`` of the second half become rows ``2i`` and ``2i+1``.
    """
    rows = weight.shape[0]
    if rows % (2 * heads):
        raise ExportError(f"cannot split {rows} rows into {heads} rotary heads")
    rest = tuple(weight.shape[1:])
    halves = weight.reshape(heads, 2, rows // heads // 2, *rest)
    return halves.transpose(1, 2).reshape(rows, *rest)


# ----------------------------------------------------------------------------- tokenizer

def _looks_special(text: str) -> bool:
    return (text.startswith("<|") and text.endswith("|>")) or text in ("<pad>", "<mask>")


def _pre_tokenizer_from_structure(tokenizer_json: dict) -> str | None:
    """The llama.cpp pre-tokenizer type of a byte-level BPE tokenizer, from its pre-tokenizer
    steps, for the structures llama.cpp implements exactly."""
    normalizer = tokenizer_json.get("normalizer")
    if normalizer and not (normalizer.get("type") == "Sequence" and not normalizer.get("normalizers")) \
            and normalizer.get("type") != "NFC":
        return None
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]

    def byte_level(step, regex: bool) -> bool:
        return step.get("type") == "ByteLevel" and bool(step.get("use_regex", True)) == regex

    if len(steps) == 1 and byte_level(steps[0], True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and byte_level(steps[1], True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and byte_level(steps[1], False):
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        if pattern == _LLAMA3_SPLIT:
            return "llama-bpe"
        if pattern == _QWEN2_SPLIT:
            return "qwen2"
    return None


def detect_pre_tokenizer(tokenizer, tokenizer_json: dict) -> tuple[str | None, str, str]:
    """``(pre_type or None, how, fingerprint)``: by llama.cpp's fingerprint, else by structure."""
    fingerprint = sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    if fingerprint in KNOWN_PRE_TOKENIZERS:
        return KNOWN_PRE_TOKENIZERS[fingerprint], "fingerprint", fingerprint
    by_structure = _pre_tokenizer_from_structure(tokenizer_json)
    if by_structure:
        return by_structure, "structure", fingerprint
    return None, "", fingerprint


def _tokenizer_kind(model_dir: Path) -> str:
    """``"spm"`` (tokenizer.model), ``"bpe"`` (byte-level BPE tokenizer.json), else an error."""
    spm_path = model_dir / "tokenizer.model"
    json_path = model_dir / "tokenizer.json"
    if spm_path.is_file():
        try:
            from sentencepiece import SentencePieceProcessor

            SentencePieceProcessor(model_file=str(spm_path))
            return "spm"
        except Exception:  # a tiktoken file under that name (Llama 3): use tokenizer.json
            if not json_path.is_file():
                raise TokenizerError(f"{spm_path} is not a SentencePiece model and there is no tokenizer.json") from None
    if not json_path.is_file():
        raise TokenizerError(
            f"{model_dir}: no tokenizer files (tokenizer.json or tokenizer.model): a GGUF carries its "
            "vocabulary; save the tokenizer next to the weights (tokenizer.save_pretrained(DIR))")
    data = json.loads(json_path.read_text(encoding="utf-8"))
    model = data.get("model") or {}

    def has_byte_level(node) -> bool:
        if isinstance(node, dict):
            return node.get("type") == "ByteLevel" or any(has_byte_level(v) for v in node.values())
        if isinstance(node, list):
            return any(has_byte_level(v) for v in node)
        return False

    if model.get("type") == "BPE" and has_byte_level(data.get("pre_tokenizer")):
        return "bpe"
    raise TokenizerError(
        f"{json_path}: cannot determine the GGUF tokenizer type: a {model.get('type')} model with pre-tokenizer "
        f"{(data.get('pre_tokenizer') or {}).get('type')} is neither a byte-level BPE (GPT-2 style) nor, without "
        "tokenizer.model, a SentencePiece vocabulary; add tokenizer.model or point --llama-cpp at a llama.cpp checkout")


def _add_special_tokens(writer, model_dir: Path, n_vocab: int, tokenizer=None, *, merges: bool) -> dict:
    import gguf

    special = gguf.SpecialVocab(model_dir, load_merges=merges, n_vocab=n_vocab)
    if tokenizer is not None:
        for kind in ("bos", "eos", "unk", "pad"):
            token_id = getattr(tokenizer, f"{kind}_token_id", None)
            if isinstance(token_id, int) and 0 <= token_id < n_vocab:
                special.special_token_ids.setdefault(kind, token_id)
        # What the tokenizer does, not what a config claims: does encoding add BOS / EOS?
        with_specials = tokenizer("a b")["input_ids"]
        plain = tokenizer("a b", add_special_tokens=False)["input_ids"]
        added = len(with_specials) > len(plain)
        special.add_special_token["bos"] = bool(
            added and tokenizer.bos_token_id is not None and with_specials[0] == tokenizer.bos_token_id)
        special.add_special_token["eos"] = bool(
            added and tokenizer.eos_token_id is not None and with_specials[-1] == tokenizer.eos_token_id)
        if special.chat_template is None and getattr(tokenizer, "chat_template", None):
            special.chat_template = tokenizer.chat_template
    if merges and not special.merges:
        raise TokenizerError(f"{model_dir}: the BPE tokenizer has no merges (tokenizer.json model.merges or merges.txt)")
    special.add_to_gguf(writer, quiet=True)
    return {"special_token_ids": dict(special.special_token_ids),
            "add_special_tokens": dict(special.add_special_token),
            "merges": len(special.merges), "chat_template": special.chat_template is not None}


def _write_bpe_vocab(writer, model_dir: Path, n_vocab: int, pre_tokenizer: str) -> dict:
    import gguf
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as exc:  # transformers raises many kinds
        raise TokenizerError(f"{model_dir}: transformers cannot load the tokenizer: {exc}") from exc
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= n_vocab:
        raise TokenizerError(f"{model_dir}: the tokenizer has ids up to {max(vocab.values())} but the model's "
                             f"vocab_size is {n_vocab}")
    tokenizer_json = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    detected, how, fingerprint = detect_pre_tokenizer(tokenizer, tokenizer_json)
    if pre_tokenizer:
        pre, how = pre_tokenizer, "user"
    elif detected:
        pre = detected
    else:
        raise TokenizerError(
            f"{model_dir}: unknown BPE pre-tokenizer (fingerprint {fingerprint}); llama.cpp must know how "
            "to split text before BPE or it tokenizes wrongly. If the model reuses a known tokenizer, pass "
            "--pre-tokenizer NAME (for example llama-bpe, qwen2, gpt-2, smollm, tekken, deepseek-llm)")
    reverse = {i: token for token, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n_vocab):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        if token in added:
            entry = decoder.get(i)
            if entry is not None and not entry.normalized:
                # llama.cpp stores added tokens pre-normalized
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            special = entry is not None and entry.special
            types.append(gguf.TokenType.CONTROL if special or _looks_special(token) else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    info = _add_special_tokens(writer, model_dir, n_vocab, tokenizer, merges=True)
    return {"model": "gpt2", "pre": pre, "pre_source": how, "fingerprint": fingerprint, "tokens": len(tokens),
            "control_tokens": sum(t == gguf.TokenType.CONTROL for t in types),
            "user_defined_tokens": sum(t == gguf.TokenType.USER_DEFINED for t in types), **info}


def _write_spm_vocab(writer, model_dir: Path, n_vocab: int) -> dict:
    import gguf
    from sentencepiece import SentencePieceProcessor

    processor = SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    size = processor.vocab_size()
    if size > n_vocab:
        raise TokenizerError(f"{model_dir}: tokenizer.model has {size} pieces but the model's vocab_size is {n_vocab}")
    tokens = [f"[PAD{i}]".encode() for i in range(n_vocab)]
    scores = [-10000.0] * n_vocab
    types = [int(gguf.TokenType.UNUSED)] * n_vocab
    for i in range(size):
        tokens[i] = processor.id_to_piece(i).encode("utf-8")
        scores[i] = processor.get_score(i)
        if processor.is_unknown(i):
            types[i] = gguf.TokenType.UNKNOWN
        elif processor.is_control(i):
            types[i] = gguf.TokenType.CONTROL
        elif processor.is_unused(i):
            types[i] = gguf.TokenType.UNUSED
        elif processor.is_byte(i):
            types[i] = gguf.TokenType.BYTE
        else:
            types[i] = gguf.TokenType.NORMAL
    added: dict[int, tuple[str, bool]] = {}
    added_file = model_dir / "added_tokens.json"
    if added_file.is_file():
        for text, i in json.loads(added_file.read_text(encoding="utf-8")).items():
            added[int(i)] = (text, False)
    config_file = model_dir / "tokenizer_config.json"
    if config_file.is_file():
        for i, entry in (json.loads(config_file.read_text(encoding="utf-8")).get("added_tokens_decoder") or {}).items():
            added[int(i)] = (entry["content"], bool(entry.get("special")))
    for i, (text, special) in added.items():
        if i >= n_vocab:
            raise TokenizerError(f"{model_dir}: added token {text!r} has id {i} >= vocab_size {n_vocab}")
        if i < size and processor.id_to_piece(i) == text:
            if special:
                types[i] = gguf.TokenType.CONTROL
            continue
        control = special or _looks_special(text)
        tokens[i] = (text if control else text.replace("\u2581", " ")).encode("utf-8")
        scores[i] = -1000.0
        types[i] = gguf.TokenType.CONTROL if control else gguf.TokenType.USER_DEFINED
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    try:
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString((model_dir / "tokenizer.model").read_bytes())
        writer.add_add_space_prefix(bool(proto.normalizer_spec.add_dummy_prefix))
    except Exception:  # protobuf missing: llama.cpp's default (a prefix space) applies
        pass
    tokenizer = None
    with contextlib.suppress(Exception):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    info = _add_special_tokens(writer, model_dir, n_vocab, tokenizer, merges=False)
    ids = info["special_token_ids"]
    for kind, getter in (("bos", processor.bos_id), ("eos", processor.eos_id), ("unk", processor.unk_id)):
        if kind not in ids and getter() >= 0:
            getattr(writer, f"add_{kind}_token_id")(getter())
            ids[kind] = getter()
    return {"model": "llama", "pre": "default", "pre_source": "sentencepiece", "tokens": n_vocab,
            "control_tokens": sum(t == gguf.TokenType.CONTROL for t in types),
            "user_defined_tokens": sum(t == gguf.TokenType.USER_DEFINED for t in types), **info}


# ----------------------------------------------------------------------------- HF -> GGUF

@dataclass
class _Planned:
    name: str  # GGUF name
    source: str  # checkpoint name ("" for generated tensors)
    shape: tuple[int, ...]
    out: str  # F32 / F16 / BF16


def _plan_tensors(ckpt: _Checkpoint, hp: _HParams, outtype: str, model_dir: Path) -> tuple[list[_Planned], list[str]]:
    import gguf

    arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}[hp.arch]
    names = gguf.get_tensor_name_map(arch, hp.n_layer)
    plan: list[_Planned] = []
    skipped: list[str] = []
    unknown: list[str] = []
    quantized: list[str] = []
    for source in ckpt.names():
        if source.endswith(("rotary_emb.inv_freq", ".masked_bias", ".attn.bias")):
            skipped.append(source)
            continue
        if hp.tied and source in ("lm_head.weight", "model.lm_head.weight"):
            skipped.append(source)  # the output reuses token_embd
            continue
        dtype = ckpt.dtype(source)
        if dtype not in _FLOAT_DTYPES:
            quantized.append(f"{source} ({dtype})")
            continue
        name = names.get_name(source, try_suffixes=(".weight", ".bias"))
        if name is None:
            unknown.append(source)
            continue
        shape = ckpt.shape(source)
        kind = "F32" if len(shape) < 2 else outtype
        plan.append(_Planned(name, source, shape, kind))
    if quantized:
        raise UnsupportedModelError(
            f"{model_dir}: tensors are stored quantized ({', '.join(quantized[:3])}{', ...' if len(quantized) > 3 else ''}); "
            "export from the full-precision model")
    if unknown:
        raise UnsupportedModelError(
            f"{model_dir}: {len(unknown)} tensors have no llama.cpp name for architecture '{hp.arch}' "
            f"({', '.join(unknown[:4])}{', ...' if len(unknown) > 4 else ''}); the checkpoint is not a plain "
            f"{hp.arch} model: point --llama-cpp at a llama.cpp checkout to use its converter")
    have = {p.name for p in plan}
    if "token_embd.weight" not in have:
        raise ExportError(f"{model_dir}: the checkpoint has no token embeddings (model.embed_tokens.weight)")
    if not hp.tied and "output.weight" not in have:
        raise ExportError(f"{model_dir}: tie_word_embeddings is false but the checkpoint has no lm_head.weight")
    if hp.rope_type == "llama3":
        plan.insert(0, _Planned("rope_freqs.weight", "", (hp.head_dim // 2,), "F32"))
    return plan, skipped


def _tensor_bytes(shape: tuple[int, ...], kind: str) -> int:
    return math.prod(shape) * (4 if kind == "F32" else 2)


def _materialise(ckpt: _Checkpoint, item: _Planned, hp: _HParams):
    """The tensor's bytes as the numpy array GGUFWriter writes."""
    import numpy as np
    import torch

    if item.name == "rope_freqs.weight":
        return llama3_rope_factors(hp.rope_theta, hp.head_dim, hp.rope)
    tensor = ckpt.load(item.source).to(torch.float32)
    if hp.arch == "llama":
        if re.search(r"\.attn_q\.(weight|bias)$", item.name):
            tensor = rotary_rows_to_gguf(tensor, hp.n_head)
        elif re.search(r"\.attn_k\.(weight|bias)$", item.name):
            tensor = rotary_rows_to_gguf(tensor, hp.n_head_kv)
    if item.out == "F32":
        return tensor.contiguous().numpy()
    peak = float(tensor.abs().max()) if tensor.numel() else 0.0
    if not math.isfinite(peak):
        raise ExportError(f"{item.source}: the checkpoint holds non-finite values (NaN or inf)")
    if item.out == "F16":
        if peak > 65504.0:
            raise ExportError(f"{item.source}: values up to {peak:g}, beyond float16's range (65504); export as "
                              "BF16 or F32")
        return tensor.to(torch.float16).contiguous().numpy()
    return tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)


def convert_hf_to_gguf(
    model_dir: str | os.PathLike, out_path: str | os.PathLike, *, outtype: str = "F16", pre_tokenizer: str = "",
) -> dict:
    """Write a Llama / Mistral / Qwen2 checkpoint as an F32, F16 or BF16 GGUF; return a report.

    Args:
        outtype: ``F32``, ``F16`` or ``BF16`` for the weight matrices (1-D tensors stay F32).
        pre_tokenizer: llama.cpp pre-tokenizer type to write instead of the detected one.

    Raises:
        UnsupportedModelError: another architecture, a quantized checkpoint, unknown tensors.
        TokenizerError: missing tokenizer files, or a type / pre-tokenizer that cannot be determined.
        ExportError: anything else (including a failed write); no file is left at ``out_path``.
    """
    import gguf

    outtype = outtype.upper()
    if outtype not in FLOAT_TYPES:
        raise ValueError(f"outtype must be one of {', '.join(FLOAT_TYPES)}, got {outtype!r}")
    model_dir, out_path = Path(model_dir), Path(out_path)
    config = read_config(model_dir)
    check_full_precision(model_dir, config)
    hf_arch = architecture_of(config)
    if hf_arch not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"{model_dir}: architecture {hf_arch} is not covered by cogumi's GGUF converter (covered: "
            f"{', '.join(ARCHITECTURES)}); point --llama-cpp (or COGUMI_LLAMA_CPP) at a llama.cpp checkout to "
            "convert it with llama.cpp's convert_hf_to_gguf.py")
    hp = _hparams(config, model_dir)
    kind = _tokenizer_kind(model_dir)
    t0 = time.perf_counter()
    ckpt = _Checkpoint(model_dir)
    tmp = _tmp_name(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    writer = None
    try:
        plan, skipped = _plan_tensors(ckpt, hp, outtype, model_dir)
        with _quiet_gguf():
            writer = gguf.GGUFWriter(None, hp.arch)
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(str(config.get("_name_or_path") or model_dir.name))
        writer.add_file_type({"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
                              "BF16": gguf.LlamaFileType.MOSTLY_BF16}[outtype])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        rope = _write_hparams(writer, hp)
        tokenizer = (_write_spm_vocab(writer, model_dir, hp.n_vocab) if kind == "spm"
                     else _write_bpe_vocab(writer, model_dir, hp.n_vocab, pre_tokenizer))
        raw = {"F32": gguf.GGMLQuantizationType.F32, "F16": gguf.GGMLQuantizationType.F16,
               "BF16": gguf.GGMLQuantizationType.BF16}
        np_dtype = {"F32": "float32", "F16": "float16", "BF16": "uint16"}
        import numpy as np

        for item in plan:
            writer.add_tensor_info(item.name, item.shape, np.dtype(np_dtype[item.out]),
                                   _tensor_bytes(item.shape, item.out), raw_dtype=raw[item.out])
        with _quiet_gguf():
            writer.open_output_file(tmp)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for item in plan:
            writer.write_tensor_data(_materialise(ckpt, item, hp))
        _sync_and_close(writer)
        _publish(tmp, out_path)
    except OSError as exc:
        raise _write_failed(out_path, exc) from exc
    finally:
        if writer is not None:
            with contextlib.suppress(OSError):
                writer.close()
        ckpt.close()
        tmp.unlink(missing_ok=True)
    parameters = sum(math.prod(p.shape) for p in plan)
    return {
        "path": str(out_path), "architecture": hp.arch, "hf_architecture": hf_arch, "outtype": outtype,
        "tensors": len(plan), "parameters": parameters, "bytes": out_path.stat().st_size,
        "tied_embeddings": hp.tied, "skipped_tensors": skipped, "rope": rope,
        "hparams": {"block_count": hp.n_layer, "embedding_length": hp.n_embd, "feed_forward_length": hp.n_ff,
                    "head_count": hp.n_head, "head_count_kv": hp.n_head_kv, "head_dim": hp.head_dim,
                    "context_length": hp.n_ctx, "rms_eps": hp.rms_eps, "vocab_size": hp.n_vocab},
        "tokenizer": tokenizer, "converter": "cogumi", "seconds": round(time.perf_counter() - t0, 2),
    }


def convert_with_llama_cpp(checkout: str | os.PathLike, model_dir: str | os.PathLike, out_path: str | os.PathLike,
                           *, outtype: str = "F16") -> dict:
    """Convert with a llama.cpp checkout's ``convert_hf_to_gguf.py`` (architectures cogumi does
    not cover); same atomic-write guarantee."""
    script = Path(checkout).expanduser() / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise ExportError(f"{checkout}: no convert_hf_to_gguf.py there (is it a llama.cpp checkout?)")
    out_path = Path(out_path)
    tmp = _tmp_name(out_path)
    command = [sys.executable, str(script), str(model_dir), "--outfile", str(tmp), "--outtype", outtype.lower()]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode != 0 or not tmp.is_file():
            tail = (proc.stdout + proc.stderr)[-3000:]
            raise ExportError(f"llama.cpp's convert_hf_to_gguf.py failed on {model_dir} (exit {proc.returncode}); "
                              f"its output ends:\n{tail}")
        _publish(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return {"path": str(out_path), "outtype": outtype, "converter": str(script),
            "bytes": out_path.stat().st_size, "seconds": round(time.perf_counter() - t0, 2)}


# ----------------------------------------------------------------------------- llama.cpp (child process)

def _child_env() -> dict:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _run_child(args: list[str], *, what: str, timeout: float | None = None) -> dict:
    """Run :func:`_child_main` in a fresh interpreter; its result, or a LlamaCppError with its log."""
    code = "import sys; from cogumi.export.gguf import _child_main; sys.exit(_child_main(sys.argv[1:]))"
    try:
        proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                              env=_child_env(), timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise LlamaCppError(f"{what}: llama.cpp did not finish in {timeout:.0f} s") from exc
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith(_RESULT_MARK):
            result = json.loads(line[len(_RESULT_MARK):])
    if proc.returncode != 0 or result is None or result.get("error"):
        how = (f"crashed (signal {-proc.returncode})" if proc.returncode < 0
               else f"failed (exit {proc.returncode})")
        detail = f": {result['error']}" if result and result.get("error") else ""
        log_tail = "\n".join(line for line in (proc.stderr + proc.stdout).splitlines()
                             if not line.startswith(_RESULT_MARK))[-2500:]
        raise LlamaCppError(f"{what}: llama.cpp {how}{detail}\nllama.cpp's log ends:\n{log_tail}")
    return result


def _child_main(argv: list[str]) -> int:
    """Entry point of the llama.cpp child process (quantize / load)."""
    spec = json.loads(argv[1])
    try:
        result = _child_quantize(spec) if argv[0] == "quantize" else _child_load(spec)
    except Exception as exc:  # reported to the parent, which raises LlamaCppError
        result = {"error": f"{type(exc).__name__}: {exc}"}
    sys.stdout.flush()
    print(_RESULT_MARK + json.dumps(result), flush=True)
    return 0 if not result.get("error") else 3


def _child_quantize(spec: dict) -> dict:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{spec['type']}"))
    params.nthread = int(spec.get("threads") or 0)
    params.pure = bool(spec.get("pure"))
    if spec.get("output_type"):
        params.output_tensor_type = int(getattr(llama_cpp, f"GGML_TYPE_{spec['output_type']}"))
    if spec.get("embedding_type"):
        params.token_embedding_type = int(getattr(llama_cpp, f"GGML_TYPE_{spec['embedding_type']}"))
    keep = []
    if spec.get("tensor_types"):
        entry = llama_cpp.llama_model_tensor_override
        patterns = [p.encode() for p in spec["tensor_types"]]
        keep.append(patterns)
        rows = [entry(p, int(getattr(llama_cpp, f"GGML_TYPE_{t}"))) for p, t in zip(patterns, spec["tensor_types"].values())]
        array = (entry * (len(rows) + 1))(*rows, entry(None, int(llama_cpp.GGML_TYPE_COUNT)))
        keep.append(array)
        params.tt_overrides = ctypes.cast(array, ctypes.POINTER(entry))
    t0 = time.perf_counter()
    status = llama_cpp.llama_model_quantize(spec["src"].encode(), spec["dst"].encode(), ctypes.byref(params))
    if status != 0:
        return {"error": f"llama_model_quantize returned {status}"}
    return {"seconds": round(time.perf_counter() - t0, 2)}


def _child_load(spec: dict) -> dict:
    import numpy as np
    from llama_cpp import Llama

    t0 = time.perf_counter()
    kwargs = {"model_path": spec["path"], "n_ctx": int(spec.get("n_ctx", 64)), "verbose": True, "logits_all": True,
              "n_threads": int(spec.get("threads") or 0) or None}
    if spec.get("lora"):
        kwargs["lora_path"] = spec["lora"]
    llm = Llama(**kwargs)
    tokens = llm.tokenize(_PROBE.encode(), add_bos=True, special=False)
    llm.eval(tokens)
    logits = np.array(llm.scores[len(tokens) - 1], dtype=np.float32)
    if not np.isfinite(logits).all():
        return {"error": "the forward pass produced non-finite logits"}
    top = int(np.argmax(logits))
    metadata = dict(llm.metadata)
    result = {"n_vocab": llm.n_vocab(), "prompt_tokens": len(tokens),
              "next_token": llm.detokenize([top]).decode("utf-8", "replace"),
              "architecture": metadata.get("general.architecture"),
              "tokenizer_pre": metadata.get("tokenizer.ggml.pre"),
              "seconds": round(time.perf_counter() - t0, 2)}
    with contextlib.suppress(Exception):
        result["n_params"] = int(llm._model.n_params())
        result["n_ctx_train"] = int(llm._model.n_ctx_train())
    llm.close()
    return result


def check_llama_cpp_load(path: str | os.PathLike, *, lora_path: str | os.PathLike | None = None,
                         threads: int = 0, timeout: float | None = 600) -> dict:
    """Load ``path`` (and a LoRA) with llama.cpp in a child process and run one forward pass.

    Raises :class:`LlamaCppError` with llama.cpp's log when it cannot load the file, crashes,
    or computes non-finite logits."""
    spec = {"path": str(path), "lora": str(lora_path) if lora_path else "", "threads": threads}
    what = f"loading {path}" + (f" with LoRA {lora_path}" if lora_path else "")
    return _run_child(["load", json.dumps(spec)], what=what, timeout=timeout)


# ----------------------------------------------------------------------------- quantization

def _main_type(qtype: str) -> str:
    """The ggml type a llama.cpp file type mostly aims at (Q5_K_M -> Q5_K)."""
    return re.sub(r"_[SML]$", "", qtype) if "_K" in qtype else qtype


def gguf_tensor_report(path: str | os.PathLike, qtype: str | None = None, *, overridden: list[str] | None = None) -> dict:
    """Per-tensor types of a GGUF, counts by type, size, bits per weight, and — given the
    requested type — the tensors whose rows do not fit that type's block and fell back.

    A tensor "fell back" when it is a weight matrix whose rows (``ne0`` values) are not a
    multiple of the requested type's block (256 for K-quants, 32 for Q8_0 / Q4_0 / ...), so
    llama.cpp stored it as another type. Tensors whose type the user chose (``overridden``:
    regexes searched in the tensor names) are listed apart, never as fallbacks.
    """
    import gguf

    path = Path(path)
    reader = gguf.GGUFReader(path)
    main = _main_type(qtype) if qtype else None
    block = None
    if main and main in gguf.GGMLQuantizationType.__members__:
        block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[main]][0]
    chosen = [re.compile(pattern) for pattern in overridden or []]
    tensors = []
    fallbacks = []
    by_user = []
    elements = data_bytes = 0
    for tensor in reader.tensors:
        shape = [int(d) for d in tensor.shape]
        kind = tensor.tensor_type.name
        row = {"name": tensor.name, "type": kind, "shape": shape}
        tensors.append(row)
        elements += int(tensor.n_elements)
        data_bytes += int(tensor.n_bytes)
        if len(shape) >= 2 and any(pattern.search(tensor.name) for pattern in chosen):
            by_user.append(row)
        elif block and main and len(shape) >= 2 and kind != main and shape[0] % block:
            fallbacks.append(row)
    file_bytes = path.stat().st_size
    return {
        "path": str(path), "type": qtype, "file_bytes": file_bytes, "size_mb": round(file_bytes / 2**20, 2),
        "parameters": elements, "bits_per_weight": round(8 * data_bytes / max(elements, 1), 3),
        "tensor_types": dict(Counter(t["type"] for t in tensors).most_common()),
        "fallbacks": {"requested": main, "block": block, "count": len(fallbacks),
                      "by_type": dict(Counter(t["type"] for t in fallbacks).most_common()),
                      "tensors": [t["name"] for t in fallbacks]},
        "overridden": {"count": len(by_user), "by_type": dict(Counter(t["type"] for t in by_user).most_common()),
                       "tensors": [t["name"] for t in by_user]},
        "tensors": tensors,
    }


def quantize_gguf(
    src: str | os.PathLike, dst: str | os.PathLike, qtype: str, *, pure: bool = False,
    output_type: str = "", embedding_type: str = "", tensor_types: dict[str, str] | None = None,
    threads: int = 0,
) -> dict:
    """Quantize an F32/F16/BF16 GGUF with llama.cpp's ``llama_model_quantize``; return the
    :func:`gguf_tensor_report` of the result (with the fallbacks).

    Args:
        qtype: a llama.cpp file type name: ``Q8_0``, ``Q6_K``, ``Q5_K_M``, ``Q4_K_M``, ... (:data:`QUANT_TYPES`).
        pure: every weight matrix in the main type (no mix: llama.cpp's ``--pure``).
        output_type / embedding_type: ggml type of ``output.weight`` / ``token_embd.weight``.
        tensor_types: ``{regex: ggml type}`` per-tensor overrides (llama.cpp's ``--tensor-type``).
    """
    if qtype not in QUANT_TYPES:
        raise ValueError(f"qtype must be one of {', '.join(QUANT_TYPES)}, got {qtype!r}")
    for name in (output_type, embedding_type, *(tensor_types or {}).values()):
        if name and name not in TENSOR_TYPES:
            raise ValueError(f"tensor type {name!r} is not one of {', '.join(TENSOR_TYPES)}")
    src, dst = Path(src), Path(dst)
    tmp = _tmp_name(dst)
    spec = {"type": qtype, "src": str(src), "dst": str(tmp), "threads": threads or os.cpu_count() or 0,
            "pure": pure, "output_type": output_type, "embedding_type": embedding_type,
            "tensor_types": dict(tensor_types or {})}
    try:
        result = _run_child(["quantize", json.dumps(spec)], what=f"quantizing {src.name} to {qtype}")
        if not tmp.is_file():
            raise LlamaCppError(f"quantizing {src.name} to {qtype}: llama.cpp reported success but wrote no file")
        _publish(tmp, dst)
    except OSError as exc:
        raise _write_failed(dst, exc) from exc
    finally:
        tmp.unlink(missing_ok=True)
    chosen = list(tensor_types or {})
    if output_type:
        chosen.append(r"^output\.weight$")
    if embedding_type:
        chosen.append(r"^token_embd\.weight$")
    report = gguf_tensor_report(dst, qtype, overridden=chosen)
    report["settings"] = {"pure": pure, "output_type": output_type or None, "embedding_type": embedding_type or None,
                          "tensor_types": dict(tensor_types or {})}
    report["seconds"] = result.get("seconds")
    return report


# ----------------------------------------------------------------------------- parity

class LlamaCppLogits:
    """A llama.cpp model that answers like a transformers causal LM: ``model(input_ids=ids).logits``
    (every position's logits, float32), so the gate's metric code measures it unchanged."""

    device = "cpu"

    def __init__(self, path: str | os.PathLike, *, n_ctx: int, lora_path: str | os.PathLike | None = None,
                 threads: int = 0) -> None:
        from llama_cpp import Llama

        kwargs: dict[str, Any] = {"model_path": str(path), "n_ctx": n_ctx, "n_batch": n_ctx, "n_ubatch": n_ctx,
                                  "logits_all": True, "verbose": False, "n_threads": threads or os.cpu_count()}
        if lora_path:
            kwargs["lora_path"] = str(lora_path)
        self.llm: Any = Llama(**kwargs)

    def __call__(self, input_ids=None, **_):
        import numpy as np
        import torch

        rows = []
        for window in input_ids.tolist():
            self.llm.reset()
            self.llm.eval(window)
            rows.append(torch.from_numpy(np.array(self.llm.scores[: len(window)], dtype=np.float32)))
        return _Output(torch.stack(rows))

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()
        self.llm = None


@dataclass
class _Output:
    logits: Any


def tokenizer_agreement(scorer: LlamaCppLogits, tokenizer, texts: list[str], *, limit: int = 64) -> dict:
    """Share of texts that llama.cpp's tokenizer (from the GGUF) splits exactly like transformers'."""
    same = 0
    first_mismatch = None
    checked = texts[:limit]
    for text in checked:
        hf_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        cpp_ids = scorer.tokenize(text)
        if hf_ids == cpp_ids:
            same += 1
        elif first_mismatch is None:
            first_mismatch = {"text": text[:200], "transformers": hf_ids[:40], "llama_cpp": cpp_ids[:40]}
    return {"texts": len(checked), "identical": same, "agreement": same / max(len(checked), 1),
            "first_mismatch": first_mismatch}


def llama_cpp_parity(
    reference, gguf_path: str | os.PathLike, windows: list[list[int]], *, lora_path: str | os.PathLike | None = None,
    batch_size: int = 1, threads: int = 0, progress: bool = False, tokenizer=None, texts: list[str] | None = None,
) -> dict:
    """The same token windows through a transformers model (``reference``) and llama.cpp.

    Returns positions, ``ppl_transformers``, ``ppl_llamacpp``, ``ppl_rel_diff`` (llama.cpp's
    perplexity relative to transformers', signed), ``kl_mean`` (KL(transformers || llama.cpp),
    nats) and ``top1_agreement``; with a tokenizer and texts, also how often llama.cpp
    tokenizes the texts exactly as transformers does.
    """
    from cogumi.compress.gate import compare_models

    if not windows:
        raise ValueError("no token windows to compare")
    seq_len = max(len(w) for w in windows)
    scorer = LlamaCppLogits(gguf_path, n_ctx=seq_len, lora_path=lora_path, threads=threads)
    try:
        batches = [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]
        t0 = time.perf_counter()
        figures = compare_models(reference, scorer, batches, progress=progress)
        result = {"positions": figures["positions"], "ppl_transformers": figures["ppl_reference"],
                  "ppl_llamacpp": figures["ppl_candidate"],
                  "ppl_rel_diff": figures["ppl_candidate"] / figures["ppl_reference"] - 1,
                  "kl_mean": figures["kl_mean"], "top1_agreement": figures["top1_agreement"],
                  "seconds": round(time.perf_counter() - t0, 2)}
        if tokenizer is not None and texts:
            result["tokenization"] = tokenizer_agreement(scorer, tokenizer, texts)
    finally:
        scorer.close()
    return result


# ----------------------------------------------------------------------------- LoRA -> GGUF

_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


def _pattern_value(patterns: dict, module: str, default):
    for key, value in (patterns or {}).items():
        if module == key or module.endswith("." + key) or re.fullmatch(key, module):
            return value
    return default


def convert_lora_to_gguf(
    adapter_dir: str | os.PathLike, out_path: str | os.PathLike, base_model_dir: str | os.PathLike, *,
    outtype: str = "F16",
) -> dict:
    """Write a peft LoRA adapter as a GGUF LoRA (``general.type = adapter``) for llama.cpp.

    Each adapted matrix ``W`` becomes ``<gguf name>.lora_a`` (A, rank x in) and ``.lora_b``
    (B, out x rank); llama.cpp adds ``alpha / rank * B A x``. peft's own scaling (rsLoRA,
    per-module ranks and alphas) is folded into B where it differs from ``alpha / rank``. For
    the ``llama`` architecture the rows of B of q and k are reordered like the base's q and k
    weights. Adapters that also train whole modules (``modules_to_save``), DoRA, LoRA biases or
    embedding LoRA are refused with a clear error.
    """
    import gguf
    import numpy as np
    import torch

    adapter_dir, out_path, base_model_dir = Path(adapter_dir), Path(out_path), Path(base_model_dir)
    outtype = outtype.upper()
    if outtype not in FLOAT_TYPES:
        raise ValueError(f"outtype must be one of {', '.join(FLOAT_TYPES)}, got {outtype!r}")
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise ExportError(f"{adapter_dir}: no adapter_config.json: not a peft adapter directory")
    lora = json.loads(config_path.read_text(encoding="utf-8"))
    if str(lora.get("peft_type", "LORA")).upper() != "LORA":
        raise UnsupportedModelError(f"{adapter_dir}: a {lora.get('peft_type')} adapter; only LoRA converts to GGUF")
    problems = []
    if lora.get("modules_to_save"):
        problems.append(f"it also trains whole modules (modules_to_save: {', '.join(lora['modules_to_save'])} — "
                        "usually embeddings grown for added tokens), which a GGUF LoRA cannot carry: merge it "
                        "(`cogumi merge`) and export the merged model with `cogumi export gguf`")
    if lora.get("use_dora"):
        problems.append("it is a DoRA adapter (use_dora); llama.cpp applies plain LoRA only: merge it and export the merged model")
    if lora.get("bias", "none") != "none":
        problems.append(f"it trains biases (bias={lora['bias']}); merge it and export the merged model")
    if lora.get("fan_in_fan_out"):
        problems.append("fan_in_fan_out (Conv1D) layers are not supported")
    if problems:
        raise UnsupportedModelError(f"{adapter_dir}: cannot convert this adapter to a GGUF LoRA: {'; '.join(problems)}")
    base_config = read_config(base_model_dir)
    hf_arch = architecture_of(base_config)
    if hf_arch not in ARCHITECTURES:
        raise UnsupportedModelError(f"{base_model_dir}: architecture {hf_arch} is not covered by cogumi's GGUF "
                                    f"converter (covered: {', '.join(ARCHITECTURES)})")
    hp = _hparams(base_config, base_model_dir)
    weights_path = adapter_dir / "adapter_model.safetensors"
    if weights_path.is_file():
        from safetensors.torch import load_file

        state = load_file(str(weights_path))
    elif (adapter_dir / "adapter_model.bin").is_file():
        state = torch.load(str(adapter_dir / "adapter_model.bin"), map_location="cpu", weights_only=True)
    else:
        raise ExportError(f"{adapter_dir}: no adapter_model.safetensors or adapter_model.bin")
    pairs: dict[str, dict[str, Any]] = {}
    other = []
    base_copies = []
    for key, tensor in state.items():
        match = _LORA_KEY.match(key)
        if key.endswith(".base_layer.weight"):
            # peft saves the base's own embedding matrices when they are adapted
            # (save_embedding_layers); they are the base's unless the vocabulary was resized.
            if tensor.shape[0] != hp.n_vocab:
                raise UnsupportedModelError(
                    f"{adapter_dir}: {key} has {tensor.shape[0]} rows but the base's vocab_size is {hp.n_vocab}: the "
                    "vocabulary was resized in training; merge the adapter and export the merged model")
            base_copies.append(key)
            continue
        if not match:
            other.append(key)
            continue
        pairs.setdefault(match["module"], {})[match["ab"]] = tensor
    if other:
        hint = ""
        if any("lora_embedding" in k for k in other):
            hint = " (LoRA on embeddings is not supported: leave embed_tokens out of target_modules)"
        elif any("magnitude" in k for k in other):
            hint = " (DoRA magnitudes)"
        elif any(k.endswith(("embed_tokens.weight", "lm_head.weight")) for k in other):
            hint = " (whole embedding matrices: merge the adapter and export the merged model)"
        raise UnsupportedModelError(f"{adapter_dir}: tensors that are not LoRA A/B pairs: "
                                    f"{', '.join(sorted(other)[:4])}{hint}")
    if not pairs:
        raise ExportError(f"{adapter_dir}: the adapter has no LoRA weights")
    arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}[hp.arch]
    names = gguf.get_tensor_name_map(arch, hp.n_layer)
    alpha = float(lora.get("lora_alpha") or lora.get("r") or 8)
    rslora = bool(lora.get("use_rslora"))
    rows = []
    folded = 0
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise ExportError(f"{adapter_dir}: {module} has lora_{'A' if 'A' in ab else 'B'} but not its pair")
        name = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if name is None:
            raise UnsupportedModelError(f"{adapter_dir}: the adapter targets {module}, which has no llama.cpp "
                                        f"tensor in architecture '{hp.arch}'")
        if name == "output.weight" and hp.tied:
            raise UnsupportedModelError(f"{adapter_dir}: the adapter targets lm_head, but the base model ties it to the "
                                        "token embeddings and llama.cpp has no separate output tensor to adapt")
        a = ab["A"].to(torch.float32)
        b = ab["B"].to(torch.float32)
        rank = a.shape[0]
        module_alpha = float(_pattern_value(lora.get("alpha_pattern"), module, alpha))
        wanted = module_alpha / (math.sqrt(rank) if rslora else rank)
        factor = wanted / (alpha / rank)
        if abs(factor - 1.0) > 1e-7:
            b = b * factor
            folded += 1
        if hp.arch == "llama" and name.endswith(".attn_q.weight"):
            b = rotary_rows_to_gguf(b, hp.n_head)
        elif hp.arch == "llama" and name.endswith(".attn_k.weight"):
            b = rotary_rows_to_gguf(b, hp.n_head_kv)
        rows.append((name, a, b))
    tmp = _tmp_name(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with _quiet_gguf():
        writer = gguf.GGUFWriter(tmp, hp.arch)
    try:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(adapter_dir.name)
        for name, a, b in rows:
            for suffix, tensor in ((".lora_a", a), (".lora_b", b)):
                if outtype == "F32":
                    array = tensor.contiguous().numpy()
                    writer.add_tensor(name + suffix, array)
                elif outtype == "F16":
                    writer.add_tensor(name + suffix, tensor.to(torch.float16).contiguous().numpy())
                else:
                    array = tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
                    writer.add_tensor(name + suffix, array, raw_dtype=gguf.GGMLQuantizationType.BF16)
        with _quiet_gguf():
            writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        _sync_and_close(writer)
        _publish(tmp, out_path)
    except OSError as exc:
        raise _write_failed(out_path, exc) from exc
    finally:
        with contextlib.suppress(OSError):
            writer.close()
        tmp.unlink(missing_ok=True)
    kinds = sorted({name.split(".")[-2] for name, _, _ in rows})
    return {"path": str(out_path), "architecture": hp.arch, "modules": len(rows), "targets": kinds,
            "ranks": sorted({int(a.shape[0]) for _, a, _ in rows}), "alpha": alpha, "rslora": rslora,
            "scaling_folded_into_b": folded, "outtype": outtype, "skipped_base_copies": base_copies,
            "parameters": sum(a.numel() + b.numel() for _, a, b in rows), "bytes": out_path.stat().st_size}


# ----------------------------------------------------------------------------- stages

def _local_model_dir(model: str, what: str) -> Path:
    from cogumi.models.loading import resolve_model

    try:
        resolved = Path(resolve_model(model))
    except ValueError as exc:
        raise ExportError(f"{what}: {exc}") from exc
    if not resolved.is_dir():
        raise ExportError(f"{what}: '{model}' is not a local checkpoint directory (download it first)")
    return resolved


def _intermediate_type(choice: str, model_dir: Path, config: dict) -> str:
    if choice != "auto":
        return choice
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return {"bfloat16": "BF16", "float16": "F16"}.get(dtype, "F32")


@dataclass(kw_only=True)
class ExportGGUFConfig(StageConfig):
    model: str = option(help="Full-precision Hugging Face checkpoint (directory, or smollm2-135m / tiny-llama).",
                        input="maybe", positional=True)
    type: ExportType = option("Q5_K_M", help="GGUF type: F32 / F16 / BF16 (converted), or a llama.cpp quantization "
                              "(Q8_0, Q6_K, Q5_K_M, Q4_K_M, ...; made from an F32/F16/BF16 GGUF by llama.cpp).")
    pre_tokenizer: str = option("", help="llama.cpp pre-tokenizer type to write (tokenizer.ggml.pre), overriding "
                                "detection: for byte-level BPE tokenizers cogumi does not recognise.")
    intermediate: Literal["auto", "F32", "F16", "BF16"] = option(
        "auto", help="Type of the GGUF that llama.cpp quantizes; auto: the checkpoint's dtype (F32 for fp32).")
    keep_intermediate: bool = option(False, help="Keep the intermediate float GGUF next to the quantized one.")
    pure: bool = option(False, help="Quantize every weight matrix to the main type (llama.cpp --pure): no mix.")
    output_tensor_type: str = option("", help="ggml type for output.weight (e.g. Q8_0, Q6_K); empty: llama.cpp's choice.")
    embedding_type: str = option("", help="ggml type for token_embd.weight; empty: llama.cpp's choice.")
    tensor_types: dict[str, str] = option(default_factory=dict, help="Per-tensor ggml types, {regex: type}, e.g. "
                                          "'{\"attn_v\": \"Q8_0\"}' (llama.cpp --tensor-type).")
    llama_cpp: str = option(default_factory=lambda: os.environ.get("COGUMI_LLAMA_CPP", ""),
                            help="A llama.cpp checkout whose convert_hf_to_gguf.py converts architectures cogumi does "
                            "not cover (default: $COGUMI_LLAMA_CPP).", hashed=False)
    verify_load: bool = option(True, help="Load the written file with llama.cpp and run a forward pass; a file "
                               "llama.cpp cannot load fails the stage (and is renamed *.rejected).")
    threads: int = option(0, help="Threads for llama.cpp (0: all cores).", hashed=False)

    def check(self) -> None:
        quantizing = self.type in QUANT_TYPES
        for name in ("output_tensor_type", "embedding_type"):
            value = getattr(self, name)
            if value and value not in TENSOR_TYPES:
                raise ConfigError(f"ExportGGUFConfig.{name}: {value!r} is not one of {', '.join(TENSOR_TYPES)}")
        for pattern, kind in self.tensor_types.items():
            if kind not in TENSOR_TYPES:
                raise ConfigError(f"ExportGGUFConfig.tensor_types[{pattern!r}]: {kind!r} is not one of "
                                  f"{', '.join(TENSOR_TYPES)}")
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"ExportGGUFConfig.tensor_types: {pattern!r} is not a regex: {exc}") from None
        if not quantizing and (self.pure or self.output_tensor_type or self.embedding_type or self.tensor_types
                               or self.keep_intermediate):
            raise ConfigError(f"ExportGGUFConfig: pure / output_tensor_type / embedding_type / tensor_types / "
                              f"keep_intermediate apply to quantized types, not {self.type}")
        if self.threads < 0:
            raise ConfigError(f"ExportGGUFConfig.threads: must be >= 0, got {self.threads}")

    def outputs(self) -> dict[str, Path]:
        found = {"gguf": self.out(f"model-{self.type}.gguf"), "report": self.out("export.json")}
        if self.keep_intermediate:
            found["intermediate"] = self.out("model-intermediate.gguf")
        return found


@stage("export-gguf", ExportGGUFConfig, help="Convert a full-precision checkpoint to GGUF (F32/F16/BF16) and quantize "
       "it with llama.cpp (Q8_0, Q6_K, Q5_K_M, Q4_K_M, ...); reports each tensor's type and the fallbacks, and "
       "fails unless llama.cpp loads the file.")
def run_export_gguf(config: ExportGGUFConfig) -> StageResult:
    t0 = time.perf_counter()
    outputs = config.outputs()
    model_dir = _local_model_dir(config.model, "export-gguf")
    hf_config = read_config(model_dir)
    check_full_precision(model_dir, hf_config)
    covered = architecture_of(hf_config) in ARCHITECTURES
    quantizing = config.type in QUANT_TYPES
    float_type = _intermediate_type(config.intermediate, model_dir, hf_config) if quantizing else config.type
    target = outputs["gguf"]
    float_path = (outputs.get("intermediate") or config.out(f".model-{float_type}.intermediate.gguf")) if quantizing \
        else target
    rejected = target.with_name(target.name + ".rejected")
    rejected.unlink(missing_ok=True)
    try:
        if covered:
            conversion = convert_hf_to_gguf(model_dir, float_path, outtype=float_type,
                                            pre_tokenizer=config.pre_tokenizer)
        elif config.llama_cpp:
            conversion = convert_with_llama_cpp(config.llama_cpp, model_dir, float_path, outtype=float_type)
        else:
            raise UnsupportedModelError(
                f"export-gguf: {model_dir} is a {architecture_of(hf_config)}, which cogumi's converter does not cover "
                f"(covered: {', '.join(ARCHITECTURES)}); pass --llama-cpp DIR (or set COGUMI_LLAMA_CPP) to convert it "
                "with a llama.cpp checkout's convert_hf_to_gguf.py")
        if quantizing:
            quantization = quantize_gguf(float_path, target, config.type, pure=config.pure,
                                         output_type=config.output_tensor_type, embedding_type=config.embedding_type,
                                         tensor_types=config.tensor_types, threads=config.threads)
        else:
            quantization = gguf_tensor_report(target, config.type)
    finally:
        if quantizing and not config.keep_intermediate:
            float_path.unlink(missing_ok=True)
    if quantizing:
        conversion["intermediate_kept"] = config.keep_intermediate
    load = None
    if config.verify_load:
        try:
            load = check_llama_cpp_load(target, threads=config.threads)
        except LlamaCppError as exc:
            os.replace(target, rejected)
            raise LlamaCppError(f"export-gguf: llama.cpp cannot use the exported file (moved to {rejected}): {exc}") \
                from None
    fallbacks = quantization["fallbacks"]
    report = {"model": str(model_dir), "type": config.type, "gguf": str(target), "conversion": conversion,
              "quantization": quantization, "load_check": load, "seconds": round(time.perf_counter() - t0, 2)}
    write_json(outputs["report"], report)
    if fallbacks["count"]:
        log.info("export-gguf: %d of %d tensors fell back from %s: %s", fallbacks["count"],
                 len(quantization["tensors"]), fallbacks["requested"], fallbacks["by_type"])
    metrics = {"size_mb": quantization["size_mb"], "bits_per_weight": quantization["bits_per_weight"],
               "tensor_types": quantization["tensor_types"], "fallbacks": fallbacks["by_type"],
               "loads_in_llama_cpp": load is not None}
    return StageResult(counts={"tensors": len(quantization["tensors"]), "fallback_tensors": fallbacks["count"]},
                       metrics=metrics)


@dataclass(kw_only=True)
class ExportVerifyConfig(StageConfig):
    model: str = option(help="The Hugging Face checkpoint the GGUF was made from (with --lora: the merged model).",
                        input="maybe", positional=True)
    gguf: str = option(help="The GGUF file to check.", input=True, positional=True)
    data: str = option(help="Held-out text: JSONL rows (text, instruction/response, messages, prompt, question) "
                       "or a .txt file.", input=True)
    lora: str = option("", help="A GGUF LoRA adapter llama.cpp applies on top of GGUF (compare with the merged model).",
                       input="maybe")
    seq_len: int = option(512, help="Tokens per window.")
    max_tokens: int = option(4096, help="Most tokens of the text to score (whole windows).")
    batch_size: int = option(1, help="Windows per transformers forward pass.", hashed=False)
    min_top1: float = option(0.0, help="Fail when top-1 agreement is below this fraction (0: no budget).")
    max_ppl_increase: float = option(0.0, help="Fail when llama.cpp's perplexity exceeds transformers' by more than "
                                     "this fraction (0.005 = 0.5%; 0: no budget).")
    max_kl: float = option(0.0, help="Fail when the mean KL(transformers || llama.cpp) exceeds this (nats; 0: no budget).")
    threads: int = option(0, help="Threads for llama.cpp (0: all cores).", hashed=False)
    progress: bool = option(True, help="Show a progress bar.", hashed=False)

    def check(self) -> None:
        if self.seq_len < 2 or self.max_tokens < self.seq_len:
            raise ConfigError(f"ExportVerifyConfig.seq_len/max_tokens: need 2 <= seq_len <= max_tokens, got "
                              f"{self.seq_len}, {self.max_tokens}")
        for name in ("min_top1", "max_ppl_increase", "max_kl"):
            if getattr(self, name) < 0:
                raise ConfigError(f"ExportVerifyConfig.{name}: must be >= 0, got {getattr(self, name)}")
        if self.min_top1 > 1:
            raise ConfigError(f"ExportVerifyConfig.min_top1: a fraction in [0, 1], got {self.min_top1}")
        if self.batch_size < 1 or self.threads < 0:
            raise ConfigError("ExportVerifyConfig.batch_size must be >= 1 and threads >= 0")

    def outputs(self) -> dict[str, Path]:
        return {"report": self.out("verify.json")}


@stage("export-verify", ExportVerifyConfig, help="Parity of a GGUF with its checkpoint: the same held-out token "
       "windows through transformers and llama.cpp; top-1 agreement, KL divergence, both perplexities; optional "
       "budgets fail the stage after the report is written.")
def run_export_verify(config: ExportVerifyConfig) -> StageResult:
    from cogumi.compress.gate import read_texts, windows
    from cogumi.models.loading import load_model, load_tokenizer

    texts = read_texts(config.data)
    tokenizer = load_tokenizer(config.model)
    pieces = windows(tokenizer, texts, config.seq_len, config.max_tokens)
    if not pieces:
        raise DataError(config.data, None, None, f"shorter than one window of {config.seq_len} tokens")
    load = check_llama_cpp_load(config.gguf, lora_path=config.lora or None, threads=config.threads)
    reference, _ = load_model(config.model, dtype="float32", device="cpu")
    if load["n_vocab"] != reference.get_output_embeddings().weight.shape[0]:
        raise ExportError(f"export-verify: {config.gguf} has a vocabulary of {load['n_vocab']} tokens but {config.model} "
                          f"has {reference.get_output_embeddings().weight.shape[0]}: not an export of this model")
    figures = llama_cpp_parity(reference, config.gguf, pieces, lora_path=config.lora or None,
                               batch_size=config.batch_size, threads=config.threads, progress=config.progress,
                               tokenizer=tokenizer, texts=texts)
    broken = []
    if config.min_top1 and figures["top1_agreement"] < config.min_top1:
        broken.append(f"top-1 agreement {figures['top1_agreement']:.4f} < {config.min_top1}")
    if config.max_ppl_increase and figures["ppl_rel_diff"] > config.max_ppl_increase:
        broken.append(f"perplexity {figures['ppl_transformers']:.4f} -> {figures['ppl_llamacpp']:.4f} "
                      f"(+{100 * figures['ppl_rel_diff']:.2f}% > {100 * config.max_ppl_increase:.2f}%)")
    if config.max_kl and figures["kl_mean"] > config.max_kl:
        broken.append(f"mean KL {figures['kl_mean']:.5f} > {config.max_kl}")
    report = {"model": config.model, "gguf": config.gguf, "lora": config.lora or None, "data": config.data,
              "windows": len(pieces), "seq_len": config.seq_len, **figures, "load_check": load,
              "budgets": {"min_top1": config.min_top1, "max_ppl_increase": config.max_ppl_increase,
                          "max_kl": config.max_kl},
              "passed": not broken, "failures": broken}
    write_json(config.outputs()["report"], report)
    if broken:
        raise VerifyFailed(f"export-verify: {config.gguf} fails its budget: {'; '.join(broken)} (report: "
                           f"{config.outputs()['report']})")
    metrics = {k: round(v, 6) for k, v in figures.items() if isinstance(v, float)}
    if "tokenization" in figures:
        metrics["tokenization_agreement"] = figures["tokenization"]["agreement"]
    return StageResult(counts={"windows": len(pieces), "positions": figures["positions"]},
                       metrics={**metrics, "passed": True})


@dataclass(kw_only=True)
class ExportLoraConfig(StageConfig):
    adapter: str = option(help="peft LoRA adapter directory (`cogumi train`'s OUTPUT/adapter).", input=True,
                          positional=True)
    base: str = option("", help="The full-precision base checkpoint the adapter was trained on; empty: the one the "
                       "adapter records.", input="maybe")
    type: FloatType = option("F16", help="Type of the LoRA tensors: F32, F16 or BF16.")
    base_gguf: str = option("", help="A GGUF of the base to check that llama.cpp applies the adapter; empty: an F16 "
                            "GGUF of the base is made for the check and deleted.", input="maybe")
    verify_load: bool = option(True, help="Load base + adapter with llama.cpp and run a forward pass before "
                               "reporting done.")
    threads: int = option(0, help="Threads for llama.cpp (0: all cores).", hashed=False)

    def outputs(self) -> dict[str, Path]:
        return {"adapter": self.out("adapter.gguf"), "report": self.out("export_lora.json")}


@stage("export-lora", ExportLoraConfig, help="Convert a peft LoRA adapter to a GGUF LoRA that llama.cpp applies at "
       "load time (Llama(model_path=base.gguf, lora_path=adapter.gguf)); checks that llama.cpp loads it.")
def run_export_lora(config: ExportLoraConfig) -> StageResult:
    from cogumi.train.merge import read_train_info

    adapter = Path(config.adapter)
    base_name = config.base
    if not base_name:
        try:
            base_name = read_train_info(adapter).get("base_model") or ""
        except StageError as exc:
            raise ExportError(f"export-lora: {exc}") from None
        if not base_name:
            raise ExportError("export-lora: the adapter does not name its base model; pass --base")
    base_dir = _local_model_dir(base_name, "export-lora")
    outputs = config.outputs()
    report: dict[str, Any] = {"adapter": str(adapter), "base": str(base_dir)}
    report["conversion"] = convert_lora_to_gguf(adapter, outputs["adapter"], base_dir, outtype=config.type)
    if config.verify_load:
        base_gguf = Path(config.base_gguf) if config.base_gguf else config.out(".base-F16.check.gguf")
        try:
            if not config.base_gguf:
                convert_hf_to_gguf(base_dir, base_gguf, outtype="F16")
            report["load_check"] = check_llama_cpp_load(base_gguf, lora_path=outputs["adapter"], threads=config.threads)
        except LlamaCppError as exc:
            outputs["adapter"].unlink(missing_ok=True)
            raise LlamaCppError(f"export-lora: llama.cpp cannot apply the converted adapter (removed): {exc}") from None
        finally:
            if not config.base_gguf:
                base_gguf.unlink(missing_ok=True)
    write_json(outputs["report"], report)
    conversion = report["conversion"]
    return StageResult(counts={"modules": conversion["modules"], "parameters": conversion["parameters"]},
                       metrics={"bytes": conversion["bytes"], "ranks": conversion["ranks"], "alpha": conversion["alpha"],
                                "loads_in_llama_cpp": "load_check" in report})


__all__ = [
    "ARCHITECTURES", "EXPORT_TYPES", "FLOAT_TYPES", "QUANT_TYPES", "ExportError", "ExportGGUFConfig",
    "ExportLoraConfig", "ExportVerifyConfig", "LlamaCppError", "LlamaCppLogits", "TokenizerError",
    "UnsupportedModelError", "VerifyFailed", "check_llama_cpp_load", "convert_hf_to_gguf", "convert_lora_to_gguf",
    "convert_with_llama_cpp", "gguf_tensor_report", "llama3_rope_factors", "llama_cpp_parity", "quantize_gguf",
    "rotary_rows_to_gguf", "run_export_gguf", "run_export_lora", "run_export_verify", "tokenizer_agreement",
]
