"""One interface for every way cogumi asks a model for text.

A backend takes a batch of prompts — each a plain string or a list of chat messages
(``{"role", "content"}``) — and returns, per prompt, ``n`` :class:`Completion` objects. Chat
messages always go through the model's own chat template (the backend applies it); strings are
sent as they are.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal, Protocol, runtime_checkable

Message = dict  # {"role": "system" | "user" | "assistant" | "tool", "content": str}
Prompt = str | list[Message]
FinishReason = Literal["stop", "length"]


@dataclass
class SamplingParams:
    """How to sample; the same names as the OpenAI API and vLLM."""

    max_tokens: int = 256
    """Most new tokens per completion."""
    temperature: float = 0.0
    """0 means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling mass (used only when temperature > 0)."""
    n: int = 1
    """Completions per prompt, produced in one batched call where the backend can."""
    stop: list[str] = field(default_factory=list)
    """Strings that end a completion; they are not included in its text."""
    seed: int | None = None
    """Seed for sampling, where the backend supports one."""
    logprobs: bool = True
    """Return the log-probability of each generated token, where the backend has them."""

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.n > 1 and self.temperature == 0:
            raise ValueError("n > 1 with temperature 0 would return n identical greedy completions")


@dataclass
class Completion:
    """One generated continuation."""

    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    tokens: list[str] | None = None
    token_logprobs: list[float] | None = None

    @property
    def logprob(self) -> float | None:
        """Sum of the token log-probabilities (None when the backend gave none)."""
        return None if self.token_logprobs is None else float(sum(self.token_logprobs))

    def to_dict(self) -> dict:
        return asdict(self)


@runtime_checkable
class Generator(Protocol):
    """What every backend implements."""

    name: str

    def generate(self, prompts: list[Prompt], params: SamplingParams) -> list[list[Completion]]:
        """``n`` completions for each prompt, in prompt order."""
        ...

    def close(self) -> None:
        """Release the model or connection."""
        ...


def is_chat(prompt: Prompt) -> bool:
    return isinstance(prompt, list)


def truncate_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """Cut ``text`` at the earliest stop string; returns (text, whether one was found)."""
    cut = min((i for s in stop if s and (i := text.find(s)) != -1), default=None)
    if cut is None:
        return text, False
    return text[:cut], True
