"""VLLMGenerator: for real on a CUDA GPU; on a CPU machine, its missing-extra error."""

from __future__ import annotations

import importlib.util

import pytest

from cogumi.generation import SamplingParams
from cogumi.generation.vllm_backend import VLLMGenerator, engine_settings

VLLM_INSTALLED = importlib.util.find_spec("vllm") is not None

CAPITAL = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]


@pytest.mark.skipif(VLLM_INSTALLED, reason="vllm is installed, so there is no ImportError to check")
def test_missing_vllm_names_the_extra():
    with pytest.raises(ImportError, match=r"pip install 'cogumi\[vllm\]'"):
        VLLMGenerator("smollm2-135m")


def test_engine_settings_follow_the_registry_and_presets():
    registry = engine_settings("qwen25_72b", "performance")
    assert registry["tensor_parallel_size"] == 4
    assert registry["gpu_memory_utilization"] == 0.95  # the entry's own value wins
    bare = engine_settings("/some/checkpoint", "memory_optimized")
    assert bare == {"gpu_memory_utilization": 0.70, "max_num_seqs": 32, "enable_prefix_caching": False}
    with pytest.raises(ValueError, match="unknown preset"):
        engine_settings("smollm2-135m", "turbo")


@pytest.mark.gpu
def test_vllm_generates_on_smollm2(smollm2_dir):
    pytest.importorskip("vllm", reason="the vllm extra is not installed: pip install 'cogumi[vllm]'")
    generator = VLLMGenerator(
        str(smollm2_dir), preset="memory_optimized", max_model_len=2048, gpu_memory_utilization=0.3,
        progress=False,
    )
    try:
        [[answer], [text]] = generator.generate(
            [CAPITAL, "The capital of France is"], SamplingParams(max_tokens=24)
        )
        assert "Paris" in answer.text
        assert answer.finish_reason == "stop"
        assert answer.prompt_tokens > 20
        assert len(answer.token_logprobs) == len(answer.tokens) == answer.completion_tokens
        assert all(lp <= 0.0 for lp in answer.token_logprobs)
        assert text.prompt_tokens == 5 and text.completion_tokens > 0

        [samples] = generator.generate(
            ["Once upon a time"], SamplingParams(max_tokens=8, temperature=1.0, n=3, seed=0)
        )
        assert len(samples) == 3
        assert len({c.text for c in samples}) > 1
        assert all(0 < c.completion_tokens <= 8 for c in samples)

        [[short]] = generator.generate([CAPITAL], SamplingParams(max_tokens=4))
        assert short.finish_reason == "length" and short.completion_tokens == 4
    finally:
        generator.close()
