"""The two offline models: the tiny random Llama and SmolLM2-135M-Instruct from its GGUF."""

from __future__ import annotations

import json

import torch

from cogumi.models.fixtures import build_tiny_llama
from cogumi.models.loading import load_model, load_tokenizer


def test_tiny_llama_is_a_small_llama_with_its_own_tokenizer(tiny_llama_dir):
    model, tokenizer = load_model(tiny_llama_dir)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 2
    assert sum(p.numel() for p in model.parameters()) < 500_000
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer("def add(a, b):\n    return a + b").input_ids
    assert tokenizer.decode(ids) == "def add(a, b):\n    return a + b"
    assert len(ids) < 20  # the BPE learned merges; bytes alone would be 32 tokens
    logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tokenizer))


def test_tiny_llama_is_deterministic_and_cached(tmp_path, tiny_llama_dir):
    again = build_tiny_llama(tmp_path / "tiny")
    a = json.loads((again / "config.json").read_text())
    b = json.loads((tiny_llama_dir / "config.json").read_text())
    assert a == b
    assert build_tiny_llama(tmp_path / "tiny") == again


def test_smollm2_checkpoint_answers_and_has_correct_special_tokens(smollm2_dir):
    model, tokenizer = load_model(smollm2_dir)
    config = model.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.vocab_size) == ("llama", 30, 576, 49152)
    # transformers' GGUF conversion calls <|im_start|> the EOS; the fixture fixes it from the GGUF metadata.
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert not hasattr(config, "quantization_config")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_nf4_loading_quantizes_linear_layers_on_cpu(smollm2_dir):
    import bitsandbytes as bnb

    model, tokenizer = load_model(smollm2_dir, quantization="nf4")
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    assert q_proj.weight.quant_type == "nf4" and q_proj.weight.quant_state.nested  # double quantization
    assert model.lm_head.weight.dtype != torch.uint8  # the head stays in full precision
    full, _ = load_model(smollm2_dir)
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        quantized = model(**ids).logits[0].float().log_softmax(-1)
        reference = full(**ids).logits[0].log_softmax(-1)
    assert quantized[-1].argmax() == reference[-1].argmax()
    kl = (reference.exp() * (reference - quantized)).sum(-1)
    # 4-bit weights cost some fidelity (measured: mean KL 0.47 nats over this prompt), far
    # from what a wrongly loaded model would give (several nats).
    assert kl.mean() < 1.0


def test_load_tokenizer_pads_on_the_left_for_generation(smollm2_dir):
    tokenizer = load_tokenizer(smollm2_dir)
    assert tokenizer.padding_side == "left"
