"""Generation with llama.cpp (``llama-cpp-python``) from a GGUF file, on CPU or GPU.

llama.cpp decodes one sequence at a time, so there is no batching here: prompts run one after
another, and the ``n`` samples of a prompt are ``n`` separate completions (with seeds
``seed, seed + 1, ...`` when a seed is given, since one seed would give ``n`` identical
samples).

Sampling is made to mean what it means in the OpenAI API and the other backends:
temperature and top_p only. llama-cpp-python's own defaults add top-k 40, min-p 0.05 and, for
chat, a repeat penalty of 1.1; those are switched off.

Differences from the transformers backend worth knowing: llama.cpp does not count the EOS
token in ``completion_tokens`` (nor return its log-probability), and its log-probabilities
come from llama.cpp's quantized arithmetic, so they differ slightly from a float forward pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cogumi.generation.base import Completion, Prompt, SamplingParams, is_chat

#: Sampling knobs that llama-cpp-python sets by default and the OpenAI API does not have.
_NEUTRAL_SAMPLING = {"top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0}


class LlamaCppGenerator:
    """A :class:`~cogumi.generation.base.Generator` over ``llama_cpp.Llama``.

    Args:
        model: a ``.gguf`` path, a directory holding exactly one, or ``smollm2-135m``.
        n_ctx: context window (prompt + completion) in tokens.
        n_threads: CPU threads; ``None`` lets llama.cpp choose.
        n_gpu_layers: layers to offload; ``None`` means all (-1) when this llama.cpp build can
            offload to a GPU, else 0.
        seed: seed of llama.cpp's sampler; calls without ``SamplingParams.seed`` continue from it.
        logprobs: keep the logits of every position (``logits_all``), which llama.cpp needs to
            report token log-probabilities. That buffer is ``n_ctx x vocab`` floats (about
            400 MB for SmolLM2 at 2048 tokens); with ``False`` completions carry no logprobs.
        progress: show a tqdm bar over prompts.
    """

    def __init__(
        self,
        model: str | Path,
        *,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        n_gpu_layers: int | None = None,
        seed: int = 0,
        verbose: bool = False,
        logprobs: bool = True,
        progress: bool = False,
    ) -> None:
        import llama_cpp

        from cogumi.models.loading import resolve_gguf

        path = resolve_gguf(model)
        if n_gpu_layers is None:
            n_gpu_layers = -1 if llama_cpp.llama_supports_gpu_offload() else 0
        self.llm: Any = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_threads=n_threads,
            n_gpu_layers=n_gpu_layers,
            seed=seed,
            logits_all=logprobs,
            verbose=verbose,
        )
        self.name = f"llamacpp:{path.name}"
        self.logprobs = logprobs
        self.progress = progress

    def __repr__(self) -> str:
        return f"LlamaCppGenerator(name={self.name!r})"

    def generate(self, prompts: list[Prompt], params: SamplingParams) -> list[list[Completion]]:
        """``params.n`` completions per prompt, in prompt order, one completion at a time."""
        from tqdm.auto import tqdm

        if self.llm is None:
            raise RuntimeError(f"{self.name} is closed")
        results = []
        for prompt in tqdm(prompts, desc=self.name, unit="prompt", disable=not self.progress):
            # Without a seed, llama-cpp-python draws each call's seed from the previous one.
            seeds = [None if params.seed is None else params.seed + k for k in range(params.n)]
            results.append([self._complete(prompt, params, seed) for seed in seeds])
        return results

    def _complete(self, prompt: Prompt, params: SamplingParams, seed: int | None) -> Completion:
        want_logprobs = params.logprobs and self.logprobs
        common = {
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "stop": params.stop or None,
            "seed": seed,
            **_NEUTRAL_SAMPLING,
        }
        if is_chat(prompt):
            # The GGUF's own chat template formats the messages. llama-cpp-python only
            # computes logprobs for chat when top_logprobs is set as well as logprobs.
            response = self.llm.create_chat_completion(
                messages=prompt,
                logprobs=want_logprobs,
                top_logprobs=1 if want_logprobs else None,
                **common,
            )
            choice = response["choices"][0]
            text = choice["message"]["content"] or ""
            content = (choice.get("logprobs") or {}).get("content")
            tokens = [entry["token"] for entry in content] if content is not None else None
            logprobs = [float(entry["logprob"]) for entry in content] if content is not None else None
        else:
            response = self.llm.create_completion(
                prompt=prompt, logprobs=1 if want_logprobs else None, **common
            )
            choice = response["choices"][0]
            text = choice["text"]
            details = choice.get("logprobs")
            tokens = list(details["tokens"]) if details else None
            logprobs = [float(lp) for lp in details["token_logprobs"]] if details else None
        usage = response["usage"]
        return Completion(
            text=text,
            finish_reason="length" if choice["finish_reason"] == "length" else "stop",
            prompt_tokens=int(usage["prompt_tokens"]),
            completion_tokens=int(usage["completion_tokens"]),
            tokens=tokens,
            token_logprobs=logprobs,
        )

    def close(self) -> None:
        """Free the llama.cpp model and context."""
        if self.llm is not None:
            self.llm.close()
        self.llm = None
