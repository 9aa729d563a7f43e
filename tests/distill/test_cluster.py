"""Failure clustering with the real all-MiniLM-L6-v2 embeddings (shipped offline) and KMeans."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from cogumi.stage import StageError, run_stage

TOPICS = {
    "code": ["Write a Python function that sorts a list of {x} in descending order.",
             "Implement merge sort in Python for a list of {x}.",
             "Write a Python function to sort the {x} by length with a key function.",
             "Write a Python function that sorts {x} without using sorted()."],
    "math": ["A farmer has {n} cows and buys {m} more. How many cows does he have?",
             "Sara has {n} dollars and spends {m}. How much money is left?",
             "Tom reads {n} pages a day for {m} days. How many pages does he read?",
             "A train travels {n} miles per hour for {m} hours. How far does it go?"],
    "geography": ["What is the capital of {c}?", "Which continent is {c} in?",
                  "Name the longest river in {c}.", "What language is spoken in {c}?"],
    "cooking": ["How long should I bake {f} in the oven?", "Give me a recipe for {f} with garlic.",
                "What spices go well with {f}?", "How do I grill {f} without burning it?"],
}
FILL = {"x": ["strings", "integers", "tuples", "names", "floats"], "n": [str(i) for i in range(3, 60)],
        "m": [str(i) for i in range(2, 30)], "c": ["France", "Peru", "Kenya", "Japan", "Canada", "Egypt"],
        "f": ["salmon", "chicken", "potatoes", "bread", "tofu"]}


def failures_file(path: Path) -> Path:
    rng = random.Random(0)
    rows = []
    for topic, templates in TOPICS.items():
        for i in range(10):
            text = templates[i % 4].format(**{k: rng.choice(v) for k, v in FILL.items()})
            rows.append({"instruction": f"{text} (case {i})", "response": "the better answer",
                         "metadata": {"category": topic, "verdict": "loss"}})
    rng.shuffle(rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cluster(tmp_path: Path, source: Path, name: str, **extra):
    out = tmp_path / name
    result = run_stage("cluster-failures", {"input": str(source), "k_min": 3, "k_max": 6, "output_dir": str(out),
                                            "progress": False, **extra})
    return result, out


def test_topics_become_clusters_deterministically(tmp_path):
    source = failures_file(tmp_path / "failures.jsonl")
    result, out = cluster(tmp_path, source, "a")
    report = json.loads((out / "report.json").read_text())
    rows = [json.loads(line) for line in (out / "clusters.jsonl").read_text().splitlines()]
    # k is the best silhouette of the range tried, and no cluster mixes topics
    assert set(report["silhouette"]) == {"3", "4", "5", "6"}
    assert str(report["k"]) == max(report["silhouette"], key=lambda k: report["silhouette"][k])
    assert result.counts["clusters"] == report["k"] and report["k"] >= 4
    by_cluster: dict[int, set] = {}
    for row in rows:
        by_cluster.setdefault(row["cluster"], set()).add(row["metadata"]["category"])
    assert all(len(topics) == 1 for topics in by_cluster.values())
    for entry in report["clusters"]:
        members = {i for i, r in enumerate(rows) if r["cluster"] == entry["cluster"]}
        assert all(central["index"] in members for central in entry["central"])
        assert len(entry["central"]) == min(3, entry["size"]) and len(entry["categories"]) == 1
    assert (out / "clusters.png").read_bytes()[:4] == b"\x89PNG" and "| cluster |" in (out / "report.md").read_text()
    # Same input and seed: identical outputs.
    _, again = cluster(tmp_path, source, "b")
    for name in ("clusters.jsonl", "report.md"):
        assert (again / name).read_text() == (out / name).read_text()
    assert json.loads((again / "report.json").read_text())["clusters"] == report["clusters"]


def test_four_clusters_are_the_four_topics(tmp_path):
    _, out = cluster(tmp_path, failures_file(tmp_path / "failures.jsonl"), "four", k_min=4, k_max=4)
    report = json.loads((out / "report.json").read_text())
    topics = {next(iter(c["categories"])): c for c in report["clusters"]}
    assert sorted(c["size"] for c in report["clusters"]) == [10, 10, 10, 10] and set(topics) == set(TOPICS)
    assert "python" in topics["code"]["top_terms"] and "capital" in topics["geography"]["top_terms"]
    assert {"recipe", "garlic", "bake", "oven"} & set(topics["cooking"]["top_terms"])


def test_too_few_prompts_is_a_clear_error(tmp_path):
    source = tmp_path / "two.jsonl"
    source.write_text("".join(json.dumps({"instruction": t, "response": "x"}) + "\n" for t in ("a b c", "d e f", "a b c")))
    with pytest.raises(StageError, match="2 distinct prompts; clustering needs at least 3"):
        cluster(tmp_path, source, "c")
