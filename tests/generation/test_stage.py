"""The generate stage: records per prompt, resume after a kill, rejected rows, secrets."""

from __future__ import annotations

import json

import pytest

from cogumi.generation.stage import GenerateConfig
from cogumi.generation.stage import run as generate
from cogumi.stage import ConfigError, read_manifest

PROMPTS = [
    {"id": "a", "prompt": "The capital of France is"},
    {"id": "b", "messages": [{"role": "user", "content": "Say hi."}]},
    {"id": "c", "instruction": "Add 2 and 3.", "input": "Answer with a number."},
    {"id": "d", "prompt": "def add(a, b):"},
    {"id": "e", "prompt": "One, two, three,"},
]


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return path


def config(prompts, out, model, **overrides):
    values = dict(prompts=str(prompts), model=str(model), max_tokens=8, batch_size=2, progress=False,
                  output_dir=str(out))
    values.update(overrides)
    return GenerateConfig(**values)


def read(path):
    return [json.loads(line) for line in open(path)]


def test_generate_writes_one_record_per_prompt(tmp_path, prompts, tiny_llama_dir):
    result = generate(config(prompts, tmp_path / "out", tiny_llama_dir))
    records = read(result.outputs["completions"])
    assert [r["id"] for r in records] == ["a", "b", "c", "d", "e"]
    assert records[1]["prompt"] == [{"role": "user", "content": "Say hi."}]
    first = records[0]["completions"][0]
    assert first["finish_reason"] in ("stop", "length") and 0 < first["completion_tokens"] <= 8
    assert len(first["token_logprobs"]) == first["completion_tokens"]
    assert result.counts == {"in": 5, "answered": 5, "rejected": 0, "not_asked": 0, "completions": 5,
                             "completion_tokens": sum(r["completions"][0]["completion_tokens"] for r in records)}
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["answered"] == 5 and summary["tokens_per_s"] > 0


def test_sampling_n_per_prompt(tmp_path, prompts, tiny_llama_dir):
    result = generate(config(prompts, tmp_path / "out", tiny_llama_dir, n=3, temperature=1.0, limit=2))
    records = read(result.outputs["completions"])
    assert len(records) == 2 and all(len(r["completions"]) == 3 for r in records)
    assert result.counts["not_asked"] == 3


def test_killed_run_resumes_from_the_partial_file(tmp_path, prompts, tiny_llama_dir):
    full = generate(config(prompts, tmp_path / "full", tiny_llama_dir))
    expected = read(full.outputs["completions"])

    # Simulate a run killed after its first batch: a partial file with two finished records
    # (and a torn third line), written by a run with the same config, and no manifest.
    cfg = config(prompts, tmp_path / "killed", tiny_llama_dir)
    out = tmp_path / "killed"
    out.mkdir()
    (out / "completions.partial.config").write_text(cfg.config_sha256())
    (out / "completions.partial.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in expected[:2]) + '{"index": 2, "id": "c", "compl')
    resumed = generate(cfg)
    assert resumed.metrics["resumed_from"] == 2
    assert read(resumed.outputs["completions"]) == expected
    assert not (out / "completions.partial.jsonl").exists()

    # A partial file from another config is not trusted.
    other = config(prompts, tmp_path / "other", tiny_llama_dir)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "completions.partial.config").write_text("0" * 64)
    (tmp_path / "other" / "completions.partial.jsonl").write_text(json.dumps(expected[0]) + "\n")
    assert generate(other).metrics["resumed_from"] == 0


def test_rejected_prompt_rows_are_counted_and_kept_aside(tmp_path, tiny_llama_dir):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "Hello"}) + "\n" + json.dumps({"prompt": ""}) + "\n"
                    + json.dumps({"question": "no prompt field"}) + "\n")
    with pytest.raises(ValueError, match=r"prompts.jsonl:2: field 'prompt': is empty"):
        generate(config(path, tmp_path / "strict", tiny_llama_dir))
    result = generate(config(path, tmp_path / "lenient", tiny_llama_dir, on_error="skip"))
    assert result.counts["in"] == 3 and result.counts["answered"] == 1 and result.counts["rejected"] == 2
    rejected = read(tmp_path / "lenient" / "rejected.jsonl")
    assert [r["line"] for r in rejected] == [2, 3]


def test_config_checks():
    with pytest.raises(ConfigError, match="n > 1 needs temperature > 0"):
        GenerateConfig(prompts="p", model="m", n=2, output_dir="o")
    with pytest.raises(ConfigError, match="needs a URL"):
        GenerateConfig(prompts="p", model="m", backend="openai", output_dir="o")


def test_manifest_never_holds_the_api_key(tmp_path, prompts, tiny_llama_dir, monkeypatch):
    secret = "sk-live-abcdefghijklmnop"
    monkeypatch.setenv("MY_PROVIDER_API_KEY", secret)
    generate(config(prompts, tmp_path / "out", tiny_llama_dir, api_key_env="MY_PROVIDER_API_KEY",
                    system_prompt=f"key {secret}", limit=1))
    manifest = read_manifest(tmp_path / "out")
    assert manifest["config"]["api_key_env"] == "MY_PROVIDER_API_KEY"
    assert secret not in json.dumps(manifest)
