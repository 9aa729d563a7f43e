"""The pairwise judge stage over real HTTP: scripted judge and reference servers on 127.0.0.1
whose ratings depend on the texts they are shown, and SmolLM2 behind llama.cpp's server."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from support import LocalJSONServer

from cogumi.evaluate.judge import (
    JUDGE_PROMPT_VERSION,
    JudgeConfig,
    JudgeRequestError,
    VerdictError,
    parse_verdict,
    run,
)
from cogumi.io import DataError
from cogumi.stage import ConfigError

CRITERIA = ("correctness", "completeness", "clarity", "conciseness")
SHOWN = re.compile(r"### Question\n(.*)\n\n### Response A\n(.*)\n### End of Response A\n\n"
                   r"### Response B\n(.*)\n### End of Response B$", re.S)


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def chat_reply(text: str, prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                         "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def shown(body: dict) -> tuple[str, str, str]:
    """(question, response A, response B) of a judge request."""
    return SHOWN.search(body["messages"][1]["content"]).groups()


def ratings_of(text: str) -> dict[str, int]:
    tag = re.search(r"\[(\d+)/(\d+)/(\d+)/(\d+)\]", text)
    if tag:
        values = [int(v) for v in tag.groups()]
    else:
        values = [9] * 4 if "GOOD" in text else [3] * 4 if "BAD" in text else [5] * 4
    return dict(zip(CRITERIA, values))


class PairJudge(LocalJSONServer):
    """A judge that rates what it is shown: a ``[c/c/c/c]`` tag gives the four ratings, "GOOD" 9,
    "BAD" 3. Questions steer it: BIASED rates A 8 and B 4 whatever they say; FLAKY replies with
    chatter, then an out-of-range rating, then a valid one; GARBAGE never rates; HALF never rates
    when the response shown as A contains ALPHA; FENCED wraps its JSON in chatter and a fence with
    "Response A" keys; FAIL answers HTTP 500 while ``fail`` is set. Usage: 1000 prompt tokens per
    turn of the conversation, 50 completion tokens per reply."""

    def __init__(self) -> None:
        self.fail = True
        self.authorizations: list[str] = []
        super().__init__()

    def respond(self, path: str, headers: dict[str, str], body: dict) -> tuple[int, dict]:
        self.authorizations.append(headers.get("authorization", ""))
        question, a, b = shown(body)
        turn = sum(1 for m in body["messages"] if m["role"] == "assistant")
        if "FAIL" in question and self.fail:
            return 500, {"error": {"message": "judge overloaded"}}
        ratings = {"A": ratings_of(a), "B": ratings_of(b)}
        if "BIASED" in question:
            ratings = {"A": dict.fromkeys(CRITERIA, 8), "B": dict.fromkeys(CRITERIA, 4)}
        text = json.dumps(ratings)
        if "GARBAGE" in question or ("HALF" in question and "ALPHA" in a):
            text = "Both responses are lovely."
        elif "FLAKY" in question and turn == 0:
            text = "Response A is better, I think."
        elif "FLAKY" in question and turn == 1:
            text = json.dumps({"A": {**ratings["A"], "correctness": 11}, "B": ratings["B"]})
        elif "FENCED" in question:
            text = ("Here is my verdict.\n```json\n"
                    + json.dumps({"Response A": {k.title(): v for k, v in ratings["A"].items()},
                                  "Response B": ratings["B"]}) + "\n```\nHope that helps.")
        return 200, chat_reply(text, 1000 * (turn + 1), 50)


class ReferenceModel(LocalJSONServer):
    """A reference model: answers a question with the text after ``->`` in it."""

    def respond(self, path: str, headers: dict[str, str], body: dict) -> tuple[int, dict]:
        question = body["messages"][-1]["content"]
        return 200, chat_reply(question.split("->", 1)[1].strip(), 20, 10)


@pytest.fixture
def servers():
    judge, reference = PairJudge(), ReferenceModel()
    yield judge, reference
    judge.close()
    reference.close()


#: id, category, question, candidate answer, reference answer (None: from the reference model),
#: whether the reference is inline in the prompt row (else in the reference-answers file).
EXAMPLES = [
    ("win", "math", "What is 1+1?", "GOOD: 2", "BAD: 3", True),
    ("loss", "math", "What is 2+2?", "BAD: 5", "GOOD: 4", False),
    ("tie-close", "code", "Reverse a list.", "xs[::-1] [7/7/7/7]", "reversed(xs) [7/7/7/6]", False),
    ("tie-margin", "code", "Sort a list.", "sorted(xs) [8/8/8/8]", "xs.sort() [8/8/7/7]", True),
    ("win-margin", "code", "FENCED: sum a list.", "sum(xs) [8/8/8/7]", "a loop [7/7/7/7]", False),
    ("biased", "reasoning", "BIASED: is 7 prime?", "Yes [9/9/9/9]", "No [2/2/2/2]", False),
    ("flaky", "reasoning", "FLAKY: is 9 prime?", "GOOD: no", "BAD: yes", False),
    ("garbage", "reasoning", "GARBAGE: is 11 prime?", "GOOD: yes", "BAD: no", False),
    ("half", "math", "HALF: what is 3*3?", "ALPHA 9 [6/6/6/6]", "9 [9/9/9/9]", True),
    ("gen1", "conversation", "Greet me -> BAD: go away", "GOOD: hello!", None, False),
    ("gen2", "conversation", "Say hi -> [6/6/6/6] hi", "[6/6/6/6] hi there", None, False),
]


def write_inputs(tmp_path: Path, changed: dict[str, str] | None = None) -> dict[str, Path]:
    prompts, answers, references = [], [], []
    for index, (ident, category, question, candidate, reference, inline) in enumerate(EXAMPLES):
        row = {"id": ident, "prompt": question, "category": category}
        if reference is not None and inline:
            row["reference"] = reference
        elif reference is not None:
            references.append({"id": ident, "output": reference})
        prompts.append(row)
        text = (changed or {}).get(ident, candidate)
        # the candidate's answers as `cogumi generate` writes them
        answers.append({"index": index, "id": ident, "prompt": [{"role": "user", "content": question}],
                        "completions": [{"text": text, "finish_reason": "stop", "prompt_tokens": 5,
                                         "completion_tokens": 3, "tokens": None, "token_logprobs": None}]})
    suffix = "-changed" if changed else ""
    return {"prompts": write_rows(tmp_path / "prompts.jsonl", prompts),
            "answers": write_rows(tmp_path / f"completions{suffix}.jsonl", answers),
            "references": write_rows(tmp_path / "references.jsonl", references)}


def make_config(files: dict[str, Path], out: Path, judge: PairJudge, reference: ReferenceModel | None,
                **kwargs) -> JudgeConfig:
    values = dict(prompts=str(files["prompts"]), answers=str(files["answers"]),
                  reference_answers=str(files["references"]), judge_model="judge-1",
                  judge_base_url=judge.base_url, output_dir=str(out), max_retries=0, progress=False,
                  price_input_per_mtok=2.0, price_output_per_mtok=8.0, reference_price_input_per_mtok=5.0,
                  reference_price_output_per_mtok=15.0)
    if reference is not None:
        values.update(reference_model="ref-1", reference_base_url=reference.base_url)
    values.update(kwargs)
    return JudgeConfig(**values)


def first_turns(judge: PairJudge, start: int = 0) -> list[tuple[str, str, str]]:
    return [shown(r["body"]) for r in judge.requests[start:] if len(r["body"]["messages"]) == 2]


def test_outcomes_orders_retries_and_usage(tmp_path, servers):
    judge, reference = servers
    files = write_inputs(tmp_path)
    out = tmp_path / "out"
    result = run(make_config(files, out, judge, reference))

    verdicts = {v["id"]: v for v in read(out / "verdicts.jsonl")}
    assert [v["id"] for v in read(out / "verdicts.jsonl")] == [e[0] for e in EXAMPLES]
    assert {i: v["outcome"] for i, v in verdicts.items()} == {
        "win": "win", "loss": "loss", "tie-close": "tie", "tie-margin": "tie", "win-margin": "win",
        "biased": "tie", "flaky": "win", "garbage": "invalid", "half": "loss", "gen1": "win", "gen2": "tie"}
    assert result.counts == {"total": 11, "wins": 4, "losses": 2, "ties": 4, "invalid": 1}
    assert result.metrics["overall_score"] == 60.0  # (4 + 0.5 * 4) / 10 * 100

    # averages over both orders; the margin is strict
    assert (verdicts["tie-close"]["candidate_avg"], verdicts["tie-close"]["reference_avg"]) == (7.0, 6.75)
    assert (verdicts["tie-margin"]["candidate_avg"], verdicts["tie-margin"]["reference_avg"]) == (8.0, 7.5)
    assert (verdicts["win-margin"]["candidate_avg"], verdicts["win-margin"]["reference_avg"]) == (7.75, 7.0)
    assert verdicts["win"]["orders"][1]["ratings"] == {"A": dict.fromkeys(CRITERIA, 3), "B": dict.fromkeys(CRITERIA, 9)}

    # every pair asked in both orders, the candidate first as A then as B
    asked = first_turns(judge)
    assert len(asked) == 2 * len(EXAMPLES)
    for ident, _, question, candidate, reference_text, _ in EXAMPLES:
        reference_text = reference_text or question.split("->", 1)[1].strip()
        pairs = sorted((a, b) for q, a, b in asked if q == question)
        assert pairs == sorted([(candidate, reference_text), (reference_text, candidate)]), ident

    # position bias: the biased prompt's two orders disagree, and A was preferred more often
    biased = verdicts["biased"]
    assert [o["outcome"] for o in biased["orders"]] == ["win", "loss"] and biased["disagreement"] is True
    assert (biased["candidate_avg"], biased["reference_avg"]) == (6.0, 6.0)
    assert [v["id"] for v in verdicts.values() if v["disagreement"]] == ["biased"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["order_disagreements"] == 1 and summary["pairs_with_both_orders_valid"] == 9
    assert summary["order_disagreement_rate"] == round(1 / 9, 4)
    assert (summary["position_a_preferred"], summary["position_b_preferred"]) == (8, 5)
    assert summary["position_a_preference"] == round(8 / 13, 4) == result.metrics["position_a_preference"]

    # format errors: answered with the problem, asked again, then valid ...
    flaky = [r["body"]["messages"] for r in judge.requests if shown(r["body"])[0].startswith("FLAKY")]
    assert sorted(len(m) for m in flaky) == [2, 2, 4, 4, 6, 6]
    third = next(m for m in flaky if len(m) == 6)
    assert third[2] == {"role": "assistant", "content": "Response A is better, I think."}
    assert "could not be used: the reply has no JSON object with ratings for both A and B" in third[3]["content"]
    assert "correctness of Response A: 11 is outside 1..10" in third[5]["content"]
    assert '"conciseness": n' in third[5]["content"]
    assert [o["attempts"] for o in verdicts["flaky"]["orders"]] == [3, 3]
    assert verdicts["flaky"]["orders_valid"] == 2
    # ... or still invalid after format_retries: excluded and counted
    garbage = verdicts["garbage"]
    assert garbage["orders_valid"] == 0 and garbage["candidate_avg"] is None
    assert [(o["valid"], o["attempts"], o["reply"]) for o in garbage["orders"]] == [
        (False, 3, "Both responses are lovely.")] * 2
    assert "no JSON object" in garbage["orders"][0]["error"]
    half = verdicts["half"]
    assert half["orders_valid"] == 1 and [o["valid"] for o in half["orders"]] == [False, True]
    assert (half["candidate_avg"], half["reference_avg"]) == (6.0, 9.0)
    assert summary["invalid"] == 1 and summary["invalid_orders"] == 3 and summary["judged"] == 10

    # per category
    by = summary["by_category"]
    assert {name: (c["wins"], c["losses"], c["ties"], c["invalid"], c["overall_score"]) for name, c in by.items()} == {
        "code": (1, 0, 2, 0, 66.67), "conversation": (1, 0, 1, 0, 75.0), "math": (1, 2, 0, 0, 33.33),
        "reasoning": (1, 0, 1, 1, 75.0)}

    # references: inline, from the file, and generated by the reference model
    assert verdicts["win"]["reference_source"] == "prompts"
    assert verdicts["loss"]["reference_source"] == "reference_answers"
    assert (verdicts["gen1"]["reference"], verdicts["gen1"]["reference_source"]) == ("BAD: go away", "reference_model")
    assert summary["reference_sources"] == {"prompts": 3, "reference_answers": 6, "reference_model": 2}

    # requests and tokens, from the servers' usage: 16 requests for the 8 plain pairs, 6 for FLAKY, 6 for
    # GARBAGE, 3 + 1 for HALF; prompt tokens 1000 per conversation turn
    assert len(judge.requests) == 32 and len(reference.requests) == 2
    usage = summary["usage"]
    assert usage["judge"] == {"requests": 32, "verdicts_cached": 0, "verdicts_new": 22,
                              "prompt_tokens": 16 * 1000 + 2 * 6000 + 2 * 6000 + 6000 + 1000,
                              "completion_tokens": 32 * 50, "cost_usd": 0.1068}
    assert usage["reference"] == {"requests": 2, "answers_cached": 0, "prompt_tokens": 40, "completion_tokens": 20,
                                  "cost_usd": 0.0005}
    assert usage["cost_usd"] == result.metrics["cost_usd"] == 0.1073  # 47000*2/1e6 + 1600*8/1e6 + 0.0005
    assert (result.metrics["judge_requests"], result.metrics["reference_requests"]) == (32, 2)
    assert (summary["judge"], summary["reference"], summary["prompt_version"]) == (
        "local:judge-1", "local:ref-1", JUDGE_PROMPT_VERSION)
    request = judge.requests[0]["body"]
    assert request["model"] == "judge-1" and request["temperature"] == 0.0 and request["max_tokens"] == 256
    for criterion in CRITERIA:
        assert criterion in request["messages"][1]["content"]


def test_caching_judges_only_what_changed(tmp_path, servers):
    judge, reference = servers
    files = write_inputs(tmp_path)
    out = tmp_path / "out"
    run(make_config(files, out, judge, reference))
    first = (out / "verdicts.jsonl").read_text()
    assert (len(judge.requests), len(reference.requests)) == (32, 2)

    # a rerun asks nothing: verdicts (the invalid ones too) and reference answers are cached
    result = run(make_config(files, out, judge, reference), force=True)
    assert (len(judge.requests), len(reference.requests)) == (32, 2)
    assert (result.metrics["judge_requests"], result.metrics["judge_cached"]) == (0, 22)
    assert (result.metrics["reference_requests"], result.metrics["reference_cached"]) == (0, 2)
    assert result.metrics["cost_usd"] == 0.0
    assert (out / "verdicts.jsonl").read_text() == first
    summary = json.loads((out / "summary.json").read_text())
    assert summary["usage"]["judge_cost_usd_without_cache"] == 0.1068

    # a retrained candidate with one answer changed: both orders of that pair, nothing else
    changed = write_inputs(tmp_path, changed={"gen1": "BAD: whatever"})
    result = run(make_config(changed, out, judge, reference))
    assert (len(judge.requests), len(reference.requests)) == (34, 2)
    assert sorted(first_turns(judge, 32)) == sorted([("Greet me -> BAD: go away", "BAD: whatever", "BAD: go away"),
                                                     ("Greet me -> BAD: go away", "BAD: go away", "BAD: whatever")])
    assert result.metrics["judge_requests"] == 2 and result.metrics["judge_cached"] == 20
    assert result.metrics["reference_requests"] == 0 and result.metrics["reference_cached"] == 2
    assert result.counts == {"total": 11, "wins": 3, "losses": 2, "ties": 5, "invalid": 1}

    # another output directory sharing the caches: nothing asked
    shared = dict(cache=str(out / "judge_cache.jsonl"), reference_cache=str(out / "reference_cache.jsonl"))
    result = run(make_config(changed, tmp_path / "other", judge, reference, **shared))
    assert (len(judge.requests), len(reference.requests)) == (34, 2)

    # more format retries resume the cached invalid conversations where they stopped
    result = run(make_config(changed, out, judge, reference, format_retries=3))
    new = judge.requests[34:]
    assert len(new) == 3 and all(len(r["body"]["messages"]) == 8 for r in new)
    assert result.counts["invalid"] == 1 and result.metrics["judge_cached"] == 19


def test_failed_requests_stop_the_stage_and_only_they_are_retried(tmp_path, servers):
    judge, _ = servers
    prompts = write_rows(tmp_path / "p.jsonl", [
        {"id": 1, "prompt": "Fine?", "reference": "BAD"}, {"id": 2, "prompt": "FAIL now?", "reference": "BAD"}])
    answers = write_rows(tmp_path / "a.jsonl", [{"id": 1, "output": "GOOD"}, {"id": 2, "output": "GOOD"}])
    config = JudgeConfig(prompts=str(prompts), answers=str(answers), judge_model="j", judge_base_url=judge.base_url,
                         output_dir=str(tmp_path / "out"), max_retries=0, progress=False)
    with pytest.raises(JudgeRequestError, match=r"2 of 4 judge conversations failed .*HTTP 500.*run again"):
        run(config)
    assert not (tmp_path / "out" / "manifest.json").exists() and not (tmp_path / "out" / "summary.json").exists()
    assert len(read(tmp_path / "out" / "judge_cache.jsonl")) == 2
    judge.fail = False
    result = run(config)
    assert len(judge.requests) == 6 and result.metrics["judge_requests"] == 2
    assert result.counts == {"total": 2, "wins": 2, "losses": 0, "ties": 0, "invalid": 0}


def test_ids_default_to_the_row_index_and_the_key_stays_secret(tmp_path, servers, monkeypatch):
    judge, _ = servers
    secret = "sk-test-judge-5f4e3d2c1b0a9988"
    monkeypatch.setenv("COGUMI_TEST_JUDGE_KEY", secret)
    prompts = write_rows(tmp_path / "p.jsonl", [{"instruction": "Add 1 and 2.", "reference": "BAD 4"}, "",
                                                {"messages": [{"role": "system", "content": "Be brief."},
                                                              {"role": "user", "content": "Add 2 and 2."}],
                                                 "reference": "GOOD four", "metadata": {"domain": "math"}}])
    answers = write_rows(tmp_path / "a.jsonl", [{"id": 1, "response": "GOOD 4"}, {"id": 0, "output": "GOOD 3"}])
    out = tmp_path / "out"
    run(JudgeConfig(prompts=str(prompts), answers=str(answers), judge_model="j", judge_base_url=judge.base_url,
                    judge_api_key_env="COGUMI_TEST_JUDGE_KEY", output_dir=str(out), max_retries=0,
                    progress=False))
    verdicts = read(out / "verdicts.jsonl")
    assert [(v["id"], v["category"], v["outcome"]) for v in verdicts] == [(0, "uncategorized", "win"),
                                                                          (1, "math", "tie")]
    assert verdicts[1]["prompt"] == "SYSTEM: Be brief.\n\nUSER: Add 2 and 2."
    assert judge.authorizations == [f"Bearer {secret}"] * 4
    for path in out.iterdir():
        assert secret not in path.read_text(), path.name


def test_bad_input_names_file_line_and_ids(tmp_path, servers):
    judge, _ = servers
    files = write_inputs(tmp_path)

    def attempt(**kwargs):
        return run(make_config(files, tmp_path / "out", judge, None, **kwargs))

    rows = read(files["answers"])
    missing = write_rows(tmp_path / "missing.jsonl", [r for r in rows if r["id"] not in ("loss", "half")])
    with pytest.raises(DataError) as info:
        attempt(answers=str(missing))
    message = str(info.value)
    assert message.startswith(f"{missing}: field 'id': no answer for 2 prompt id(s)")
    assert f"'loss' ({files['prompts']}:2)" in message and f"'half' ({files['prompts']}:9)" in message

    duplicate = write_rows(tmp_path / "duplicate.jsonl", [*rows[:3], {"id": "win", "output": "again"}])
    with pytest.raises(DataError, match=re.escape(f"{duplicate}:4: field 'id': duplicate id 'win' (first on line 1)")):
        attempt(answers=str(duplicate))
    no_id = write_rows(tmp_path / "no_id.jsonl", [rows[0], {"output": "x"}])
    with pytest.raises(DataError, match=re.escape(f"{no_id}:2: field 'id': missing required field")):
        attempt(answers=str(no_id))
    no_text = write_rows(tmp_path / "no_text.jsonl", [rows[0], "", {"id": "loss", "answer": "x"}])
    with pytest.raises(DataError, match=re.escape(f"{no_text}:3: field 'output': missing")):
        attempt(answers=str(no_text))
    bad_prompt = write_rows(tmp_path / "bad_prompt.jsonl", [{"id": "a", "prompt": "q"}, {"id": "b", "prompt": 3}])
    with pytest.raises(DataError, match=re.escape(f"{bad_prompt}:2: field 'prompt': expected string")):
        attempt(prompts=str(bad_prompt))

    # prompts with no reference answer and no reference model to ask
    with pytest.raises(ConfigError, match=r"JudgeConfig\.reference_model: 2 prompt\(s\) have no reference answer "
                                          r"\('gen1' .*:10\), 'gen2'"):
        attempt()
    assert judge.requests == []


def test_config_checks_name_the_field(tmp_path):
    files = {"prompts": "p.jsonl", "answers": "a.jsonl"}
    with pytest.raises(ConfigError, match=r"JudgeConfig\.judge_base_url"):
        JudgeConfig(**files, judge_model="j", output_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"JudgeConfig\.reference_base_url"):
        JudgeConfig(**files, judge_model="j", judge_base_url="http://x/v1", reference_model="r",
                    output_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"JudgeConfig\.margin"):
        JudgeConfig(**files, judge_model="j", judge_base_url="http://x/v1", margin=-1.0, output_dir=str(tmp_path))


@pytest.mark.parametrize("reply", [
    '{"A": {"correctness": 8, "completeness": 7, "clarity": 6, "conciseness": 5}, '
    '"B": {"correctness": 1, "completeness": 2, "clarity": 3, "conciseness": 4}}',
    'Sure!\n```json\n{"Response A": {"Correctness": "8", "Completeness": 7.0, "Clarity": "6/10", "Conciseness": 5},'
    ' "response_b": {"accuracy": 1, "completeness": 2, "clarity": 3, "conciseness": 4}}\n```\nDone.',
    '{"ratings": {"a": {"correctness": 8, "completeness": 7, "clarity": 6, "conciseness": 5}, '
    '"b": {"correctness": 1, "completeness": 2, "clarity": 3, "conciseness": 4}}, "winner": "A"}',
])
def test_parse_verdict_accepts_common_shapes(reply):
    assert parse_verdict(reply) == {"A": {"correctness": 8, "completeness": 7, "clarity": 6, "conciseness": 5},
                                    "B": {"correctness": 1, "completeness": 2, "clarity": 3, "conciseness": 4}}


@pytest.mark.parametrize("reply, error", [
    ("", "the reply is empty"),
    ("A is better.", "no JSON object with ratings for both A and B"),
    ('{"A": {"correctness": 8}, "B": 4}', "Response A has no 'completeness', 'clarity', 'conciseness' rating"),
    ('{"A": 9, "B": 4}', "Response A: expected an object with the four criteria, got 9"),
    ('{"A": {"correctness": 0, "completeness": 1, "clarity": 1, "conciseness": 1}, "B": {}}',
     "correctness of Response A: 0 is outside 1..10"),
    ('{"A": {"correctness": 7.5, "completeness": 1, "clarity": 1, "conciseness": 1}, "B": {}}',
     "correctness of Response A: 7.5 is not a whole number"),
    ('{"A": {"correctness": 5, "completeness": 1, "clarity": 1, "conciseness": true}, "B": {}}',
     "conciseness of Response A: expected a whole number from 1 to 10, got true"),
])
def test_parse_verdict_says_what_is_wrong(reply, error):
    with pytest.raises(VerdictError, match=re.escape(error)):
        parse_verdict(reply)


# ----------------------------------------------------------------------------- a real judge

#: llama.cpp's server otherwise adds top-k 40, min-p 0.05 and a 1.1 repeat penalty
PLAIN_SAMPLING = {"top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0}
VERDICT_SCHEMA = {"type": "object", "required": ["A", "B"], "properties": {
    side: {"type": "object", "required": list(CRITERIA),
           "properties": {c: {"type": "integer", "minimum": 1, "maximum": 10} for c in CRITERIA}}
    for side in ("A", "B")}}


def test_end_to_end_with_smollm2_as_judge(tmp_path, llama_server):
    """SmolLM2-135M is a weak judge: this checks the mechanics, whatever it replies."""
    prompts = write_rows(tmp_path / "p.jsonl", [
        {"id": "capital", "prompt": "What is the capital of France?", "category": "knowledge",
         "reference": "The capital of France is Paris."},
        {"id": "sum", "prompt": "What is 2 + 3?", "category": "math", "reference": "2 + 3 = 5."}])
    answers = write_rows(tmp_path / "a.jsonl", [{"id": "capital", "output": "Paris."}, {"id": "sum", "output": "6"}])

    def judged(out: str, base_url: str = llama_server, **kwargs):
        return run(JudgeConfig(prompts=str(prompts), answers=str(answers), judge_model="smollm2",
                               judge_base_url=base_url, output_dir=str(tmp_path / out), max_concurrency=1,
                               max_retries=0, progress=False, **kwargs), force=True)

    # Asked plainly, the small model mostly answers the question or echoes the responses instead of
    # rating them: each such reply is answered with the problem (once), then recorded as invalid.
    plain = judged("plain", max_tokens=24, format_retries=1, extra_body=PLAIN_SAMPLING)
    verdicts = read(tmp_path / "plain" / "verdicts.jsonl")
    assert sum(plain.counts[k] for k in ("wins", "losses", "ties", "invalid")) == plain.counts["total"] == 2
    attempts = [o["attempts"] for v in verdicts for o in v["orders"]]
    assert len(attempts) == 4 and all(a in (1, 2) for a in attempts)
    assert plain.metrics["judge_requests"] == sum(attempts)  # 2 orders x 2 pairs x (1 + retries used)
    for v in verdicts:
        assert v["outcome"] in ("win", "loss", "tie", "invalid")
        for order in v["orders"]:
            assert order["valid"] == (order["error"] is None) and order["reply"] is not None

    # With llama.cpp's JSON-schema grammar every reply parses on the first attempt. (SmolLM2 then
    # rates whichever response comes second one point higher, whatever it says: a pure position
    # bias that judging both orders turns into ties flagged as disagreements.)
    forced = dict(max_tokens=80, extra_body={**PLAIN_SAMPLING, "response_format": {
        "type": "json_object", "schema": VERDICT_SCHEMA}})
    result = judged("forced", **forced)
    assert result.counts["invalid"] == 0 and result.metrics["judge_requests"] == 4
    assert result.counts["wins"] + result.counts["losses"] + result.counts["ties"] == 2
    assert 0 <= result.metrics["overall_score"] <= 100
    summary = json.loads((tmp_path / "forced" / "summary.json").read_text())
    verdicts = read(tmp_path / "forced" / "verdicts.jsonl")
    assert summary["order_disagreements"] == sum(v["disagreement"] for v in verdicts)
    assert all(v["orders_valid"] == 2 and 1 <= v["candidate_avg"] <= 10 for v in verdicts)
    assert summary["usage"]["judge"]["prompt_tokens"] > 4 * 200 and summary["usage"]["judge"]["completion_tokens"] > 0

    # A rerun is served from the cache: pointed at a port nobody listens on, it still finishes.
    again = judged("forced", base_url="http://127.0.0.1:9/v1", **forced)
    assert again.metrics["judge_requests"] == 0 and again.metrics["judge_cached"] == 4
    assert again.counts == result.counts
