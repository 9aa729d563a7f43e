"""The quality gate on the tiny fixture: figures against a hand computation, budgets, bad input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from cogumi.compress.gate import GateFailed
from cogumi.io import DataError
from cogumi.stage import ConfigError, run_stage

TEXT = ("The quick brown fox jumps over the lazy dog. A model reads text and predicts the next token. "
        "Compression should cost as little quality as possible. ") * 6


@pytest.fixture(scope="module")
def noisy_llama(tiny_llama_dir, tmp_path_factory) -> Path:
    """The tiny fixture with Gaussian noise added to every weight matrix: a 'compressed' candidate."""
    import torch
    from transformers import AutoModelForCausalLM

    target = tmp_path_factory.mktemp("noisy") / "model"
    shutil.copytree(tiny_llama_dir, target)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 2:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * parameter.std() * 0.5)
    model.save_pretrained(target)
    return target


def held_out(tmp_path: Path) -> Path:
    path = tmp_path / "held_out.jsonl"
    path.write_text(json.dumps({"text": TEXT}) + "\n" + json.dumps({"instruction": "Say hi.", "response": "Hi!"}) + "\n")
    return path


def hand_computed(reference_dir: Path, candidate_dir: Path, data: Path, seq_len: int) -> dict:
    """The same figures from a plain per-position loop: one window at a time, sums written out."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(reference_dir)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    texts = [rows[0]["text"], "Say hi.\n\nHi!"]
    stream = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    stream = stream[: len(stream) - len(stream) % seq_len]
    reference = AutoModelForCausalLM.from_pretrained(reference_dir).eval()
    candidate = AutoModelForCausalLM.from_pretrained(candidate_dir).eval()
    nll_r = nll_c = kl = 0.0
    agree = positions = 0
    for start in range(0, len(stream), seq_len):
        window = stream[start:start + seq_len]
        with torch.no_grad():
            lr = torch.log_softmax(reference(torch.tensor([window])).logits[0].double(), -1)
            lc = torch.log_softmax(candidate(torch.tensor([window])).logits[0].double(), -1)
        for t in range(len(window) - 1):
            nll_r -= float(lr[t, window[t + 1]])
            nll_c -= float(lc[t, window[t + 1]])
            kl += float(sum(math.exp(a) * (a - b) for a, b in zip(lr[t].tolist(), lc[t].tolist())))
            agree += int(lr[t].argmax() == lc[t].argmax())
            positions += 1
    return {"positions": positions, "ppl_reference": math.exp(nll_r / positions),
            "ppl_candidate": math.exp(nll_c / positions), "kl_mean": kl / positions, "top1_agreement": agree / positions}


def gate(tmp_path: Path, reference: Path, candidate: Path, **extra):
    return run_stage("gate", {"reference": str(reference), "candidate": str(candidate), "data": str(held_out(tmp_path)),
                              "seq_len": 32, "max_tokens": 4096, "output_dir": str(tmp_path / "gate"),
                              "progress": False, **extra})


def test_figures_match_a_hand_computation(tmp_path, tiny_llama_dir, noisy_llama):
    result = gate(tmp_path, tiny_llama_dir, noisy_llama)
    expected = hand_computed(tiny_llama_dir, noisy_llama, held_out(tmp_path), 32)
    report = json.loads((tmp_path / "gate/gate.json").read_text())
    assert report["positions"] == expected["positions"] == result.counts["positions"]
    for name in ("ppl_reference", "ppl_candidate", "kl_mean", "top1_agreement"):
        assert report[name] == pytest.approx(expected[name], rel=1e-4, abs=1e-6), name
    assert report["kl_mean"] > 0 and report["top1_agreement"] < 1 and report["passed"]


def test_a_model_against_itself(tmp_path, tiny_llama_dir):
    report = gate(tmp_path, tiny_llama_dir, tiny_llama_dir).metrics
    assert report["ppl_candidate"] == pytest.approx(report["ppl_reference"])
    assert report["kl_mean"] == pytest.approx(0.0, abs=1e-6) and report["top1_agreement"] == 1.0


def test_budgets_stop_with_the_figures(tmp_path, tiny_llama_dir, noisy_llama):
    with pytest.raises(GateFailed, match=r"top-1 agreement 0\.\d+ < 0\.999"):
        gate(tmp_path, tiny_llama_dir, noisy_llama, min_top1=0.999)
    report = json.loads((tmp_path / "gate/gate.json").read_text())  # written before failing
    assert not report["passed"] and report["failures"]
    assert not (tmp_path / "gate/manifest.json").exists()  # a failed gate never counts as done
    with pytest.raises(GateFailed, match="mean KL"):
        gate(tmp_path, tiny_llama_dir, noisy_llama, max_kl=1e-6)
    # a generous budget passes
    assert gate(tmp_path, tiny_llama_dir, noisy_llama, max_ppl_increase=100.0, max_kl=100.0).metrics["passed"]


def test_bad_input(tmp_path, tiny_llama_dir, smollm2_dir):
    with pytest.raises(ConfigError, match="different tokenizers"):
        gate(tmp_path, tiny_llama_dir, smollm2_dir)
    with pytest.raises(DataError, match="shorter than one window of 4096 tokens"):
        gate(tmp_path, tiny_llama_dir, tiny_llama_dir, seq_len=4096, max_tokens=4096)
    with pytest.raises(ConfigError, match="min_top1"):
        gate(tmp_path, tiny_llama_dir, tiny_llama_dir, min_top1=2.0)
