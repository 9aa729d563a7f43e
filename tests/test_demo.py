"""recipes/demo.yaml runs end to end on the CPU, and a second run skips every step."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cogumi.recipe import run_recipe

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_recipe_runs_and_resumes(tmp_path, smollm2_dir, smollm2_gguf):
    os.chdir(ROOT)  # recipe paths are relative to the repository root, as with `make demo`
    lines = []
    results = run_recipe("recipes/demo.yaml", workdir=tmp_path / "demo", echo=lines.append)
    assert [r.stage for r in results] == ["validate", "materialize", "generate", "generate"]
    assert not any(r.skipped for r in results)
    for result in results[2:]:
        records = [json.loads(line) for line in open(result.outputs["completions"])]
        assert len(records) == 6
        by_id = {r["id"]: r["completions"][0] for r in records}
        assert "Paris" in by_id["capital"]["text"]
        assert all(c["completion_tokens"] > 0 and c["token_logprobs"] for c in by_id.values())
    assert f"results in {tmp_path / 'demo'}" in lines[-1]
    again = run_recipe("recipes/demo.yaml", workdir=tmp_path / "demo", echo=lines.append)
    assert all(r.skipped for r in again)
