"""Generation with Hugging Face transformers: batched, left-padded ``model.generate``.

Prompts are sorted by token length before they are cut into batches, so each batch pads as
little as possible; results are put back in input order. The ``n`` samples of a prompt come
from one ``generate`` call (``num_return_sequences=n``), not ``n`` calls.

Token log-probabilities are taken from the model's raw logits (``output_logits=True``), not
from the scores after temperature / top-p warping: they are the model's own probabilities of
the tokens it produced, comparable across sampling settings and with a teacher-forced forward
pass. Keeping those logits costs ``steps x rows x vocab`` floats per batch (rows =
``batch_size * n``), which is what bounds ``batch_size`` for large vocabularies.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

from cogumi.generation.base import Completion, Prompt, SamplingParams, is_chat, truncate_at_stop


class _CompletionStopStrings:
    """Stops a row once its *generated* text contains a stop string, and records where.

    transformers' own ``stop_strings`` criterion matches against the end of the whole
    sequence, prompt included: with a prompt ending in ``"A:"`` and stop ``": The"`` it halts
    right after the first generated token ``" The"``. OpenAI, vLLM and llama.cpp apply stop
    strings to the completion only, so this criterion decodes just the generated part, with
    the same decoding and :func:`truncate_at_stop` that produce the final text. It follows
    transformers' ``StoppingCriteria`` call protocol.
    """

    def __init__(self, tokenizer: Any, stop: list[str], prompt_width: int, rows: int) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.prompt_width = prompt_width
        self.stopped_at: list[int | None] = [None] * rows
        """Per row, how many generated tokens it took for a stop string to appear."""

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        generated = input_ids[:, self.prompt_width :]
        for row, ids in enumerate(generated.tolist()):
            if self.stopped_at[row] is None:
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                if truncate_at_stop(text, self.stop)[1]:
                    self.stopped_at[row] = len(ids)
        done = [at is not None for at in self.stopped_at]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class TransformersGenerator:
    """A :class:`~cogumi.generation.base.Generator` over a transformers causal LM.

    Args:
        model: anything :func:`cogumi.models.loading.load_model` accepts (a checkpoint
            directory, a registry id, a built-in such as ``smollm2-135m``, a hub id).
        quantization: ``"none"`` or ``"nf4"`` (see ``load_model``).
        device: ``"auto"``, ``"cpu"`` or ``"cuda[:N]"``.
        batch_size: prompts per ``generate`` call; each contributes ``n`` rows.
        dtype: ``"auto"`` (bf16 on CUDA, fp32 on CPU) or a torch dtype name.
        progress: show a tqdm bar over batches.
    """

    def __init__(
        self,
        model: str | Path,
        *,
        quantization: str = "none",
        device: str = "auto",
        batch_size: int = 8,
        dtype: str = "auto",
        progress: bool = True,
    ) -> None:
        from cogumi.models.loading import load_model

        loaded, tokenizer = load_model(model, quantization=quantization, dtype=dtype, device=device)
        self._setup(loaded, tokenizer, name=f"transformers:{model}", batch_size=batch_size, progress=progress)

    @classmethod
    def from_loaded(
        cls,
        model: Any,
        tokenizer: Any,
        *,
        batch_size: int = 8,
        name: str | None = None,
        progress: bool = True,
    ) -> TransformersGenerator:
        """Wrap a model and tokenizer that are already in memory (e.g. right after training)."""
        self = cls.__new__(cls)
        label = name or getattr(model.config, "name_or_path", None) or type(model).__name__
        self._setup(model, tokenizer, name=f"transformers:{label}", batch_size=batch_size, progress=progress)
        return self

    def _setup(self, model: Any, tokenizer: Any, *, name: str, batch_size: int, progress: bool) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = tokenizer.eos_token_id
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.batch_size = batch_size
        self.progress = progress
        self.eos_token_ids: set[int] = set(eos if isinstance(eos, list) else [eos]) - {None}

    def __repr__(self) -> str:
        return f"TransformersGenerator(name={self.name!r}, batch_size={self.batch_size})"

    def generate(self, prompts: list[Prompt], params: SamplingParams) -> list[list[Completion]]:
        """``params.n`` completions per prompt, in prompt order."""
        import torch
        from tqdm.auto import tqdm

        if self.model is None:
            raise RuntimeError(f"{self.name} is closed")
        encoded = [self._encode(prompt) for prompt in prompts]
        # Longest first: similar lengths share a batch, and an out-of-memory batch fails early.
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]), reverse=True)
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if params.seed is not None:
            torch.manual_seed(params.seed)
        results: list[list[Completion]] = [[] for _ in prompts]
        for batch in tqdm(batches, desc=self.name, unit="batch", disable=not self.progress):
            for index, completions in zip(batch, self._generate_batch([encoded[i] for i in batch], params)):
                results[index] = completions
        return results

    def _encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt: chat through the model's template, strings as they are."""
        if is_chat(prompt):
            encoding = self.tokenizer.apply_chat_template(
                prompt, add_generation_prompt=True, tokenize=True, return_dict=True
            )
            return list(encoding["input_ids"])
        # add_special_tokens: a raw prompt gets the BOS token the model was trained with.
        return list(self.tokenizer(prompt)["input_ids"])

    def _generate_batch(self, batch_ids: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        import torch
        from transformers import StoppingCriteriaList

        # Decoder-only models continue from the last position, so padding goes on the left
        # (whatever side a training tokenizer handed to from_loaded is set to).
        inputs = self.tokenizer.pad(
            {"input_ids": batch_ids}, padding=True, padding_side="left", return_tensors="pt"
        )
        inputs = {key: value.to(self.model.device) for key, value in inputs.items()}
        prompt_width = inputs["input_ids"].shape[1]
        rows = len(batch_ids) * params.n
        kwargs: dict[str, Any] = {
            "max_new_tokens": params.max_tokens,
            "num_return_sequences": params.n,
            "pad_token_id": self.tokenizer.pad_token_id,
            "return_dict_in_generate": True,
            "output_logits": params.logprobs,
        }
        if params.temperature > 0:
            # top_k=0 switches off transformers' default top-k of 50: like the OpenAI API,
            # sampling here is shaped by temperature and top_p alone.
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0)
        else:
            kwargs.update(do_sample=False)
        stop_criterion = None
        if params.stop:
            stop_criterion = _CompletionStopStrings(self.tokenizer, params.stop, prompt_width, rows)
            kwargs["stopping_criteria"] = StoppingCriteriaList([stop_criterion])

        with torch.inference_mode():
            output = self.model.generate(**inputs, **kwargs)
        generated = output.sequences[:, prompt_width:]
        token_logprobs = None
        if params.logprobs:
            # One step at a time: stacking all raw logits first would double their memory.
            token_logprobs = torch.stack(
                [
                    torch.log_softmax(step.float(), dim=-1).gather(-1, generated[:, t : t + 1]).squeeze(-1)
                    for t, step in enumerate(output.logits)
                ],
                dim=1,
            ).tolist()

        completions: list[list[Completion]] = [[] for _ in batch_ids]
        for row, ids in enumerate(generated.tolist()):
            stopped_at = stop_criterion.stopped_at[row] if stop_criterion else None
            length, finished = self._completion_length(ids, stopped_at)
            kept = ids[:length]
            text, _ = truncate_at_stop(self.tokenizer.decode(kept, skip_special_tokens=True), params.stop)
            prompt_index = row // params.n
            completions[prompt_index].append(
                Completion(
                    text=text,
                    finish_reason="stop" if finished else "length",
                    prompt_tokens=len(batch_ids[prompt_index]),
                    completion_tokens=length,
                    tokens=self.tokenizer.batch_decode([[token] for token in kept]),
                    token_logprobs=token_logprobs[row][:length] if token_logprobs is not None else None,
                )
            )
        return completions

    def _completion_length(self, ids: list[int], stopped_at: int | None) -> tuple[int, bool]:
        """How many generated tokens a row really has, and whether it stopped by itself.

        A row ends at its first EOS (counted) or where a stop string appeared, whichever is
        first; ``generate`` fills the rest with padding while other rows go on. A row that
        did neither ran to ``max_tokens``.
        """
        ends = [i + 1 for i, token in enumerate(ids) if token in self.eos_token_ids][:1]
        if stopped_at is not None:
            ends.append(stopped_at)
        if ends:
            return min(ends), True
        return len(ids), False

    def close(self) -> None:
        """Drop the model and give its memory back (CUDA cache included)."""
        import torch

        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
