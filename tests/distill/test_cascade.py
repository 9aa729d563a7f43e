"""The teacher cascade: escalation, per-tier accounting, the budget cap, failing teachers; and a
real cascade of local models (the tiny random Llama, then SmolLM2 behind a llama.cpp server)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import ScriptedTeacher as Teacher
from support import write_problems

from cogumi.distill.cascade import parse_tiers
from cogumi.stage import ConfigError, run_stage

PROBLEMS = [
    {"id": "p1", "category": "math", "prompt": "What is 2+2?", "answer": "4"},
    {"id": "p2", "category": "math", "prompt": "What is 3+3?", "answer": "6"},
    {"id": "p3", "category": "math", "prompt": "What is 4+4?", "answer": "8"},
    {"id": "p4", "category": "knowledge", "prompt": "Capital of Italy?", "answer": "Rome"},
]


def tier(name: str, server: Teacher, price_in: float, price_out: float) -> dict:
    return {"name": name, "backend": "openai", "model": name, "base_url": server.base_url,
            "price_input_per_mtok": price_in, "price_output_per_mtok": price_out, "extra": {"max_retries": 0}}


def run_cascade(tmp_path: Path, tiers: list[dict], **extra):
    problems = write_problems(tmp_path / "problems.jsonl", PROBLEMS)
    out = tmp_path / "out"
    result = run_stage("cascade", {"problems": str(problems), "tiers": tiers, "output_dir": str(out),
                                   "batch_size": 2, "progress": False, **extra})
    records = {r["id"]: r for r in map(json.loads, (out / "problems.jsonl").read_text().splitlines())}
    report = json.loads((out / "report.json").read_text())
    return result, records, report


@pytest.fixture
def tiers3():
    cheap = Teacher({"What is 2+2?": ["#### 4"], "What is 3+3?": ["#### 5"], "What is 4+4?": ["#### 9"],
                     "Capital of Italy?": ["Milan"]}, usage=(100, 50))
    mid = Teacher({"What is 3+3?": ["#### 6"], "What is 4+4?": ["#### 7"], "Capital of Italy?": ["Rome."]},
                  fail={"Capital of Italy?"}, usage=(100, 50))
    frontier = Teacher({"What is 4+4?": ["#### 8"], "Capital of Italy?": ["It is Rome."]}, usage=(100, 50))
    yield cheap, mid, frontier
    for server in (cheap, mid, frontier):
        server.close()


def test_escalation_accounting_and_failing_teacher(tmp_path, tiers3):
    cheap, mid, frontier = tiers3
    tiers = [tier("cheap", cheap, 0.0, 0.0), tier("mid", mid, 1.0, 2.0), tier("frontier", frontier, 10.0, 30.0)]
    result, records, report = run_cascade(tmp_path, tiers)
    assert {pid: r["kept_by"] for pid, r in records.items()} == {"p1": "cheap", "p2": "mid", "p3": "frontier",
                                                                  "p4": "frontier"}
    assert [a["tier"] for a in records["p3"]["attempts"]] == ["cheap", "mid", "frontier"]
    # The mid tier fails on p4 (HTTP 500): recorded as failed at that tier, and p4 escalates.
    p4_mid = records["p4"]["attempts"][1]
    assert p4_mid["tier"] == "mid" and p4_mid["reason"] == "teacher_failed" and "500" in p4_mid["error"]
    per_tier = report["per_tier"]
    assert [per_tier[n]["attempted"] for n in ("cheap", "mid", "frontier")] == [4, 3, 2]
    assert [per_tier[n]["kept"] for n in ("cheap", "mid", "frontier")] == [1, 1, 2]
    assert per_tier["mid"]["failed_requests"] == 1
    # cost = tokens x price: mid answered 2 problems (100 in, 50 out each); frontier 2
    assert per_tier["mid"]["prompt_tokens"] == 200 and per_tier["mid"]["completion_tokens"] == 100
    assert per_tier["mid"]["cost_usd"] == pytest.approx((200 * 1.0 + 100 * 2.0) / 1e6)
    assert per_tier["frontier"]["cost_usd"] == pytest.approx((200 * 10.0 + 100 * 30.0) / 1e6)
    assert report["cost_usd"] == pytest.approx(per_tier["mid"]["cost_usd"] + per_tier["frontier"]["cost_usd"])
    assert result.counts == {"problems": 4, "kept_problems": 4, "training_rows": 4, "budget_exhausted": 0}
    train = [json.loads(line) for line in (tmp_path / "out/train.jsonl").read_text().splitlines()]
    assert {row["metadata"]["teacher"] for row in train} == {"cheap:cheap", "mid:mid", "frontier:frontier"}
    # The frontier tier was only asked about what the cheaper tiers could not do.
    assert sorted(r["body"]["messages"][-1]["content"] for r in frontier.requests) == ["Capital of Italy?",
                                                                                       "What is 4+4?"]


def test_budget_cap_stops_escalation_cleanly(tmp_path, tiers3):
    cheap, mid, frontier = tiers3
    tiers = [tier("cheap", cheap, 1000.0, 1000.0), tier("mid", mid, 1.0, 2.0), tier("frontier", frontier, 10.0, 30.0)]
    # cheap costs 150 tokens x $1000/M = $0.15 per problem; 2 problems per batch -> $0.30 after its first
    # batch; the cap of $0.25 lets no further batch start.
    result, records, report = run_cascade(tmp_path, tiers, max_cost_usd=0.25)
    assert report["stopped_by_budget_at"] == "cheap"
    assert [r for r in records.values() if r["kept"]] == [records["p1"]]
    assert {entry["id"]: entry["waiting_for"] for entry in report["left"]} == {"p2": "mid", "p3": "cheap", "p4": "cheap"}
    assert records["p3"]["reason"] == "budget_exhausted" and records["p3"]["attempts"] == []
    assert result.counts["budget_exhausted"] == 3
    assert mid.requests == [] and frontier.requests == []
    assert report["cost_usd"] == pytest.approx(0.30)


def test_tier_config_errors():
    with pytest.raises(ConfigError, match=r"tiers\[0\].model: required"):
        parse_tiers([{"backend": "openai"}])
    with pytest.raises(ConfigError, match=r"tiers\[0\]: unknown field"):
        parse_tiers([{"backend": "transformers", "model": "m", "temperature": 1}])
    with pytest.raises(ConfigError, match="base_url"):
        parse_tiers([{"backend": "openai", "model": "m"}])
    with pytest.raises(ConfigError, match="names must differ"):
        parse_tiers([{"name": "a", "backend": "transformers", "model": "m"},
                     {"name": "a", "backend": "transformers", "model": "n"}])


def test_local_models_cascade(tmp_path, tiny_llama_dir, llama_server):
    # Tier 1: a random 2-layer Llama (transformers) cannot name a capital; tier 2: SmolLM2 served by
    # llama.cpp's OpenAI-compatible server can.
    problems = write_problems(tmp_path / "p.jsonl", [
        {"id": "fr", "category": "knowledge", "prompt": "What is the capital of France? Answer in one sentence.",
         "answer": "Paris"}])
    tiers = [{"name": "tiny", "backend": "transformers", "model": str(tiny_llama_dir)},
             {"name": "smollm2", "backend": "openai", "model": "smollm2", "base_url": llama_server,
              "extra": {"extra_body": {"top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0}}}]
    result = run_stage("cascade", {"problems": str(problems), "tiers": tiers, "max_tokens": 24,
                                   "system_prompt": "You are a helpful assistant.",
                                   "output_dir": str(tmp_path / "o"), "progress": False})
    record = json.loads((tmp_path / "o/problems.jsonl").read_text())
    assert [a["tier"] for a in record["attempts"]] == ["tiny", "smollm2"]
    assert record["kept_by"] == "smollm2" and result.counts["kept_problems"] == 1
    assert result.metrics["per_tier"]["smollm2"]["completion_tokens"] > 0
