from __future__ import annotations

import json

from cogumi.models.materialize import MaterializeConfig
from cogumi.models.materialize import run as materialize
from cogumi.stage import read_manifest


def test_materialize_smollm2_writes_checkpoint_and_gguf(tmp_path, smollm2_dir, smollm2_gguf):
    result = materialize(MaterializeConfig(model="smollm2-135m", output_dir=str(tmp_path / "m")))
    model_dir = tmp_path / "m" / "model"
    assert json.loads((model_dir / "config.json").read_text())["num_hidden_layers"] == 30
    assert (tmp_path / "m" / "model.gguf").stat().st_size == smollm2_gguf.stat().st_size
    assert result.counts["bytes"] > 100_000_000
    manifest = read_manifest(tmp_path / "m")
    assert set(manifest["outputs"]) == {"model", "gguf"}
    assert materialize(MaterializeConfig(model="smollm2-135m", output_dir=str(tmp_path / "m"))).skipped


def test_materialize_tiny_and_local_dir(tmp_path, tiny_llama_dir):
    materialize(MaterializeConfig(model="tiny-llama", output_dir=str(tmp_path / "a")))
    copy = materialize(MaterializeConfig(model=str(tmp_path / "a" / "model"), output_dir=str(tmp_path / "b")))
    assert (tmp_path / "b" / "model" / "tokenizer.json").exists()
    manifest = read_manifest(tmp_path / "b")
    assert "model" in manifest["inputs"]  # a local directory is an input, hashed
    assert manifest["inputs"]["model"]["sha256"] == manifest["outputs"]["model"]["sha256"]
    assert copy.counts["files"] >= 4
