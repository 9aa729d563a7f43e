"""Pruning on the tiny fixture: the 2:4 pattern after each method, unstructured targets, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cogumi.io import DataError
from cogumi.stage import ConfigError, StageError, run_stage


@pytest.fixture(scope="module")
def calibration(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calibration") / "cal.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"Question {i}: what is {i} plus {i * 3}?",
                                        "response": f"It is {i * 4}, because {i} + {i * 3} = {i * 4}. " * 3}) + "\n"
                            for i in range(40)))
    return path


def prune(tmp_path: Path, model: Path, name: str, **config):
    out = tmp_path / name
    result = run_stage("prune", {"model": str(model), "samples": 8, "seq_len": 64, "output_dir": str(out), **config})
    return result, out


def load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


def projections(model):
    import torch

    return {n: m.weight.detach() for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in n and n.endswith("_proj")}


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_two_four_holds_on_every_pruned_weight(tmp_path, tiny_llama_dir, calibration, method):
    import torch

    result, out = prune(tmp_path, tiny_llama_dir, method, method=method, calibration=str(calibration))
    pruned, dense = load(out / "model"), load(tiny_llama_dir)  # an ordinary checkpoint: transformers loads it
    weights = projections(pruned)
    assert len(weights) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    for name, weight in weights.items():
        zeros = (weight.reshape(-1, 4) == 0).sum(dim=1)
        assert int(zeros.min()) >= 2, name
        assert float((weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01), name
    # embeddings and lm_head untouched
    assert torch.equal(pruned.lm_head.weight, dense.lm_head.weight)
    assert torch.equal(pruned.model.embed_tokens.weight, dense.model.embed_tokens.weight)
    report = json.loads((out / "prune_report.json").read_text())
    assert report["violations"] == [] and all(e["min_zeros_per_4"] >= 2 for e in report["layers"].values())
    assert result.metrics["mean_sparsity"] == pytest.approx(0.5, abs=0.01)


def test_magnitude_keeps_the_two_largest_of_each_group(tmp_path, tiny_llama_dir):
    _, out = prune(tmp_path, tiny_llama_dir, "mag", method="magnitude")
    dense = projections(load(tiny_llama_dir))["model.layers.0.mlp.up_proj"].reshape(-1, 4)
    pruned = projections(load(out / "model"))["model.layers.0.mlp.up_proj"].reshape(-1, 4)
    for group_dense, group_pruned in zip(dense[:50].tolist(), pruned[:50].tolist()):
        kept = sorted(range(4), key=lambda i: abs(group_dense[i]))[2:]
        assert [group_pruned[i] for i in kept] == [group_dense[i] for i in kept]
        assert all(group_pruned[i] == 0 for i in range(4) if i not in kept)


def test_unstructured_per_layer_type_targets(tmp_path, tiny_llama_dir, calibration):
    for method in ("magnitude", "sparsegpt"):
        _, out = prune(tmp_path, tiny_llama_dir, f"u-{method}", method=method, structure="unstructured",
                       attention_sparsity=0.6, mlp_sparsity=0.7, calibration=str(calibration))
        report = json.loads((out / "prune_report.json").read_text())
        for name, entry in report["layers"].items():
            expected = 0.6 if ".self_attn." in name else 0.7
            assert entry["sparsity"] == pytest.approx(expected, abs=0.02), (method, name)
            assert "min_zeros_per_4" not in entry


def test_bad_input_fails_before_work(tmp_path, tiny_llama_dir, calibration):
    with pytest.raises(ConfigError, match="2:4 is exactly 50%"):
        prune(tmp_path, tiny_llama_dir, "x", sparsity=0.6, method="magnitude")
    with pytest.raises(ConfigError, match="needs calibration text"):
        prune(tmp_path, tiny_llama_dir, "x", method="sparsegpt")
    with pytest.raises(DataError, match="calibration samples of 64 tokens need"):
        prune(tmp_path, tiny_llama_dir, "x", method="wanda", calibration=str(calibration), samples=1000)
    quantized = tmp_path / "quantized"
    shutil.copytree(tiny_llama_dir, quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "compressed-tensors", "format": "pack-quantized"}
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(StageError, match="is quantized; prune the full-precision model"):
        prune(tmp_path, quantized, "x", method="magnitude")
