"""Reading JSONL: every malformed case fails with file:line and the field, or is skipped and counted."""

from __future__ import annotations

import json

import pytest

from cogumi.io import DataError, atomic_write, read_jsonl, sha256_path, to_messages, write_jsonl

GOOD = {"instruction": "Add 2 and 3.", "response": "5",
        "metadata": {"domain": "math", "difficulty": "easy", "source": "test", "quality_score": 8.2, "tokens": 3}}


def write_lines(path, lines):
    path.write_bytes(b"".join(line if isinstance(line, bytes) else (line + "\n").encode() for line in lines))
    return path


def test_reads_instruction_and_messages_rows(tmp_path):
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(GOOD), "", json.dumps(chat)])
    rows, report = read_jsonl(path, "sft")
    assert rows == [GOOD, chat]
    assert (report.records, report.rejected, report.blank_lines) == (2, 0, 1)


@pytest.mark.parametrize(
    ("line", "lineno", "field", "message"),
    [
        ('{"instruction": "x", "response": ', 2, None, "invalid JSON"),
        (json.dumps({"response": "5"}), 2, "instruction", "missing required field"),
        (json.dumps({"instruction": "x", "response": 5}), 2, "response", "expected string, got int"),
        (json.dumps({**GOOD, "metadata": {"difficulty": "trivial"}}), 2, "metadata.difficulty", "not one of"),
        (json.dumps({**GOOD, "metadata": {"tokens": "many"}}), 2, "metadata.tokens", "expected integer"),
        (json.dumps({**GOOD, "metadata": {"quality_score": True}}), 2, "metadata.quality_score", "got boolean"),
        (json.dumps(["not", "an", "object"]), 2, "<record>", "expected a JSON object"),
    ],
)
def test_malformed_line_names_file_line_and_field(tmp_path, line, lineno, field, message):
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps(GOOD), line])
    with pytest.raises(DataError) as info:
        read_jsonl(path, "instruction")
    error = info.value
    assert (error.line, error.field) == (lineno, field)
    assert str(error).startswith(f"{path}:{lineno}: ")
    assert message in str(error)


def test_non_utf8_line(tmp_path):
    path = write_lines(tmp_path / "latin1.jsonl", [json.dumps(GOOD), '{"instruction": "caf\xe9", "response": "x"}\n'.encode("latin-1")])
    with pytest.raises(DataError, match=r"latin1.jsonl:2: not valid UTF-8 \(byte 0xe9 at column 21\)"):
        read_jsonl(path, "instruction")


def test_messages_schema_checks_roles(tmp_path):
    bad = {"messages": [{"role": "wizard", "content": "hi"}]}
    path = write_lines(tmp_path / "chat.jsonl", [json.dumps(bad)])
    with pytest.raises(DataError, match=r"chat.jsonl:1: field 'messages\[0\].role': 'wizard' is not one of"):
        read_jsonl(path, "messages")


def test_sft_messages_need_an_assistant_turn(tmp_path):
    path = write_lines(tmp_path / "chat.jsonl", [json.dumps({"messages": [{"role": "user", "content": "hi"}]})])
    with pytest.raises(DataError, match="no assistant turn"):
        read_jsonl(path, "sft")


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_empty_file_is_an_error(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=r"empty.jsonl: file is empty \(no records\)"):
        read_jsonl(path)


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_skip_writes_rejected_lines_to_a_side_file_and_counts_them(tmp_path):
    lines = [json.dumps(GOOD), "{broken", json.dumps({"instruction": "x"}), b"\xff\xfe\n", json.dumps(GOOD)]
    path = write_lines(tmp_path / "mixed.jsonl", lines)
    rejects = tmp_path / "rejects.jsonl"
    rows, report = read_jsonl(path, "instruction", on_error="skip", rejects_path=rejects)
    assert len(rows) == 2
    assert (report.records, report.rejected, report.lines) == (2, 3, 5)
    side = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert [r["line"] for r in side] == [2, 3, 4]
    assert side[0]["raw"].strip() == "{broken"
    assert "field 'response': missing required field" in side[1]["error"]
    assert "not valid UTF-8" in side[2]["error"]


def test_skip_with_only_bad_lines_is_not_an_empty_file(tmp_path):
    path = write_lines(tmp_path / "allbad.jsonl", ["{", "["])
    rows, report = read_jsonl(path, on_error="skip")
    assert rows == [] and report.rejected == 2
    assert report.rejects_path and (tmp_path / "allbad.jsonl.rejected.jsonl").exists()


def test_to_messages():
    assert to_messages({"instruction": "Sum", "input": "1 2"}) == [{"role": "user", "content": "Sum\n\n1 2"}]
    assert to_messages({"prompt": "hi"}) == [{"role": "user", "content": "hi"}]
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    assert to_messages({"messages": chat}) == chat[:2]


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.jsonl"
    write_jsonl(target, [{"a": 1}])
    with pytest.raises(RuntimeError), atomic_write(target) as handle:
        handle.write("partial")
        raise RuntimeError("killed")
    assert target.read_text() == '{"a": 1}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_sha256_of_directory_depends_on_names_and_contents(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("one")
    first = sha256_path(tmp_path / "d")
    (tmp_path / "d" / "a.txt").write_text("two")
    assert sha256_path(tmp_path / "d") != first
    (tmp_path / "d" / "a.txt").write_text("one")
    assert sha256_path(tmp_path / "d") == first
    (tmp_path / "d" / "a.txt").rename(tmp_path / "d" / "b.txt")
    assert sha256_path(tmp_path / "d") != first
