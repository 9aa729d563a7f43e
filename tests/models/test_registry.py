from __future__ import annotations

import dataclasses

import pytest

from cogumi.models.registry import PRESETS, REGISTRY, ModelConfig, get_model, registry_table


def test_presets_match_the_seed():
    assert {p: (c.gpu_memory_utilization, c.max_num_seqs, c.evaluation_batch_size) for p, c in PRESETS.items()} == {
        "performance": (0.90, 128, 16),
        "balanced": (0.85, 64, 8),
        "memory_optimized": (0.70, 32, 4),
    }
    assert PRESETS["performance"].enable_prefix_caching and not PRESETS["memory_optimized"].enable_prefix_caching


def test_registry_has_the_seed_families_and_model_config_fields():
    families = {entry.family for entry in REGISTRY.values()}
    assert {"llama", "qwen", "mistral"} <= families
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    assert {"model_name", "huggingface_id", "license", "size_gb", "context_window", "preset",
            "specialization_category", "quantization_method", "max_model_len", "gpu_memory_utilization",
            "tensor_parallel_size", "priority", "agent_temperature", "evaluation_batch_size"} <= fields
    assert get_model("Qwen/Qwen2.5-72B-Instruct").tensor_parallel_size == 4


def test_explicit_values_win_over_the_preset():
    big = get_model("qwen25_72b").with_preset("memory_optimized")
    assert big.gpu_memory_utilization == 0.95 and big.evaluation_batch_size == 1
    small = get_model("llama31_8b").serving_settings("performance")
    assert small == {"gpu_memory_utilization": 0.9, "max_num_seqs": 128, "enable_prefix_caching": True,
                     "max_model_len": 8192, "tensor_parallel_size": 1, "trust_remote_code": False}


def test_unknown_model_names_the_known_ones():
    with pytest.raises(KeyError, match="smollm2-135m"):
        get_model("gpt-5")


def test_table_has_a_row_per_model():
    assert len(registry_table().splitlines()) == len(REGISTRY) + 2
