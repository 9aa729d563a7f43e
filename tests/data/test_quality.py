"""LLM quality scoring through the real OpenAI-compatible client: a deterministic judge served
over HTTP on 127.0.0.1 for parsing, thresholds and caching, and SmolLM2 on llama.cpp's server
end to end."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from support import LocalJSONServer

from cogumi.data.quality import (
    RUBRIC_VERSION,
    JudgeRequestError,
    QualityConfig,
    ScoreError,
    parse_scores,
    run,
)
from cogumi.stage import ConfigError


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class Judge(LocalJSONServer):
    """A deterministic judge on 127.0.0.1: its scores come from a ``[a/b/c/d]`` tag in the
    graded response; ``JUDGE:GARBAGE``, ``JUDGE:RANGE``, ``JUDGE:FENCED`` and ``JUDGE:FAIL``
    make it reply without scores, out of range, in a fenced block, or with HTTP 500."""

    def __init__(self) -> None:
        self.authorizations: list[str] = []
        self.fail = True
        super().__init__()

    def respond(self, path: str, headers: dict[str, str], body: dict) -> tuple[int, dict]:
        self.authorizations.append(headers.get("authorization", ""))
        graded = body["messages"][-1]["content"].split("### RESPONSE\n", 1)[1]
        if "JUDGE:FAIL" in graded and self.fail:
            return 500, {"error": {"message": "judge overloaded"}}
        return 200, {
            "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                         "message": {"role": "assistant", "content": self.reply(graded)}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20}}

    @staticmethod
    def reply(graded: str) -> str:
        if "JUDGE:GARBAGE" in graded:
            return "What a lovely answer, I enjoyed it."
        if "JUDGE:RANGE" in graded:
            return '{"accuracy": 5, "completeness": 2, "coherence": 2, "helpfulness": 3}'
        if "JUDGE:FENCED" in graded:
            return 'My grade:\n```json\n{"Accuracy": 3, "Completeness": 2, "Coherence": 1, "Helpfulness": 3}\n```'
        tag = re.search(r"\[(\d)/(\d)/(\d)/(\d)\]", graded)
        a, c, o, h = tag.groups() if tag else (1, 1, 1, 1)
        return json.dumps({"accuracy": int(a), "completeness": int(c), "coherence": int(o), "helpfulness": int(h)})



@pytest.fixture
def judge():
    server = Judge()
    yield server
    server.close()


def config(judge_url: str, data: Path, out: Path, **kwargs) -> QualityConfig:
    return QualityConfig(input=str(data), output_dir=str(out), model="judge-1", base_url=judge_url,
                         max_retries=0, progress=False, **kwargs)


ROWS = [
    {"id": "perfect", "instruction": "Capital of France?", "response": "Paris. [3/2/2/3]"},
    {"id": "boundary", "instruction": "Capital of Spain?", "response": "Madrid. [2/2/1/2]",
     "metadata": {"domain": "conversation"}},
    {"id": "weak", "instruction": "Capital of Italy?", "response": "Rome, I think. [2/1/1/2]"},
    {"id": "garbage", "instruction": "Capital of Peru?", "response": "Lima. JUDGE:GARBAGE"},
    {"id": "range", "instruction": "Capital of Chile?", "response": "Santiago. JUDGE:RANGE"},
    {"id": "fenced", "instruction": "Capital of Japan?", "response": "Tokyo. JUDGE:FENCED"},
]


def test_scores_threshold_metadata_and_unscored_rows(tmp_path, judge):
    data = write_rows(tmp_path / "t.jsonl", [*ROWS[:3], "{broken", *ROWS[3:]])
    out = tmp_path / "out"
    result = run(config(judge.base_url, data, out, on_error="skip"))
    assert len(judge.requests) == 6
    assert result.counts == {"in": 7, "kept": 3, "removed": 1, "unscored": 2, "rejected": 1}
    kept = read(out / "kept.jsonl")
    assert [(r["id"], r["metadata"]["quality_score"]) for r in kept] == [("perfect", 10), ("boundary", 7),
                                                                         ("fenced", 9)]
    assert kept[1]["metadata"]["domain"] == "conversation"
    assert kept[1]["metadata"]["quality"] == {"accuracy": 2, "completeness": 2, "coherence": 1, "helpfulness": 2,
                                              "judge": "local:judge-1", "rubric": RUBRIC_VERSION}
    (removed,) = read(out / "removed.jsonl")
    assert (removed["id"], removed["reason"], removed["quality_score"], removed["line"]) == ("weak", "low_quality", 6, 3)
    unscored = {r["id"]: r for r in read(out / "unscored.jsonl")}
    assert "no JSON object with rubric scores" in unscored["garbage"]["error"]
    assert unscored["range"]["error"] == "accuracy: 5 is outside 0..3"
    assert unscored["range"]["reply"].startswith('{"accuracy": 5') and unscored["range"]["line"] == 6
    assert read(out / "rejected.jsonl")[0]["line"] == 4
    report = json.loads((out / "report.json").read_text())
    assert report["score_histogram"]["7"] == 1 and report["mean_score"] == round((10 + 7 + 6 + 9) / 4, 3)
    # the rubric is what the judge was asked
    (request,) = [r["body"] for r in judge.requests if "Capital of France?" in r["body"]["messages"][-1]["content"]]
    for text in ("accuracy (0-3)", "completeness (0-2)", "coherence (0-2)", "helpfulness (0-3)", "Paris. [3/2/2/3]"):
        assert text in request["messages"][-1]["content"]
    assert request["temperature"] == 0.0 and request["model"] == "judge-1"


def test_a_rerun_sends_no_requests(tmp_path, judge):
    data = write_rows(tmp_path / "t.jsonl", ROWS)
    run(config(judge.base_url, data, tmp_path / "out"))
    first = (tmp_path / "out" / "kept.jsonl").read_text()
    assert len(judge.requests) == 6

    result = run(config(judge.base_url, data, tmp_path / "out"), force=True)
    assert len(judge.requests) == 6 and result.metrics["requests"] == 0 and result.metrics["cached"] == 6
    assert (tmp_path / "out" / "kept.jsonl").read_text() == first

    # Another threshold and another output directory, sharing the cache: still nothing asked.
    cache = tmp_path / "out" / "quality_cache.jsonl"
    result = run(config(judge.base_url, data, tmp_path / "strict", min_score=9.5, cache=str(cache)))
    assert len(judge.requests) == 6 and result.counts["kept"] == 1

    # A grown input: only the new row is judged.
    grown = write_rows(tmp_path / "grown.jsonl", [*ROWS, {"instruction": "Capital of Kenya?",
                                                          "response": "Nairobi. [3/2/2/2]"}])
    result = run(config(judge.base_url, grown, tmp_path / "grown", cache=str(cache)))
    assert len(judge.requests) == 7 and result.metrics["requests"] == 1 and result.counts["kept"] == 4


def test_failed_requests_stop_the_stage_and_only_they_are_retried(tmp_path, judge):
    data = write_rows(tmp_path / "t.jsonl", [ROWS[0], {"instruction": "Hi", "response": "JUDGE:FAIL [3/2/2/3]"},
                                             ROWS[1]])
    out = tmp_path / "out"
    with pytest.raises(JudgeRequestError, match=r"1 of 3 judge requests failed .*HTTP 500.*run again"):
        run(config(judge.base_url, data, out))
    assert not (out / "manifest.json").exists() and not (out / "kept.jsonl").exists()
    assert len(read(out / "quality_cache.jsonl")) == 2
    judge.fail = False
    asked = len(judge.requests)
    result = run(config(judge.base_url, data, out))
    assert len(judge.requests) == asked + 1
    assert result.counts == {"in": 3, "kept": 3, "removed": 0, "unscored": 0, "rejected": 0}


def test_the_api_key_is_sent_but_never_written(tmp_path, judge, monkeypatch, caplog):
    secret = "sk-test-9f8e7d6c5b4a39281706"
    monkeypatch.setenv("COGUMI_TEST_JUDGE_KEY", secret)
    data = write_rows(tmp_path / "t.jsonl", ROWS[:2])
    out = tmp_path / "out"
    with caplog.at_level("DEBUG"):
        run(config(judge.base_url, data, out, api_key_env="COGUMI_TEST_JUDGE_KEY"))
    assert judge.authorizations == [f"Bearer {secret}"] * 2
    for path in out.iterdir():
        assert secret not in path.read_text(), path.name
    assert secret not in caplog.text
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["api_key_env"] == "COGUMI_TEST_JUDGE_KEY"


def test_empty_input_asks_nothing(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    # Nothing listens on this port: an empty input must not even connect.
    result = run(config("http://127.0.0.1:9/v1", empty, tmp_path / "out"))
    assert result.counts == {"in": 0, "kept": 0, "removed": 0, "unscored": 0, "rejected": 0}
    assert result.metrics["requests"] == 0
    assert json.loads((tmp_path / "out" / "report.json").read_text())["empty_input"] is True


def test_config_checks_name_the_field(tmp_path):
    data = write_rows(tmp_path / "t.jsonl", ROWS[:1])
    with pytest.raises(ConfigError, match=r"QualityConfig\.base_url"):
        QualityConfig(input=str(data), output_dir=str(tmp_path / "o"), model="m")
    with pytest.raises(ConfigError, match=r"QualityConfig\.min_score"):
        QualityConfig(input=str(data), output_dir=str(tmp_path / "o"), model="m", base_url="http://x/v1",
                      min_score=11)


@pytest.mark.parametrize("reply, expected", [
    ('{"accuracy": 3, "completeness": 2, "coherence": 2, "helpfulness": 3}', 10),
    ('Sure.\n```json\n{"Accuracy": "2", "Completeness": 1.5, "Coherence": 2, "Helpfulness": 2}\n```', 7.5),
    ("Accuracy: 3/3\nCompleteness: 2/2\nCoherence: 1\nHelpfulness - 2", 8),
    ('{"scores": {"accuracy": 1, "completeness": 1, "coherence": 1, "helpfulness": 1}, "total": 9}', 4),
])
def test_parse_scores_accepts_common_shapes(reply, expected):
    assert sum(parse_scores(reply).values()) == expected


@pytest.mark.parametrize("reply, error", [
    ("", "the reply is empty"),
    ("Great answer!", "no JSON object with rubric scores"),
    ('{"accuracy": 3, "completeness": 2, "coherence": 2}', "no 'helpfulness' score"),
    ('{"accuracy": true, "completeness": 2, "coherence": 2, "helpfulness": 3}', "accuracy: expected a number"),
    ('{"accuracy": 3, "completeness": -1, "coherence": 2, "helpfulness": 3}', "completeness: -1 is outside 0..2"),
])
def test_parse_scores_says_what_is_wrong(reply, error):
    with pytest.raises(ScoreError, match=re.escape(error)):
        parse_scores(reply)


# ----------------------------------------------------------------------------- end to end

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def llama_server(smollm2_gguf, tmp_path):
    """``python -m llama_cpp.server`` on SmolLM2-135M; yields (base URL, process)."""
    pytest.importorskip("llama_cpp.server")
    port = _free_port()
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(smollm2_gguf),
                                    "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048"],
                                   stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                pytest.fail(f"llama_cpp.server exited:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"llama_cpp.server did not start:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.2)
        yield url, process
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


JSON_SCHEMA = {"type": "object", "required": ["accuracy", "completeness", "coherence", "helpfulness"],
               "properties": {name: {"type": "integer", "minimum": 0, "maximum": top} for name, top in
                              (("accuracy", 3), ("completeness", 2), ("coherence", 2), ("helpfulness", 3))}}


def test_end_to_end_with_smollm2_on_llama_cpp_server(tmp_path, llama_server):
    """SmolLM2-135M is a weak judge: this checks the mechanics, not its judgement."""
    url, process = llama_server
    rows = [{"id": "paris", "instruction": "What is the capital of France?", "response": "Paris."},
            {"id": "haiku", "instruction": "Write a haiku about the sea.",
             "response": "Salt wind on my face\nwaves fold over the grey stones\nthe gulls cry, then leave"}]
    data = write_rows(tmp_path / "t.jsonl", rows)
    cache = tmp_path / "cache.jsonl"

    def judged(out: str, **kwargs):
        return run(QualityConfig(input=str(data), output_dir=str(tmp_path / out), model="smollm2", base_url=url,
                                 cache=str(cache), max_tokens=32, max_concurrency=1, progress=False, **kwargs))

    # Asked plainly, the small model answers the question instead of grading: unscored, not lost.
    plain = judged("plain")
    assert plain.counts["in"] == 2 and plain.metrics["requests"] == 2
    assert plain.counts["kept"] + plain.counts["removed"] + plain.counts["unscored"] == 2
    for record in read(tmp_path / "plain" / "unscored.jsonl"):
        assert record["error"] and record["row"]["id"] in {"paris", "haiku"}

    # With llama.cpp's JSON-schema grammar every reply parses.
    forced = judged("forced", extra_body={"response_format": {"type": "json_object", "schema": JSON_SCHEMA}})
    assert forced.metrics["requests"] == 2 and forced.counts["unscored"] == 0
    scored = read(tmp_path / "forced" / "kept.jsonl") + [r["row"] | {"metadata": {"quality_score": r["quality_score"]}}
                                                         for r in read(tmp_path / "forced" / "removed.jsonl")]
    assert sorted(r["id"] for r in scored) == ["haiku", "paris"]
    assert all(0 <= r["metadata"]["quality_score"] <= 10 for r in scored)
    assert len(read(cache)) == 4  # the plain and the forced replies: the settings differ

    # The server is gone: a rerun is served entirely from the cache.
    process.terminate()
    process.wait(timeout=15)
    again = judged("forced", extra_body={"response_format": {"type": "json_object", "schema": JSON_SCHEMA}})
    assert again.skipped  # same input and config: the manifest says it is done
    again = run(QualityConfig(input=str(data), output_dir=str(tmp_path / "forced"), model="smollm2", base_url=url,
                              cache=str(cache), max_tokens=32, progress=False, min_score=0.0,
                              extra_body={"response_format": {"type": "json_object", "schema": JSON_SCHEMA}}))
    assert again.metrics["requests"] == 0 and again.counts["kept"] == 2
