"""The rule-based filters: length (real SmolLM2 tokenizer), language (real py3langid), format
and exact duplicates; every line accounted for, empty and malformed input handled."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cogumi.cli import main
from cogumi.data.filters import (
    ExactDedupConfig,
    FormatFilterConfig,
    LanguageFilterConfig,
    LanguageScorer,
    LengthFilterConfig,
    prose_of,
    run_exact_dedup,
    run_format,
    run_language,
    run_length,
    unterminated_fence,
)
from cogumi.io import DataError, record_text
from cogumi.stage import ConfigError


def write_rows(path: Path, rows: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def read(path: Path | str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def outputs(out: Path) -> tuple[list[dict], list[dict], list[dict], dict]:
    return (read(out / "kept.jsonl"), read(out / "removed.jsonl"), read(out / "rejected.jsonl"),
            json.loads((out / "report.json").read_text()))


def row(instruction: str, response: str, **extra) -> dict:
    return {"instruction": instruction, "response": response, **extra}


# ----------------------------------------------------------------------------- length

@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def test_length_filter_counts_with_the_model_tokenizer(tmp_path, smollm2_tokenizer):
    sentence = "The quick brown fox jumps over the lazy dog while the farmer watches. "
    rows = [
        row("Say hi.", "Hi!", id="short"),
        row("Tell me a story about a fox.", sentence * 4, id="medium"),
        row("Tell me a long story about a fox.", sentence * 30, id="long"),
        row("Another medium one.", sentence * 3, id="medium2", metadata={"domain": "creative"}),
    ]
    data = write_rows(tmp_path / "train.jsonl", [rows[0], "", rows[1], "{not json", rows[2], rows[3]])
    out = tmp_path / "out"
    result = run_length(LengthFilterConfig(input=str(data), output_dir=str(out), min_tokens=20,
                                           max_tokens=120, on_error="skip", progress=False))

    expected = {r["id"]: len(smollm2_tokenizer(record_text(r), add_special_tokens=False)["input_ids"]) for r in rows}
    assert expected["short"] < 20 and 20 <= expected["medium"] <= 120 and expected["long"] > 120
    kept, removed, rejected, report = outputs(out)
    assert [r["id"] for r in kept] == ["medium", "medium2"]
    assert [r["metadata"]["tokens"] for r in kept] == [expected["medium"], expected["medium2"]]
    assert kept[1]["metadata"]["domain"] == "creative"  # existing metadata is kept
    assert [(r["reason"], r["line"], r["id"], r["tokens"]) for r in removed] == [
        ("too_short", 1, "short", expected["short"]), ("too_long", 5, "long", expected["long"])]
    assert removed[0]["row"]["instruction"] == "Say hi."
    assert [r["line"] for r in rejected] == [4]
    assert result.counts == {"in": 5, "kept": 2, "removed": 2, "rejected": 1}
    assert report["in"] == report["kept"] + report["removed"] + report["rejected"]
    lengths = sorted(expected.values())
    assert report["tokens_in"]["min"] == lengths[0] and report["tokens_in"]["max"] == lengths[-1]
    assert report["tokens_in"]["median"] == (lengths[1] + lengths[2]) / 2
    assert report["removed_by_reason"] == {"too_short": 1, "too_long": 1}


def test_length_filter_default_bounds_are_the_specs(tmp_path):
    paragraph = ("Photosynthesis turns light, water and carbon dioxide into sugar and oxygen. "
                 "It happens in the chloroplasts of plant cells. ")
    rows = [row("Explain photosynthesis briefly.", paragraph, id="a"),
            row("Explain photosynthesis in detail.", paragraph * 12, id="b")]
    config = LengthFilterConfig(input=str(write_rows(tmp_path / "t.jsonl", rows)), output_dir=str(tmp_path / "o"),
                                progress=False)
    assert (config.min_tokens, config.max_tokens, config.model) == (150, 2048, "smollm2-135m")
    run_length(config)
    kept, removed, _, _ = outputs(tmp_path / "o")
    assert [r["id"] for r in kept] == ["b"] and [r["id"] for r in removed] == ["a"]
    assert 150 <= kept[0]["metadata"]["tokens"] <= 2048


def test_length_filter_chat_mode_counts_the_template(tmp_path):
    rows = [row("Name a colour.", "Blue is a colour.", id="a")]
    data = write_rows(tmp_path / "t.jsonl", rows)
    for mode in ("text", "chat"):
        run_length(LengthFilterConfig(input=str(data), output_dir=str(tmp_path / mode), min_tokens=0,
                                      count=mode, progress=False))
    text_tokens = read(tmp_path / "text" / "kept.jsonl")[0]["metadata"]["tokens"]
    chat_tokens = read(tmp_path / "chat" / "kept.jsonl")[0]["metadata"]["tokens"]
    assert chat_tokens > text_tokens + 4  # role markers and the template's system prompt


def test_length_config_checks_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"LengthFilterConfig\.max_tokens"):
        LengthFilterConfig(input=str(write_rows(tmp_path / "t.jsonl", [row("a", "b")])),
                           output_dir=str(tmp_path / "o"), min_tokens=300, max_tokens=200)
    with pytest.raises(ConfigError, match=r"LengthFilterConfig\.min_tokens"):
        LengthFilterConfig(input=str(tmp_path / "t.jsonl"), output_dir=str(tmp_path / "o"), min_tokens=-1)


# ----------------------------------------------------------------------------- language

ENGLISH = [
    row("Explain why the sky appears blue during the day.",
        "The sky looks blue because molecules in the atmosphere scatter short wavelengths of sunlight "
        "much more strongly than long ones, so blue light reaches us from every direction.", id="en-prose"),
    row("How do I read a JSON file in Python?",
        "Use the json module:\n\n```python\nimport json\n\nwith open('data.json') as f:\n    data = json.load(f)\n"
        "print(data['name'])\n```\n\nThis opens the file, parses it and gives you a dict.", id="en-code"),
    row("Implement binary search in Java.",
        "```java\npublic static int search(int[] a, int key) {\n    int lo = 0, hi = a.length - 1;\n"
        "    while (lo <= hi) {\n        int mid = (lo + hi) >>> 1;\n        if (a[mid] < key) lo = mid + 1;\n"
        "        else if (a[mid] > key) hi = mid - 1;\n        else return mid;\n    }\n    return -1;\n}\n```",
        id="en-code-java"),
    row("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
        "How many clips did Natalia sell altogether?",
        "In May she sold 48 / 2 = 24 clips. Altogether she sold 48 + 24 = 72 clips. The answer is 72.", id="en-math"),
]
CODE_ONLY = row("def fib(n):", "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n"
                "    return a\n\nprint([fib(i) for i in range(10)])", id="code-only")
NON_ENGLISH = [
    row("Explique pourquoi le ciel est bleu pendant la journée.",
        "Le ciel paraît bleu parce que les molécules de l'atmosphère diffusent beaucoup plus la lumière "
        "de courte longueur d'onde que la lumière rouge.", id="fr"),
    row("Erkläre, wie ein Kühlschrank funktioniert.",
        "Ein Kühlschrank pumpt Wärme aus dem Innenraum nach außen. Ein Kältemittel verdampft im Inneren.", id="de"),
    row("Объясни, почему небо голубое.",
        "Небо кажется голубым, потому что молекулы воздуха рассеивают синий свет сильнее, чем красный.", id="ru"),
    row("请解释一下什么是人工智能。", "人工智能是让计算机模拟人类智能的技术，包括学习、推理、理解语言和识别图像等能力。", id="zh"),
    row("Escribe una función en Python que invierta una cadena.",
        "Aquí tienes una función sencilla que usa el corte con paso negativo para devolver la cadena al revés:"
        "\n\n```python\ndef invertir(s):\n    return s[::-1]\n```\n\nPor ejemplo, invertir('hola') devuelve 'aloh'.",
        id="es-code"),
]


def test_language_filter_keeps_english_and_code_removes_other_languages(tmp_path):
    data = write_rows(tmp_path / "t.jsonl", [*ENGLISH, CODE_ONLY, *NON_ENGLISH])
    out = tmp_path / "out"
    result = run_language(LanguageFilterConfig(input=str(data), output_dir=str(out), progress=False))
    kept, removed, _, report = outputs(out)
    assert [r["id"] for r in kept] == ["en-prose", "en-code", "en-code-java", "en-math", "code-only"]
    assert [(r["id"], r["language"]) for r in removed] == [
        ("fr", "fr"), ("de", "de"), ("ru", "ru"), ("zh", "zh"), ("es-code", "es")]
    for record in removed:
        assert record["reason"] == "non_english"
        assert 0.0 <= record["english_prob"] < 0.5 and record["language_prob"] > 0.5
        assert record["row"]["id"] == record["id"]
    assert report["languages"] == {"english": 4, "non_english": 5, "undetermined": 1}
    assert result.counts == {"in": 10, "kept": 5, "removed": 5, "rejected": 0}


def test_language_scorer_sets_code_aside():
    scorer = LanguageScorer()
    code_only = scorer.score(record_text(CODE_ONLY))
    assert code_only.is_english is None and code_only.english_prob is None and code_only.prose_chars < 20
    java = record_text(ENGLISH[2])
    assert "public static" not in prose_of(java) and "binary search" in prose_of(java)
    assert scorer.score(java).is_english is True
    # Scored raw, code reads as some other language: the reason code is set aside.
    raw = LanguageScorer(code_aware=False, min_prose_chars=0)
    assert raw.score(record_text(CODE_ONLY)).is_english is False


def test_language_filter_without_code_awareness_drops_code(tmp_path):
    data = write_rows(tmp_path / "t.jsonl", [CODE_ONLY, ENGLISH[0]])
    run_language(LanguageFilterConfig(input=str(data), output_dir=str(tmp_path / "o"), code_aware=False,
                                      min_prose_chars=0, progress=False))
    kept, removed, _, _ = outputs(tmp_path / "o")
    assert [r["id"] for r in kept] == ["en-prose"] and [r["id"] for r in removed] == ["code-only"]


def test_language_min_english_prob_is_stricter(tmp_path):
    data = write_rows(tmp_path / "t.jsonl", ENGLISH)
    scores = [LanguageScorer().score(record_text(r)).english_prob for r in ENGLISH]
    cut = sorted(scores)[1] + 1e-6  # between the second-lowest and the rest
    run_language(LanguageFilterConfig(input=str(data), output_dir=str(tmp_path / "o"), min_english_prob=cut,
                                      progress=False))
    _, removed, _, _ = outputs(tmp_path / "o")
    assert len(removed) == 2 and all(r["english_prob"] < cut for r in removed)
    with pytest.raises(ConfigError, match=r"LanguageFilterConfig\.min_english_prob"):
        LanguageFilterConfig(input=str(data), output_dir=str(tmp_path / "x"), min_english_prob=1.5)


# ----------------------------------------------------------------------------- format

def test_format_filter_gives_each_problem_a_reason(tmp_path):
    rows = [
        row("Write hello world in Python.", "```python\nprint('hello world')\n```", id="good"),
        {"instruction": "No answer here.", "id": "no-response"},
        row("Blank answer.", "   \n", id="blank"),
        row("Show code.", "Here it is:\n```python\nprint('cut off", id="fence"),
        row("Greet me.", "Hello there!<|im_end|>\n<|im_start|>user", id="template"),
        row("Llama 2 leftovers.", "[INST] again [/INST] Sure.", id="inst"),
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}], "id": "chat-empty"},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], "id": "chat-good"},
        row("Nested fences are fine.", "````markdown\n```python\nx = 1\n```\n````", id="nested"),
        row("Tilde fence.", "~~~\ncode\n~~~", id="tilde"),
        {"instruction": "Bad domain.", "response": "ok", "metadata": {"domain": "sports"}, "id": "meta"},
        "[1, 2, 3]",
        "{broken",
    ]
    data = write_rows(tmp_path / "t.jsonl", rows)
    out = tmp_path / "out"
    result = run_format(FormatFilterConfig(input=str(data), output_dir=str(out), on_error="skip", progress=False))
    kept, removed, rejected, report = outputs(out)
    assert [r["id"] for r in kept] == ["good", "chat-good", "nested", "tilde"]
    reasons = {r["id"]: (r["reason"], r["field"]) for r in removed}
    assert reasons == {
        "no-response": ("schema", "response"),
        "blank": ("empty_response", "response"),
        "fence": ("unterminated_code_fence", "response"),
        "template": ("template_tokens", "response"),
        "inst": ("template_tokens", "response"),
        "chat-empty": ("empty_response", "messages[1].content"),
        "meta": ("schema", "metadata.domain"),
    }
    template = next(r for r in removed if r["id"] == "template")
    assert "<|im_end|>" in template["detail"]
    assert [r["line"] for r in rejected] == [12, 13]
    assert result.counts == {"in": 13, "kept": 4, "removed": 7, "rejected": 2}
    assert report["removed_by_reason"]["template_tokens"] == 2


def test_format_filter_records_every_problem_of_a_row(tmp_path):
    data = write_rows(tmp_path / "t.jsonl", [row("Fix <|im_start|> this", "```\nunterminated")])
    run_format(FormatFilterConfig(input=str(data), output_dir=str(tmp_path / "o"), progress=False))
    (removed,) = read(tmp_path / "o" / "removed.jsonl")
    assert [p["reason"] for p in removed["problems"]] == ["template_tokens", "unterminated_code_fence"]
    assert removed["reason"] == "template_tokens" and removed["field"] == "instruction"


def test_format_filter_options(tmp_path):
    data = write_rows(tmp_path / "t.jsonl", [row("a", "```\nopen <|x|>")])
    run_format(FormatFilterConfig(input=str(data), output_dir=str(tmp_path / "o"), template_pattern="",
                                  check_fences=False, progress=False))
    assert len(read(tmp_path / "o" / "kept.jsonl")) == 1
    with pytest.raises(ConfigError, match=r"FormatFilterConfig\.template_pattern"):
        FormatFilterConfig(input=str(data), output_dir=str(tmp_path / "x"), template_pattern="(")


def test_unterminated_fence_follows_commonmark():
    assert unterminated_fence("a\n```py\nx\n```") is None
    assert unterminated_fence("a\n```py\nx\n") == 2
    assert unterminated_fence("````\nx\n```\n") == 1  # a shorter fence does not close
    assert unterminated_fence("```inline``` text") is None
    assert unterminated_fence("~~~\nx\n~~~~\n```") == 4


# ----------------------------------------------------------------------------- exact duplicates

def test_exact_dedup_keeps_the_first_and_points_to_it(tmp_path):
    rows = [
        row("What is 2+2?", "4", id="q1"),
        row("Capital of France?", "Paris.", id="q2"),
        row("  what is   2+2? ", "4", id="q1-copy"),
        row("WHAT IS 2+2?", "Four.", id="q1-other-answer"),
        row("capital of france?", "paris.", id="q2-copy"),
        row("What is 2+2?", "4\n", id="q1-copy2"),
    ]
    data = write_rows(tmp_path / "t.jsonl", rows)
    result = run_exact_dedup(ExactDedupConfig(input=str(data), output_dir=str(tmp_path / "o"), progress=False))
    kept, removed, _, report = outputs(tmp_path / "o")
    assert [r["id"] for r in kept] == ["q1", "q2", "q1-other-answer"]
    assert [(r["id"], r["duplicate_of_line"], r["duplicate_of_id"]) for r in removed] == [
        ("q1-copy", 1, "q1"), ("q2-copy", 2, "q2"), ("q1-copy2", 1, "q1")]
    assert result.counts == {"in": 6, "kept": 3, "removed": 3, "rejected": 0}
    assert report["duplicate_groups"] == 2 and report["largest_group"] == 3

    run_exact_dedup(ExactDedupConfig(input=str(data), output_dir=str(tmp_path / "p"), key="prompt", progress=False))
    assert [r["id"] for r in read(tmp_path / "p" / "kept.jsonl")] == ["q1", "q2"]


def test_exact_dedup_sees_chats_and_instructions_alike(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
            {"instruction": "hi", "response": "hello"}]
    data = write_rows(tmp_path / "t.jsonl", rows)
    run_exact_dedup(ExactDedupConfig(input=str(data), output_dir=str(tmp_path / "o"), progress=False))
    (removed,) = read(tmp_path / "o" / "removed.jsonl")
    assert (removed["line"], removed["duplicate_of_line"], removed["duplicate_of_id"]) == (2, 1, None)


# ----------------------------------------------------------------------------- shared behaviour

FILTERS = {
    "length": lambda i, o: run_length(LengthFilterConfig(input=i, output_dir=o, min_tokens=1, progress=False)),
    "language": lambda i, o: run_language(LanguageFilterConfig(input=i, output_dir=o, progress=False)),
    "format": lambda i, o: run_format(FormatFilterConfig(input=i, output_dir=o, progress=False)),
    "exact-dedup": lambda i, o: run_exact_dedup(ExactDedupConfig(input=i, output_dir=o, progress=False)),
}


@pytest.mark.parametrize("name", FILTERS)
def test_empty_input_gives_empty_outputs_and_a_report(name, tmp_path):
    data = tmp_path / "empty.jsonl"
    data.write_text("\n\n")
    result = FILTERS[name](str(data), str(tmp_path / "o"))
    assert result.counts == {"in": 0, "kept": 0, "removed": 0, "rejected": 0}
    kept, removed, rejected, report = outputs(tmp_path / "o")
    assert kept == removed == rejected == []
    assert report["empty_input"] is True and report["in"] == 0
    assert (tmp_path / "o" / "manifest.json").is_file()


@pytest.mark.parametrize("name", ["language", "exact-dedup"])
def test_malformed_rows_raise_with_file_and_line(name, tmp_path):
    data = write_rows(tmp_path / "t.jsonl", [row("Hello there, how are you?", "Fine, thanks."),
                                             {"instruction": "x", "response": 3}])
    with pytest.raises(DataError, match=r"t\.jsonl:2: field 'response': expected string, got int"):
        FILTERS[name](str(data), str(tmp_path / "o"))
    assert not (tmp_path / "o" / "kept.jsonl").exists()  # nothing half-written


def test_filters_run_from_the_cli(tmp_path, capsys):
    data = write_rows(tmp_path / "t.jsonl", [row("a", "b"), row("A", "b "), "{bad"])
    argv = ["exact-dedup", str(data), "-o", str(tmp_path / "o"), "--on-error", "skip", "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "kept: 1" in out and "removed: 1" in out and "rejected: 1" in out
    assert main(argv) == 0
    assert "skipped: up to date" in capsys.readouterr().out
