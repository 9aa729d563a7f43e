"""``cogumi distill cascade``: the tiered teacher cascade (seeds/003, the modifiers' "3-tier cascade").

Teachers are listed cheapest first — local models, then mid-price endpoints, then a frontier
model. Every problem goes to tier 1; each tier's answers pass through the same category rules
as :mod:`cogumi.distill.self_consistency` (verification, the agreement vote, diversity), and a
problem that is not kept escalates to the next tier. Tokens and cost are counted per tier (from
the usage each backend reports and the tier's prices). A budget cap (``max_cost_usd``) is
checked before every batch: when the spend so far has reached it, escalation stops cleanly and
the problems still waiting are reported as ``budget_exhausted`` with the tier they were waiting
for. A teacher whose requests fail (after the HTTP client's own retries) is asked once more one
problem at a time; a problem that still fails is recorded as failed at that tier and escalates.

Outputs as for self-consistency (``train.jsonl``, ``problems.jsonl`` with every tier's attempt
per problem, ``report.json``), plus per-tier accounting in the report.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from cogumi.distill.self_consistency import (
    DistillOptions,
    distill_batch,
    load_problems,
    make_teacher,
    summarize_records,
    training_row,
)
from cogumi.io import AtomicWriter, PartialRecords, write_json
from cogumi.stage import ConfigError, StageResult, option, stage

log = logging.getLogger(__name__)

_TIER_FIELDS = {"name", "backend", "model", "provider", "base_url", "api_key_env", "price_input_per_mtok",
                "price_output_per_mtok", "batch_size", "extra"}


@dataclass(frozen=True)
class Tier:
    """One teacher of the cascade."""

    name: str
    backend: str
    model: str
    provider: str = "local"
    base_url: str = ""
    api_key_env: str = ""
    price_input_per_mtok: float = 0.0
    price_output_per_mtok: float = 0.0
    batch_size: int = 8
    extra: dict | None = None

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.price_input_per_mtok + completion_tokens * self.price_output_per_mtok) / 1e6


def parse_tiers(tiers: list[dict]) -> list[Tier]:
    parsed = []
    for i, spec in enumerate(tiers):
        where = f"CascadeConfig.tiers[{i}]"
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: expected a mapping (name, backend, model, prices...), got {spec!r}")
        unknown = sorted(set(spec) - _TIER_FIELDS)
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; fields: {', '.join(sorted(_TIER_FIELDS))}")
        for required in ("backend", "model"):
            if not spec.get(required):
                raise ConfigError(f"{where}.{required}: required")
        if spec["backend"] not in ("transformers", "llamacpp", "openai", "vllm"):
            raise ConfigError(f"{where}.backend: one of transformers, llamacpp, openai, vllm, got {spec['backend']!r}")
        if spec["backend"] == "openai" and spec.get("provider", "local") == "local" and not spec.get("base_url"):
            raise ConfigError(f"{where}.base_url: the openai backend with provider 'local' needs a URL")
        for price in ("price_input_per_mtok", "price_output_per_mtok"):
            if float(spec.get(price, 0.0)) < 0:
                raise ConfigError(f"{where}.{price}: must be >= 0")
        parsed.append(Tier(**{"name": spec.get("name") or f"tier{i + 1}", **{k: v for k, v in spec.items() if k != "name"}}))
    names = [t.name for t in parsed]
    if len(set(names)) != len(names):
        raise ConfigError(f"CascadeConfig.tiers: tier names must differ, got {names}")
    return parsed


@dataclass(kw_only=True)
class CascadeConfig(DistillOptions):
    tiers: list[dict] = option(help="Teachers, cheapest first; each {\"name\", \"backend\" (transformers|llamacpp|"
                               "openai|vllm), \"model\", optional \"provider\", \"base_url\", \"api_key_env\", "
                               "\"price_input_per_mtok\", \"price_output_per_mtok\" (USD), \"batch_size\", \"extra\"}.")
    max_cost_usd: float = option(0.0, help="Stop escalating once the spend reaches this many USD (0: no cap).")

    def check(self) -> None:
        super().check()
        if not self.tiers:
            raise ConfigError("CascadeConfig.tiers: name at least one teacher")
        parse_tiers(self.tiers)
        if self.max_cost_usd < 0:
            raise ConfigError(f"CascadeConfig.max_cost_usd: must be >= 0, got {self.max_cost_usd}")


def _attempt(problems, rules, tier: Tier, teacher: Any, options: dict) -> list[tuple[Any, Any, str | None]]:
    """(problem, outcome or None, error) for each problem; a failed batch is retried one by one."""
    try:
        return [(p, o, None) for p, o in zip(problems, distill_batch(problems, rules, teacher, **options))]
    except Exception as exc:  # the teacher failed: find out which problems it cannot answer
        log.warning("%s: a batch of %d failed (%s: %s); retrying one by one", tier.name, len(problems),
                    type(exc).__name__, exc)
    results = []
    for problem in problems:
        try:
            results.append((problem, distill_batch([problem], rules, teacher, **options)[0], None))
        except Exception as exc:
            results.append((problem, None, f"{type(exc).__name__}: {exc}"[:500]))
    return results


@stage("cascade", CascadeConfig,
       help="Tiered teacher cascade: each problem goes to the cheapest teacher first and escalates when its answers "
       "fail verification or agreement; tokens and cost per tier, with a budget cap.")
def run(config: CascadeConfig) -> StageResult:
    from tqdm.auto import tqdm

    rules = config.rules()
    tiers = parse_tiers(config.tiers)
    problems = load_problems(config.problems, rules, config.default_category)
    if config.limit:
        problems = problems[: config.limit]
    partial = PartialRecords(config.out("cascade.partial.jsonl"), config.config_sha256())
    options = config.engine_options()
    accounting = {t.name: {"model": t.model, "backend": t.backend, "attempted": 0, "kept": 0, "failed_requests": 0,
                           "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0} for t in tiers}
    # Replay what a killed run finished, so the spend and the tier each problem waits for are known.
    attempts: dict[str, list[dict]] = {p.id: [] for p in problems}
    final: dict[str, dict] = {}
    for entry in partial.done.values():
        attempts[entry["problem"]].append(entry)
    for problem in problems:
        for entry in attempts[problem.id]:
            stats = accounting[entry["tier"]]
            stats["attempted"] += 1
            stats["kept"] += bool(entry["kept"])
            stats["failed_requests"] += entry["error"] is not None
            stats["prompt_tokens"] += entry["tokens"]["prompt"]
            stats["completion_tokens"] += entry["tokens"]["completion"]
            stats["cost_usd"] += entry["cost_usd"]
            if entry["kept"]:
                final[problem.id] = entry

    def spent() -> float:
        return sum(stats["cost_usd"] for stats in accounting.values())

    stopped_at: str | None = None
    t0 = time.perf_counter()
    with tqdm(total=len(problems) * len(tiers), desc="cascade", unit="attempt", disable=not config.progress) as bar:
        for tier in tiers:
            waiting = [p for p in problems if p.id not in final
                       and not any(a["tier"] == tier.name for a in attempts[p.id])]
            bar.update(len(problems) - len(waiting))
            if not waiting:
                continue
            teacher = None
            try:
                for start in range(0, len(waiting), config.batch_size):
                    if config.max_cost_usd and spent() >= config.max_cost_usd:
                        stopped_at = tier.name
                        break
                    part = waiting[start:start + config.batch_size]
                    if teacher is None:
                        teacher = make_teacher(tier.backend, tier.model, provider=tier.provider, base_url=tier.base_url,
                                               api_key_env=tier.api_key_env, batch_size=tier.batch_size,
                                               seed=config.seed, extra=tier.extra)
                    entries = []
                    for problem, outcome, error in _attempt(part, rules, tier, teacher, options):
                        tokens = outcome.tokens if outcome else {"prompt": 0, "completion": 0}
                        record = outcome.record if outcome else {"id": problem.id, "category": problem.category,
                                                                 "kept": False, "reason": "teacher_failed"}
                        entry = {"key": f"{tier.name}\x1f{problem.id}", "problem": problem.id, "tier": tier.name,
                                 "record": record, "kept": outcome.kept if outcome else [], "error": error,
                                 "tokens": tokens, "cost_usd": tier.cost(tokens["prompt"], tokens["completion"])}
                        entries.append(entry)
                        attempts[problem.id].append(entry)
                        stats = accounting[tier.name]
                        stats["attempted"] += 1
                        stats["kept"] += bool(entry["kept"])
                        stats["failed_requests"] += error is not None
                        stats["prompt_tokens"] += tokens["prompt"]
                        stats["completion_tokens"] += tokens["completion"]
                        stats["cost_usd"] += entry["cost_usd"]
                        if entry["kept"]:
                            final[problem.id] = entry
                    partial.add(entries)
                    bar.update(len(part))
            finally:
                if teacher is not None:
                    teacher.close()
            if stopped_at:
                break
    elapsed = time.perf_counter() - t0

    tier_names = [t.name for t in tiers]
    records, rows = [], []
    left: list[dict] = []
    for problem in problems:
        tried = attempts[problem.id]
        winner = final.get(problem.id)
        record = {"id": problem.id, "category": problem.category, "kept": winner is not None,
                  "kept_by": winner["tier"] if winner else None,
                  "attempts": [{"tier": a["tier"], "error": a["error"], "cost_usd": round(a["cost_usd"], 6), **a["record"]}
                               for a in tried]}
        if winner is None:
            untried = [name for name in tier_names if name not in {a["tier"] for a in tried}]
            if untried and stopped_at:
                record["reason"] = "budget_exhausted"
                left.append({"id": problem.id, "waiting_for": untried[0]})
            else:
                record["reason"] = tried[-1]["record"].get("reason") if tried else "not_attempted"
        if winner and winner["record"].get("agreement") is not None:
            record["agreement"] = winner["record"]["agreement"]
        records.append(record)
        if winner:
            teacher_name = f"{winner['tier']}:{next(t.model for t in tiers if t.name == winner['tier'])}"
            rows.extend(training_row(problem, s, rules[problem.category], winner["record"], teacher_name)
                        for s in winner["kept"])
    outputs = config.outputs()
    with AtomicWriter(outputs["train"]) as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    with AtomicWriter(outputs["problems"]) as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    for stats in accounting.values():
        stats["cost_usd"] = round(stats["cost_usd"], 6)
    counts = {"problems": len(problems), "kept_problems": len(final), "training_rows": len(rows),
              "budget_exhausted": len(left)}
    metrics = {"per_tier": accounting, "per_category": summarize_records(records),
               "cost_usd": round(spent(), 6), "stopped_by_budget_at": stopped_at, "seconds": round(elapsed, 2)}
    write_json(outputs["report"], {**counts, **metrics, "max_cost_usd": config.max_cost_usd, "left": left,
                                   "tiers": [{k: v for k, v in t.__dict__.items() if k != "extra"} for t in tiers]})
    partial.remove()
    return StageResult(counts=counts, metrics=metrics)


__all__ = ["CascadeConfig", "Tier", "parse_tiers", "run"]
