"""Log-likelihood of continuations under a transformers causal LM (multiple-choice scoring).

For each ``(context, continuation)`` pair: the sum of the log-probabilities the model gives the
continuation's tokens after the context, the number of those tokens, and whether greedy
decoding would have produced exactly them. Like lm-evaluation-harness, the context and the
continuation are tokenized together and the continuation's tokens are those past the
context's own encoding, with a trailing space of the context moved onto the continuation, so a
choice such as ``" Paris"`` is scored as the token the model would really emit.

Requests are sorted by length and run in right-padded batches; results come back in input order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class LoglikResult:
    logprob: float
    """Sum of the continuation tokens' log-probabilities."""
    tokens: int
    """How many tokens the continuation took."""
    greedy: bool
    """Whether every continuation token was the model's top choice."""


def _encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    whole = tokenizer(context + continuation)["input_ids"]
    context_ids = tokenizer(context)["input_ids"]
    split = len(context_ids)
    # A tokenizer may merge across the boundary; never let the continuation be empty.
    split = min(split, len(whole) - 1)
    return whole[:split], whole[split:]


def loglikelihoods(model: Any, tokenizer: Any, requests: list[tuple[str, str]], *, batch_size: int = 8,
                   max_length: int | None = None, progress: bool = False) -> list[LoglikResult]:
    """Score each ``(context, continuation)``; contexts too long for the model are cut from the left."""
    import torch
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    limit = max_length or getattr(model.config, "max_position_embeddings", None) or 2048
    encoded = []
    for context, continuation in requests:
        context_ids, continuation_ids = _encode_pair(tokenizer, context, continuation)
        ids = (context_ids + continuation_ids)[-(limit + 1):]
        encoded.append((ids, len(continuation_ids)))
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]), reverse=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    results: list[LoglikResult | None] = [None] * len(encoded)
    device = model.device
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    with torch.inference_mode():
        for batch in tqdm(batches, desc="log-likelihood", unit="batch", disable=not progress):
            # The last token is only ever a target, never an input.
            inputs = [encoded[i][0][:-1] for i in batch]
            width = max(len(ids) for ids in inputs)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for row, ids in enumerate(inputs):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                attention[row, : len(ids)] = 1
            logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
            for row, i in enumerate(batch):
                ids, n = encoded[i]
                targets = torch.tensor(ids[-n:], device=logits.device)
                positions = torch.arange(len(ids) - 1 - n, len(ids) - 1, device=logits.device)
                step_logits = logits[row, positions].float()
                logprobs = torch.log_softmax(step_logits, dim=-1)
                chosen = logprobs.gather(-1, targets[:, None]).squeeze(-1)
                results[i] = LoglikResult(logprob=float(chosen.sum()), tokens=n,
                                          greedy=bool((step_logits.argmax(-1) == targets).all()))
    return results  # type: ignore[return-value]


__all__ = ["LoglikResult", "loglikelihoods"]
