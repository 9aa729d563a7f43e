"""GGUF export: conversion, llama.cpp load and parity (tiny fixture, other architectures, a
SentencePiece vocabulary, SmolLM2), llama.cpp quantization and its fallbacks, LoRA adapters,
and bad input. Real models, real llama.cpp through llama-cpp-python; nothing is mocked."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cogumi.cli import main
from cogumi.compress.gate import windows
from cogumi.export.gguf import (
    ExportError,
    LlamaCppError,
    TokenizerError,
    UnsupportedModelError,
    check_llama_cpp_load,
    convert_hf_to_gguf,
    convert_lora_to_gguf,
    gguf_tensor_report,
    llama3_rope_factors,
    llama_cpp_parity,
    quantize_gguf,
    rotary_rows_to_gguf,
)
from cogumi.stage import ConfigError, run_stage

#: Held-out text: prose, code and word problems (about 1,100 SmolLM2 tokens).
TEXTS = [
    "The quick brown fox jumps over the lazy dog. A model reads text and predicts the next token, one at a time.",
    "Tom has 3 apples and buys 4 more. How many apples does Tom have now?\n\n3 + 4 = 7.\n#### 7",
    "A pencil costs 2 dollars. How much do 5 pencils cost?\n\n5 * 2 = 10.\n#### 10",
    "def add(a, b):\n    return a + b\n\nclass Stack:\n    def __init__(self):\n        self.items = []\n",
    "Water boils at 100 degrees Celsius at sea level, and at a lower temperature high in the mountains, "
    "because the air pressure there is lower.",
    "Maria read 15 pages on Monday and 20 pages on Tuesday. How many pages did she read in total?\n\n15 + 20 = 35.",
    "Summarize the text in one sentence. Translate the sentence to French. Classify the sentiment as positive.",
    "for i in range(10):\n    print(i * i)\n\nimport json, os, sys\nprint(json.dumps({'a': 1}))",
    "The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is Madrid, and the "
    "capital of Portugal is Lisbon, a city built on seven hills near the mouth of the river Tagus.",
    "There are 12 cookies shared equally among 4 children. How many cookies does each child get?\n\n12 / 4 = 3.",
    "Explain why the sky is blue: sunlight is scattered by the molecules of the air, and blue light, with its "
    "shorter wavelength, is scattered much more strongly than red light, so the sky looks blue from every side.",
    "A farmer has 30 chickens and sells 12 of them. How many chickens are left?\n\n30 - 12 = 18.\n#### 18",
    "Reasoning step by step: first add the numbers, then divide by the count to get the mean of the list.",
    "Write a function that reverses a string. def reverse(s):\n    return s[::-1]\n",
    "A train travels 60 km in 45 minutes. What is its speed in km/h? 60 km / 0.75 h = 80 km/h.",
    "Good code is read far more often than it is written, so clear names and short functions pay for themselves.",
] * 2


def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "held_out.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return path


def hf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype="float32").eval()


def token_windows(model_dir: Path, seq_len: int, max_tokens: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    return windows(AutoTokenizer.from_pretrained(model_dir), TEXTS, seq_len, max_tokens)


def copy_tokenizer(source: Path, target: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (source / name).exists():
            shutil.copy(source / name, target / name)


def no_files_named(directory: Path, name: str) -> bool:
    return not [p for p in directory.iterdir() if p.name == name]


# ----------------------------------------------------------------------------- tiny fixture

@pytest.fixture(scope="module")
def tiny_ggufs(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("tiny-gguf")
    found = {}
    for kind in ("F32", "F16", "BF16"):
        found[kind] = out / f"tiny-{kind}.gguf"
        convert_hf_to_gguf(tiny_llama_dir, found[kind], outtype=kind)
    return found


def test_tiny_metadata_tensors_and_tokenizer(tiny_llama_dir, tiny_ggufs):
    import numpy as np
    import torch
    from gguf import GGUFReader

    reader = GGUFReader(tiny_ggufs["F32"])
    fields = {name: field.contents() for name, field in reader.fields.items()
              if name not in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")}
    assert fields["general.architecture"] == "llama"
    assert fields["llama.block_count"] == 2 and fields["llama.embedding_length"] == 64
    assert fields["llama.attention.head_count"] == 4 and fields["llama.attention.head_count_kv"] == 2
    assert fields["llama.feed_forward_length"] == 128 and fields["llama.vocab_size"] == 512
    assert fields["llama.rope.dimension_count"] == 16 and fields["llama.context_length"] == 512
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.eos_token_id"] == 2 and fields["tokenizer.ggml.padding_token_id"] == 3
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert "<|im_start|>" in fields["tokenizer.chat_template"]
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert types[:4] == [3, 3, 3, 3]  # the four special tokens are CONTROL
    assert len(reader.fields["tokenizer.ggml.merges"].contents()) > 200
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" in tensors  # the fixture does not tie its embeddings

    state = hf_model(tiny_llama_dir).state_dict()
    q = np.asarray(tensors["blk.0.attn_q.weight"].data)
    k = np.asarray(tensors["blk.1.attn_k.weight"].data)
    hf_q = state["model.layers.0.self_attn.q_proj.weight"]
    assert np.array_equal(q, rotary_rows_to_gguf(hf_q, 4).numpy())
    assert not np.array_equal(q, hf_q.numpy())  # the permutation did something
    assert np.array_equal(k, rotary_rows_to_gguf(state["model.layers.1.self_attn.k_proj.weight"], 2).numpy())
    # row 2i / 2i+1 of a head are rows i and i + head_dim/2 of transformers' layout
    assert torch.equal(torch.from_numpy(q[1]), hf_q[8]) and torch.equal(torch.from_numpy(q[16 + 2]), hf_q[16 + 1])

    half = {t.name: t.tensor_type.name for t in GGUFReader(tiny_ggufs["F16"]).tensors}
    assert half["blk.0.attn_norm.weight"] == "F32" and half["blk.0.ffn_up.weight"] == "F16"
    assert {t.tensor_type.name for t in GGUFReader(tiny_ggufs["BF16"]).tensors} == {"F32", "BF16"}


@pytest.mark.parametrize("kind, min_top1", [("F32", 0.999), ("F16", 0.99), ("BF16", 0.99)])
def test_tiny_parity_with_transformers(tiny_llama_dir, tiny_ggufs, kind, min_top1):
    from transformers import AutoTokenizer

    figures = llama_cpp_parity(hf_model(tiny_llama_dir), tiny_ggufs[kind], token_windows(tiny_llama_dir, 128, 1024),
                               tokenizer=AutoTokenizer.from_pretrained(tiny_llama_dir), texts=TEXTS)
    assert figures["positions"] > 900
    assert figures["top1_agreement"] >= min_top1
    assert abs(figures["ppl_rel_diff"]) < 1e-3
    assert figures["kl_mean"] < 1e-4
    assert figures["tokenization"]["agreement"] == 1.0


def test_tiny_quantization_reports_fallbacks(tiny_ggufs, tmp_path):
    report = quantize_gguf(tiny_ggufs["F32"], tmp_path / "q4km.gguf", "Q4_K_M")
    # rows of 64 and 128 values are no multiple of a K-quant's 256: every matrix falls back
    assert report["fallbacks"]["requested"] == "Q4_K" and report["fallbacks"]["block"] == 256
    assert report["fallbacks"]["count"] == 16
    assert "blk.0.attn_q.weight" in report["fallbacks"]["tensors"]
    assert "Q4_K" not in report["tensor_types"] and report["tensor_types"]["F32"] == 5
    q8 = quantize_gguf(tiny_ggufs["F32"], tmp_path / "q8.gguf", "Q8_0")
    assert q8["fallbacks"]["count"] == 0 and q8["tensor_types"] == {"Q8_0": 16, "F32": 5}
    assert 8.0 < q8["bits_per_weight"] < 9.5
    pure = quantize_gguf(tiny_ggufs["F32"], tmp_path / "q8-f16-out.gguf", "Q8_0", output_type="F16",
                         tensor_types={r"attn_v": "F32"})
    types = {t["name"]: t["type"] for t in pure["tensors"]}
    assert types["output.weight"] == "F16" and types["blk.0.attn_v.weight"] == "F32"
    assert types["blk.0.attn_q.weight"] == "Q8_0"
    assert pure["overridden"]["count"] == 3 and pure["fallbacks"]["count"] == 0  # chosen, not fallen back
    assert check_llama_cpp_load(tmp_path / "q4km.gguf")["n_vocab"] == 512


def test_export_and_verify_stages_through_the_cli(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["export", "gguf", str(tiny_llama_dir), "-o", str(out), "--type", "F32"]) == 0
    report = json.loads((out / "export.json").read_text())
    assert report["load_check"]["n_vocab"] == 512 and report["conversion"]["tokenizer"]["pre"] == "gpt-2"
    assert (out / "manifest.json").is_file() and (out / "model-F32.gguf").is_file()
    data = data_file(tmp_path)
    verify = tmp_path / "verify"
    args = ["export", "verify", str(tiny_llama_dir), str(out / "model-F32.gguf"), "--data", str(data),
            "-o", str(verify), "--seq-len", "64", "--max-tokens", "512", "--no-progress"]
    assert main([*args, "--min-top1", "0.99", "--max-ppl-increase", "0.005"]) == 0
    figures = json.loads((verify / "verify.json").read_text())
    assert figures["passed"] and figures["top1_agreement"] >= 0.999 and figures["windows"] == 8
    assert figures["tokenization"]["agreement"] == 1.0
    # a budget no export can meet: the report is written, then the stage fails
    assert main([*args, "--max-kl", "1e-15"]) == 2
    assert "fails its budget" in capsys.readouterr().err
    failed = json.loads((verify / "verify.json").read_text())
    assert failed["passed"] is False and "mean KL" in failed["failures"][0]
    assert not (verify / "manifest.json").exists()


def test_stage_rejects_a_file_llama_cpp_cannot_load(tiny_llama_dir, tmp_path):
    """A pre-tokenizer llama.cpp does not know: conversion succeeds, the load check fails."""
    out = tmp_path / "bad"
    with pytest.raises(LlamaCppError, match="unknown pre-tokenizer type: 'no-such-pre'"):
        run_stage("export-gguf", {"model": str(tiny_llama_dir), "type": "F16", "pre_tokenizer": "no-such-pre",
                                  "output_dir": str(out)})
    assert not (out / "model-F16.gguf").exists() and (out / "model-F16.gguf.rejected").is_file()
    assert not (out / "manifest.json").exists()


def test_config_checks():
    with pytest.raises(ConfigError, match="apply to quantized types"):
        run_stage("export-gguf", {"model": "x", "type": "F16", "pure": True, "output_dir": "o"})
    with pytest.raises(ConfigError, match="output_tensor_type"):
        run_stage("export-gguf", {"model": "x", "output_tensor_type": "Q9", "output_dir": "o"})
    with pytest.raises(ConfigError, match="type"):
        run_stage("export-gguf", {"model": "x", "type": "Q7_K", "output_dir": "o"})


# ----------------------------------------------------------------------------- other architectures

def _tiny_model(kind: str, tokenizer_dir: Path, target: Path) -> Path:
    import torch
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(1)
    common = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
              "eos_token_id": 2, "pad_token_id": 3, "bos_token_id": None}
    if kind == "qwen2":  # attention biases, tied embeddings, NEOX rope (no permutation)
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True))
    elif kind == "mistral":
        model = MistralForCausalLM(MistralConfig(**common, tie_word_embeddings=False))
    else:  # Llama 3.1-style RoPE scaling: a rope_freqs tensor
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64, "rope_theta": 500000.0}
        model = LlamaForCausalLM(LlamaConfig(**common, rope_parameters=rope, head_dim=32, tie_word_embeddings=False))
    with torch.no_grad():  # larger weights than the default init: logits far from uniform
        for name, parameter in model.named_parameters():
            if parameter.ndim == 2:
                parameter.normal_(0, 0.08)
            elif name.endswith("proj.bias"):
                parameter.normal_(0, 0.5)  # Qwen2's q/k/v biases
    model.save_pretrained(target)
    copy_tokenizer(tokenizer_dir, target)
    return target


@pytest.mark.parametrize("kind", ["qwen2", "mistral", "llama3-rope"])
def test_other_architectures_match_transformers(kind, tiny_llama_dir, tmp_path):
    from gguf import GGUFReader

    model_dir = _tiny_model(kind, tiny_llama_dir, tmp_path / kind)
    report = convert_hf_to_gguf(model_dir, tmp_path / f"{kind}.gguf", outtype="F32")
    names = {t.name for t in GGUFReader(tmp_path / f"{kind}.gguf").tensors}
    if kind == "qwen2":
        assert report["architecture"] == "qwen2" and report["tied_embeddings"]
        assert "output.weight" not in names and "blk.0.attn_q.bias" in names
    if kind == "llama3-rope":
        assert "rope_freqs.weight" in names and report["rope"]["type"] == "llama3"
        assert report["hparams"]["head_dim"] == 32  # head_dim != hidden / heads
    figures = llama_cpp_parity(hf_model(model_dir), tmp_path / f"{kind}.gguf", token_windows(model_dir, 256, 1024))
    assert figures["top1_agreement"] >= 0.995, figures
    assert figures["kl_mean"] < 1e-3


def test_llama3_rope_factors_follow_the_schedule():
    factors = llama3_rope_factors(500000.0, 128, {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                  "original_max_position_embeddings": 8192})
    assert factors.shape == (64,) and factors[0] == 1.0 and factors[-1] == 8.0
    assert ((factors[1:] - factors[:-1]) >= 0).all()  # monotone: high frequencies kept, low ones divided


def test_sentencepiece_vocabulary(tiny_llama_dir, tmp_path):
    import sentencepiece as spm
    import torch
    from llama_cpp import Llama
    from transformers import LlamaConfig, LlamaForCausalLM

    from cogumi.models.fixtures import _TINY_CORPUS

    model_dir = tmp_path / "spm-llama"
    model_dir.mkdir()
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_TINY_CORPUS.splitlines() * 4), model_writer=proto, vocab_size=320, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        minloglevel=2)
    (model_dir / "tokenizer.model").write_bytes(proto.getvalue())
    (model_dir / "tokenizer_config.json").write_text(json.dumps(
        {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
                     ).save_pretrained(model_dir)
    report = convert_hf_to_gguf(model_dir, tmp_path / "spm.gguf", outtype="F32")
    assert report["tokenizer"]["model"] == "llama" and report["tokenizer"]["add_special_tokens"]["bos"] is True
    assert report["tokenizer"]["special_token_ids"] == {"bos": 1, "eos": 2, "unk": 0}
    processor = spm.SentencePieceProcessor(model_proto=proto.getvalue())
    llm = Llama(str(tmp_path / "spm.gguf"), n_ctx=256, verbose=False)
    try:
        for text in TEXTS[:16]:
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == processor.encode(text), text
        assert llm.tokenize(b"hi", add_bos=True)[0] == 1
    finally:
        llm.close()
    ids = [i for text in TEXTS for i in processor.encode(text)][:512]
    figures = llama_cpp_parity(hf_model(model_dir), tmp_path / "spm.gguf", [ids[:256], ids[256:]])
    assert figures["top1_agreement"] >= 0.999


# ----------------------------------------------------------------------------- bad input

def test_quantized_checkpoint_is_refused(tiny_llama_dir, tmp_path):
    model_dir = tmp_path / "awq"
    shutil.copytree(tiny_llama_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 64}
    (model_dir / "config.json").write_text(json.dumps(config))
    target = tmp_path / "out" / "model-Q5_K_M.gguf"
    with pytest.raises(UnsupportedModelError, match="export from the full-precision model"):
        run_stage("export-gguf", {"model": str(model_dir), "output_dir": str(target.parent)})
    assert not target.exists()


def test_unsupported_architecture_is_refused(tiny_llama_dir, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model_dir = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=32, n_layer=1, n_head=2, n_positions=64)).save_pretrained(model_dir)
    copy_tokenizer(tiny_llama_dir, model_dir)
    out = tmp_path / "out"
    with pytest.raises(UnsupportedModelError, match=r"GPT2LMHeadModel.*--llama-cpp"):
        run_stage("export-gguf", {"model": str(model_dir), "type": "F16", "output_dir": str(out), "llama_cpp": ""})
    with pytest.raises(ExportError, match=r"no convert_hf_to_gguf\.py"):
        run_stage("export-gguf", {"model": str(model_dir), "type": "F16", "output_dir": str(out),
                                  "llama_cpp": str(tmp_path)})
    assert not (out / "model-F16.gguf").exists()


def test_tokenizer_problems(tiny_llama_dir, tmp_path):
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_llama_dir / name, no_tokenizer / name)
    with pytest.raises(TokenizerError, match="no tokenizer files"):
        convert_hf_to_gguf(no_tokenizer, tmp_path / "a.gguf")
    assert no_files_named(tmp_path, "a.gguf")

    # a byte-level BPE whose split regex llama.cpp's table does not know
    odd = tmp_path / "odd-pre"
    shutil.copytree(tiny_llama_dir, odd)
    tokenizer = json.loads((odd / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\s?\w+|\s?[^\w\s]+|\s+"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    (odd / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(TokenizerError, match=r"unknown BPE pre-tokenizer.*--pre-tokenizer"):
        convert_hf_to_gguf(odd, tmp_path / "b.gguf")
    assert no_files_named(tmp_path, "b.gguf")
    report = convert_hf_to_gguf(odd, tmp_path / "b.gguf", pre_tokenizer="gpt-2")
    assert report["tokenizer"]["pre"] == "gpt-2" and report["tokenizer"]["pre_source"] == "user"

    # neither byte-level BPE nor SentencePiece
    wordlevel = tmp_path / "word-level"
    shutil.copytree(tiny_llama_dir, wordlevel)
    tokenizer["model"] = {"type": "WordLevel", "vocab": {"a": 0}, "unk_token": "a"}
    tokenizer["pre_tokenizer"] = {"type": "Whitespace"}
    (wordlevel / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(TokenizerError, match="cannot determine the GGUF tokenizer type"):
        convert_hf_to_gguf(wordlevel, tmp_path / "c.gguf")
    assert no_files_named(tmp_path, "c.gguf")


def test_a_failed_write_leaves_no_file(tiny_llama_dir, tmp_path):
    """A file-size limit makes the write fail part-way (as a full disk would)."""
    script = textwrap.dedent(f"""
        import resource, signal, sys
        import gguf, torch, transformers, safetensors
        from cogumi.export.gguf import ExportError, convert_hf_to_gguf
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.RLIM_INFINITY))
        try:
            convert_hf_to_gguf({str(tiny_llama_dir)!r}, {str(tmp_path / "model.gguf")!r}, outtype="F32")
        except ExportError as exc:
            print("ERROR", exc)
            sys.exit(0)
        sys.exit(1)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "cannot write" in proc.stdout and "nothing was left under that name" in proc.stdout
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- LoRA

def _random_lora(base_dir: Path, target: Path, **config) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model

    from cogumi.models.loading import load_model

    model, _ = load_model(base_dir, dtype="float32", device="cpu")
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=config.pop("targets", modules),
                                                  task_type="CAUSAL_LM", **config))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a freshly made LoRA has B = 0: give it an effect
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.4)
    peft_model.save_pretrained(target)
    return target


def _merged(base_dir: Path, adapter: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(hf_model(base_dir), adapter).merge_and_unload().eval()


def test_lora_adapter_matches_the_merged_model(tiny_llama_dir, tiny_ggufs, tmp_path):
    # rsLoRA and a per-module alpha: scalings llama.cpp's alpha / rank cannot express, folded into B;
    # lm_head (untied in the fixture) is adapted too
    adapter = _random_lora(tiny_llama_dir, tmp_path / "adapter", use_rslora=True, alpha_pattern={"v_proj": 4},
                           targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                    "lm_head"])
    out = tmp_path / "lora"
    result = run_stage("export-lora", {"adapter": str(adapter), "base": str(tiny_llama_dir), "type": "F16",
                                       "base_gguf": str(tiny_ggufs["F32"]), "output_dir": str(out)})
    report = json.loads((out / "export_lora.json").read_text())
    assert result.counts["modules"] == 15 and report["conversion"]["scaling_folded_into_b"] == 15
    assert report["conversion"]["targets"] == ["attn_k", "attn_output", "attn_q", "attn_v", "ffn_down", "ffn_gate",
                                               "ffn_up", "output"]
    assert report["load_check"]["n_vocab"] == 512
    lora_windows = token_windows(tiny_llama_dir, 128, 1024)
    merged = _merged(tiny_llama_dir, adapter)
    with_adapter = llama_cpp_parity(merged, tiny_ggufs["F32"], lora_windows, lora_path=out / "adapter.gguf")
    without = llama_cpp_parity(merged, tiny_ggufs["F32"], lora_windows)
    assert with_adapter["top1_agreement"] >= 0.98, with_adapter
    assert without["top1_agreement"] < 0.5  # the adapter really changes the model


def test_lora_with_trained_embeddings_is_refused(tiny_llama_dir, tmp_path):
    adapter = _random_lora(tiny_llama_dir, tmp_path / "adapter", modules_to_save=["embed_tokens", "lm_head"])
    with pytest.raises(UnsupportedModelError, match=r"modules_to_save.*cogumi merge"):
        convert_lora_to_gguf(adapter, tmp_path / "adapter.gguf", tiny_llama_dir)
    assert not (tmp_path / "adapter.gguf").exists()


# ----------------------------------------------------------------------------- SmolLM2

@pytest.fixture(scope="module")
def smollm2_ggufs(smollm2_dir, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("smollm2-gguf")
    found = {"F32": out / "smollm2-F32.gguf", "F16": out / "smollm2-F16.gguf"}
    for kind, path in found.items():
        convert_hf_to_gguf(smollm2_dir, path, outtype=kind)
    return found


@pytest.fixture(scope="module")
def smollm2_hf(smollm2_dir):
    return hf_model(smollm2_dir)


@pytest.fixture(scope="module")
def smollm2_f16_parity(smollm2_dir, smollm2_hf, smollm2_ggufs) -> dict:
    return llama_cpp_parity(smollm2_hf, smollm2_ggufs["F16"], token_windows(smollm2_dir, 256, 512))


@pytest.mark.slow
def test_smollm2_f16_meets_the_parity_targets(smollm2_f16_parity):
    figures = smollm2_f16_parity
    assert figures["positions"] == 510
    assert figures["top1_agreement"] >= 0.99, figures
    assert abs(figures["ppl_rel_diff"]) <= 0.005, figures


@pytest.mark.slow
def test_smollm2_matches_llama_cpps_own_conversion(smollm2_ggufs, smollm2_gguf):
    """The shipped SmolLM2 GGUF was written by llama.cpp's converter; the HF fixture is its
    dequantization. Converting that back must give llama.cpp's tensors bit for bit (names,
    shapes, the q/k row order) and its model and tokenizer metadata."""
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize

    original = GGUFReader(smollm2_gguf)
    ours = {t.name: t for t in GGUFReader(smollm2_ggufs["F32"]).tensors}
    assert sorted(ours) == sorted(t.name for t in original.tensors)
    for tensor in original.tensors:
        mine = np.asarray(ours[tensor.name].data)
        assert np.array_equal(dequantize(tensor.data, tensor.tensor_type).reshape(mine.shape), mine), tensor.name
    theirs = original.fields
    mine = GGUFReader(smollm2_ggufs["F16"]).fields
    for key in theirs:
        if key.startswith(("llama.", "tokenizer.")) and key not in (
                "tokenizer.ggml.padding_token_id",  # the fixture pads with <|endoftext|>, not EOS
                "tokenizer.ggml.add_space_prefix"):  # not read for GPT-2-style vocabularies
            assert mine[key].contents() == theirs[key].contents(), key


@pytest.mark.slow
def test_smollm2_tokenizer_matches_the_original(smollm2_dir, smollm2_ggufs):
    """llama.cpp tokenizes like SmolLM2's own pre-tokenizer (digits split, then byte-level BPE).

    The fixture's tokenizer.json, rebuilt by transformers from the GGUF, lost the digit split,
    so it differs from both where whitespace precedes a digit; the original is rebuilt here.
    """
    from gguf import GGUFReader
    from llama_cpp import Llama
    from tokenizers import Tokenizer, pre_tokenizers

    fields = GGUFReader(smollm2_ggufs["F16"]).fields
    assert fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert fields["tokenizer.ggml.bos_token_id"].contents() == 1 and fields["tokenizer.ggml.eos_token_id"].contents() == 2
    original = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    original.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                      pre_tokenizers.ByteLevel(add_prefix_space=False)])
    llm = Llama(str(smollm2_ggufs["F16"]), n_ctx=64, vocab_only=True, verbose=False)
    try:
        for text in [*TEXTS[:16], "<|im_start|>user\nHi 42<|im_end|>"]:
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == original.encode(text).ids, text
    finally:
        llm.close()


QUANT_TYPES_TESTED = ["Q6_K", "Q5_K_M", "Q4_K_M", "Q5_0", "Q4_0"]  # Q8_0: through the stage below


@pytest.fixture(scope="module")
def smollm2_quantized(smollm2_ggufs, tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("smollm2-quant")
    return {q: quantize_gguf(smollm2_ggufs["F32"], out / f"smollm2-{q}.gguf", q) for q in QUANT_TYPES_TESTED}


@pytest.mark.slow
@pytest.mark.parametrize("qtype", QUANT_TYPES_TESTED)
def test_smollm2_quantized_types_load_and_report_fallbacks(smollm2_quantized, qtype):
    report = smollm2_quantized[qtype]
    load = check_llama_cpp_load(report["path"])
    assert load["n_vocab"] == 49152 and load["tokenizer_pre"] == "smollm"
    if qtype == "Q6_K":  # "The capital of France is" -> " Paris" (Q4_0 already says " capital")
        assert load["next_token"] == " Paris"
    fallbacks = report["fallbacks"]
    if "_K" in qtype:
        # SmolLM2's rows of 576 are no multiple of 256: q, k, v, o, gate, up and the embeddings fall back
        assert fallbacks["count"] == 181 and "blk.0.attn_q.weight" in fallbacks["tensors"]
        assert "blk.0.ffn_down.weight" not in fallbacks["tensors"]  # rows of 1536 = 6 x 256
    else:
        assert fallbacks["count"] == 0
    assert sum(report["tensor_types"].values()) == 272
    assert report == gguf_tensor_report(report["path"], qtype) | {"settings": report["settings"],
                                                                  "seconds": report["seconds"]}


@pytest.fixture(scope="module")
def smollm2_stage_q8(smollm2_dir, tmp_path_factory):
    """The export-gguf stage end to end on SmolLM2 (convert, quantize, load check)."""
    out = tmp_path_factory.mktemp("smollm2-stage")
    return out, run_stage("export-gguf", {"model": str(smollm2_dir), "type": "Q8_0", "output_dir": str(out)})


@pytest.mark.slow
def test_smollm2_q8_0_is_within_half_a_percent_of_f16(smollm2_dir, smollm2_hf, smollm2_stage_q8, smollm2_f16_parity):
    out, result = smollm2_stage_q8
    assert result.counts == {"tensors": 272, "fallback_tensors": 0}
    assert result.metrics["tensor_types"] == {"Q8_0": 211, "F32": 61}
    assert not [p for p in out.iterdir() if "intermediate" in p.name or p.name.endswith(".tmp")]
    q8 = llama_cpp_parity(smollm2_hf, result.outputs["gguf"], token_windows(smollm2_dir, 256, 512))
    assert abs(q8["ppl_llamacpp"] / smollm2_f16_parity["ppl_llamacpp"] - 1) <= 0.005, q8
    assert q8["top1_agreement"] >= 0.97


@pytest.mark.slow
def test_smollm2_q8_0_answers_a_chat(smollm2_stage_q8):
    from llama_cpp import Llama

    _, result = smollm2_stage_q8
    llm = Llama(result.outputs["gguf"], n_ctx=512, verbose=False)
    try:
        answer = llm.create_chat_completion(
            messages=[{"role": "system", "content": "You are a helpful assistant."},
                      {"role": "user", "content": "What is the capital of France?"}],
            max_tokens=24, temperature=0.0, top_k=1)
    finally:
        llm.close()
    assert answer["choices"][0]["message"]["content"].startswith("The capital of France is Paris")
