"""Text generation behind one interface, with four backends.

* ``transformers`` — :class:`~cogumi.generation.hf.TransformersGenerator`: any HF causal LM,
  batched, CPU or CUDA, optionally 4-bit.
* ``llamacpp`` — :class:`~cogumi.generation.llamacpp.LlamaCppGenerator`: a GGUF file.
* ``openai`` — :class:`~cogumi.generation.openai_http.OpenAIGenerator`: an OpenAI-compatible
  HTTP API (OpenAI, Groq, Together, or a local vLLM / llama.cpp server).
* ``vllm`` — :class:`~cogumi.generation.vllm_backend.VLLMGenerator`: vLLM's engine (CUDA).

Importing this package is cheap: each backend imports its heavy dependencies only when it is
built, so ``get_generator`` is the one place that loads them.
"""

from __future__ import annotations

import importlib
from typing import Any

from cogumi.generation.base import Completion, Generator, Prompt, SamplingParams, truncate_at_stop

#: backend name -> (module, class)
_BACKENDS: dict[str, tuple[str, str]] = {
    "transformers": ("cogumi.generation.hf", "TransformersGenerator"),
    "llamacpp": ("cogumi.generation.llamacpp", "LlamaCppGenerator"),
    "openai": ("cogumi.generation.openai_http", "OpenAIGenerator"),
    "vllm": ("cogumi.generation.vllm_backend", "VLLMGenerator"),
}

BACKENDS: tuple[str, ...] = tuple(_BACKENDS)


def get_generator(backend: str, model: str, **kwargs: Any) -> Generator:
    """Build the ``backend`` generator for ``model``; ``kwargs`` go to its constructor."""
    if backend not in _BACKENDS:
        raise ValueError(f"unknown generation backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    module_name, class_name = _BACKENDS[backend]
    generator_class = getattr(importlib.import_module(module_name), class_name)
    return generator_class(model, **kwargs)


__all__ = [
    "BACKENDS",
    "Completion",
    "Generator",
    "Prompt",
    "SamplingParams",
    "get_generator",
    "truncate_at_stop",
]
