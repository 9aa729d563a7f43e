"""Dataset statistics: counts by domain and difficulty, token lengths by the real SmolLM2
tokenizer, English purity by py3langid, the printed table and the bar plot."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from cogumi.cli import main
from cogumi.data.stats import StatsConfig, load_stats, run
from cogumi.io import DataError, record_text


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def meta(domain=None, difficulty=None, **extra) -> dict:
    values = {"domain": domain, "difficulty": difficulty, **extra}
    return {k: v for k, v in values.items() if v is not None}


ROWS = [
    {"instruction": "Write a Python function that reverses a string.",
     "response": "Slicing with a negative step reverses it:\n\n```python\ndef reverse(s):\n    return s[::-1]\n```",
     "metadata": meta("code", "easy", quality_score=9)},
    {"instruction": "def add(a, b):", "response": "def add(a, b):\n    return a + b\n",
     "metadata": meta("code", "easy", quality_score=7)},
    {"instruction": "Natalia sold clips to 48 of her friends in April and half as many in May. How many in all?",
     "response": "In May she sold 24 clips, so altogether she sold 48 + 24 = 72 clips.",
     "metadata": meta("math", "medium", quality_score=8)},
    {"instruction": "Explique pourquoi le ciel est bleu pendant la journée.",
     "response": "Le ciel paraît bleu parce que les molécules de l'atmosphère diffusent la lumière bleue.",
     "metadata": meta("science", "hard")},
    {"instruction": "Explain why the sky appears blue during the day.",
     "response": "Molecules in the air scatter blue light much more strongly than red light.",
     "metadata": meta("science", "medium")},
    {"instruction": "explain why the sky appears  blue during the day.",
     "response": "Molecules in the air scatter blue light much more strongly than red light."},
]


def test_stats_report_counts_tokens_language_and_table(tmp_path, smollm2_dir, capsys):
    from transformers import AutoTokenizer

    data = write_rows(tmp_path / "t.jsonl", ROWS)
    out = tmp_path / "out"
    result = run(StatsConfig(input=str(data), output_dir=str(out), progress=False))
    stats = load_stats(out)

    assert stats["total"] == 6 and result.counts == {"rows": 6, "rejected": 0}
    assert stats["by_domain"]["code"] == {"count": 2, "percent": 33.33}
    assert stats["by_domain"]["science"] == {"count": 2, "percent": 33.33}
    assert stats["by_domain"]["creative"] == {"count": 0, "percent": 0.0}
    assert stats["by_domain"]["unknown"] == {"count": 1, "percent": 16.67}
    assert {k: v["count"] for k, v in stats["by_difficulty"].items()} == {"easy": 2, "medium": 2, "hard": 1,
                                                                           "unknown": 1}
    assert stats["unique"] == {"count": 5, "duplicates": 1, "percent": 83.33}
    assert stats["quality"] == {"scored": 3, "mean": 8.0}

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    lengths = [len(tokenizer(record_text(r), add_special_tokens=False)["input_ids"]) for r in ROWS]
    tokens = stats["tokens"]["distribution"]
    assert tokens["mean"] == round(float(np.mean(lengths)), 2)
    assert tokens["median"] == float(np.median(lengths))
    assert tokens["p95"] == pytest.approx(float(np.percentile(lengths, 95)), abs=0.01)
    assert (tokens["min"], tokens["max"]) == (min(lengths), max(lengths))

    lang = stats["language"]
    assert (lang["english"], lang["non_english"], lang["undetermined"]) == (4, 1, 1)
    assert lang["english_share"] == 80.0 and lang["non_english_languages"] == {"fr": 1}
    assert result.metrics["english_share"] == 80.0

    table = (out / "stats.md").read_text()
    assert "| **Total Examples**" in table and "| 6 |" in table
    assert re.search(r"\| \*\*Code Examples\*\* +\| 2 \(33\.33%\) \|", table)
    assert "83.33% (exact; 1 duplicate)" in table
    assert "**English Purity**" in table and "80% (4 of 5 rows with prose; 1 code-only)" in table
    assert table in capsys.readouterr().out

    png = (out / "stats.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread

    height, width = imread(str(out / "stats.png")).shape[:2]
    assert (width, height) == (1100, 400)


def test_empty_input_gives_a_report(tmp_path):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    result = run(StatsConfig(input=str(data), output_dir=str(tmp_path / "o"), progress=False, print_table=False))
    stats = load_stats(tmp_path / "o")
    assert result.counts == {"rows": 0, "rejected": 0}
    assert stats["tokens"]["distribution"]["mean"] is None and stats["language"]["english_share"] is None
    assert all(v["count"] == 0 and v["percent"] is None for v in stats["by_domain"].values())
    assert "| **Total Examples**" in (tmp_path / "o" / "stats.md").read_text()
    assert (tmp_path / "o" / "stats.png").stat().st_size > 0


def test_malformed_rows_skip_or_raise(tmp_path):
    data = write_rows(tmp_path / "t.jsonl", [ROWS[0], '{"instruction": "x"}', "nope", ROWS[2]])
    result = run(StatsConfig(input=str(data), output_dir=str(tmp_path / "o"), on_error="skip", tokens=False,
                             language=False, plot=False, progress=False, print_table=False))
    assert result.counts == {"rows": 2, "rejected": 2}
    rejected = [json.loads(x) for x in (tmp_path / "o" / "rejected.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rejected] == [2, 3]
    stats = load_stats(tmp_path / "o")
    assert stats["tokens"] is None and stats["language"] is None and not (tmp_path / "o" / "stats.png").exists()
    table = (tmp_path / "o" / "stats.md").read_text()
    assert "English Purity" not in table and "Average Tokens" not in table
    with pytest.raises(DataError, match=r"t\.jsonl:2: field 'response': missing required field"):
        run(StatsConfig(input=str(data), output_dir=str(tmp_path / "r"), tokens=False, progress=False))


def test_stats_from_the_cli(tmp_path, capsys):
    data = write_rows(tmp_path / "t.jsonl", ROWS[:3])
    assert main(["stats", str(data), "-o", str(tmp_path / "o"), "--no-progress", "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "| **Math Examples**" in out and "rows: 3" in out and "english_share: 100.0" in out
