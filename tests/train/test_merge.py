"""The merge stage: the merged model reproduces base + adapter; after 4-bit training the merge
goes into the dequantized NF4 weights, which reproduce the trained model far better than the
original weights do; a vocabulary grown for ChatML survives the merge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cogumi.stage import StageError
from cogumi.train.merge import VERIFY_CHATS, MergeConfig
from cogumi.train.merge import run as merge
from cogumi.train.sft import TrainConfig
from cogumi.train.sft import run as train

ROWS = [
    {"instruction": "What is the capital of France?", "response": "Paris."},
    {"instruction": "What is 2 + 3?", "response": "5."},
    {"instruction": "Name a primary color.", "response": "Red."},
    {"instruction": "What is the capital of Italy?", "response": "Rome."},
]


def _train(model_dir, tmp_path: Path, name: str, **overrides) -> Path:
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS * 4))
    values = dict(data=str(data), model=str(model_dir), output_dir=str(tmp_path / name), quantization="none",
                  lora_r=8, max_steps=6, batch_size=2, grad_accum=1, learning_rate=2e-2, warmup_steps=0,
                  logging_steps=1, save_steps=6, val_fraction=0.0, gradient_checkpointing=False,
                  max_length=64, progress=False)
    values.update(overrides)
    train(TrainConfig(**values))
    return tmp_path / name / "adapter"


def _logits(model, tokenizer):
    texts = [tokenizer.apply_chat_template(chat, tokenize=False) for chat in VERIFY_CHATS]
    tokenizer.padding_side = "right"
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        logits = model(**batch).logits.float()
    return logits[batch["attention_mask"].bool()]


def _relative(a, b) -> float:
    return float((a - b).abs().max() / a.abs().max())


def test_merged_model_matches_base_plus_adapter(tiny_llama_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = _train(tiny_llama_dir, tmp_path, "fp")
    result = merge(MergeConfig(adapter=str(adapter), output_dir=str(tmp_path / "merged")))
    assert result.metrics["saved_relative_diff"] < 1e-5

    # Checked here independently of the stage's own report.
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    reference = _logits(PeftModel.from_pretrained(base, adapter).eval(), tokenizer)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged" / "model").eval()
    assert _relative(reference, _logits(merged, tokenizer)) < 1e-5
    # The adapter changed the model: the comparison is not between two copies of the base.
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    assert _relative(reference, _logits(plain, tokenizer)) > 1e-2
    assert not any("lora" in name for name, _ in merged.named_parameters())
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    eos = merged.generation_config.eos_token_id
    assert end in (eos if isinstance(eos, list) else [eos])
    assert merged.generation_config.pad_token_id == tokenizer.pad_token_id != end

    # The check is live: an impossible tolerance fails the stage and writes nothing.
    with pytest.raises(StageError, match="above the tolerance"):
        merge(MergeConfig(adapter=str(adapter), output_dir=str(tmp_path / "strict"), tolerance=1e-12))
    assert not (tmp_path / "strict" / "model").exists()


def test_4bit_training_merges_into_the_dequantized_base(tiny_llama_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cogumi.models.loading import load_model
    from cogumi.train.sft import keep_bnb_layout_trainable

    adapter = _train(tiny_llama_dir, tmp_path, "nf4", quantization="nf4")
    dequantized = merge(MergeConfig(adapter=str(adapter), output_dir=str(tmp_path / "deq")))
    original = merge(MergeConfig(adapter=str(adapter), output_dir=str(tmp_path / "orig"), base_weights="original"))
    report = json.loads((tmp_path / "deq" / "merge_report.json").read_text())
    assert report["base_weights"] == "dequantized" and report["trained_4bit"]
    assert dequantized.metrics["saved_relative_diff"] < 1e-5

    # Independently: the model as trained (NF4 base + adapter, bf16 compute) vs the merged ones.
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    quantized, _ = load_model(tiny_llama_dir, quantization="nf4", device="cpu")
    keep_bnb_layout_trainable(quantized)
    trained = _logits(PeftModel.from_pretrained(quantized, adapter).eval(), tokenizer)
    into_dequantized = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "deq" / "model").eval(), tokenizer)
    into_original = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "orig" / "model").eval(), tokenizer)
    assert _relative(trained, into_dequantized) < 1e-2
    assert _relative(trained, into_original) > 5 * _relative(trained, into_dequantized)
    assert dequantized.metrics["vs_trained_4bit_relative_diff"] < original.metrics["vs_trained_4bit_relative_diff"]


def _base_model_without_chatml(target: Path, *, tied: bool) -> Path:
    """A tiny Llama whose tokenizer has no chat template and no ChatML tokens (a base model)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(
        [" ".join(r["instruction"] + " " + r["response"] for r in ROWS)] * 10,
        trainer=trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False),
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=tied, eos_token_id=fast.eos_token_id))
    model.save_pretrained(target)
    fast.save_pretrained(target)
    return target


@pytest.mark.parametrize("tied", [False, True])
def test_chatml_tokens_added_in_training_survive_the_merge(tmp_path, tied):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = _base_model_without_chatml(tmp_path / "base", tied=tied)
    adapter = _train(base, tmp_path, "run", max_steps=4)
    info = json.loads((adapter / "cogumi_train.json").read_text())
    assert info["tokenizer"]["added_tokens"] == ["<|im_start|>", "<|im_end|>", "<|pad|>"]
    saved = json.loads((adapter / "adapter_config.json").read_text())["modules_to_save"]
    # The embeddings are trained whole (LoRA never changes an embedding row); peft records a tied
    # lm_head under the embedding's name.
    assert any(name.endswith("embed_tokens") for name in saved)
    assert tied or "lm_head" in saved

    result = merge(MergeConfig(adapter=str(adapter), output_dir=str(tmp_path / "merged")))
    assert result.metrics["saved_relative_diff"] < 1e-5
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged" / "model")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged" / "model")
    assert merged.get_input_embeddings().weight.shape[0] == len(tokenizer) == info["vocab_size"]
    assert merged.config.tie_word_embeddings == tied
    if tied:
        assert merged.get_input_embeddings().weight.data_ptr() == merged.get_output_embeddings().weight.data_ptr()
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    eos = merged.generation_config.eos_token_id
    assert end in (eos if isinstance(eos, list) else [eos])
