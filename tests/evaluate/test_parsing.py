"""Answer parsers on hand-written model outputs, messy ones included."""

from __future__ import annotations

import pytest

from cogumi.evaluate.parsing import (
    bbh_answer,
    bbh_match,
    choice_letter,
    extract_code,
    gsm8k_flexible,
    gsm8k_reference,
    gsm8k_strict,
    normalize_number,
)


@pytest.mark.parametrize("text, expected", [
    ("18", "18"), ("1,234", "1234"), ("$18.00", "18"), ("-3.50", "-3.5"), ("0.125", "0.125"),
    ("7.", "7"), ("abc", None), ("", None),
])
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


def test_gsm8k_reference_is_the_number_after_the_marker():
    assert gsm8k_reference("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs.\n#### 18") == "18"
    assert gsm8k_reference("... so 1,000 in total\n#### 1,000") == "1000"
    with pytest.raises(ValueError):
        gsm8k_reference("no marker and no number")


@pytest.mark.parametrize("text, strict, flexible", [
    ("She makes 9 * 2 = 18 dollars.\n#### 18", "18", "18"),
    ("#### $1,250.00", "1250", "1250"),
    ("Step 1: 3 + 4 = 7\nA: 7", "7", "7"),
    ("Answer: 42 apples", "42", "42"),
    ("**Answer:** 42", "42", "42"),
    ("So the answer is 12.", "12", "12"),
    ("The final answer is: $36", "36", "36"),
    # a worked answer without the required form: only the flexible rule finds it
    ("She has 5 apples and buys 3 more, so she has 8", None, "8"),
    # the last statement wins; a later stray number doesn't change the strict answer
    ("#### 5\nWait, recompute: #### 6\nThat took 2 steps.", "6", "2"),
    ("I cannot solve this.", None, None),
    ("", None, None),
    ("The temperature fell to -4 degrees. #### -4", "-4", "-4"),
    ("Total = 3.50 + 1.50 = 5.00\n#### 5.00", "5", "5"),
])
def test_gsm8k_parsers(text, strict, flexible):
    assert gsm8k_strict(text) == strict
    assert gsm8k_flexible(text) == flexible


CHOICES = ["Paris", "London", "Berlin", "Madrid"]


@pytest.mark.parametrize("text, expected", [
    ("A", "A"), ("B", "B"), (" (C) ", "C"), ("D.", "D"), ("B) London", "B"), ("**B**", "B"),
    ("Answer: C", "C"), ("The answer is (D).", "D"), ("The correct answer is B: London.", "B"),
    ("I think the answer is C, Berlin.", "C"), ("Option D", "D"),
    ("A good question! The capital is Paris.", "A"),  # the article is not option A; the text names Paris
    ("A lot of people think London, but the answer is A.", "A"),
    ("London", "B"), ("It is Madrid.", "D"),
    ("answer: b", None),  # lower-case b: an ambiguous word, not a letter
    ("Either A or B.", None),  # two letters: not clear
    ("I don't know.", None), ("", None),
    ("Answer: A\nExplanation: B is wrong because...", "A"),
])
def test_choice_letter(text, expected):
    assert choice_letter(text, CHOICES) == expected


def test_choice_letter_respects_the_number_of_choices():
    assert choice_letter("E", ["x", "y", "z", "w"]) is None
    assert choice_letter("E", ["v", "w", "x", "y", "z"]) == "E"


@pytest.mark.parametrize("text, target, ok", [
    ("Let's think. X is before Y. So the answer is (B).", "(B)", True),
    ("the answer is B", "(B)", True),
    ("So the answer is True.", "True", True),
    ("So the answer is **valid**.", "valid", True),
    ("False", "False", True),
    ("So the answer is apple banana cherry.", "apple banana cherry", True),
    ("So the answer is (A).", "(B)", False),
    ("a long rambling answer\nwith lines and no conclusion", "True", False),
])
def test_bbh(text, target, ok):
    assert bbh_match(bbh_answer(text), target) is ok


def test_bbh_unparsed_is_none():
    assert bbh_answer("I'm not sure\nmaybe") is None
    assert bbh_answer("") is None


def test_extract_code_prefers_the_block_defining_the_function():
    reply = ("Here is a helper:\n```python\ndef helper(x):\n    return x\n```\nAnd the solution:\n"
             "```python\ndef add(a, b):\n    return a + b\n```\nHope it helps!")
    assert extract_code(reply, "add").startswith("def add(a, b):")
    assert extract_code(reply).startswith("def helper")


def test_extract_code_handles_unclosed_fences_raw_text_and_empty_replies():
    assert extract_code("```python\ndef f():\n    return 1\n", "f") == "def f():\n    return 1\n"
    assert extract_code("    return a + b\n") == "    return a + b\n"
    assert extract_code("```\nprint(1)\n```") == "print(1)\n"
    assert extract_code("") is None
    assert extract_code("  \n") is None
