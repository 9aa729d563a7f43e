"""``cogumi stats``: the spec's "Dataset Statistics" table for a JSONL file of training rows.

Counts by domain and difficulty (with shares), token lengths by the model's tokenizer
(mean / median / p95), English purity by the language filter's scorer (py3langid on the
prose; rows with too little prose, such as pure code, are counted apart as undetermined),
exact-duplicate share, and the mean quality score where rows carry one. Writes ``stats.json``,
the table as ``stats.md`` (also printed), a bar plot of the domain and difficulty
distributions as ``stats.png``, and ``rejected.jsonl`` for malformed lines (``--on-error skip``).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from cogumi.data.filters import (
    LanguageScorer,
    TokenCounter,
    batched,
    count_lines,
    distribution,
    exact_key,
    numbered_rows,
)
from cogumi.io import (
    DIFFICULTIES,
    DOMAINS,
    AtomicWriter,
    OnError,
    ReadReport,
    atomic_write,
    record_text,
    write_json,
)
from cogumi.stage import ConfigError, StageConfig, StageResult, option, stage

UNKNOWN = "unknown"


@dataclass(kw_only=True)
class StatsConfig(StageConfig):
    input: str = option(help="JSONL file of training rows (instruction/response or messages).",
                        input=True, positional=True)
    model: str = option("smollm2-135m", help="Tokenizer for token lengths: a built-in model name, a "
                        "checkpoint directory or a hub id.", input="maybe")
    tokens: bool = option(True, help="Count tokens (--no-tokens skips loading the tokenizer).")
    language: bool = option(True, help="Measure English purity (--no-language skips it).")
    plot: bool = option(True, help="Write stats.png, a bar plot of the domain and difficulty distributions.")
    on_error: OnError = option("raise", help="Malformed lines: 'raise' stops with file:line:field; 'skip' "
                               "writes them to rejected.jsonl and goes on.")
    print_table: bool = option(True, help="Print the table when the stage runs.", hashed=False)
    batch_size: int = option(512, help="Rows per tokenizer call.", hashed=False)
    progress: bool = option(True, help="Show a progress bar.", hashed=False)

    def check(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"StatsConfig.batch_size: must be >= 1, got {self.batch_size}")

    def outputs(self) -> dict[str, Path]:
        files = {"stats": self.out("stats.json"), "table": self.out("stats.md"),
                 "rejected": self.out("rejected.jsonl")}
        if self.plot:
            files["plot"] = self.out("stats.png")
        return files


def _share(part: int, whole: int) -> float | None:
    return round(100.0 * part / whole, 2) if whole else None


def _breakdown(counter: Counter, order: tuple[str, ...], total: int) -> dict[str, dict]:
    names = [*order, *sorted(k for k in counter if k not in order and k != UNKNOWN)]
    if counter[UNKNOWN]:
        names.append(UNKNOWN)
    return {name: {"count": counter[name], "percent": _share(counter[name], total)} for name in names}


def _fmt(n: float | int | None, suffix: str = "") -> str:
    if n is None:
        return "–"
    return (f"{n:,}" if isinstance(n, int) else f"{n:,.2f}".rstrip("0").rstrip(".")) + suffix


def table(stats: dict) -> str:
    """The stats as a Markdown table shaped like the spec's "Dataset Statistics"."""
    total = stats["total"]
    rows = [("**Total Examples**", _fmt(total))]
    duplicates = stats["unique"]["duplicates"]
    rows.append(("**Unique Examples**", f"{_fmt(stats['unique']['percent'], '%')} (exact; "
                                         f"{_fmt(duplicates)} duplicate{'' if duplicates == 1 else 's'})"))
    lang = stats.get("language")
    if lang is not None:
        rows.append(("**English Purity**", f"{_fmt(lang['english_share'], '%')} ({_fmt(lang['english'])} of "
                                            f"{_fmt(lang['english'] + lang['non_english'])} rows with prose; "
                                            f"{_fmt(lang['undetermined'])} code-only)"))
    tokens = stats.get("tokens")
    if tokens is not None:
        t = tokens["distribution"]
        rows.append(("**Average Tokens**", f"{_fmt(t['mean'])} (median {_fmt(t['median'])}, p95 {_fmt(t['p95'])}, "
                                            f"max {_fmt(t['max'])}; {tokens['tokenizer']})"))
    quality = stats["quality"]
    if quality["scored"]:
        rows.append(("**Average Quality**", f"{_fmt(quality['mean'])}/10 ({_fmt(quality['scored'])} scored)"))
    for name, entry in stats["by_domain"].items():
        rows.append((f"**{name.capitalize()} Examples**", f"{_fmt(entry['count'])} ({_fmt(entry['percent'], '%')})"))
    for name, entry in stats["by_difficulty"].items():
        rows.append((f"**{name.capitalize()} Difficulty**", f"{_fmt(entry['count'])} ({_fmt(entry['percent'], '%')})"))
    width = max(len(r[0]) for r in rows)
    lines = [f"| {'Metric'.ljust(width)} | Value |", f"| {'-' * width} | ----- |"]
    lines += [f"| {name.ljust(width)} | {value} |" for name, value in rows]
    return "\n".join(lines) + "\n"


def plot(stats: dict, path: Path) -> None:
    """Bar charts of the domain and difficulty distributions (matplotlib, Agg canvas)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4), dpi=100)
    axes = figure.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
    for ax, key, title, colour in ((axes[0], "by_domain", "Domain", "#4C72B0"),
                                   (axes[1], "by_difficulty", "Difficulty", "#DD8452")):
        names = list(stats[key])
        counts = [stats[key][n]["count"] for n in names]
        bars = ax.bar(names, counts, color=colour)
        for bar, name in zip(bars, names):
            percent = stats[key][name]["percent"]
            ax.annotate(f"{stats[key][name]['count']:,}\n({_fmt(percent, '%')})",
                        (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                        fontsize=8)
        ax.set_title(f"{title} ({stats['total']:,} rows)")
        ax.set_ylabel("rows")
        ax.set_ylim(0, max([*counts, 1]) * 1.25)
        ax.tick_params(axis="x", labelrotation=30)
    figure.tight_layout()
    with atomic_write(path, "wb") as handle:
        figure.savefig(handle, format="png")


@stage("stats", StatsConfig, help="Dataset statistics like the spec's table: domains, difficulties, "
       "token lengths, English purity (stats.json, stats.md, stats.png).")
def run(config: StatsConfig) -> StageResult:
    from tqdm.auto import tqdm

    outputs = config.outputs()
    report = ReadReport(config.input)
    rows = numbered_rows(config.input, "sft", on_error=config.on_error, rejects_path=outputs["rejected"],
                         report=report)
    domains: Counter[str] = Counter()
    difficulties: Counter[str] = Counter()
    sources: Counter[str] = Counter()
    languages: Counter[str] = Counter()
    verdicts: Counter[str] = Counter()
    lengths: list[int] = []
    scores: list[float] = []
    keys: set[str] = set()
    counter: TokenCounter | None = None
    scorer: LanguageScorer | None = None
    total = 0
    with tqdm(total=count_lines(config.input) if config.progress else None, desc="stats", unit="row",
              disable=not config.progress) as bar:
        for batch in batched(rows, config.batch_size):
            batch_rows = [row for _, row in batch]
            if config.tokens:
                counter = counter or TokenCounter(config.model)
                lengths.extend(counter.count(batch_rows))
            if config.language:
                scorer = scorer or LanguageScorer()
            for row in batch_rows:
                total += 1
                meta = row.get("metadata") or {}
                domains[meta.get("domain") or UNKNOWN] += 1
                difficulties[meta.get("difficulty") or UNKNOWN] += 1
                sources[meta.get("source") or UNKNOWN] += 1
                if isinstance(meta.get("quality_score"), (int, float)):
                    scores.append(meta["quality_score"])
                keys.add(exact_key(row))
                if scorer is not None:
                    result = scorer.score(record_text(row))
                    if result.is_english is None:
                        verdicts["undetermined"] += 1
                    elif result.is_english:
                        verdicts["english"] += 1
                    else:
                        verdicts["non_english"] += 1
                        languages[result.language] += 1
            bar.update(len(batch))
    if report.rejected == 0:
        AtomicWriter(outputs["rejected"]).close()

    stats: dict = {
        "input": config.input,
        "total": total,
        "rejected": report.rejected,
        "unique": {"count": len(keys), "duplicates": total - len(keys), "percent": _share(len(keys), total)},
        "by_domain": _breakdown(domains, DOMAINS, total),
        "by_difficulty": _breakdown(difficulties, DIFFICULTIES, total),
        "by_source": dict(sources.most_common()),
        "quality": {"scored": len(scores), "mean": round(sum(scores) / len(scores), 2) if scores else None},
        "tokens": {"tokenizer": config.model, "distribution": distribution(lengths)} if config.tokens else None,
        "language": None,
    }
    if config.language:
        determined = verdicts["english"] + verdicts["non_english"]
        stats["language"] = {
            "identifier": "py3langid", "english": verdicts["english"], "non_english": verdicts["non_english"],
            "undetermined": verdicts["undetermined"], "english_share": _share(verdicts["english"], determined),
            "non_english_languages": dict(languages.most_common()),
        }
    text = table(stats)
    write_json(outputs["stats"], stats)
    with atomic_write(outputs["table"]) as handle:
        handle.write(text)
    if config.plot:
        plot(stats, outputs["plot"])
    if config.print_table:
        print(text, end="")

    counts = {"rows": total, "rejected": report.rejected}
    metrics = {
        "english_share": stats["language"]["english_share"] if stats["language"] else None,
        "tokens_mean": stats["tokens"]["distribution"]["mean"] if stats["tokens"] else None,
        "tokens_median": stats["tokens"]["distribution"]["median"] if stats["tokens"] else None,
        "tokens_p95": stats["tokens"]["distribution"]["p95"] if stats["tokens"] else None,
        "unique_percent": stats["unique"]["percent"],
        "by_domain": {k: v["count"] for k, v in stats["by_domain"].items()},
        "by_difficulty": {k: v["count"] for k, v in stats["by_difficulty"].items()},
    }
    return StageResult(counts=counts, metrics=metrics)


def load_stats(output_dir: str | Path) -> dict:
    """The ``stats.json`` a finished ``stats`` stage wrote."""
    return json.loads((Path(output_dir) / "stats.json").read_text(encoding="utf-8"))


__all__ = ["StatsConfig", "load_stats", "plot", "run", "table"]
