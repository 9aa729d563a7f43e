"""Failure extraction: the tie policy, predictions from a real eval-score run, dedup, bad input."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
from support import edit, words

from cogumi.distill.failures import TIE_WARNING
from cogumi.evaluate.judge import VERDICTS_SCHEMA
from cogumi.io import DataError
from cogumi.stage import run_stage

EVAL_DATA = Path(__file__).parents[1] / "evaluate" / "data"


def verdict(ident: str, outcome: str, category: str = "math", prompt: str | None = None) -> dict:
    return {"schema": VERDICTS_SCHEMA, "id": ident, "category": category,
            "prompt": prompt or f"Question {ident}: {words(random.Random(ident), 12)}?",
            "candidate": f"weak answer {ident}", "reference": f"strong answer {ident}", "outcome": outcome,
            "candidate_avg": 5.0, "reference_avg": 7.0, "disagreement": False}


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def extract(tmp_path: Path, results: list[Path], **extra):
    out = tmp_path / "out"
    result = run_stage("failures", {"results": [str(p) for p in results], "output_dir": str(out), **extra})
    rows = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    removed = [json.loads(line) for line in (out / "removed.jsonl").read_text().splitlines()]
    return result, rows, removed, json.loads((out / "report.json").read_text())


def test_losses_only_by_default_ties_opt_in_with_a_warning(tmp_path, caplog):
    verdicts = write(tmp_path / "verdicts.jsonl", [
        verdict("1", "loss"), verdict("2", "win"), verdict("3", "tie"), verdict("4", "invalid"),
        verdict("5", "loss", "code"), verdict("6", "tie", "code")])
    result, rows, _, report = extract(tmp_path, [verdicts])
    assert [r["metadata"]["source_id"] for r in rows] == ["1", "5"]
    assert rows[0]["output"] == "strong answer 1" and rows[0]["instruction"].startswith("Question 1")
    assert rows[0]["metadata"]["verdict"] == "loss" and rows[0]["metadata"]["model_output"] == "weak answer 1"
    assert result.counts == {"in": 6, "extracted": 2, "not_failures": 1, "ties_excluded": 2, "invalid_verdicts": 1,
                             "skipped_empty": 0, "duplicates": 0}
    assert report["by_category"]["math"] == {"loss": 1, "win": 1, "tie": 1, "invalid": 1, "extracted": 1}
    assert report["tie_policy"] == "losses only" and report["warnings"] == []

    with caplog.at_level(logging.WARNING):
        result, rows, _, report = extract(tmp_path, [verdicts], include_ties=True)
    assert sorted(r["metadata"]["source_id"] for r in rows) == ["1", "3", "5", "6"]
    assert TIE_WARNING in caplog.text and report["warnings"] == [TIE_WARNING]
    assert result.counts["ties_excluded"] == 0 and result.counts["extracted"] == 4


def test_predictions_from_a_real_eval_run(tmp_path):
    predictions = write(tmp_path / "p.jsonl", [{"id": 0, "output": "#### 7"}, {"id": 1, "output": "#### 35"},
                                               {"id": 2, "output": "no idea"}])
    run_stage("eval-score", {"benchmark": "gsm8k", "predictions": str(predictions), "progress": False,
                             "data": str(EVAL_DATA / "gsm8k.jsonl"), "output_dir": str(tmp_path / "eval")})
    result, rows, _, _ = extract(tmp_path, [tmp_path / "eval/predictions.jsonl"], benchmark="gsm8k")
    assert [(r["metadata"]["source_id"], r["metadata"]["verdict"]) for r in rows] == [("1", "wrong"), ("2", "unparsed")]
    assert rows[0]["output"] == "36" and rows[0]["metadata"]["output_kind"] == "gold_label"
    assert result.counts["not_failures"] == 1
    with pytest.raises(DataError, match=r"predictions.jsonl:1: field 'benchmark': results from a different benchmark"):
        extract(tmp_path, [tmp_path / "eval/predictions.jsonl"], benchmark="mbpp")


def test_multiple_choice_and_code_outputs(tmp_path):
    from cogumi.evaluate.run import PREDICTIONS_SCHEMA

    rows = [{"schema": PREDICTIONS_SCHEMA, "benchmark": "mmlu", "id": "0", "category": "geography",
             "prompt": "Capital of France?\nA. Berlin\nB. Paris\n\nAnswer with the letter.", "reference": "B",
             "correct": False, "unparsed": False, "output": "A"},
            {"schema": PREDICTIONS_SCHEMA, "benchmark": "humaneval", "id": "HumanEval/2", "category": "code",
             "prompt": "def f():\n", "reference": "    return 1\n", "correct": False, "output": "x"}]
    _, extracted, _, _ = extract(tmp_path, [write(tmp_path / "p.jsonl", rows)])
    assert extracted[0]["output"] == "B. Paris" and extracted[0]["metadata"]["output_kind"] == "gold_label"
    assert extracted[1]["output"] == "    return 1\n" and extracted[1]["metadata"]["output_kind"] == "canonical_solution"


def test_duplicates_within_and_against_an_existing_training_set(tmp_path):
    rng = random.Random(3)
    base = words(rng, 40)
    near = edit(rng, base, 1)
    other = words(rng, 40)
    known = words(rng, 40)
    verdicts = write(tmp_path / "v.jsonl", [
        verdict("a", "loss", prompt=base), verdict("b", "loss", prompt=base.upper()),  # exact (normalised)
        verdict("c", "loss", prompt=near), verdict("d", "loss", prompt=other),
        verdict("e", "loss", prompt=edit(rng, known, 1))])
    existing = write(tmp_path / "train.jsonl", [{"instruction": known, "output": "x"}])
    result, rows, removed, _ = extract(tmp_path, [verdicts], existing=[str(existing)])
    assert [r["metadata"]["source_id"] for r in rows] == ["a", "d"]
    reasons = {entry["row"]["metadata"]["source_id"]: entry["reason"] for entry in removed}
    assert reasons == {"b": "duplicate", "c": "near_duplicate", "e": "in_existing_training_set"}
    assert result.counts["duplicates"] == 3
    assert result.counts["in"] == result.counts["extracted"] + result.counts["duplicates"]


def test_wrong_or_missing_schema_is_an_error(tmp_path):
    with pytest.raises(DataError, match=r"v.jsonl:2: field 'schema': missing: not a cogumi results file"):
        extract(tmp_path, [write(tmp_path / "v.jsonl", [verdict("1", "loss"), {"id": 2, "outcome": "loss"}])])
    with pytest.raises(DataError, match=r"v.jsonl:1: field 'schema': 'cogumi.verdicts/0' is not a results schema"):
        extract(tmp_path, [write(tmp_path / "v.jsonl", [{**verdict("1", "loss"), "schema": "cogumi.verdicts/0"}])])
    with pytest.raises(DataError, match=r"v.jsonl:1: field 'outcome'"):
        extract(tmp_path, [write(tmp_path / "v.jsonl", [{**verdict("1", "loss"), "outcome": "draw"}])])
