"""OpenAIGenerator against a real llama-cpp-python server, and against scripted local servers
that misbehave on purpose (errors, slowness, an echoed key)."""

from __future__ import annotations

import logging
import time
import uuid

import pytest
from support import LocalJSONServer

from cogumi.generation import Generator, SamplingParams, get_generator
from cogumi.generation.openai_http import OpenAIGenerator, OpenAIRequestError

CAPITAL = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]


@pytest.fixture(scope="module")
def served(llama_server) -> OpenAIGenerator:
    generator = OpenAIGenerator("smollm2", provider="local", base_url=llama_server, timeout=120)
    yield generator
    generator.close()


def test_chat_through_the_server(served):
    [[answer]] = served.generate([CAPITAL], SamplingParams(max_tokens=24))
    assert "Paris" in answer.text
    assert answer.finish_reason == "stop"
    assert answer.prompt_tokens > 20
    assert 0 < answer.completion_tokens < 24
    assert len(answer.tokens) == len(answer.token_logprobs) == answer.completion_tokens
    assert all(lp <= 0.0 for lp in answer.token_logprobs)


def test_completion_through_the_server(served):
    [[answer]] = served.generate(["The capital of France is"], SamplingParams(max_tokens=6))
    assert answer.text.startswith(" Paris")
    assert answer.finish_reason == "length"
    assert (answer.prompt_tokens, answer.completion_tokens) == (5, 6)
    assert len(answer.token_logprobs) == 6


def test_n_samples_although_the_server_ignores_n(served):
    params = SamplingParams(max_tokens=8, temperature=1.0, n=3, seed=5, logprobs=False)
    [chat_samples, text_samples] = served.generate([CAPITAL, "Once upon a time"], params)
    for samples in (chat_samples, text_samples):
        assert len(samples) == 3
        for c in samples:
            assert c.prompt_tokens > 0
            assert 0 < c.completion_tokens <= 8
            assert c.token_logprobs is None
    assert len({c.text for c in text_samples}) > 1


def test_concurrent_requests_keep_prompt_order(llama_server):
    prompts = ["Hi", "The capital of France is", "One, two, three, four, five, six, seven,", CAPITAL]
    params = SamplingParams(max_tokens=3, logprobs=False)
    generator = OpenAIGenerator("smollm2", provider="local", base_url=llama_server, max_concurrency=4)
    try:
        together = generator.generate(prompts, params)
        one_by_one = [generator.generate([p], params)[0] for p in prompts]
    finally:
        generator.close()
    assert [r[0].prompt_tokens for r in together] == [r[0].prompt_tokens for r in one_by_one]
    assert len({r[0].prompt_tokens for r in together}) == 4


# --- scripted servers -------------------------------------------------------------------------


def _chat_body(*texts: str, completion_tokens: int = 2, logprobs: list | None = None) -> dict:
    return {
        "id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": "fake",
        "choices": [
            {
                "index": i, "message": {"role": "assistant", "content": text}, "finish_reason": "stop",
                "logprobs": None if logprobs is None else {"content": logprobs},
            }
            for i, text in enumerate(texts)
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": completion_tokens,
                  "total_tokens": 9 + completion_tokens},
    }


class ScriptedServer(LocalJSONServer):
    """A local HTTP server that answers each POST with the next scripted (status, body, delay).

    The last entry repeats. It records what it received, so tests can count attempts and
    read headers server-side.
    """

    def __init__(self, script: list[tuple[int, dict, float]]) -> None:
        self.script = script
        super().__init__()

    def respond(self, path: str, headers: dict[str, str], body: dict) -> tuple[int, dict]:
        status, payload, delay = self.script[min(len(self.requests), len(self.script)) - 1]
        time.sleep(delay)
        return status, payload


@pytest.fixture
def scripted():
    servers: list[ScriptedServer] = []

    def start(*script: tuple[int, dict, float]) -> ScriptedServer:
        servers.append(ScriptedServer(list(script)))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


UNAVAILABLE = {"error": {"message": "overloaded", "type": "server_error"}}


def test_retries_then_succeeds(scripted):
    server = scripted((503, UNAVAILABLE, 0), (429, UNAVAILABLE, 0), (200, _chat_body("Paris."), 0))
    generator = OpenAIGenerator("fake", provider="local", base_url=server.base_url, max_retries=5)
    [[answer]] = generator.generate([CAPITAL], SamplingParams(max_tokens=8))
    assert len(server.requests) == 3
    assert server.requests[0]["path"] == "/v1/chat/completions"
    sent = server.requests[0]["body"]
    assert (sent["max_tokens"], sent["n"], sent["logprobs"]) == (8, 1, True)
    assert (answer.text, answer.finish_reason) == ("Paris.", "stop")
    assert (answer.prompt_tokens, answer.completion_tokens) == (9, 2)
    assert answer.token_logprobs is None  # the server sent none


def test_gives_up_after_max_retries(scripted):
    server = scripted((503, UNAVAILABLE, 0))
    generator = OpenAIGenerator("fake", provider="local", base_url=server.base_url, max_retries=2)
    with pytest.raises(OpenAIRequestError, match="503") as info:
        generator.generate([CAPITAL], SamplingParams(max_tokens=8))
    assert info.value.status_code == 503
    assert len(server.requests) == 3  # the first attempt and two retries


def test_timeout(scripted):
    server = scripted((200, _chat_body("late"), 2.0))
    generator = OpenAIGenerator(
        "fake", provider="local", base_url=server.base_url, timeout=0.3, max_retries=0
    )
    start = time.monotonic()
    with pytest.raises(OpenAIRequestError, match="Timeout") as info:
        generator.generate([CAPITAL], SamplingParams(max_tokens=8))
    assert info.value.timed_out
    assert time.monotonic() - start < 1.5


def test_api_key_reaches_the_server_and_nothing_else(scripted, monkeypatch, caplog):
    key = f"sk-cogumi-test-{uuid.uuid4().hex}"
    monkeypatch.setenv("COGUMI_TEST_API_KEY", key)
    # A careless server that quotes the key back in its error.
    rejection = {"error": {"message": f"Incorrect API key provided: {key}", "type": "invalid_request_error"}}
    server = scripted((401, rejection, 0))
    caplog.set_level(logging.DEBUG)
    generator = OpenAIGenerator(
        "fake", provider="local", base_url=server.base_url, api_key_env="COGUMI_TEST_API_KEY"
    )
    assert isinstance(generator, Generator)
    assert key not in repr(generator)
    with pytest.raises(OpenAIRequestError) as info:
        generator.generate(["Hello"], SamplingParams(max_tokens=4))
    assert server.requests[0]["headers"]["authorization"] == f"Bearer {key}"
    assert info.value.status_code == 401
    assert key not in str(info.value) and key not in repr(info.value)
    assert "Incorrect API key provided: ***" in str(info.value)
    assert info.value.__cause__ is None and info.value.__context__ is None
    assert caplog.records, "expected the client's debug logs"
    assert key not in caplog.text


def test_missing_key_names_the_variable(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ValueError, match="OPENAI_API_KEY"):
        OpenAIGenerator("gpt-4o-mini", provider="openai")
    monkeypatch.delenv("GROQ_API_KEY", raising=False)
    with pytest.raises(ValueError, match="GROQ_API_KEY"):
        get_generator("openai", "llama-3.1-8b-instant", provider="groq")


def test_configuration_errors(monkeypatch):
    with pytest.raises(ValueError, match="base_url"):
        OpenAIGenerator("m", provider="local")
    with pytest.raises(ValueError, match="unknown provider"):
        OpenAIGenerator("m", provider="azure")
    monkeypatch.setenv("GROQ_API_KEY", "gsk-not-a-real-key")
    groq = OpenAIGenerator("llama-3.1-8b-instant", provider="groq")
    assert groq.base_url == "https://api.groq.com/openai/v1"
    with pytest.raises(ValueError, match="chat completions only"):
        groq.generate(["a plain string prompt"], SamplingParams())


def test_server_that_honours_n_is_asked_once(scripted):
    logprobs = [{"token": "Par", "logprob": -0.5, "top_logprobs": []},
                {"token": "is", "logprob": -0.25, "top_logprobs": []}]
    server = scripted((200, _chat_body("Paris", "Paris", completion_tokens=4, logprobs=logprobs), 0))
    generator = OpenAIGenerator("fake", provider="local", base_url=server.base_url)
    [samples] = generator.generate([CAPITAL], SamplingParams(temperature=0.7, n=2))
    assert len(server.requests) == 1 and server.requests[0]["body"]["n"] == 2
    assert [c.tokens for c in samples] == [["Par", "is"], ["Par", "is"]]
    assert [c.token_logprobs for c in samples] == [[-0.5, -0.25], [-0.5, -0.25]]
    assert [c.completion_tokens for c in samples] == [2, 2]


def test_usage_is_shared_out_when_choices_have_no_logprobs(scripted):
    server = scripted((200, _chat_body("abc", "abcdefg", completion_tokens=10), 0))
    generator = OpenAIGenerator("fake", provider="local", base_url=server.base_url)
    [samples] = generator.generate([CAPITAL], SamplingParams(temperature=0.7, n=2, logprobs=False))
    assert [c.completion_tokens for c in samples] == [3, 7]
    assert "logprobs" not in server.requests[0]["body"]
