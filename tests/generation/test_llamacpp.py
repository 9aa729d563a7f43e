"""LlamaCppGenerator on the packaged SmolLM2 GGUF."""

from __future__ import annotations

import pytest

from cogumi.generation import Generator, SamplingParams, get_generator
from cogumi.generation.llamacpp import LlamaCppGenerator

# With the GGUF's default system prompt, greedy Q4_1 SmolLM2 answers this question with a
# French ramble; a system message of our own keeps the answer on topic (and tests that path).
CAPITAL = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]


@pytest.fixture(scope="module")
def llama(smollm2_gguf) -> LlamaCppGenerator:
    # A small context keeps llama.cpp's all-positions logits buffer (for logprobs) small.
    generator = LlamaCppGenerator(smollm2_gguf, n_ctx=512, n_threads=2, progress=False)
    yield generator
    generator.close()


def test_chat_answer_uses_the_gguf_template(llama):
    [[answer]] = llama.generate([CAPITAL], SamplingParams(max_tokens=24))
    assert "Paris" in answer.text
    assert answer.finish_reason == "stop"
    assert answer.prompt_tokens > 20  # the template's role markers are in the prompt
    assert 0 < answer.completion_tokens < 24
    assert len(answer.token_logprobs) == len(answer.tokens) == answer.completion_tokens
    assert all(lp <= 0.0 for lp in answer.token_logprobs)


def test_string_prompt_logprobs_and_length(llama):
    [[answer]] = llama.generate(["The capital of France is"], SamplingParams(max_tokens=6))
    assert answer.finish_reason == "length"
    assert answer.text.startswith(" Paris")
    assert answer.completion_tokens == 6
    assert answer.prompt_tokens == 5
    assert "".join(answer.tokens) == answer.text
    assert len(answer.token_logprobs) == 6
    assert all(isinstance(lp, float) and lp <= 0.0 for lp in answer.token_logprobs)


def test_stop_string(llama):
    [[answer]] = llama.generate(["The capital of France is"], SamplingParams(max_tokens=16, stop=["."]))
    assert answer.text == " Paris"
    assert answer.finish_reason == "stop"


def test_n_samples_are_n_calls_with_distinct_seeds(llama):
    params = SamplingParams(max_tokens=8, temperature=1.0, n=3, seed=11, logprobs=False)
    [samples] = llama.generate(["Once upon a time"], params)
    assert len(samples) == 3
    assert len({c.text for c in samples}) > 1
    for c in samples:
        assert c.prompt_tokens > 0 and c.completion_tokens > 0
        assert c.token_logprobs is None
    # Seeded: the same call gives the same samples.
    [again] = llama.generate(["Once upon a time"], params)
    assert [c.text for c in again] == [c.text for c in samples]


def test_prompts_come_back_in_order(llama):
    prompts = ["The capital of France is", CAPITAL, "2 + 2 ="]
    results = llama.generate(prompts, SamplingParams(max_tokens=4, logprobs=False))
    assert [len(r) for r in results] == [1, 1, 1]
    assert results[0][0].prompt_tokens == 5
    assert results[1][0].prompt_tokens > 20


def test_get_generator_resolves_the_builtin_name():
    generator = get_generator("llamacpp", "smollm2-135m", n_ctx=256, logprobs=False, progress=False)
    assert isinstance(generator, Generator)
    try:
        [[answer]] = generator.generate(["Hello"], SamplingParams(max_tokens=3, logprobs=True))
        assert answer.completion_tokens > 0
        assert answer.token_logprobs is None  # no logits buffer, so no logprobs
    finally:
        generator.close()
    with pytest.raises(RuntimeError, match="closed"):
        generator.generate(["Hello"], SamplingParams(max_tokens=3))
