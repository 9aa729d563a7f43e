"""``cogumi dedup``: remove near-duplicate rows with MinHash LSH (the spec's phase 0 dedup).

Each row's text (the ``fields`` joined by newlines, lowercased and stripped as in the spec) is
shingled into character or word n-grams and MinHashed (:mod:`cogumi.data.minhash`). Rows that
share an LSH band are candidates; a candidate pair whose estimated Jaccard similarity is at
least ``threshold`` is a duplicate pair. Duplicate pairs are joined into clusters (union-find),
each cluster keeps one row (``keep``: first, longest or best-quality) and the others are removed,
pointing to the row that was kept.

Output: ``output_dir`` is a directory, like every stage's, holding

- ``kept.jsonl`` — the kept rows, byte for byte as in the input, in input order;
- ``dups.jsonl`` — one line per removed row, in input order: ``line`` and ``id`` (``null`` when
  the row has none), ``duplicate_of_line`` / ``duplicate_of_id`` of the row kept for its
  cluster and ``jaccard``, their estimated Jaccard similarity; ``matched_line`` and
  ``matched_jaccard``, its most similar verified duplicate (the pair that put it in the
  cluster: in a chain a ~ b ~ c the kept row can be less similar than the threshold); and the
  removed ``row`` itself;
- ``report.json`` — counts (``in = kept + removed + rejected``), clusters, the largest cluster,
  time and documents per second, the LSH parameters;
- ``rejected.jsonl`` — malformed lines (with ``on_error="skip"``; empty otherwise);
- ``manifest.json`` — written last by the stage contract, so an unchanged run is skipped.

So ``cogumi dedup data.jsonl -o deduped`` writes ``deduped/kept.jsonl``. A ``-o`` ending in
``.jsonl`` is refused rather than turned into a directory of that name.

Rows whose text is empty are never hashed (they would all look identical): they are kept,
counted as ``empty_text`` and listed in the report. Two read passes keep memory at the
signatures (``4 * num_perm`` bytes per row) rather than the text.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from cogumi.io import AtomicWriter, DataError, OnError, ReadReport, iter_jsonl, write_json
from cogumi.stage import ConfigError, StageConfig, StageResult, option, stage

if TYPE_CHECKING:
    import numpy as np

    from cogumi.data.minhash import LSHIndex

# numpy and cogumi.data.minhash are imported where used: the CLI imports every stage module to
# build its parser, and `cogumi --help` should not pay for numpy. These mirror minhash's.
Keep = Literal["first", "longest", "best-quality"]
Mode = Literal["char", "word"]
HashFamily = Literal["fast", "datasketch", "datasketch-legacy"]


@dataclass(kw_only=True)
class DedupConfig(StageConfig):
    input: str = option(help="JSONL file to deduplicate.", input=True, positional=True)
    threshold: float = option(
        0.8, help="Jaccard similarity at or above which two rows are duplicates (estimated from signatures)."
    )
    num_perm: int = option(128, help="MinHash permutations per signature; more is more exact and slower.")
    ngram: int = option(3, help="Shingle size: characters (mode 'char') or words (mode 'word').")
    mode: Mode = option("char", help="Shingles of characters (the spec's 3-grams) or of whitespace-separated words.")
    fields: list[str] = option(
        default_factory=lambda: ["instruction", "response", "output"],
        help="Fields whose text is compared, joined by newlines; a dotted name reaches into objects "
        "(metadata.title); a list contributes its strings or its chat messages' contents. Missing fields "
        "count as empty.",
    )
    keep: Keep = option(
        "first",
        help="Which row of a cluster stays: 'first' in input order, 'longest' text, or 'best-quality' "
        "(highest metadata.quality_score; rows without one rank last). Ties go to the first.",
    )
    bands: int = option(
        0, help="LSH bands; 0 chooses bands and rows for the threshold by datasketch's optimisation."
    )
    rows: int = option(0, help="LSH rows per band; 0 chooses (num_perm // bands when only bands is given).")
    false_negative_weight: float = option(
        0.8,
        help="When bands and rows are chosen: the weight of missed pairs against false candidates in "
        "datasketch's optimisation (datasketch's default is 0.5). Every candidate is verified, so false "
        "candidates cost only time; 0.8 buys recall near the threshold (see docs/data.md).",
    )
    hash_family: HashFamily = option(
        "fast",
        help="'fast' (vectorised hashing), 'datasketch' (identical to datasketch.MinHash signatures, "
        "slower) or 'datasketch-legacy' (datasketch < 2.0).",
    )
    seed: int = option(1, help="Seed of the permutations (datasketch's MinHash seed).")
    workers: int = option(0, help="Processes (or Ray CPUs) for signatures; 0 uses every CPU.", hashed=False)
    backend: Literal["local", "ray"] = option(
        "local", help="Compute signatures and bands in local processes or as Ray tasks (needs cogumi[ray]).",
        hashed=False,
    )
    ray_address: str | None = option(
        None, help="Ray cluster to join ('auto', 'ray://host:10001'); none starts a local Ray.", hashed=False
    )
    on_error: OnError = option(
        "raise", help="'raise' stops at the first malformed line; 'skip' writes it to rejected.jsonl and goes on."
    )
    progress: bool = option(True, help="Show a progress bar with the signing rate.", hashed=False)

    def check(self) -> None:
        name = type(self).__name__
        if not 0.0 < self.threshold <= 1.0:
            raise ConfigError(f"{name}.threshold: {self.threshold} is outside (0, 1]")
        if not 1 <= self.num_perm <= 4096:
            raise ConfigError(f"{name}.num_perm: {self.num_perm} is outside 1..4096")
        if not 1 <= self.ngram <= 64:
            raise ConfigError(f"{name}.ngram: {self.ngram} is outside 1..64")
        if not self.fields or any(not f.strip() for f in self.fields):
            raise ConfigError(f"{name}.fields: must name at least one field, none empty")
        for key in ("bands", "rows", "workers"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{name}.{key}: {getattr(self, key)} is negative")
        if self.bands * max(self.rows, 1) > self.num_perm:
            raise ConfigError(f"{name}.bands: bands * rows = {self.bands * max(self.rows, 1)} "
                              f"exceeds num_perm = {self.num_perm}")
        if self.rows > self.num_perm:
            raise ConfigError(f"{name}.rows: {self.rows} exceeds num_perm = {self.num_perm}")
        if not 0.0 <= self.false_negative_weight <= 1.0:
            raise ConfigError(f"{name}.false_negative_weight: {self.false_negative_weight} is outside [0, 1]")
        if Path(self.output_dir).suffix == ".jsonl":
            raise ConfigError(
                f"{name}.output_dir: '{self.output_dir}' looks like a file; dedup writes a directory "
                "(kept.jsonl, dups.jsonl, report.json), e.g. -o deduped"
            )

    def lsh_params(self) -> tuple[int, int]:
        """``(bands, rows)``: as given, or chosen for the threshold (datasketch's optimisation)."""
        if self.bands and self.rows:
            return self.bands, self.rows
        if self.bands:
            return self.bands, self.num_perm // self.bands
        if self.rows:
            return self.num_perm // self.rows, self.rows
        from cogumi.data.minhash import optimal_bands

        weights = (1.0 - self.false_negative_weight, self.false_negative_weight)
        return optimal_bands(self.threshold, self.num_perm, weights)

    def outputs(self) -> dict[str, Path]:
        return {"kept": self.out("kept.jsonl"), "dups": self.out("dups.jsonl"),
                "report": self.out("report.json"), "rejected": self.out("rejected.jsonl")}


@dataclass
class _Rows:
    """What pass 1 keeps per row: never the text, only what clustering and reporting need."""

    lines: list[int] = field(default_factory=list)
    ids: list = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    signed: list[int] = field(default_factory=list)  # row indices that got a signature
    empty: list[int] = field(default_factory=list)  # row indices with empty text
    bad: dict[int, str] = field(default_factory=dict)  # line -> error, for field errors (skip mode)


def _lookup(row: dict, name: str):
    if name in row:
        return row[name]
    value = row
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def row_text(row: dict, fields: list[str]) -> str:
    """The text of ``row`` that dedup compares; raises ``ValueError("field: problem")`` on bad types."""
    parts = []
    for name in fields:
        value = _lookup(row, name)
        if value is None:
            continue
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, list):  # chat messages (their contents) or strings
            for i, item in enumerate(value):
                content = item.get("content") if isinstance(item, dict) else item
                if not isinstance(content, str):
                    raise ValueError(f"{name}[{i}]: expected a string or a chat message with string 'content'")
                parts.append(content)
        else:
            raise ValueError(f"{name}: expected a string or a list of chat messages or strings, "
                             f"got {type(value).__name__}")
    return "\n".join(parts)


def _quality(row: dict) -> float:
    meta = row.get("metadata")
    score = meta.get("quality_score") if isinstance(meta, dict) else None
    if score is None:
        return -math.inf
    if isinstance(score, bool) or not isinstance(score, (int, float)):
        raise ValueError(f"metadata.quality_score: expected a number, got {type(score).__name__}")
    return float(score)


def _count_lines(path: str) -> int:
    count = 0
    with open(path, "rb") as handle:
        while block := handle.read(1 << 24):
            count += block.count(b"\n")
    return count


def _read_texts(config: DedupConfig, rows: _Rows, report: ReadReport, rejects: Path):
    """Pass 1: yield the normalised non-empty texts, recording per-row facts in ``rows``."""
    from cogumi.data.minhash import normalize

    records = iter_jsonl(config.input, "any", on_error=config.on_error, rejects_path=rejects, report=report)
    for row in records:
        # iter_jsonl counts every line it has seen, this one included.
        line = report.records + report.rejected + report.blank_lines
        try:
            text = normalize(row_text(row, config.fields))
            score = _quality(row) if config.keep == "best-quality" else 0.0
        except ValueError as exc:
            field_name, _, problem = str(exc).partition(": ")
            if config.on_error == "raise":
                raise DataError(config.input, line, field_name, problem) from None
            rows.bad[line] = str(DataError(config.input, line, field_name, problem))
            continue
        index = len(rows.lines)
        rows.lines.append(line)
        row_id = row.get("id")
        rows.ids.append(row_id if isinstance(row_id, (str, int)) and not isinstance(row_id, bool) else None)
        rows.lengths.append(len(text))
        rows.scores.append(score)
        if text:
            rows.signed.append(index)
            yield text
        else:
            rows.empty.append(index)


def _representatives(labels: np.ndarray, rows: _Rows, keep: str) -> np.ndarray:
    """The kept row (row index) of each component label, by the keep policy; ties -> first."""
    import numpy as np

    position = np.arange(len(labels))
    if keep == "first":
        rank = np.zeros(len(labels))
    elif keep == "longest":
        rank = -np.asarray(rows.lengths, dtype=float)
    else:
        rank = -np.asarray(rows.scores, dtype=float)
    order = np.lexsort((position, rank, labels))  # by label, then best rank, then input order
    starts = np.flatnonzero(np.r_[True, labels[order][1:] != labels[order][:-1]])
    reps = np.empty(labels.max() + 1 if len(labels) else 0, dtype=np.int64)
    reps[labels[order][starts]] = order[starts]
    return reps


def _clusters(index: LSHIndex, rows: _Rows, keep: str) -> tuple[np.ndarray, dict[int, dict], int]:
    """Union-find over the verified pairs: each row's cluster label (its first row index), the
    ``dups.jsonl`` entry of every removed row (by line), and the number of verified pairs."""
    import numpy as np

    from cogumi.data import minhash

    i, j, est = index.duplicate_pairs()
    signed = np.asarray(rows.signed, dtype=np.int64)  # index position -> row index
    labels = np.arange(len(rows.lines))
    component = minhash.connected_components(len(signed), i, j)
    _, first_member = np.unique(component, return_index=True)
    labels[signed] = signed[first_member[component]]
    reps = _representatives(labels, rows, keep)
    removed = np.flatnonzero(reps[labels] != np.arange(len(labels)))
    position = np.full(len(labels), -1, dtype=np.int64)
    position[signed] = np.arange(len(signed))
    rep_est = minhash.estimated_jaccard(index.signatures[position[removed]],
                                        index.signatures[position[reps[labels[removed]]]])
    # A removed row's most similar verified partner: the pair that made it a duplicate. In a
    # chain (a ~ b ~ c) it can differ from the kept row, which may be less similar.
    src, dst, weight = np.r_[i, j], np.r_[j, i], np.r_[est, est]
    order = np.lexsort((dst, -weight, src))
    best = order[np.r_[True, src[order][1:] != src[order][:-1]]] if len(order) else order
    partner = dict(zip(src[best].tolist(), zip(dst[best].tolist(), weight[best].tolist())))
    dups = {}
    for r, similarity in zip(removed.tolist(), np.atleast_1d(rep_est).tolist()):
        rep = int(reps[labels[r]])
        match, match_est = partner[int(position[r])]
        dups[rows.lines[r]] = {
            "line": rows.lines[r], "id": rows.ids[r],
            "duplicate_of_line": rows.lines[rep], "duplicate_of_id": rows.ids[rep],
            "jaccard": round(similarity, 4),
            "matched_line": rows.lines[signed[match]], "matched_jaccard": round(match_est, 4),
        }
    return labels, dups, len(i)


@stage("dedup", DedupConfig, help="Remove near-duplicate rows with MinHash LSH; write kept rows, the removed pairs and a report.")
def run(config: DedupConfig) -> StageResult:
    import numpy as np

    from cogumi.data import minhash

    outputs = config.outputs()
    started = time.perf_counter()
    bands, rows_per_band = config.lsh_params()
    params = minhash.SignatureParams(num_perm=config.num_perm, ngram=config.ngram, mode=config.mode,
                                     hash_family=config.hash_family, seed=config.seed,
                                     bands=bands, rows=rows_per_band)
    workers = config.workers or minhash.available_cpus()
    report = ReadReport(config.input)
    rows = _Rows()
    outputs["rejected"].unlink(missing_ok=True)  # rejects are merged into it below: start clean
    # Rows <= lines: room for every signature up front, so none is ever copied (pages that stay
    # unused are never touched, so they cost no memory).
    capacity = _count_lines(config.input) + 1
    signatures = np.empty((capacity, config.num_perm), dtype=np.uint32)
    band_keys = np.empty((capacity, bands), dtype=np.uint64)
    filled = 0
    bar = None
    if config.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=capacity - 1 or None, unit="docs", desc="dedup: minhash")
    try:
        texts = _read_texts(config, rows, report, outputs["rejected"])
        for block, keys in minhash.sign_batches(
            minhash.batched(texts, minhash.DEFAULT_BATCH), params, workers=workers,
            backend=config.backend, ray_address=config.ray_address,
            progress=bar.update if bar is not None else None,
        ):
            signatures[filled : filled + len(block)] = block
            band_keys[filled : filled + len(block)] = keys
            filled += len(block)
    except DataError as exc:
        # iter_jsonl refuses a file without records; here that is an empty result, not an error.
        if exc.line is not None or report.records or report.rejected or not Path(config.input).is_file():
            raise
    finally:
        if bar is not None:
            bar.close()
    signed_at = time.perf_counter()

    n_rows = len(rows.lines)
    labels, dups, pairs, checked = np.arange(n_rows), {}, 0, 0
    if filled:
        index = minhash.LSHIndex(config.num_perm, config.threshold, bands=bands, rows=rows_per_band)
        index.insert(signatures[:filled], band_keys=band_keys[:filled])
        labels, dups, pairs = _clusters(index, rows, config.keep)
        checked = index.candidates_checked
        del index
    del signatures, band_keys
    clustered_at = time.perf_counter()

    sizes = np.bincount(labels, minlength=1)
    cluster_sizes = sizes[sizes >= 2]
    kept_lines = set(rows.lines) - set(dups)
    bad_raw = _write_outputs(config.input, outputs, kept_lines, dups, set(rows.bad))
    _write_rejected(outputs["rejected"], rows.bad, bad_raw)
    finished = time.perf_counter()

    rejected = report.rejected + len(rows.bad)
    elapsed = finished - started
    counts = {"in": n_rows + rejected, "kept": n_rows - len(dups), "removed": len(dups), "rejected": rejected}
    metrics = {
        "clusters": len(cluster_sizes),
        "largest_cluster": int(cluster_sizes.max()) if len(cluster_sizes) else 0,
        "empty_text": len(rows.empty),
        "candidates_checked": checked,
        "duplicate_pairs": pairs,
        "time_s": round(elapsed, 3),
        "docs_per_s": round(n_rows / elapsed, 1) if elapsed > 0 else 0.0,
    }
    write_json(outputs["report"], {
        **counts, **metrics,
        "empty_text_lines": [rows.lines[r] for r in rows.empty[:100]],
        "empty_input": n_rows + rejected == 0, "blank_lines": report.blank_lines,
        "timings_s": {"read_and_sign": round(signed_at - started, 3),
                      "index_and_cluster": round(clustered_at - signed_at, 3),
                      "write": round(finished - clustered_at, 3)},
        "lsh": {"bands": bands, "rows": rows_per_band, "threshold": config.threshold, "num_perm": config.num_perm},
        "shingles": {"mode": config.mode, "ngram": config.ngram, "fields": config.fields},
        "keep": config.keep, "hash_family": config.hash_family, "seed": config.seed,
        "backend": config.backend, "workers": workers, "input": config.input,
        "errors": (report.errors + list(rows.bad.values()))[:100],
    })
    return StageResult(counts=counts, metrics=metrics)


def _write_outputs(source: str, outputs: dict[str, Path], kept_lines: set[int], dups: dict[int, dict],
                   bad_lines: set[int]) -> dict[int, str]:
    """Pass 2: copy kept lines verbatim, write each removed row with its entry; return bad lines' text."""
    bad_raw: dict[int, str] = {}
    with open(source, "rb") as handle, AtomicWriter(outputs["kept"], "wb") as kept, \
            AtomicWriter(outputs["dups"]) as removed:
        for number, raw in enumerate(handle, start=1):
            if number in kept_lines:
                kept.write(raw if raw.endswith(b"\n") else raw + b"\n")
            elif number in dups:
                entry = {**dups[number], "row": json.loads(raw)}
                removed.write(json.dumps(entry, ensure_ascii=False) + "\n")
            elif number in bad_lines:
                bad_raw[number] = raw.decode("utf-8")  # verbatim, like iter_jsonl's rejects
    return bad_raw


def _write_rejected(path: Path, bad: dict[int, str], bad_raw: dict[int, str]) -> None:
    """Merge rows with bad field types into the rejects ``iter_jsonl`` wrote; always leave a file."""
    entries = []
    if path.exists():
        entries = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    entries += [{"line": line, "error": error, "raw": bad_raw[line]} for line, error in bad.items()]
    entries.sort(key=lambda entry: entry["line"])
    with AtomicWriter(path) as handle:
        for entry in entries:
            handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
