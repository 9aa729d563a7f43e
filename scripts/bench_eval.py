"""Benchmark batched generation for evaluation: the same prompts one by one and in batches.

    .venv/bin/python scripts/bench_eval.py                      # SmolLM2-135M, 16 prompts, ~3 minutes on 2 cores
    .venv/bin/python scripts/bench_eval.py --batch-sizes 1 4 8 16 --max-tokens 64

What is timed is what ``cogumi eval`` does for a generative benchmark: the GSM8K-style problems
of ``recipes/data/gsm8k_style.jsonl`` asked through SmolLM2-135M-Instruct's chat template by the
transformers backend, greedy, with a fixed token budget. ``--batch-sizes 1`` is the one-by-one
baseline, measured in the same run. A warm-up call first keeps one-off costs out of every row.

Besides time, the table shows generated tokens/s and how many answers are identical to the
one-by-one answers: batching pads prompts on the left, and a padded row may differ from the
unpadded one in the last bits of its logits, which can flip a greedy near-tie; the score is
printed so such flips are seen, not hidden.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT / "recipes/data/gsm8k_style.jsonl"))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--limit", type=int, default=16)
    args = parser.parse_args()

    import torch

    from cogumi.evaluate.benchmarks import get_benchmark, prompt_for
    from cogumi.evaluate.parsing import gsm8k_flexible
    from cogumi.generation import SamplingParams
    from cogumi.generation.hf import TransformersGenerator
    from cogumi.models.fixtures import materialize_smollm2

    bench = get_benchmark("gsm8k")
    examples = bench.load(args.data, args.limit)
    prompts = [prompt_for(bench, ex, chat=True) for ex in examples]
    generator = TransformersGenerator(str(materialize_smollm2()), progress=False)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    generator.batch_size = 1
    generator.generate(prompts[:1], SamplingParams(max_tokens=8))  # warm-up

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, load average before {os.getloadavg()[0]:.2f}")
    print(f"{len(prompts)} GSM8K-style prompts, SmolLM2-135M-Instruct (fp32, CPU), greedy, max {args.max_tokens} new tokens\n")
    header = f"{'batch size':>10} {'seconds':>9} {'tokens':>7} {'tokens/s':>9} {'speed-up':>9} {'same answers':>13} {'correct':>8}"
    print(header)
    print("-" * len(header))
    baseline_time = None
    baseline_texts = None
    rows = []
    for batch_size in args.batch_sizes:
        generator.batch_size = batch_size
        start = time.perf_counter()
        results = generator.generate(prompts, params)
        seconds = time.perf_counter() - start
        texts = [r[0].text for r in results]
        tokens = sum(r[0].completion_tokens for r in results)
        if baseline_time is None:
            baseline_time, baseline_texts = seconds, texts
        same = sum(a == b for a, b in zip(texts, baseline_texts))
        correct = sum(gsm8k_flexible(t) == ex.reference for t, ex in zip(texts, examples))
        rows.append({"batch_size": batch_size, "seconds": seconds, "tokens": tokens, "speedup": baseline_time / seconds})
        print(f"{batch_size:>10} {seconds:>9.1f} {tokens:>7} {tokens / seconds:>9.1f} {baseline_time / seconds:>8.2f}x "
              f"{same:>6}/{len(texts):<6} {correct:>4}/{len(texts)}")
    print(f"\nload average after {os.getloadavg()[0]:.2f}; target: batched >= 3x faster than one by one")
    best = max(rows[1:], key=lambda r: r["speedup"], default=None)
    if best:
        print(f"best: batch size {best['batch_size']}, {best['speedup']:.2f}x "
              f"({'meets' if best['speedup'] >= 3 else 'MISSES'} the target)")
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
