"""The dedup stage: what is removed and kept, the side files, bad input, resume, CLI, Ray."""

from __future__ import annotations

import json
import random
import typing

import pytest
from datasketch import MinHashLSH
from support import edit, words

from cogumi.cli import main as cli
from cogumi.data.dedup import DedupConfig
from cogumi.data.dedup import run as dedup
from cogumi.io import DataError
from cogumi.stage import ConfigError, read_manifest


def row(instruction: str, response: str, **extra) -> dict:
    return {"instruction": instruction, "response": response, **extra}


def write(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def corpus(tmp_path):
    """Ten unrelated rows; row 3 is copied exactly (line 11) and row 5 nearly (line 12)."""
    rng = random.Random(0)
    rows = [row(f"Question {i}: " + words(rng, 8), words(rng, 120), id=f"r{i}") for i in range(10)]
    rows.append({**rows[3], "id": "copy-of-r3"})
    rows.append(row(rows[5]["instruction"], edit(rng, rows[5]["response"], 2), id="near-r5"))
    return tmp_path / "data.jsonl", rows


def config(path, out, **kw) -> DedupConfig:
    return DedupConfig(input=str(path), output_dir=str(out), workers=1, progress=False, **kw)


def test_exact_and_near_duplicates_are_removed_in_order(tmp_path, corpus):
    path, rows = corpus
    write(path, rows)
    result = dedup(config(path, tmp_path / "out"))
    assert result.counts == {"in": 12, "kept": 10, "removed": 2, "rejected": 0}
    out = tmp_path / "out"
    kept_lines = (out / "kept.jsonl").read_text().splitlines()
    assert kept_lines == path.read_text().splitlines()[:10]  # verbatim, in input order
    dups = read(out / "dups.jsonl")
    assert [(d["line"], d["id"], d["duplicate_of_line"], d["duplicate_of_id"]) for d in dups] == [
        (11, "copy-of-r3", 4, "r3"), (12, "near-r5", 6, "r5")]
    assert dups[0]["jaccard"] == 1.0 and 0.8 <= dups[1]["jaccard"] < 1.0
    assert dups[1]["matched_line"] == 6 and dups[1]["matched_jaccard"] == dups[1]["jaccard"]
    assert dups[1]["row"] == rows[11]
    report = json.loads((out / "report.json").read_text())
    assert report["in"] == report["kept"] + report["removed"] == 12
    assert report["clusters"] == 2 and report["largest_cluster"] == 2
    assert report["lsh"] == {"bands": 12, "rows": 10, "threshold": 0.8, "num_perm": 128}
    assert report["duplicate_pairs"] == 2 and report["docs_per_s"] > 0 and report["time_s"] > 0
    assert (out / "rejected.jsonl").read_text() == ""


def test_a_stricter_threshold_keeps_the_near_duplicate(tmp_path, corpus):
    path, rows = corpus
    write(path, rows)
    result = dedup(config(path, tmp_path / "out", threshold=0.999))
    assert result.counts["removed"] == 1
    assert [d["id"] for d in read(tmp_path / "out" / "dups.jsonl")] == ["copy-of-r3"]


@pytest.mark.parametrize(("keep", "kept_id"), [("first", "a"), ("longest", "c"), ("best-quality", "b")])
def test_keep_policies_choose_the_representative(tmp_path, keep, kept_id):
    rng = random.Random(1)
    text = words(rng, 150)
    rows = [
        row("q", text, id="a", metadata={"quality_score": 6}),
        row("q", text, id="b", metadata={"quality_score": 9}),
        row("q", text + " and more", id="c"),  # longest; no score: ranks last for best-quality
        row("q", text, id="d", metadata={"quality_score": 9}),  # ties with b, comes later
        row("other", words(rng, 150), id="e"),
    ]
    path = write(tmp_path / "d.jsonl", rows)
    dedup(config(path, tmp_path / "out", keep=keep))
    kept = [r["id"] for r in read(tmp_path / "out" / "kept.jsonl")]
    assert kept == sorted([kept_id, "e"])
    assert {d["duplicate_of_id"] for d in read(tmp_path / "out" / "dups.jsonl")} == {kept_id}


def test_chained_cluster_points_to_its_kept_row_and_names_the_matched_one(tmp_path):
    rng = random.Random(2)
    a = words(rng, 300)
    b = edit(rng, a, 12)
    c = edit(rng, b, 12)  # a ~ b ~ c, while a and c are further apart
    path = write(tmp_path / "d.jsonl", [row("", a, id="a"), row("", b, id="b"), row("", c, id="c")])
    dedup(config(path, tmp_path / "out", threshold=0.7))
    dups = {d["id"]: d for d in read(tmp_path / "out" / "dups.jsonl")}
    assert set(dups) == {"b", "c"} and {d["duplicate_of_id"] for d in dups.values()} == {"a"}
    assert dups["c"]["matched_line"] == 2 and dups["c"]["matched_jaccard"] >= 0.7
    assert dups["c"]["jaccard"] < dups["c"]["matched_jaccard"]


def test_empty_input_gives_empty_outputs_and_a_report(tmp_path):
    for name, content in (("empty", ""), ("blank", "\n  \n")):
        path = tmp_path / f"{name}.jsonl"
        path.write_text(content)
        out = tmp_path / f"out-{name}"
        result = dedup(config(path, out))
        assert result.counts == {"in": 0, "kept": 0, "removed": 0, "rejected": 0}
        assert (out / "kept.jsonl").read_text() == "" and (out / "dups.jsonl").read_text() == ""
        report = json.loads((out / "report.json").read_text())
        assert report["clusters"] == 0 and report["largest_cluster"] == 0
        assert read_manifest(out)["counts"]["in"] == 0


def test_rows_with_empty_text_are_reported_not_clustered(tmp_path, corpus):
    path, rows = corpus
    empties = [row("", "", id="e1"), row("  ", "\n", id="e2"), {"id": "e3", "prompt": "no dedup fields"}]
    write(path, rows[:4] + empties)
    result = dedup(config(path, tmp_path / "out"))
    assert result.counts == {"in": 7, "kept": 7, "removed": 0, "rejected": 0}
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["empty_text"] == 3 and report["empty_text_lines"] == [5, 6, 7]
    assert report["clusters"] == 0


def test_malformed_lines_raise_with_file_and_line_or_go_to_rejected(tmp_path, corpus):
    path, rows = corpus
    lines = [rows[0], "{not json", rows[1], "", row("q", 5, id="bad-type"), rows[3], rows[3]]
    write(path, lines)
    with pytest.raises(DataError, match=r"data\.jsonl:2: invalid JSON"):
        dedup(config(path, tmp_path / "out"))
    write(path, [lines[0], lines[4]])
    with pytest.raises(DataError, match=r"data\.jsonl:2: field 'response': expected a string"):
        dedup(config(path, tmp_path / "out"))

    write(path, lines)
    result = dedup(config(path, tmp_path / "out", on_error="skip"))
    assert result.counts == {"in": 6, "kept": 3, "removed": 1, "rejected": 2}
    rejected = read(tmp_path / "out" / "rejected.jsonl")
    assert [r["line"] for r in rejected] == [2, 5]
    assert rejected[0]["raw"] == "{not json\n" and json.loads(rejected[1]["raw"])["id"] == "bad-type"
    assert "field 'response'" in rejected[1]["error"]
    # line numbers count the blank and rejected lines
    assert [(d["line"], d["duplicate_of_line"]) for d in read(tmp_path / "out" / "dups.jsonl")] == [(7, 6)]


def test_fields_reach_into_objects_and_chat_messages(tmp_path):
    rng = random.Random(3)
    text = words(rng, 100)
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": text}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": text}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": words(rng, 100)}]},
        {"meta": {"title": text}},
    ]
    path = write(tmp_path / "chat.jsonl", rows)
    assert dedup(config(path, tmp_path / "o1", fields=["messages"])).counts["removed"] == 1
    result = dedup(config(path, tmp_path / "o2", fields=["meta.title", "nothing"]))
    assert result.metrics["empty_text"] == 3


def test_word_mode_and_datasketch_hashes_run_as_a_stage(tmp_path, corpus):
    path, rows = corpus
    write(path, rows)
    for i, overrides in enumerate(({"mode": "word", "ngram": 2}, {"hash_family": "datasketch"},
                                   {"hash_family": "datasketch-legacy", "num_perm": 64})):
        result = dedup(config(path, tmp_path / f"o{i}", **overrides))
        assert result.counts["removed"] == 2, overrides


def test_config_is_checked_and_bands_follow_datasketch(tmp_path):
    from cogumi.data import dedup as module
    from cogumi.data import minhash

    assert typing.get_args(module.Mode) == minhash.MODES
    assert typing.get_args(module.HashFamily) == minhash.HASH_FAMILIES
    for overrides, field in (({"threshold": 0.0}, "threshold"), ({"num_perm": 0}, "num_perm"),
                             ({"bands": 20, "rows": 10}, "bands"), ({"fields": []}, "fields"),
                             ({"false_negative_weight": 1.5}, "false_negative_weight")):
        with pytest.raises(ConfigError, match=rf"DedupConfig\.{field}:"):
            DedupConfig(input="x", output_dir="o", **overrides)
    with pytest.raises(ConfigError, match="looks like a file"):
        DedupConfig(input="x", output_dir="deduped.jsonl")
    for threshold in (0.5, 0.8, 0.9):
        lsh = MinHashLSH(threshold=threshold, num_perm=128)
        assert DedupConfig(input="x", output_dir="o", threshold=threshold,
                           false_negative_weight=0.5).lsh_params() == (lsh.b, lsh.r)
    weighted = MinHashLSH(threshold=0.8, num_perm=128, weights=(0.2, 0.8))
    assert DedupConfig(input="x", output_dir="o").lsh_params() == (weighted.b, weighted.r) == (12, 10)
    assert DedupConfig(input="x", output_dir="o", bands=16).lsh_params() == (16, 8)


def test_unchanged_run_is_skipped_and_worker_count_does_not_matter(tmp_path, corpus):
    path, rows = corpus
    write(path, rows)
    assert not dedup(config(path, tmp_path / "out")).skipped
    again = dedup(DedupConfig(input=str(path), output_dir=str(tmp_path / "out"), workers=2, progress=False))
    assert again.skipped and again.counts["removed"] == 2
    assert not dedup(config(path, tmp_path / "out", threshold=0.9)).skipped


def test_cli_runs_the_stage(tmp_path, corpus, capsys):
    path, rows = corpus
    write(path, rows)
    out = tmp_path / "deduped"
    assert cli(["dedup", str(path), "-o", str(out), "--workers", "1", "--no-progress", "--keep", "longest"]) == 0
    printed = capsys.readouterr().out
    assert "dedup: done" in printed and "removed: 2" in printed
    assert len((out / "kept.jsonl").read_text().splitlines()) == 10
    assert cli(["dedup", str(path), "-o", str(tmp_path / "x.jsonl")]) == 2
    assert "looks like a file" in capsys.readouterr().err


def _larger_corpus(tmp_path, n=400):
    rng = random.Random(7)
    rows = []
    for i in range(n):
        if i % 5 == 4:
            source = rows[rng.randrange(len(rows))]
            rows.append(row(source["instruction"], edit(rng, source["response"], rng.randint(0, 6)), id=i))
        else:
            rows.append(row(words(rng, 6), words(rng, 80), id=i))
    return write(tmp_path / "big.jsonl", rows)


@pytest.mark.slow
def test_two_worker_processes_give_identical_output(tmp_path):
    path = _larger_corpus(tmp_path)
    one = dedup(config(path, tmp_path / "one"))
    two = dedup(DedupConfig(input=path, output_dir=str(tmp_path / "two"), workers=2, progress=False))
    assert one.counts == two.counts and one.counts["removed"] > 50
    for name in ("kept.jsonl", "dups.jsonl"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


@pytest.mark.slow
def test_ray_backend_matches_the_local_backend(tmp_path):
    ray = pytest.importorskip("ray", reason="needs the ray extra")
    path = _larger_corpus(tmp_path)
    local = dedup(config(path, tmp_path / "local"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        on_ray = dedup(DedupConfig(input=path, output_dir=str(tmp_path / "ray"), backend="ray", workers=2,
                                   progress=False))
    finally:
        ray.shutdown()
    assert on_ray.counts == local.counts and local.counts["removed"] > 50
    for name in ("kept.jsonl", "dups.jsonl", "rejected.jsonl"):
        assert (tmp_path / "local" / name).read_bytes() == (tmp_path / "ray" / name).read_bytes()
    assert json.loads((tmp_path / "ray" / "report.json").read_text())["backend"] == "ray"
