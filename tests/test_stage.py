"""The stage contract: manifest contents, skip when unchanged, re-run when config or input changed."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from cogumi.data.validate import ValidateConfig
from cogumi.data.validate import run as validate
from cogumi.stage import ConfigError, StageConfig, build_config, option, read_manifest, redact

ROW = {"instruction": "Add 2 and 3.", "response": "5", "metadata": {"domain": "math"}}


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(ROW) + "\n" + json.dumps({**ROW, "instruction": "Add 1 and 1."}) + "\n")
    return path


def test_manifest_records_stage_config_hashes_versions_and_counts(tmp_path, data):
    result = validate(ValidateConfig(input=str(data), output_dir=str(tmp_path / "out")))
    manifest = read_manifest(tmp_path / "out")
    assert manifest["stage"] == "validate"
    assert manifest["config"]["input"] == str(data)
    assert len(manifest["config_sha256"]) == 64
    assert manifest["inputs"]["input"]["sha256"] == __import__("hashlib").sha256(data.read_bytes()).hexdigest()
    assert set(manifest["outputs"]) == {"valid", "rejected", "report"}
    assert manifest["counts"] == {"in": 2, "kept": 2, "rejected": 0} == result.counts
    assert "cogumi" in manifest["packages"] and "python" in manifest["host"]
    assert manifest["started_at"] <= manifest["finished_at"]
    assert not result.skipped


def test_unchanged_stage_is_skipped_and_changes_rerun_it(tmp_path, data):
    config = ValidateConfig(input=str(data), output_dir=str(tmp_path / "out"))
    assert not validate(config).skipped
    again = validate(config)
    assert again.skipped and again.counts["kept"] == 2

    changed_config = ValidateConfig(input=str(data), output_dir=str(tmp_path / "out"), schema="any")
    assert not validate(changed_config).skipped
    assert validate(changed_config).skipped

    data.write_text(json.dumps(ROW) + "\n")  # the input changed
    rerun = validate(changed_config)
    assert not rerun.skipped and rerun.counts["kept"] == 1

    (tmp_path / "out" / "valid.jsonl").write_text("tampered\n")  # an output changed
    assert not validate(changed_config).skipped
    assert validate(changed_config, force=False).skipped
    assert not validate(changed_config, force=True).skipped


def test_failed_run_leaves_no_manifest(tmp_path, data):
    out = tmp_path / "out"
    validate(ValidateConfig(input=str(data), output_dir=str(out)))
    data.write_text("{not json\n")
    with pytest.raises(Exception, match=r"data.jsonl:1: invalid JSON"):
        validate(ValidateConfig(input=str(data), output_dir=str(out)))
    assert read_manifest(out) is None  # the stale manifest went before the body ran


def test_missing_input_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"ValidateConfig.input: input '.*nope.jsonl' does not exist"):
        validate(ValidateConfig(input=str(tmp_path / "nope.jsonl"), output_dir=str(tmp_path / "o")))


def test_config_types_and_choices_are_checked():
    with pytest.raises(ConfigError, match=r"ValidateConfig.schema: 'chat' is not one of"):
        ValidateConfig(input="x", output_dir="o", schema="chat")
    with pytest.raises(ConfigError, match=r"ValidateConfig.input: expected a string, got 3"):
        ValidateConfig(input=3, output_dir="o")
    with pytest.raises(ConfigError, match=r"has no field 'schemaa'"):
        build_config(ValidateConfig, {"input": "x", "output_dir": "o", "schemaa": "any"})
    with pytest.raises(ConfigError, match=r"missing 1 required keyword-only argument: 'input'"):
        build_config(ValidateConfig, {"output_dir": "o"})


@dataclass(kw_only=True)
class _Toy(StageConfig):
    steps: int = option(10, help="How many steps.")
    workers: int = option(1, help="Parallelism; does not change results.", hashed=False)
    ratio: float = option(0.5, help="A number.")


def test_unhashed_fields_do_not_change_the_config_hash():
    base = _Toy(output_dir="o")
    assert base.config_sha256() == _Toy(output_dir="elsewhere", workers=8).config_sha256()
    assert base.config_sha256() != _Toy(output_dir="o", steps=11).config_sha256()
    assert _Toy(output_dir="o", ratio=1).ratio == 1.0  # ints are accepted as floats
    with pytest.raises(ConfigError, match="expected an integer, got True"):
        _Toy(output_dir="o", steps=True)


def test_secrets_from_the_environment_never_reach_a_manifest(tmp_path, data, monkeypatch):
    secret = "sk-test-0123456789abcdef"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    assert redact({"a": [f"Bearer {secret}", "public"]}) == {"a": ["***", "public"]}
    secret_dir = tmp_path / secret
    secret_dir.mkdir()
    path = secret_dir / "data.jsonl"
    path.write_text(data.read_text())
    validate(ValidateConfig(input=str(path), output_dir=str(tmp_path / "out")))
    text = (tmp_path / "out" / "manifest.json").read_text()
    assert secret not in text and "***" in text
