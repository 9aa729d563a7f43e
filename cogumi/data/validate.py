"""``cogumi validate``: check a JSONL file against a record schema and write the clean rows.

Every line is accounted for: ``in = kept + rejected``; with ``--on-error skip`` the rejected
lines go to ``rejected.jsonl`` with their line number and the reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cogumi.io import AtomicWriter, OnError, ReadReport, Schema, iter_jsonl, write_json
from cogumi.stage import StageConfig, StageResult, option, stage


@dataclass(kw_only=True)
class ValidateConfig(StageConfig):
    input: str = option(help="JSONL file to check.", input=True, positional=True)
    schema: Schema = option(
        "sft",
        help="Record schema: 'instruction' (instruction/response/metadata), 'messages' (chat), "
        "'sft' (either, with an answer to train on), 'prompt' (something to ask), 'any' (valid JSON objects).",
    )
    on_error: OnError = option(
        "raise", help="'raise' stops at the first bad line; 'skip' writes it to rejected.jsonl and goes on."
    )

    def outputs(self) -> dict[str, Path]:
        return {"valid": self.out("valid.jsonl"), "rejected": self.out("rejected.jsonl"),
                "report": self.out("report.json")}


@stage("validate", ValidateConfig, help="Check a JSONL file against a record schema; write the valid rows.")
def run(config: ValidateConfig) -> StageResult:
    outputs = config.outputs()
    report = ReadReport(config.input)
    rows = iter_jsonl(config.input, config.schema, on_error=config.on_error,
                      rejects_path=outputs["rejected"], report=report)
    with AtomicWriter(outputs["valid"]) as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    if report.rejected == 0:
        AtomicWriter(outputs["rejected"]).close()  # an empty side file says "none rejected"
    counts = {"in": report.lines, "kept": report.records, "rejected": report.rejected}
    write_json(outputs["report"], {**counts, "blank_lines": report.blank_lines, "schema": config.schema,
                                   "input": config.input, "errors": report.errors[:100]})
    return StageResult(counts=counts)
