"""Generation through an OpenAI-compatible HTTP API: OpenAI, Groq, Together, or a local server.

Uses the official ``openai`` client, which already retries connection errors, timeouts, 408,
409, 429 and 5xx responses with exponential backoff (honouring ``Retry-After``); this module
only configures it (``timeout``, ``max_retries``) and runs requests concurrently in a thread
pool. String prompts go to ``/v1/completions``, chat prompts to ``/v1/chat/completions``
(where the server applies the model's chat template).

The API key is read from an environment variable only, never taken as an argument, so it does
not end up in configs or shell history. It is kept out of ``repr``, out of cogumi's logs, and
out of the errors cogumi raises: a failed request surfaces as :class:`OpenAIRequestError`,
whose message has the key masked and which does not chain the client's original exception.

Servers differ in what they honour, so the results are normalised:

* ``n``: some servers return fewer choices than asked (llama-cpp-python's server ignores
  ``n``; Groq rejects ``n > 1``). Missing samples are requested again, with the seed moved on
  by the number already received so the samples differ.
* Sampling: only the OpenAI fields are sent, but a server may add its own defaults on top
  (llama-cpp-python's server applies top-k 40, min-p 0.05 and a 1.1 repeat penalty, which
  changes even greedy output). ``extra_body`` adds server-specific fields to every request,
  e.g. ``{"top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0}`` for that server.
* Token counts: ``usage.completion_tokens`` covers all choices of a request. A choice's own
  count is the length of its logprobs when the server sent them, the request's count when
  there is one choice, and otherwise the total split in proportion to each choice's text.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from cogumi.generation.base import Completion, Prompt, SamplingParams, is_chat

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Provider:
    """Where a provider's API lives and which parts of the OpenAI API it supports."""

    base_url: str | None
    key_env: str | None
    completions: bool = True
    """Whether it serves ``/v1/completions`` (plain-text prompts)."""
    logprobs: bool = True
    """Whether it accepts the ``logprobs`` request fields."""
    max_n: int | None = None
    """Most completions one request may ask for (``None``: no limit)."""


PROVIDERS: dict[str, Provider] = {
    "openai": Provider("https://api.openai.com/v1", "OPENAI_API_KEY"),
    # Groq answers 400 to logprobs/top_logprobs and to n != 1, and has no text-completions
    # endpoint (console.groq.com/docs/openai).
    "groq": Provider(
        "https://api.groq.com/openai/v1", "GROQ_API_KEY", completions=False, logprobs=False, max_n=1
    ),
    "together": Provider("https://api.together.xyz/v1", "TOGETHER_API_KEY"),
    # vLLM, llama-cpp-python's server, ...: base_url is required, a key usually is not.
    "local": Provider(None, None),
}

#: The key sent to local servers that do not check one (vLLM documents the value "EMPTY").
LOCAL_PLACEHOLDER_KEY = "EMPTY"


class OpenAIRequestError(RuntimeError):
    """A request that failed after the client's retries; the message never holds the API key."""

    def __init__(self, message: str, *, status_code: int | None = None, timed_out: bool = False) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.timed_out = timed_out


class OpenAIGenerator:
    """A :class:`~cogumi.generation.base.Generator` over an OpenAI-compatible API.

    Args:
        model: the model name the server knows.
        base_url: the API root (ending in ``/v1``); defaults to the provider's.
        provider: ``"openai"``, ``"groq"``, ``"together"`` or ``"local"``.
        api_key_env: the environment variable holding the key; defaults to the provider's
            (``OPENAI_API_KEY``, ``GROQ_API_KEY``, ``TOGETHER_API_KEY``; none for local, which
            then sends ``"EMPTY"``).
        timeout: seconds per HTTP request attempt.
        max_retries: retries per request after the first attempt (the client's backoff).
        max_concurrency: requests in flight at once.
        extra_body: server-specific request fields added to every request.
        progress: show a tqdm bar over prompts.
    """

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        provider: str = "openai",
        api_key_env: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 5,
        max_concurrency: int = 4,
        extra_body: dict[str, Any] | None = None,
        progress: bool = False,
    ) -> None:
        import openai

        if provider not in PROVIDERS:
            raise ValueError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.provider = PROVIDERS[provider]
        self.provider_name = provider
        self.base_url = base_url or self.provider.base_url
        if not self.base_url:
            raise ValueError(f"provider {provider!r} needs a base_url (e.g. http://127.0.0.1:8000/v1)")
        self.api_key_env = api_key_env or self.provider.key_env
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if not key:
            if provider != "local":
                raise ValueError(
                    f"provider {provider!r} needs an API key in the environment variable "
                    f"{self.api_key_env}, which is not set"
                )
            key = LOCAL_PLACEHOLDER_KEY
        self.client: Any = openai.OpenAI(
            api_key=key, base_url=self.base_url, timeout=timeout, max_retries=max_retries
        )
        self.model = model
        self.name = f"{provider}:{model}"
        self.max_concurrency = max_concurrency
        self.extra_body = dict(extra_body or {})
        self.progress = progress

    def __repr__(self) -> str:
        return (
            f"OpenAIGenerator(model={self.model!r}, provider={self.provider_name!r}, "
            f"base_url={self.base_url!r}, api_key_env={self.api_key_env!r})"
        )

    def generate(self, prompts: list[Prompt], params: SamplingParams) -> list[list[Completion]]:
        """``params.n`` completions per prompt, in prompt order; requests run concurrently."""
        from tqdm.auto import tqdm

        if self.client is None:
            raise RuntimeError(f"{self.name} is closed")
        if not self.provider.completions and not all(is_chat(p) for p in prompts):
            raise ValueError(
                f"{self.provider_name} serves chat completions only; send chat prompts "
                "(lists of messages), not plain strings"
            )
        with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            futures = [pool.submit(self._complete, prompt, params) for prompt in prompts]
            try:
                return [f.result() for f in tqdm(futures, desc=self.name, disable=not self.progress)]
            except BaseException:
                for future in futures:
                    future.cancel()
                raise

    def _complete(self, prompt: Prompt, params: SamplingParams) -> list[Completion]:
        """All ``n`` completions of one prompt, asking again for any the server left out."""
        completions: list[Completion] = []
        while len(completions) < params.n:
            wanted = params.n - len(completions)
            if self.provider.max_n is not None:
                wanted = min(wanted, self.provider.max_n)
            seed = None if params.seed is None else params.seed + len(completions)
            received = self._request(prompt, params, wanted, seed)
            if not received:
                raise OpenAIRequestError(f"{self.name}: the server returned no choices")
            completions.extend(received)
        return completions[: params.n]

    def _request(self, prompt: Prompt, params: SamplingParams, n: int, seed: int | None) -> list[Completion]:
        """One HTTP request for ``n`` completions of ``prompt``."""
        import openai

        chat = is_chat(prompt)
        fields: dict[str, Any] = {
            "model": self.model,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "n": n,
        }
        if params.stop:
            fields["stop"] = params.stop
        if seed is not None:
            fields["seed"] = seed
        if self.extra_body:
            fields["extra_body"] = self.extra_body
        want_logprobs = params.logprobs and self.provider.logprobs
        if chat:
            fields["messages"] = prompt
            if want_logprobs:
                # top_logprobs too: llama-cpp-python's server computes none without it.
                fields.update(logprobs=True, top_logprobs=1)
            create = self.client.chat.completions.create
        else:
            fields["prompt"] = prompt
            if want_logprobs:
                fields["logprobs"] = 1
            create = self.client.completions.create
        log.debug("%s: %s request, n=%d", self.name, "chat" if chat else "completions", n)

        try:
            response = create(**fields)
        except openai.APIError as error:
            failure = self._scrubbed(error)
        else:
            return self._parse(response, chat)
        # Raised outside the except block, so the client's exception (which may quote the key)
        # is not attached as __context__.
        raise failure

    def _scrubbed(self, error: Exception) -> OpenAIRequestError:
        import openai

        status = getattr(error, "status_code", None)
        kind = type(error).__name__ + (f" (HTTP {status})" if status is not None else "")
        message = str(getattr(error, "message", None) or error)
        key = self.client.api_key
        if key and key != LOCAL_PLACEHOLDER_KEY:
            message = message.replace(key, "***")
        return OpenAIRequestError(
            f"{self.name} at {self.base_url}: {kind}: {message}",
            status_code=status,
            timed_out=isinstance(error, openai.APITimeoutError),
        )

    @staticmethod
    def _parse(response: Any, chat: bool) -> list[Completion]:
        usage = response.usage
        prompt_tokens = usage.prompt_tokens if usage else 0
        total_completion = usage.completion_tokens if usage else 0
        choices = sorted(response.choices, key=lambda c: c.index)
        texts = [(c.message.content or "") if chat else c.text for c in choices]
        parsed = [_token_logprobs(c.logprobs) for c in choices]
        estimates = _split(total_completion, texts)
        return [
            Completion(
                text=text,
                finish_reason="length" if choice.finish_reason == "length" else "stop",
                prompt_tokens=prompt_tokens,
                completion_tokens=(
                    len(logprobs) if logprobs is not None
                    else total_completion if len(choices) == 1
                    else estimate
                ),
                tokens=tokens,
                token_logprobs=logprobs,
            )
            for choice, text, (tokens, logprobs), estimate in zip(choices, texts, parsed, estimates)
        ]

    def close(self) -> None:
        """Close the HTTP connection pool."""
        if self.client is not None:
            self.client.close()
        self.client = None


def _token_logprobs(logprobs: Any) -> tuple[list[str] | None, list[float] | None]:
    """Tokens and their logprobs from either response shape, or (None, None).

    Chat responses carry ``logprobs.content`` (a list of ``{token, logprob}``); text
    completions (and Together's chat responses) carry parallel ``tokens`` / ``token_logprobs``.
    """
    if logprobs is None:
        return None, None
    content = getattr(logprobs, "content", None)
    if content is not None:
        return [entry.token for entry in content], [float(entry.logprob) for entry in content]
    tokens = getattr(logprobs, "tokens", None)
    values = getattr(logprobs, "token_logprobs", None)
    if tokens is None or values is None or any(value is None for value in values):
        return None, None
    return list(tokens), [float(value) for value in values]


def _split(total: int, texts: list[str]) -> list[int]:
    """``total`` tokens shared out in proportion to the texts' lengths (sums to ``total``)."""
    weights = [max(len(text), 1) for text in texts]
    shares = [total * weight // sum(weights) for weight in weights]
    if shares:
        shares[0] += total - sum(shares)
    return shares
