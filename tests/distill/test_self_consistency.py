"""Category rules of self-consistency distillation, through a scripted OpenAI-compatible teacher
(real HTTP, real client) and, for batching, SmolLM2 through transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import ScriptedTeacher as Teacher
from support import write_problems

from cogumi.distill.self_consistency import (
    CATEGORY_SETTINGS,
    build_rules,
    final_answer,
    pick_diverse,
    text_matches,
)
from cogumi.io import DataError
from cogumi.stage import ConfigError, run_stage


def distill(tmp_path: Path, teacher: Teacher, rows: list[dict], **extra) -> tuple[dict, dict, list[dict]]:
    problems = write_problems(tmp_path / "problems.jsonl", rows)
    out = tmp_path / "out"
    result = run_stage("self-consistency", {
        "problems": str(problems), "model": "scripted", "backend": "openai", "base_url": teacher.base_url,
        "extra": {"max_retries": 0}, "output_dir": str(out), "progress": False, **extra})
    records = {r["id"]: r for r in map(json.loads, (out / "problems.jsonl").read_text().splitlines())}
    train = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    return result.counts | {"metrics": result.metrics}, records, train


@pytest.fixture
def teacher_factory():
    servers = []

    def make(script, **kwargs):
        server = Teacher(script, **kwargs)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


def test_verify_categories_keep_only_verified_answers(tmp_path, teacher_factory):
    script = {
        "What is 2+2?": ["2 + 2 = 4\n#### 4"],
        "What is 3*3?": ["3 * 3 = 6\n#### 6"],
        "What is 5+5?": ["It is ten, 10"],
        "Capital of France?": ["The capital of France is Paris."],
        "Capital of Spain?": ["The capital of Spain is Barcelona."],
        "Tallest mountain?": ["Mount Everest."],
        "Write add(a, b).": ["```python\ndef add(a, b):\n    return a + b\n```"],
        "Write sub(a, b).": ["```python\ndef sub(a, b):\n    return a + b\n```"],
        "Write mul(a, b).": ["def mul(a, b): return a * b"],
    }
    rows = [
        {"id": "m1", "category": "math", "prompt": "What is 2+2?", "answer": "4"},
        {"id": "m2", "category": "math", "prompt": "What is 3*3?", "answer": "#### 9"},
        {"id": "m3", "category": "math", "prompt": "What is 5+5?", "answer": 10},
        {"id": "k1", "category": "knowledge", "prompt": "Capital of France?", "answer": "Paris"},
        {"id": "k2", "category": "knowledge", "prompt": "Capital of Spain?", "answer": "Madrid"},
        {"id": "k3", "category": "knowledge", "prompt": "Tallest mountain?"},  # no ground truth: skipped
        {"id": "c1", "category": "code", "prompt": "Write add(a, b).", "tests": ["assert add(2, 3) == 5"]},
        {"id": "c2", "category": "code", "prompt": "Write sub(a, b).", "tests": ["assert sub(5, 3) == 2"]},
        {"id": "c3", "category": "code", "prompt": "Write mul(a, b)."},  # no tests: skipped
    ]
    counts, records, train = distill(tmp_path, teacher_factory(script), rows)
    assert {pid for pid, r in records.items() if r["kept"]} == {"m1", "m3", "k1", "c1"}
    assert records["m2"]["reason"] == "failed_verification" and records["m2"]["verified"][0]["answer"] == "6"
    assert records["k2"]["reason"] == "failed_verification"
    assert records["c2"]["verified"][0]["status"] == "failed"
    assert records["k3"]["reason"] == records["c3"]["reason"] == "no_ground_truth"
    assert counts["skipped_no_ground_truth"] == 2 and counts["training_rows"] == 4
    assert {row["metadata"]["source_id"] for row in train} == {"m1", "m3", "k1", "c1"}
    assert all(row["metadata"]["strategy"] == "verify" for row in train)


def vote_rows(samples: dict[str, list[str]], answer: dict[str, str] | None = None) -> tuple[dict, list[dict]]:
    rows = [{"id": pid, "category": "reasoning", "prompt": f"Puzzle {pid}?"} for pid in samples]
    for row in rows:
        if answer and row["id"] in answer:
            row["answer"] = answer[row["id"]]
    return {f"Puzzle {pid}?": texts for pid, texts in samples.items()}, rows


def test_vote_keeps_the_majority_at_sixty_percent_and_the_longest_solution(tmp_path, teacher_factory):
    six = ["So the answer is A."] * 5 + ["Long careful reasoning... so the answer is A."] + ["The answer is B."] * 4
    five = ["The answer is A."] * 5 + ["The answer is B."] * 3 + ["The answer is C."] * 2
    tie = ["The answer is A."] * 4 + ["The answer is B."] * 4 + ["The answer is C."] * 2
    wrong = ["The answer is 12."] * 8 + ["The answer is 13."] * 2
    numbers = ["... the answer is 12.0"] * 3 + ["The answer is 12."] * 4 + ["#### 7"] * 3
    script, rows = vote_rows({"six": six, "five": five, "tie": tie, "wrong": wrong, "numbers": numbers},
                             answer={"wrong": "13"})
    counts, records, train = distill(tmp_path, teacher_factory(script), rows)
    assert records["six"]["kept"] and records["six"]["agreement"] == 0.6 and records["six"]["majority"] == "a"
    assert records["six"]["chosen_sample"] == 5  # the longest solution reaching the majority
    assert records["five"]["reason"] == "low_agreement" and records["five"]["agreement"] == 0.5
    assert records["tie"]["reason"] == "tied_majority"
    assert records["wrong"]["reason"] == "majority_wrong"  # 80% agree on 12, but the ground truth is 13
    assert records["numbers"]["kept"] and records["numbers"]["majority"] == "12" and records["numbers"]["agreement"] == 0.7
    assert [row["output"] for row in train if row["metadata"]["source_id"] == "six"] == [six[5]]
    assert next(r for r in train if r["metadata"]["source_id"] == "six")["metadata"]["agreement"] == 0.6
    per_category = counts["metrics"]["per_category"]["reasoning"]
    assert per_category == {"problems": 5, "kept": 2, "not_kept": {"low_agreement": 1, "tied_majority": 1,
                                                                   "majority_wrong": 1},
                            "mean_agreement": pytest.approx((0.6 + 0.5 + 0.4 + 0.8 + 0.7) / 5)}


def test_the_threshold_is_configurable(tmp_path, teacher_factory):
    five = ["The answer is A."] * 5 + ["The answer is B."] * 3 + ["The answer is C."] * 2
    script, rows = vote_rows({"five": five})
    _, records, _ = distill(tmp_path, teacher_factory(script), rows, min_agreement=0.5)
    assert records["five"]["kept"]


def test_diverse_keeps_three_different_samples_and_drops_near_copies(tmp_path, teacher_factory):
    base = "The sea was grey and restless under a heavy sky, waves folding over the old stone pier."
    samples = [
        base,
        base.replace("grey", "gray"),  # a near copy
        "Gulls wheeled above the harbour while fishing boats rocked on their moorings at dawn.",
        "",
        "Moonlight silvered the calm water, and the tide whispered secrets to the sleeping sand.",
        "A storm rolled in from the horizon, black clouds swallowing the last light of evening.",
        base + " ",  # another copy
        "Children built castles from wet sand as the surf crept closer with every passing minute.",
    ]
    chosen, dropped = pick_diverse(samples, keep=3, max_similarity=0.5)
    assert chosen == [0, 2, 4]
    reasons = {d["sample"]: d["reason"] for d in dropped}
    assert reasons[1] == "near_copy" and reasons[6] == "near_copy" and reasons[3] == "empty"
    assert reasons[5] == reasons[7] == "enough_kept"
    script = {"Write about the sea.": samples}
    counts, records, train = distill(tmp_path, teacher_factory(script),
                                     [{"id": "s", "category": "creativity", "prompt": "Write about the sea."}],
                                     categories={"creativity": {"samples": 8}})
    assert [row["output"] for row in train] == [samples[0], samples[2], samples[4]]
    assert records["s"]["kept_samples"] == [0, 2, 4] and counts["training_rows"] == 3
    assert all(row["metadata"]["train_temperature"] == 0.3 for row in train)


def test_rules_and_bad_input(tmp_path):
    rules = build_rules({"reasoning": {"samples": 5}, "legal": {"strategy": "vote", "temperature": 0.3}})
    assert rules["reasoning"].samples == 5 and rules["reasoning"].temperature == CATEGORY_SETTINGS["reasoning"]["temperature"]
    assert rules["math"].strategy == "verify" and rules["creativity"].temperature == 0.7 and "legal" in rules
    with pytest.raises(ConfigError, match="several samples need a temperature"):
        build_rules({"math": {"samples": 3}})
    with pytest.raises(ConfigError, match="strategy"):
        build_rules({"math": {"strategy": "guess"}})
    problems = write_problems(tmp_path / "p.jsonl", [{"prompt": "x", "category": "poetry"}])
    with pytest.raises(DataError, match=r"p.jsonl:1: field 'category': 'poetry' is not one of"):
        run_stage("self-consistency", {"problems": str(problems), "model": "m", "output_dir": str(tmp_path / "o")})
    problems = write_problems(tmp_path / "p.jsonl", [{"prompt": "x", "category": "math", "answer": "many"}])
    with pytest.raises(DataError, match=r"p.jsonl:1: field 'answer': math answers must be numbers"):
        run_stage("self-consistency", {"problems": str(problems), "model": "m", "output_dir": str(tmp_path / "o")})


def test_answer_helpers():
    assert final_answer("Thinking... So the answer is (B).") == "b"
    assert final_answer("x = 3\n#### 18.00") == "18"
    assert final_answer("The answer is 1,000.") == "1000"
    assert final_answer("step one\nstep two\nYes") == "yes"
    assert final_answer("") is None
    assert text_matches("I believe it is Paris, France.", "Paris") and not text_matches("Parisian food", "Paris")


def test_smollm2_samples_come_from_one_batched_call(tmp_path, smollm2_dir):
    # Real model, real sampling: 4 samples for each of 2 reasoning prompts in one generate call.
    problems = write_problems(tmp_path / "p.jsonl", [
        {"id": "a", "category": "reasoning", "prompt": "Is the sky blue on a clear day? End with 'The answer is yes/no.'"},
        {"id": "b", "category": "creativity", "prompt": "Write one sentence about rain."}])
    result = run_stage("self-consistency", {
        "problems": str(problems), "model": str(smollm2_dir), "max_tokens": 24, "output_dir": str(tmp_path / "o"),
        "categories": {"reasoning": {"samples": 4}, "creativity": {"samples": 4}}, "progress": False})
    records = [json.loads(line) for line in (tmp_path / "o/problems.jsonl").read_text().splitlines()]
    assert [len(r["samples"]) for r in records] == [4, 4]
    assert len(set(records[1]["samples"])) > 1  # sampled, not greedy copies
    assert result.counts["problems"] == 2 and records[0]["agreement"] is not None
    assert result.metrics["tokens"]["completion"] > 0
