"""W4A16 quantization through llm-compressor on the tiny fixture: RTN and AWQ checkpoints load in
transformers with at most 16 levels per group, AWQ really rescales (its smoothing moves the
norms), group sizes that do not divide a row shrink or are refused, and the CPU pinning
workaround is narrow (restores the original method; only applies without an accelerator)."""

from __future__ import annotations

import json

import pytest
import torch

from cogumi.compress.quantize import (
    QuantizeConfig,
    fitting_group_size,
    no_pinning_without_accelerator,
    run,
)
from cogumi.stage import ConfigError, StageError

CALIBRATION = "recipes/data/gsm8k_style.jsonl"


@pytest.fixture(scope="module")
def quantized(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("quantized")
    rtn = run(QuantizeConfig(method="rtn", model=str(tiny_llama_dir), output_dir=str(out / "rtn")))
    awq = run(QuantizeConfig(method="awq", model=str(tiny_llama_dir), output_dir=str(out / "awq"),
                             calibration=CALIBRATION, samples=8, seq_len=32, n_grid=4))
    return {"rtn": rtn, "awq": awq, "dir": out}


def _levels_per_group(weight: torch.Tensor, group: int) -> int:
    groups = weight.reshape(weight.shape[0], -1, group)
    return max(len(torch.unique(groups[r, g])) for r in range(0, groups.shape[0], 7) for g in range(groups.shape[1]))


@pytest.mark.parametrize("method", ["rtn", "awq"])
def test_checkpoint_loads_as_4bit_groups(quantized, tiny_llama_dir, method):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    report = json.loads((quantized["dir"] / method / "quantize_report.json").read_text())
    # the fixture's hidden size 64 is not a multiple of the default 128: the group shrank to 64
    assert report["group_size"] == 64 and report["uneven_widths"] == [64] and report["loads"]
    config = json.loads((quantized["dir"] / method / "model" / "config.json").read_text())
    scheme = config["quantization_config"]["config_groups"]["group_0"]["weights"]
    assert (scheme["num_bits"], scheme["group_size"], scheme["symmetric"]) == (4, 64, False)

    packed = AutoModelForCausalLM.from_pretrained(quantized["dir"] / method / "model")
    assert packed.model.layers[0].self_attn.q_proj.weight_packed.dtype == torch.int32  # int4, eight to an int32
    model = AutoModelForCausalLM.from_pretrained(quantized["dir"] / method / "model",
                                                 quantization_config=CompressedTensorsConfig(dequantize=True))
    original = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    q_proj = model.model.layers[0].self_attn.q_proj.weight.detach()
    assert _levels_per_group(q_proj, 64) <= 16  # 4 bits
    assert _levels_per_group(original.model.layers[0].self_attn.q_proj.weight.detach(), 64) == 64
    assert torch.equal(model.lm_head.weight, original.lm_head.weight)  # lm_head stays full precision


def test_awq_rescales_what_rtn_leaves(quantized, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).model.layers[0].input_layernorm.weight
    rtn = AutoModelForCausalLM.from_pretrained(quantized["dir"] / "rtn" / "model")
    awq = AutoModelForCausalLM.from_pretrained(quantized["dir"] / "awq" / "model")
    assert torch.equal(rtn.model.layers[0].input_layernorm.weight, original)
    # AWQ folds its per-channel scales into the norm that feeds q/k/v
    assert not torch.allclose(awq.model.layers[0].input_layernorm.weight, original)


def test_group_size_rules(tiny_llama_dir, tmp_path):
    assert fitting_group_size([576, 1536], 128) == 64
    assert fitting_group_size([4096, 14336], 128) == 128
    assert fitting_group_size([24, 40], 128) == 0
    with pytest.raises(StageError, match="not multiples of group_size 128"):
        run(QuantizeConfig(method="rtn", model=str(tiny_llama_dir), output_dir=str(tmp_path / "e"),
                           uneven_groups="error"))
    with pytest.raises(ConfigError, match="awq needs calibration"):
        QuantizeConfig(method="awq", model=str(tiny_llama_dir), output_dir=str(tmp_path / "c"))
    with pytest.raises(ConfigError, match="power of two"):
        QuantizeConfig(method="rtn", model=str(tiny_llama_dir), output_dir=str(tmp_path / "g"), group_size=96)


def test_a_quantized_checkpoint_is_refused(quantized, tmp_path):
    with pytest.raises(StageError, match="already quantized"):
        run(QuantizeConfig(method="rtn", model=str(quantized["dir"] / "rtn" / "model"), output_dir=str(tmp_path)))


@pytest.mark.skipif(torch.accelerator.is_available(), reason="the workaround only applies without an accelerator")
def test_pinning_workaround_is_narrow():
    from llmcompressor.pipelines.cache import IntermediatesCache, IntermediateValue

    cache = IntermediatesCache([{"x": IntermediateValue(value=torch.ones(2), device=None)}], offload_device=None)
    original = IntermediatesCache.pin_memory
    with pytest.raises(RuntimeError):  # the crash it works around
        cache.pin_memory(0)
    with no_pinning_without_accelerator():
        cache.pin_memory(0)
    assert IntermediatesCache.pin_memory is original
