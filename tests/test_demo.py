"""recipes/demo.yaml runs end to end on the CPU, and a second run skips every step."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cogumi.recipe import run_recipe

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the whole method end to end: about 15 minutes alone on 2 cores
def test_demo_recipe_runs_and_resumes(tmp_path, smollm2_dir, smollm2_gguf):
    os.chdir(ROOT)  # recipe paths are relative to the repository root, as with `make demo`
    lines = []
    results = run_recipe("recipes/demo.yaml", workdir=tmp_path / "demo", echo=lines.append)
    stages = [r.stage for r in results]
    assert stages[:8] == ["validate", "exact-dedup", "dedup", "filter-language", "filter-format",
                          "decontaminate", "filter-length", "stats"]
    assert stages[8:12] == ["validate", "materialize", "generate", "generate"]
    assert stages[12:14] == ["train", "merge"]
    assert stages[14:16] == ["eval", "eval"]
    assert stages[16:19] == ["failures", "cluster-failures", "self-consistency"]
    assert stages[19:23] == ["prune", "gate", "quantize", "gate"]
    assert stages[23:] == ["export-gguf", "export-verify", "pack", "unpack", "generate"]
    assert not any(r.skipped for r in results)
    by_stage = {r.stage: r for r in results[:8]}
    # Each planted problem in demo_train.jsonl is caught by the step made for it.
    assert by_stage["exact-dedup"].counts["removed"] == 2
    assert by_stage["dedup"].counts["removed"] == 3
    assert by_stage["filter-language"].counts["removed"] == 2
    assert by_stage["filter-format"].counts["removed"] == 2
    assert by_stage["decontaminate"].counts["removed"] == 2
    assert by_stage["filter-length"].counts["kept"] == 27
    for result in results[10:12]:
        records = [json.loads(line) for line in open(result.outputs["completions"])]
        assert len(records) == 6
        by_id = {r["id"]: r["completions"][0] for r in records}
        assert "Paris" in by_id["capital"]["text"]
        assert all(c["completion_tokens"] > 0 and c["token_logprobs"] for c in by_id.values())
    finetune, merged = results[12:14]
    assert finetune.counts["train_examples"] + finetune.counts["validation_examples"] == 27
    assert finetune.counts["steps"] == 4 and finetune.metrics["eval_loss"] > 0
    assert merged.metrics["saved_relative_diff"] < 1e-4
    assert merged.metrics["vs_trained_4bit_top1_agreement"] > 0.9
    for evaluation in results[14:16]:
        assert evaluation.counts["examples"] == 8
        summary = json.loads((Path(evaluation.output_dir) / "summary.json").read_text())
        assert set(summary["benchmarks"]) == {"gsm8k", "humaneval"} and summary["sandbox"]
        records = [json.loads(line) for line in open(evaluation.outputs["predictions"])]
        assert all(r["output"] and r["confidence"] for r in records)
    failures, clusters, distilled = results[16:19]
    base_records = [json.loads(line) for line in open(results[14].outputs["predictions"])]
    wrong = sum(not r["correct"] for r in base_records)
    assert failures.counts["in"] == 8 and failures.counts["extracted"] + failures.counts["duplicates"] == wrong
    assert clusters.counts["clusters"] in (2, 3) and clusters.counts["rows"] == failures.counts["extracted"]
    problems = [json.loads(line) for line in open(distilled.outputs["problems"])]
    assert distilled.counts["problems"] == len(problems) == 8
    # The problem without ground truth in a verified category is skipped, never kept.
    assert next(p for p in problems if p["id"] == "knowledge-2")["reason"] == "no_ground_truth"
    assert [len(p["samples"]) for p in problems if p["category"] == "reasoning"] == [4]
    pruned, gate_pruned, awq, gate_awq = results[19:23]
    assert pruned.metrics["mean_sparsity"] >= 0.5
    assert 0 < gate_pruned.metrics["ppl_increase"] <= 2.0 and gate_pruned.metrics["top1_agreement"] > 0.5
    assert awq.metrics["group_size"] == 64
    assert gate_awq.metrics["ppl_increase"] <= 0.5 and gate_awq.metrics["top1_agreement"] > 0.7
    # The demo ends with a verified, packed GGUF of the fine-tuned model that llama.cpp answers with.
    gguf, verified, packed, unpacked, answers = results[23:]
    assert gguf.metrics["loads_in_llama_cpp"] and gguf.metrics["tensor_types"].get("Q8_0")
    assert verified.metrics["passed"] and verified.metrics["top1_agreement"] >= 0.9
    assert packed.metrics["ratio"] > 1.0 and packed.metrics["codec"] == "cogumi"
    assert Path(unpacked.outputs["file"]).read_bytes() == Path(gguf.outputs["gguf"]).read_bytes()
    records = [json.loads(line) for line in open(answers.outputs["completions"])]
    assert len(records) == 6
    assert "Paris" in next(r for r in records if r["id"] == "capital")["completions"][0]["text"]
    assert f"results in {tmp_path / 'demo'}" in lines[-1]
    again = run_recipe("recipes/demo.yaml", workdir=tmp_path / "demo", echo=lines.append)
    assert all(r.skipped for r in again)
