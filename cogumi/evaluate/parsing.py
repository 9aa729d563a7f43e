"""Answer extraction from raw model text: the part of evaluation that most often goes wrong.

The seeds' evaluation reported 0% on ARC, HumanEval, MBPP and HellaSwag because answers were
parsed wrongly, not because the models failed. Every parser here returns ``None`` when it finds
no answer (the example then counts as wrong and is marked *unparsed*) and never raises on model
text, however messy.

* :func:`gsm8k_strict` — the final answer in the forms the prompt asks for: ``#### 42``,
  ``A: 42`` / ``Answer: 42``, or ``The answer is 42``; the last such statement wins.
* :func:`gsm8k_flexible` — the last number in the text (lm-evaluation-harness' "flexible
  extract").
* :func:`choice_letter` — a multiple-choice letter from text such as ``"B"``, ``"(C)"``,
  ``"Answer: D."``, ``"**B**"``, ``"The correct answer is C) Paris"``, or the text of exactly one
  choice.
* :func:`bbh_answer` — the answer after the last ``the answer is``, else a one-line reply.
* :func:`extract_code` — Python code from a fenced block (the one defining the wanted function
  when there are several), else the text as it is.
"""

from __future__ import annotations

import math
import re

_NUMBER = r"-?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_NUMBER_RE = re.compile(_NUMBER)
_STRICT_RES = (
    re.compile(rf"####\s*({_NUMBER})"),
    re.compile(rf"(?:^|\n)\s*(?:\*\*)?(?:final\s+)?a(?:nswer)?\s*(?:\*\*)?\s*[:=]\s*(?:\*\*)?\s*({_NUMBER})", re.I),
    re.compile(rf"the\s+(?:final\s+)?answer\s+is\s*[:=]?\s*(?:\*\*)?\s*({_NUMBER})", re.I),
)


def normalize_number(text: str) -> str | None:
    """``"$1,234.50"`` -> ``"1234.5"``; ``"18.00"`` -> ``"18"``; None when it is not a number."""
    cleaned = text.replace(",", "").replace("$", "").replace(" ", "").strip().rstrip(".")
    try:
        value = float(cleaned)
    except ValueError:
        return None
    if math.isnan(value) or math.isinf(value):
        return None
    if value.is_integer():
        return str(int(value))
    return repr(round(value, 6)).rstrip("0").rstrip(".")


def gsm8k_reference(answer: str) -> str:
    """The gold number of a GSM8K ``answer`` field (its text after ``####``)."""
    tail = answer.rsplit("####", 1)[-1]
    value = normalize_number(tail)
    if value is None:
        raise ValueError(f"GSM8K answer has no number after '####': {answer[-80:]!r}")
    return value


def gsm8k_strict(text: str) -> str | None:
    """The number in the last ``#### n`` / ``A: n`` / ``The answer is n`` statement."""
    found: list[tuple[int, str]] = []
    for pattern in _STRICT_RES:
        found.extend((m.start(1), m.group(1)) for m in pattern.finditer(text))
    if not found:
        return None
    return normalize_number(max(found)[1])


def gsm8k_flexible(text: str) -> str | None:
    """The last number anywhere in the text."""
    numbers = _NUMBER_RE.findall(text)
    for candidate in reversed(numbers):
        value = normalize_number(candidate)
        if value is not None:
            return value
    return None


def letters(count: int) -> str:
    return "ABCDEFGHIJ"[:count]


def _squash(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def choice_letter(text: str, choices: list[str]) -> str | None:
    """The letter of the chosen option (``A`` for ``choices[0]``), or None if none is clear.

    Tried in order, each over the whole reply: an explicit statement (``answer is C``,
    ``Answer: (C)``, ``option C``) — the last one wins; a reply that starts with a letter
    (``B``, ``(B)``, ``B.``, ``B) text``, ``**B**``); a lone ``(C)``; the text of exactly one
    choice; finally a single distinct stand-alone capital letter among the options. The article
    "A" followed by a lower-case word ("A good answer") is not read as option A.
    """
    valid = letters(len(choices))
    if not text or not valid:
        return None
    body = text.strip().replace("*", "")
    letter_group = f"([{valid}])"
    explicit = re.compile(
        rf"(?:answer|option|choice)\s*(?:is|would be|:|=)?\s*(?:option|choice)?\s*[:\-]?\s*\(?{letter_group}\b(?![a-z'])",
        re.I,
    )
    hits = [m for m in explicit.finditer(body) if m.group(1).upper() in valid]
    # "answer is a" in lower case is an article more often than an option
    hits = [m for m in hits if m.group(1).isupper()]
    if hits:
        return hits[-1].group(1).upper()
    start = re.match(rf"\s*[\(\[]?{letter_group}(?:[\)\]\.:,]|\s|$)(?!\s*[a-z])", body)
    if start and not re.match(r"\s*A\s+[a-z]", body):
        return start.group(1)
    start_with_text = re.match(rf"\s*[\(\[]?{letter_group}[\)\]\.:]\s", body)
    if start_with_text:
        return start_with_text.group(1)
    bracketed = {m.group(1) for m in re.finditer(rf"\({letter_group}\)", body)}
    if len(bracketed) == 1:
        return bracketed.pop()
    squashed = _squash(body)
    named = [i for i, choice in enumerate(choices) if _squash(choice) and
             re.search(rf"(?:^|\s){re.escape(_squash(choice))}(?:\s|$)", squashed)]
    if len(named) == 1:
        return valid[named[0]]
    if len(named) > 1:
        # "Paris" inside "Paris, Texas": prefer the longest choice text that matched, if unique
        longest = max(len(choices[i]) for i in named)
        top = [i for i in named if len(choices[i]) == longest]
        if len(top) == 1:
            return valid[top[0]]
    lone = {m.group(1) for m in re.finditer(rf"(?<![\w']){letter_group}(?![\w'])", body)
            if not _is_article(body, m)}
    if len(lone) == 1:
        return lone.pop()
    return None


def _is_article(body: str, match: re.Match) -> bool:
    """Whether a matched "A" is the English article ("A lot of ..."), not option A."""
    if match.group(1) != "A":
        return False
    following = re.match(r"\s+([a-z]+)", body[match.end():])
    return following is not None and following.group(1) not in ("or", "and", "is", "nor")


_ANSWER_IS = re.compile(r"the\s+answer\s+is\s*:?\s*(.+?)(?:\.\s|\.$|\n|$)", re.I)


def normalize_bbh(text: str) -> str:
    """Lower-case, trimmed, without surrounding markup, quotes or a final full stop."""
    value = text.strip().strip("*`\"' ").rstrip(".").strip().strip("*`\"' ")
    return " ".join(value.lower().split())


def bbh_answer(text: str) -> str | None:
    """The text after the last "the answer is"; otherwise a short one-line reply as it is."""
    hits = _ANSWER_IS.findall(text.replace("**", ""))
    if hits:
        answer = normalize_bbh(hits[-1])
        return answer or None
    stripped = text.strip()
    if stripped and "\n" not in stripped and len(stripped) <= 60:
        return normalize_bbh(stripped)
    return None


def bbh_match(answer: str | None, target: str) -> bool:
    """Exact match after normalisation; ``(A)`` targets also accept ``A`` and ``A)``."""
    if answer is None:
        return False
    gold = normalize_bbh(target)
    if answer == gold:
        return True
    option = re.fullmatch(r"\(([a-z])\)", gold)
    if option:
        return re.fullmatch(rf"\(?{option.group(1)}\)?(?:\s.*)?", answer) is not None
    return False


_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)


def extract_code(text: str, entry_point: str | None = None) -> str | None:
    """The program in a model reply, or None when the reply is empty.

    Fenced blocks (```python ...```) win over prose: the first block defining ``entry_point``,
    else the first Python-looking block. An unclosed fence (the reply ran out of tokens) still
    counts. Text with no fence is returned as it is (a raw continuation of the prompt).
    """
    if not text or not text.strip():
        return None
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(text)]
    blocks = [(lang, body) for lang, body in blocks if body.strip()]
    if not blocks:
        return text
    python = [body for lang, body in blocks if lang in ("", "python", "py", "python3")] or [b for _, b in blocks]
    if entry_point:
        for body in python:
            if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", body, re.M):
                return body
    return python[0]


def defines(code: str, name: str) -> bool:
    """Whether ``code`` defines function ``name`` at the top level."""
    return re.search(rf"^def\s+{re.escape(name)}\s*\(", code, re.M) is not None


__all__ = [
    "bbh_answer", "bbh_match", "choice_letter", "defines", "extract_code", "gsm8k_flexible", "gsm8k_reference",
    "gsm8k_strict", "letters", "normalize_bbh", "normalize_number",
]
