"""TransformersGenerator on real models: SmolLM2 where answers matter, the tiny Llama for mechanics."""

from __future__ import annotations

import pytest
import torch

from cogumi.generation import Generator, SamplingParams, get_generator
from cogumi.generation.hf import TransformersGenerator
from cogumi.models.loading import load_tokenizer

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


def _chat_ids(tokenizer, messages) -> list[int]:
    encoding = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
    return list(encoding["input_ids"])


@pytest.fixture(scope="module")
def smol(smollm2_dir) -> TransformersGenerator:
    generator = TransformersGenerator(smollm2_dir, device="cpu", batch_size=4, progress=False)
    yield generator
    generator.close()


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir) -> TransformersGenerator:
    generator = TransformersGenerator(tiny_llama_dir, device="cpu", batch_size=8, progress=False)
    yield generator
    generator.close()


def test_greedy_chat_answer(smol):
    [[answer]] = smol.generate([CAPITAL], SamplingParams(max_tokens=32))
    assert "Paris" in answer.text
    assert answer.finish_reason == "stop"
    assert answer.prompt_tokens == len(_chat_ids(smol.tokenizer, CAPITAL))
    # The EOS token is generated and counted, but not part of the text.
    assert answer.tokens[-1] == smol.tokenizer.eos_token
    assert smol.tokenizer.eos_token not in answer.text
    assert len(answer.tokens) == len(answer.token_logprobs) == answer.completion_tokens
    assert all(isinstance(lp, float) and lp <= 0.0 for lp in answer.token_logprobs)
    assert answer.logprob < 0


def test_logprobs_match_a_teacher_forced_forward_pass(smol):
    [[answer]] = smol.generate([CAPITAL], SamplingParams(max_tokens=12))
    model, tokenizer = smol.model, smol.tokenizer
    prompt_ids = _chat_ids(tokenizer, CAPITAL)
    ids = list(prompt_ids)
    # Greedy decoding by hand, a full forward pass per step and no KV cache.
    with torch.no_grad():
        for _ in range(answer.completion_tokens):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        logits = model(torch.tensor([ids])).logits[0].float()
    completion = ids[len(prompt_ids) :]
    assert tokenizer.batch_decode([[t] for t in completion]) == answer.tokens
    # Position p predicts token p + 1.
    forced = torch.log_softmax(logits[len(prompt_ids) - 1 : -1], dim=-1)
    expected = forced.gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)
    assert torch.allclose(torch.tensor(answer.token_logprobs), expected, atol=1e-3)


def test_batched_equals_one_by_one(smol):
    prompts = [
        "The capital of France is",
        CAPITAL,
        [{"role": "user", "content": "Name three primary colors, separated by commas."}],
        "def add(a, b):\n    return",
        "Water boils at",
    ]
    params = SamplingParams(max_tokens=12)
    batched = smol.generate(prompts, params)  # batch_size 4: two batches, padded
    single = TransformersGenerator.from_loaded(smol.model, smol.tokenizer, batch_size=1, progress=False)
    for prompt, [together] in zip(prompts, batched):
        [[alone]] = single.generate([prompt], params)
        assert together.text == alone.text
        assert together.tokens == alone.tokens
        assert together.prompt_tokens == alone.prompt_tokens
        assert together.completion_tokens == alone.completion_tokens
        assert together.finish_reason == alone.finish_reason
        assert together.token_logprobs == pytest.approx(alone.token_logprobs, abs=1e-3)
    # Without padding the prompt counts are the raw token counts.
    assert batched[0][0].prompt_tokens == len(smol.tokenizer("The capital of France is")["input_ids"])


def test_max_tokens_gives_length(smol):
    story = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]
    [[answer]] = smol.generate([story], SamplingParams(max_tokens=6))
    assert answer.finish_reason == "length"
    assert answer.completion_tokens == len(answer.token_logprobs) == 6


def test_stop_string_truncates(smol):
    [[answer]] = smol.generate([CAPITAL], SamplingParams(max_tokens=32, stop=[" Paris"]))
    assert answer.text == "The capital of France is"
    assert answer.finish_reason == "stop"
    # Generation halted at the token that completed the stop string.
    assert answer.tokens[-1] == " Paris"
    assert answer.completion_tokens == len(answer.token_logprobs) == 6


def test_stop_string_only_matches_the_completion(smol):
    """transformers' own stop_strings would match ': The' across prompt 'A:' + ' The'."""
    prompt = "Q: What is the capital of France?\nA:"
    [[plain]] = smol.generate([prompt], SamplingParams(max_tokens=8))
    assert plain.text.startswith(" The")
    [[stopped]] = smol.generate([prompt], SamplingParams(max_tokens=8, stop=[": The"]))
    assert stopped.text == plain.text
    assert stopped.completion_tokens == plain.completion_tokens


def test_n_samples_come_from_one_generate_call(tiny, monkeypatch):
    calls = []
    original = tiny.model.generate

    def counting_generate(*args, **kwargs):
        calls.append(kwargs["num_return_sequences"])
        return original(*args, **kwargs)

    monkeypatch.setattr(tiny.model, "generate", counting_generate)
    prompts = ["Hello there", [{"role": "user", "content": "Write a function that reverses a string."}]]
    params = SamplingParams(max_tokens=10, temperature=1.0, n=3, seed=7)
    results = tiny.generate(prompts, params)
    assert calls == [3]
    assert [len(samples) for samples in results] == [3, 3]
    for samples in results:
        assert len({c.text for c in samples}) > 1  # sampled, not three greedy copies
        for c in samples:
            assert len(c.token_logprobs) == c.completion_tokens <= 10
            assert c.finish_reason == ("length" if c.completion_tokens == 10 else "stop")
    # The same seed gives the same samples.
    again = tiny.generate(prompts, params)
    assert [[c.text for c in s] for s in again] == [[c.text for c in s] for s in results]


def test_order_and_left_padding_with_a_training_tokenizer(smol, smollm2_dir):
    prompts = ["Hi", "The quick brown fox jumps over the lazy dog and", "Paris is", "1, 2, 3,"]
    params = SamplingParams(max_tokens=4, logprobs=False)
    # A tokenizer set up for training (right padding) is still padded on the left here.
    right_padded = load_tokenizer(smollm2_dir, padding_side="right")
    generator = TransformersGenerator.from_loaded(smol.model, right_padded, batch_size=2, progress=False)
    results = generator.generate(prompts, params)
    assert [r[0].prompt_tokens for r in results] == [len(right_padded(p)["input_ids"]) for p in prompts]
    assert all(r[0].token_logprobs is None for r in results)
    assert [r[0].text for r in results] == [smol.generate([p], params)[0][0].text for p in prompts]


def test_get_generator_builds_the_transformers_backend(tiny_llama_dir):
    generator = get_generator("transformers", str(tiny_llama_dir), device="cpu", progress=False)
    assert isinstance(generator, TransformersGenerator)
    assert isinstance(generator, Generator)
    generator.close()
    with pytest.raises(RuntimeError, match="closed"):
        generator.generate(["hi"], SamplingParams(max_tokens=2))


def test_get_generator_rejects_unknown_backends():
    with pytest.raises(ValueError, match="transformers, llamacpp, openai, vllm"):
        get_generator("onnx", "smollm2-135m")
