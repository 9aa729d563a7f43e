"""``cogumi failures``: turn what the model got wrong into training rows (phase 1B.2).

Sources, recognised by the ``schema`` field of their rows:

* judge verdicts (``verdicts.jsonl`` of ``cogumi judge``, schema ``cogumi.verdicts/1``): a
  **loss** becomes ``{"instruction": prompt, "output": the reference model's answer}``. **Ties**
  are left out unless ``include_ties`` is set, and then a warning is logged and written to the
  report: in the original project, training on ties caused catastrophic forgetting (MATH losses
  went from 24% to 78%). Invalid verdicts are never used.
* benchmark predictions (``predictions.jsonl`` of ``cogumi eval`` / ``eval score``, schema
  ``cogumi.predictions/1``): an example answered wrongly (or not parsably) becomes a row whose
  output is the benchmark's reference — the canonical solution for code, the worked solution
  when the row has one (``reference_solution``), otherwise the bare gold answer (a number, a
  letter with its option), marked ``metadata.output_kind`` so the trainer can tell them apart.

Rows are deduplicated — exact (normalised instruction) and near-duplicate (MinHash LSH on the
instruction, phase 0's code) — against each other and, optionally, against existing training
sets. Nothing is dropped silently: ``removed.jsonl`` says why each row went and what it
duplicates, and ``report.json`` counts ``in = extracted + not_failures + skipped + duplicates``
per category and verdict.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from cogumi.evaluate.benchmarks import read_rows
from cogumi.evaluate.judge import VERDICTS_SCHEMA as VERDICTS
from cogumi.evaluate.run import PREDICTIONS_SCHEMA as PREDICTIONS
from cogumi.io import AtomicWriter, DataError, iter_jsonl, record_parts, write_json
from cogumi.stage import ConfigError, StageConfig, StageResult, option, stage

log = logging.getLogger(__name__)

TIE_WARNING = ("training on judge ties is enabled: in the original Cogumi project it caused catastrophic forgetting "
               "(MATH losses 24% -> 78%); prefer losses only")


@dataclass(kw_only=True)
class FailuresConfig(StageConfig):
    results: list[str] = option(help="Judge verdicts.jsonl and/or eval predictions.jsonl files (recognised by "
                                "their rows' 'schema').", input=True, positional=True)
    include_ties: bool = option(False, help="Also extract judge ties (off by default: training on ties caused "
                                "catastrophic forgetting in the original project).")
    benchmark: str = option("", help="Only accept predictions of this benchmark (rows of another are an error).")
    existing: list[str] = option(default_factory=list, help="Existing training JSONL files: failures that "
                                 "duplicate one of their instructions are removed.", input=True)
    dedup_threshold: float = option(0.8, help="MinHash Jaccard similarity at which two instructions are "
                                    "near-duplicates (phase 0's LSH).")
    min_chars: int = option(1, help="Rows whose output is shorter than this many characters are skipped.")

    def check(self) -> None:
        if not self.results:
            raise ConfigError("FailuresConfig.results: name at least one verdicts or predictions file")
        if not 0 < self.dedup_threshold <= 1:
            raise ConfigError(f"FailuresConfig.dedup_threshold: must be in (0, 1], got {self.dedup_threshold}")

    def outputs(self) -> dict[str, Path]:
        return {"failures": self.out("failures.jsonl"), "removed": self.out("removed.jsonl"),
                "report": self.out("report.json")}


def _option_text(row: dict) -> str | None:
    """For a multiple-choice gold letter, the letter with its option text when the prompt lists it."""
    letter = str(row.get("reference", "")).strip()
    match = re.search(rf"^{re.escape(letter)}\. (.+)$", str(row.get("prompt", "")), re.M) if letter else None
    return f"{letter}. {match.group(1)}" if match else None


def _from_prediction(path: str, line: int, row: dict, benchmark: str) -> tuple[str, dict | None, str]:
    """(verdict, training row or None, reason when None)."""
    for name in ("benchmark", "id", "prompt", "reference", "correct"):
        if name not in row:
            raise DataError(path, line, name, "missing from a predictions row")
    if benchmark and row["benchmark"] != benchmark:
        raise DataError(path, line, "benchmark", f"results from a different benchmark: {row['benchmark']!r}, "
                        f"expected {benchmark!r}")
    if row["correct"]:
        return "correct", None, "not_failure"
    verdict = "unparsed" if row.get("unparsed") else "wrong"
    if row.get("reference_solution"):
        output, kind = str(row["reference_solution"]), "reference_answer"
    elif row["benchmark"] in ("humaneval", "mbpp"):
        output, kind = str(row["reference"]), "canonical_solution"
    else:
        output, kind = _option_text(row) or str(row["reference"]), "gold_label"
    meta = {"category": row.get("category") or row["benchmark"], "verdict": verdict, "source": path,
            "source_id": str(row["id"]), "benchmark": row["benchmark"], "output_kind": kind,
            "unparsed": bool(row.get("unparsed")), "model_output": row.get("output")}
    return verdict, {"instruction": str(row["prompt"]), "output": output, "metadata": meta}, ""


def _from_verdict(path: str, line: int, row: dict, include_ties: bool) -> tuple[str, dict | None, str]:
    for name in ("id", "prompt", "outcome", "reference"):
        if name not in row:
            raise DataError(path, line, name, "missing from a verdicts row")
    verdict = row["outcome"]
    if verdict not in ("win", "loss", "tie", "invalid"):
        raise DataError(path, line, "outcome", f"expected win, loss, tie or invalid, got {verdict!r}")
    if verdict == "invalid":
        return verdict, None, "invalid_verdict"
    if verdict == "win" or (verdict == "tie" and not include_ties):
        return verdict, None, "not_failure" if verdict == "win" else "tie_excluded"
    meta = {"category": row.get("category") or "uncategorized", "verdict": verdict, "source": path,
            "source_id": str(row["id"]), "output_kind": "reference_answer",
            "candidate_avg": row.get("candidate_avg"), "reference_avg": row.get("reference_avg"),
            "model_output": row.get("candidate")}
    return verdict, {"instruction": str(row["prompt"]), "output": str(row["reference"]), "metadata": meta}, ""


def _normalized(text: str) -> str:
    return " ".join(text.lower().split())


@stage("failures", FailuresConfig, help="Extract failures (judge losses, optionally ties; wrong benchmark answers) "
       "as training rows with the better answer; deduplicated against each other and existing training data.")
def run(config: FailuresConfig) -> StageResult:
    from cogumi.data.minhash import LSHIndex, compute_signatures

    if config.include_ties:
        log.warning(TIE_WARNING)
    candidates: list[dict] = []
    tally: Counter[str] = Counter()
    table: dict[str, Counter] = defaultdict(Counter)
    per_source: dict[str, Counter] = defaultdict(Counter)
    removed: list[dict] = []
    for path in config.results:
        for line, row in read_rows(path, ()):
            schema = row.get("schema")
            if schema not in (PREDICTIONS, VERDICTS):
                raise DataError(path, line, "schema", f"{schema!r} is not a results schema cogumi reads "
                                f"({PREDICTIONS} from cogumi eval, {VERDICTS} from cogumi judge)"
                                if schema else f"missing: not a cogumi results file (expected {PREDICTIONS} or "
                                f"{VERDICTS}); re-run the evaluation with this version")
            tally["in"] += 1
            if schema == PREDICTIONS:
                verdict, extracted, reason = _from_prediction(path, line, row, config.benchmark)
            else:
                verdict, extracted, reason = _from_verdict(path, line, row, config.include_ties)
            category = (extracted or {}).get("metadata", {}).get("category") or row.get("category") or "uncategorized"
            table[category][verdict] += 1
            per_source[path][verdict] += 1
            if extracted is None:
                tally[reason] += 1
                continue
            if len(extracted["output"].strip()) < config.min_chars or not extracted["instruction"].strip():
                tally["skipped_empty"] += 1
                removed.append({"source": path, "line": line, "reason": "empty", "row": extracted})
                continue
            extracted["metadata"]["line"] = line
            candidates.append(extracted)

    # Exact duplicates first, then near-duplicates with phase 0's MinHash LSH.
    keep = [True] * len(candidates)
    seen: dict[str, int] = {}
    for i, row in enumerate(candidates):
        key = _normalized(row["instruction"])
        if key in seen:
            keep[i] = False
            removed.append({"reason": "duplicate", "of": _where(candidates[seen[key]]), "row": row})
        else:
            seen[key] = i
    survivors = [i for i, ok in enumerate(keep) if ok]
    if len(survivors) > 1:
        signatures = compute_signatures([candidates[i]["instruction"] for i in survivors])
        index = LSHIndex(signatures.shape[1], config.dedup_threshold)
        index.insert(signatures)
        first, second, _ = index.duplicate_pairs()
        parent = list(range(len(survivors)))

        def root(x: int) -> int:
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        for a, b in zip(first.tolist(), second.tolist()):
            ra, rb = root(a), root(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
        for position, i in enumerate(survivors):
            r = root(position)
            if r != position:
                keep[i] = False
                removed.append({"reason": "near_duplicate", "of": _where(candidates[survivors[r]]),
                                "row": candidates[i]})
    if config.existing and any(keep):
        texts = []
        for path in config.existing:
            texts.extend(record_parts(row)[0] for row in iter_jsonl(path, "sft"))
        existing_exact = {_normalized(t) for t in texts}
        index = LSHIndex(128, config.dedup_threshold)
        index.insert(compute_signatures(texts))
        alive = [i for i, ok in enumerate(keep) if ok]
        hits = index.query_positions_many(compute_signatures([candidates[i]["instruction"] for i in alive]),
                                          verify=True)
        for i, found in zip(alive, hits):
            exact = _normalized(candidates[i]["instruction"]) in existing_exact
            if exact or len(found):
                keep[i] = False
                removed.append({"reason": "in_existing_training_set", "exact": exact,
                                "of": texts[int(found[0])][:200] if len(found) else None, "row": candidates[i]})
    kept = [row for row, ok in zip(candidates, keep) if ok]
    duplicates = len(candidates) - len(kept)

    outputs = config.outputs()
    with AtomicWriter(outputs["failures"]) as handle:
        for row in kept:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    with AtomicWriter(outputs["removed"]) as handle:
        for entry in removed:
            handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
    kept_by_category = Counter(row["metadata"]["category"] for row in kept)
    counts = {"in": tally["in"], "extracted": len(kept), "not_failures": tally["not_failure"],
              "ties_excluded": tally["tie_excluded"], "invalid_verdicts": tally["invalid_verdict"],
              "skipped_empty": tally["skipped_empty"], "duplicates": duplicates}
    assert counts["in"] == sum(v for k, v in counts.items() if k != "in"), counts
    metrics = {"by_category": {c: {**dict(v), "extracted": kept_by_category[c]} for c, v in sorted(table.items())},
               "by_source": {s: dict(v) for s, v in per_source.items()},
               "tie_policy": "losses and ties" if config.include_ties else "losses only",
               "warnings": [TIE_WARNING] if config.include_ties else []}
    write_json(outputs["report"], {**counts, **metrics})
    return StageResult(counts=counts, metrics=metrics)


def _where(row: dict) -> str:
    meta = row["metadata"]
    return f"{meta['source']}:{meta['line']} ({meta['source_id']})"


__all__ = ["PREDICTIONS", "TIE_WARNING", "VERDICTS", "FailuresConfig", "run"]
