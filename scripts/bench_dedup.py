"""Benchmark ``cogumi dedup``: speed and memory against datasketch (and rensa), exactness
against exact character-3-gram Jaccard.

    .venv/bin/python scripts/bench_dedup.py            # about 4 minutes on 2 cores
    .venv/bin/python scripts/bench_dedup.py --docs 640000 --memory-docs 640000 --exact-docs 0

The corpus is generated (seeded, so every run sees the same documents): ~3,900-character
English-like documents (pseudo-words with a Zipf frequency, sentences, punctuation), split
into an instruction (first sentence) and a response. 20% of the rows are planted copies in
the spec's mix of duplicates — exact 30%, Jaccard 0.95-1.0 13%, 0.8-0.95 57% — made by word
edits (substitute, delete, insert) at a rate drawn for each copy, plus 5% "related" copies
edited further (Jaccard about 0.65-0.8) that must *not* be removed. The rows are shuffled.

Speed: each method runs in its own process on the first ``--docs`` documents, sampled for the
peak resident memory of its whole process tree (psutil). The spec's loop (``MinHash`` +
``update`` per shingle) is slow, so it (and datasketch ``bulk``, rensa) runs on a subsample and
reports documents per second. The dedup stage runs end to end from a JSONL file (read, sign,
index, cluster, write).

Memory: the stage's main-process allocations are traced (tracemalloc, workers=1) at
``--memory-docs`` and a quarter of it; the slope is extrapolated to 640K documents and the rest
of the 2-worker run's RSS (interpreter, libraries, worker processes) added. Linear, so it is a
lower bound where candidate pairs grow faster than the corpus; the 640K command above
measures instead of extrapolating.

Exactness: a second corpus of ``--exact-docs`` documents (same generator, next seed) gets the
exact character-3-gram Jaccard of every pair by brute force (a matrix product over the
shingle sets), and the stage is run on it with its defaults, with datasketch's bands and with
256 permutations. Printed: precision of the removed pairs (against the matched pair and
against the kept row) and recall (true pairs of which the output keeps at most one row).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ONSETS = ("", "", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "qu", "r", "s", "t",
          "v", "w", "x", "y", "z", "bl", "br", "ch", "cl", "cr", "dr", "fl", "fr", "gl", "gr", "kn",
          "ph", "pl", "pr", "sc", "sh", "sk", "sl", "sm", "sn", "sp", "st", "str", "sw", "th", "tr",
          "tw", "wh", "wr")
VOWELS = ("a", "e", "i", "o", "u", "a", "e", "i", "o", "u", "ai", "au", "ea", "ee", "ei", "ie",
          "oa", "oi", "oo", "ou", "ue", "y")
CODAS = ("", "", "", "b", "ck", "ct", "d", "f", "ft", "g", "k", "l", "ld", "lk", "ll", "lt", "m",
         "mp", "n", "nd", "ng", "nk", "nt", "p", "pt", "r", "rd", "rk", "rm", "rn", "rt", "s", "sh",
         "sk", "sp", "ss", "st", "t", "th", "tch", "x", "z")
SUFFIXES = ("", "", "", "", "", "s", "ed", "ing", "er", "ly", "tion", "ment", "ness", "al", "able", "ous")
FUNCTION_WORDS = (
    "the of and to a in is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there been one all we their has would when if so no will "
    "more can out up who them some could what into than other only then its also"
).split()

#: Planted copies: (share, lowest edit rate, highest edit rate). Word edit rate r gives a char
#: 3-gram Jaccard of about 1 - 0.75 r here: 0.06 -> 0.95, 0.27 -> 0.8, 0.6 -> 0.65.
DUPLICATE_MIX = ((0.30, 0.0, 0.0), (0.13, 0.005, 0.06), (0.57, 0.06, 0.27))
RELATED_RATES = (0.33, 0.6)
THRESHOLD = 0.8


class Corpus:
    """A seeded generator of documents and edited copies."""

    def __init__(self, seed: int = 0, vocabulary: int = 30_000, chars: int = 3_900):
        self.rng = random.Random(seed)
        self.chars = chars
        words = set()
        while len(words) < vocabulary:
            syllables = self.rng.choice((1, 1, 1, 2, 2, 2, 3))
            words.add("".join(self.rng.choice(ONSETS) + self.rng.choice(VOWELS) + self.rng.choice(CODAS)
                              for _ in range(syllables)) + self.rng.choice(SUFFIXES))
        self.words = FUNCTION_WORDS + sorted(words)
        self.cum = list(itertools.accumulate(1.0 / (rank + 8) for rank in range(len(self.words))))

    def word(self) -> str:
        return self.rng.choices(self.words, cum_weights=self.cum)[0]

    def document(self) -> str:
        sentences, size = [], 0
        while size < self.chars + 50:
            words = self.rng.choices(self.words, cum_weights=self.cum, k=self.rng.randint(6, 22))
            sentence = " ".join(words)
            sentence = sentence[0].upper() + sentence[1:] + self.rng.choice(".....?!")
            sentences.append(sentence)
            size += len(sentence) + 1
        text = " ".join(sentences)
        return text[: text.rfind(" ", 0, self.chars)]

    def edit(self, text: str, rate: float) -> str:
        out = []
        for word in text.split(" "):
            if self.rng.random() >= rate:
                out.append(word)
                continue
            op = self.rng.random()
            if op < 0.4:
                out.append(self.word())
            elif op >= 0.7:
                out.extend((word, self.word()))
        return " ".join(out)

    def rows(self, n: int, duplicate_share: float = 0.2, related_share: float = 0.05) -> list[dict]:
        """``n`` shuffled rows; ``duplicate_share`` of them planted duplicates, ``related_share``
        edited copies below the threshold. Each row records its origin in ``metadata``."""
        texts: list[tuple[str, str, float]] = []  # (text, origin id, edit rate)
        shares, lows, highs = zip(*DUPLICATE_MIX)
        while len(texts) < n:
            original = self.document()
            origin = f"o{len(texts)}"
            texts.append((original, origin, -1.0))
            if self.rng.random() < duplicate_share / (1 - duplicate_share) / 1.6:
                for _ in range(self.rng.choices((1, 2, 3, 4), (60, 25, 10, 5))[0]):
                    k = self.rng.choices(range(len(shares)), shares)[0]
                    rate = self.rng.uniform(lows[k], highs[k])
                    texts.append((self.edit(original, rate), origin, rate))
            if self.rng.random() < related_share:
                rate = self.rng.uniform(*RELATED_RATES)
                texts.append((self.edit(original, rate), origin, rate))
        texts = texts[:n]
        self.rng.shuffle(texts)
        rows = []
        for i, (text, origin, rate) in enumerate(texts):
            cut = min((p for p in (text.find(". "), text.find("? "), text.find("! ")) if p > 0), default=80) + 1
            rows.append({"id": f"doc-{i:06d}", "instruction": text[:cut], "response": text[cut + 1:],
                         "metadata": {"quality_score": round(self.rng.uniform(5, 10), 1),
                                      "origin": origin, "edit_rate": round(rate, 4)}})
        return rows


def write_corpus(rows: list[dict], path: Path) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def load_texts(path: Path, limit: int | None = None) -> list[str]:
    """The texts the stage compares (default fields, normalised), for the library-level methods."""
    from cogumi.data.dedup import row_text
    from cogumi.data.minhash import normalize

    texts = []
    with path.open(encoding="utf-8") as handle:
        for line in itertools.islice(handle, limit):
            texts.append(normalize(row_text(json.loads(line), ["instruction", "response"])))
    return texts


# ----------------------------------------------------------------------------- methods (child side)

def method_datasketch_update(texts, args):
    from datasketch import MinHash

    from cogumi.data.minhash import shingles

    for text in texts:  # the spec's loop: one MinHash, one update per shingle
        m = MinHash(num_perm=128)
        for shingle in shingles(text, 3, normalized=True):
            m.update(shingle.encode("utf8"))


def method_datasketch_bulk(texts, args):
    from datasketch import MinHash

    from cogumi.data.minhash import shingles

    MinHash.bulk([[s.encode("utf8") for s in shingles(t, 3, normalized=True)] for t in texts], num_perm=128)


def method_rensa(texts, args):
    from rensa import RMinHash

    from cogumi.data.minhash import shingles

    for text in texts:
        m = RMinHash(num_perm=128, seed=1)
        m.update(list(shingles(text, 3, normalized=True)))
        m.digest()


def method_cogumi_signatures(texts, args):
    from cogumi.data.minhash import compute_signatures

    compute_signatures(texts, num_perm=128, ngram=3, workers=args.workers)


def method_cogumi_stage(path, args):
    from cogumi.data.dedup import DedupConfig, run

    run(DedupConfig(input=str(path), output_dir=args.stage_out, workers=args.workers, progress=False),
        force=True)
    return {"report": json.loads((Path(args.stage_out) / "report.json").read_text())}


def method_cogumi_stage_traced(path, args):
    """The stage in this process only (workers=1) with tracemalloc: its exact peak allocations."""
    import tracemalloc

    import scipy.sparse.csgraph  # noqa: F401 - imported and cached before tracing: fixed costs

    from cogumi.data.dedup import DedupConfig, run

    config = DedupConfig(input=str(path), output_dir=args.stage_out, workers=1, progress=False)
    config.lsh_params()
    tracemalloc.start()
    run(config, force=True)
    return {"traced_peak": tracemalloc.get_traced_memory()[1]}


METHODS = {
    "datasketch-update": method_datasketch_update,
    "datasketch-bulk": method_datasketch_bulk,
    "rensa": method_rensa,
    "cogumi-signatures": method_cogumi_signatures,
    "cogumi-stage": method_cogumi_stage,
    "cogumi-stage-traced": method_cogumi_stage_traced,
}


def child_main(args) -> None:
    """Run one method in this (fresh) process and print its timing as JSON."""
    path = Path(args.corpus)
    if args.method.startswith("cogumi-stage"):
        subset = path.with_name(f"{path.stem}.{args.n}.jsonl")
        with path.open("rb") as src, subset.open("wb") as dst:
            dst.writelines(itertools.islice(src, args.n))
        start = time.perf_counter()
        extra = METHODS[args.method](subset, args)
        seconds = time.perf_counter() - start
    else:
        texts = load_texts(path, args.n)
        start = time.perf_counter()
        extra = METHODS[args.method](texts, args)
        seconds = time.perf_counter() - start
    print(json.dumps({"docs": args.n, "seconds": seconds, **(extra or {})}))


# ----------------------------------------------------------------------------- parent side

def measure(method: str, corpus: Path, n: int, args) -> dict:
    """Run ``method`` on the first ``n`` documents in a child process; sample its tree's RSS."""
    import psutil

    command = [sys.executable, __file__, "--child", method, "--corpus", str(corpus), "--n", str(n),
               "--workers", str(args.workers), "--stage-out", str(args.tmp / f"out-{method}-{n}")]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    stop = threading.Event()

    def sample():
        nonlocal peak
        try:
            parent = psutil.Process(proc.pid)
            while not stop.is_set():
                total = 0
                for p in [parent, *parent.children(recursive=True)]:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                peak = max(peak, total)
                time.sleep(0.02)
        except psutil.Error:
            return

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{err}")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss"] = peak
    result["docs_per_s"] = result["docs"] / result["seconds"]
    return result


def exact_pairs(texts: list[str], threshold: float, block: int = 1024):
    """Every pair ``i < j`` with exact char-3-gram Jaccard >= threshold, by brute force.

    Shingle sets become rows of a 0/1 matrix (shingles seen in one document only are left out
    of the matrix: they count in the set sizes but can never be shared), and a float32 matrix
    product gives every intersection size exactly (counts are far below 2**24).
    """
    from cogumi.data.minhash import shingles

    sets = [shingles(t, 3, normalized=True) for t in texts]
    sizes = np.array([len(s) for s in sets], dtype=np.float64)
    df: dict[str, int] = {}
    for s in sets:
        for g in s:
            df[g] = df.get(g, 0) + 1
    column = {g: k for k, g in enumerate(g for g, c in df.items() if c > 1)}
    matrix = np.zeros((len(texts), len(column)), dtype=np.float32)
    for row, s in enumerate(sets):
        matrix[row, [column[g] for g in s if g in column]] = 1.0
    found_i, found_j, found_s = [], [], []
    for start in range(0, len(texts), block):
        inter = matrix[start:start + block] @ matrix.T
        union = sizes[start:start + block, None] + sizes[None, :] - inter
        sim = np.divide(inter, union, out=np.zeros_like(union), where=union > 0)
        i, j = np.nonzero(sim >= threshold)
        i += start
        keep = j > i
        found_i.append(i[keep])
        found_j.append(j[keep])
        found_s.append(sim[i[keep] - start, j[keep]])
    return np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_s), sizes, matrix


EXACTNESS_RUNS = (
    ("stage defaults", {}),
    ("datasketch's bands (fn weight 0.5)", {"false_negative_weight": 0.5}),
    ("num_perm=256", {"num_perm": 256}),
)


def exactness(args) -> list[str]:
    """Precision and recall of the stage's removals against exact Jaccard over all pairs."""
    from cogumi.data.dedup import DedupConfig, run

    path = args.tmp / "exact.jsonl"
    write_corpus(Corpus(seed=args.seed + 1).rows(args.exact_docs), path)
    texts = load_texts(path)
    n = len(texts)
    t0 = time.perf_counter()
    ti, tj, tsim, sizes, matrix = exact_pairs(texts, THRESHOLD)
    brute_s = time.perf_counter() - t0
    truth = set(zip(ti.tolist(), tj.tolist()))

    def exact_j(i: int, j: int) -> float:
        inter = float(matrix[i] @ matrix[j])
        return inter / (sizes[i] + sizes[j] - inter)

    near = int((tsim < 0.85).sum())
    lines = [
        f"exactness corpus: {n:,} documents (seed {args.seed + 1}); exact char-3-gram Jaccard of all "
        f"{n * (n - 1) // 2:,} pairs by brute force ({brute_s:.0f} s): {len(truth):,} pairs >= {THRESHOLD}, "
        f"{near:,} of them below 0.85",
        "  precision: removed rows whose matched pair (the verified duplicate that removed it) has exact "
        f"Jaccard >= {THRESHOLD};",
        "    vs kept row: the same for the pair (removed row, the row kept for its cluster);",
        "  recall: exact pairs >= 0.8 of which the output keeps at most one row",
        f"| {'settings':<34} | {'bands x rows':>12} | {'removed':>7} | {'precision':>9} | {'vs kept row':>11} | "
        f"{'recall':>6} | {'seconds':>7} |",
        f"|{'-' * 36}|{'-' * 14}|{'-' * 9}|{'-' * 11}|{'-' * 13}|{'-' * 8}|{'-' * 9}|",
    ]
    for label, overrides in EXACTNESS_RUNS:
        out = args.tmp / f"exact-out-{len(lines)}"
        config = DedupConfig(input=str(path), output_dir=str(out), workers=args.workers, progress=False,
                             **overrides)
        result = run(config, force=True)
        report = json.loads((out / "report.json").read_text())
        dups = [json.loads(line) for line in (out / "dups.jsonl").read_text().splitlines()]
        removed = {d["line"] - 1 for d in dups}
        matched_ok = sum(exact_j(d["line"] - 1, d["matched_line"] - 1) >= THRESHOLD for d in dups)
        kept_ok = sum(exact_j(d["line"] - 1, d["duplicate_of_line"] - 1) >= THRESHOLD for d in dups)
        resolved = sum(i in removed or j in removed for i, j in truth)
        lsh = f"{report['lsh']['bands']} x {report['lsh']['rows']}"
        lines.append(
            f"| {label:<34} | {lsh:>12} | {len(dups):>7,} | {matched_ok / max(len(dups), 1):>9.4f} | "
            f"{kept_ok / max(len(dups), 1):>11.4f} | {resolved / max(len(truth), 1):>6.4f} | "
            f"{result.duration_s:>7.1f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=20_000, help="Corpus size for the speed runs.")
    parser.add_argument("--memory-docs", type=int, default=80_000,
                        help="Largest size for the traced-memory runs (also run at a quarter of it).")
    parser.add_argument("--baseline-docs", type=int, default=300, help="Subsample for datasketch's update loop.")
    parser.add_argument("--bulk-docs", type=int, default=2_000, help="Subsample for datasketch bulk and rensa.")
    parser.add_argument("--exact-docs", type=int, default=10_000, help="Corpus size for the exactness check (0: skip).")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-files", metavar="DIR", help="Write the corpora and outputs here and keep them.")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--stage-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.method = args.child
        child_main(args)
        return

    import datasketch

    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = Path(args.keep_files or tmp)
        args.tmp.mkdir(parents=True, exist_ok=True)
        load = os.getloadavg()
        print(f"machine: {os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
              f"python {platform.python_version()}, numpy {np.__version__}, datasketch {datasketch.__version__}")
        t0 = time.perf_counter()
        corpus = args.tmp / "corpus.jsonl"
        size = max(args.docs, args.memory_docs)
        rows = Corpus(seed=args.seed).rows(size)
        write_corpus(rows, corpus)
        mean_chars = sum(len(r["instruction"]) + len(r["response"]) + 1 for r in rows) / len(rows)
        planted = sum(r["metadata"]["edit_rate"] >= 0 for r in rows)
        del rows
        print(f"corpus: {size:,} documents, mean {mean_chars:,.0f} characters, {planted:,} planted copies "
              f"(seed {args.seed}, generated in {time.perf_counter() - t0:.0f} s)")

        runs = [("datasketch update loop (spec)", "datasketch-update", min(args.baseline_docs, args.docs)),
                ("datasketch MinHash.bulk", "datasketch-bulk", min(args.bulk_docs, args.docs))]
        try:
            import rensa  # noqa: F401

            runs.append(("rensa RMinHash (Rust)", "rensa", min(args.bulk_docs, args.docs)))
        except ImportError:
            print("rensa: not installed, skipped")
        runs += [(f"cogumi signatures, {args.workers} workers", "cogumi-signatures", args.docs),
                 (f"cogumi dedup stage, {args.workers} workers", "cogumi-stage", args.docs)]
        results = []
        for label, method, n in runs:
            results.append((label, method, measure(method, corpus, n, args)))
        base = results[0][2]["docs_per_s"]
        print()
        print("signatures of 128 permutations over character 3-grams (shingling included for every method);")
        print("the stage row is end to end: read JSONL, sign, index, cluster, write the outputs")
        print(f"| {'method':<34} | {'docs':>7} | {'seconds':>8} | {'docs/s':>8} | {'peak RSS':>9} | {'vs spec loop':>12} |")
        print(f"|{'-' * 36}|{'-' * 9}|{'-' * 10}|{'-' * 10}|{'-' * 11}|{'-' * 14}|")
        for label, _, r in results:
            print(f"| {label:<34} | {r['docs']:>7,} | {r['seconds']:>8.1f} | {r['docs_per_s']:>8,.0f} | "
                  f"{r['peak_rss'] / 2**20:>6,.0f} MB | {r['docs_per_s'] / base:>11.1f}x |")
        full = results[-1][2]
        report = full["report"]
        print("(peak RSS: the whole process tree; the library rows hold every text in memory, the stage "
              "streams the file)")
        print()
        print(f"dedup stage at {full['docs']:,} docs: removed {report['removed']:,}, clusters {report['clusters']:,}, "
              f"bands x rows {report['lsh']['bands']} x {report['lsh']['rows']}, candidates checked "
              f"{report['candidates_checked']:,}; seconds {report['timings_s']}")
        print(f"stage end to end: {full['docs_per_s']:,.0f} docs/s -> 640,000 documents in "
              f"{640_000 / full['docs_per_s'] / 60:.1f} min (target: 1,100 docs/s, under 10 min)")
        # Memory: the main process's allocations traced exactly at two sizes (workers=1, so no
        # worker processes), extrapolated linearly; the worker processes' RSS does not grow with n.
        # Small sizes mislead (fixed costs and transient buffers dominate), hence --memory-docs.
        small, large = (measure("cogumi-stage-traced", corpus, n, args)
                        for n in (args.memory_docs // 4, args.memory_docs))
        per_doc = (large["traced_peak"] - small["traced_peak"]) / (large["docs"] - small["docs"])
        at_640k = large["traced_peak"] + per_doc * (640_000 - large["docs"])
        overhead = max(full["peak_rss"] - large["traced_peak"], 0)  # interpreter, libraries, workers
        print(f"memory: main process peak allocations (tracemalloc) {small['traced_peak'] / 2**20:,.0f} MB at "
              f"{small['docs']:,} docs, {large['traced_peak'] / 2**20:,.0f} MB at {large['docs']:,}: "
              f"{per_doc:,.0f} bytes/doc -> {at_640k / 2**30:.2f} GB at 640,000 docs; plus the rest of the "
              f"{args.workers}-worker run's peak RSS (interpreter, libraries, workers: {overhead / 2**20:,.0f} MB) "
              f"about {(at_640k + overhead) / 2**30:.2f} GB (target: within 2 GB); linear, so a lower bound where "
              "candidate pairs grow faster than n — --docs 640000 --memory-docs 640000 measures it")
        if args.exact_docs:
            print()
            for line in exactness(args):
                print(line)
        load = os.getloadavg()
        print(f"\nload average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
              f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
