"""Generation with vLLM's offline engine (CUDA): continuous batching, paged KV cache.

vLLM is an optional extra (``pip install 'cogumi[vllm]'``) and is imported only when a
:class:`VLLMGenerator` is built. Engine settings come from the model registry's serving preset
(``ModelConfig.serving_settings``) when the model is a registry entry, else from the bare
preset; explicit keyword arguments override both.

vLLM schedules all prompts itself, so every prompt (and all ``n`` samples of each, via
``SamplingParams.n``) goes to the engine in one call. Its log-probabilities are, by default,
those of the raw model output, before temperature and top-p, like the transformers backend.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

from cogumi.generation.base import Completion, Prompt, SamplingParams, is_chat


def engine_settings(model: str | Path, preset: str = "balanced") -> dict[str, Any]:
    """vLLM ``LLM(...)`` settings for ``model`` under ``preset``."""
    from cogumi.models.registry import PRESETS, get_model

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    try:
        return get_model(str(model)).serving_settings(preset)
    except KeyError:
        chosen = PRESETS[preset]
        return {
            "gpu_memory_utilization": chosen.gpu_memory_utilization,
            "max_num_seqs": chosen.max_num_seqs,
            "enable_prefix_caching": chosen.enable_prefix_caching,
        }


class VLLMGenerator:
    """A :class:`~cogumi.generation.base.Generator` over ``vllm.LLM``.

    Args:
        model: a checkpoint directory, a registry id, a built-in (``smollm2-135m``) or a hub id.
        preset: ``"performance"``, ``"balanced"`` or ``"memory_optimized"``.
        progress: show vLLM's progress bar.
        **engine_kwargs: passed to ``vllm.LLM``, overriding the preset (e.g. ``max_model_len``).
    """

    def __init__(
        self, model: str | Path, *, preset: str = "balanced", progress: bool = True, **engine_kwargs: Any
    ) -> None:
        try:
            import vllm
        except ImportError as error:
            raise ImportError(
                "the vLLM backend needs vLLM, which is not installed: pip install 'cogumi[vllm]' "
                "(CUDA only; use the 'transformers' or 'llamacpp' backend on a CPU)"
            ) from error

        from cogumi.models.loading import resolve_model

        settings = {**engine_settings(model, preset), **engine_kwargs}
        self._vllm = vllm
        self.llm: Any = vllm.LLM(model=resolve_model(model), **settings)
        self.name = f"vllm:{model}"
        self.settings = settings
        self.progress = progress

    def __repr__(self) -> str:
        return f"VLLMGenerator(name={self.name!r}, settings={self.settings!r})"

    def generate(self, prompts: list[Prompt], params: SamplingParams) -> list[list[Completion]]:
        """``params.n`` completions per prompt, in prompt order."""
        if self.llm is None:
            raise RuntimeError(f"{self.name} is closed")
        sampling = self._vllm.SamplingParams(
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p,
            max_tokens=params.max_tokens,
            stop=params.stop or None,
            seed=params.seed,
            logprobs=1 if params.logprobs else None,
        )
        chat_indices = [i for i, p in enumerate(prompts) if is_chat(p)]
        text_indices = [i for i, p in enumerate(prompts) if not is_chat(p)]
        results: list[list[Completion]] = [[] for _ in prompts]
        if chat_indices:
            outputs = self.llm.chat(
                [prompts[i] for i in chat_indices],
                sampling_params=sampling,
                use_tqdm=self.progress,
                add_generation_prompt=True,
            )
            for i, output in zip(chat_indices, outputs):
                results[i] = _completions(output)
        if text_indices:
            outputs = self.llm.generate(
                [prompts[i] for i in text_indices], sampling_params=sampling, use_tqdm=self.progress
            )
            for i, output in zip(text_indices, outputs):
                results[i] = _completions(output)
        return results

    def close(self) -> None:
        """Drop the engine and give its GPU memory back."""
        import torch

        self.llm = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _completions(output: Any) -> list[Completion]:
    """Completions from one ``vllm.RequestOutput``."""
    prompt_tokens = len(output.prompt_token_ids or [])
    completions = []
    for sample in output.outputs:
        token_ids = list(sample.token_ids)
        tokens = logprobs = None
        if sample.logprobs is not None:
            # One dict per generated token: token id -> Logprob, always holding the chosen one.
            chosen = [step[token] for token, step in zip(token_ids, sample.logprobs)]
            tokens = [entry.decoded_token or "" for entry in chosen]
            logprobs = [float(entry.logprob) for entry in chosen]
        completions.append(
            Completion(
                text=sample.text,
                finish_reason="length" if sample.finish_reason == "length" else "stop",
                prompt_tokens=prompt_tokens,
                completion_tokens=len(token_ids),
                tokens=tokens,
                token_logprobs=logprobs,
            )
        )
    return completions
