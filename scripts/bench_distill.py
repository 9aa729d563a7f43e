"""Benchmark self-consistency sampling: N samples per prompt from one batched call vs a loop.

    .venv/bin/python scripts/bench_distill.py                   # 32 prompts x 10 samples, ~15 minutes on 2 cores
    .venv/bin/python scripts/bench_distill.py --prompts 8 --max-tokens 16

What ``cogumi distill self-consistency`` does for a sampled category: SmolLM2-135M-Instruct,
transformers backend, temperature 0.7, ``--samples`` completions for each of ``--prompts``
prompts (the GSM8K-style problems of ``recipes/data/gsm8k_style.jsonl``, repeated as needed)
with a fixed token budget (``min_new_tokens`` = ``max_tokens`` so both sides generate exactly
the same number of tokens and the timing compares like with like).

* **loop**: one ``generate`` call per sample (prompts x samples calls of n = 1) — the seed's
  ``[generate_solution(...) for _ in range(n_samples)]``;
* **batched**: ``generate`` with ``n = samples`` (``num_return_sequences``), ``--batch-size``
  prompts per forward pass, i.e. batch x samples rows decoded together.

The baseline is measured in the same run. Target: batched >= 5x faster on this CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4, help="prompts per forward pass when batched")
    args = parser.parse_args()

    import torch

    from cogumi.generation import SamplingParams
    from cogumi.generation.hf import TransformersGenerator
    from cogumi.models.fixtures import materialize_smollm2

    rows = [json.loads(line) for line in (ROOT / "recipes/data/gsm8k_style.jsonl").read_text().splitlines()]
    prompts = [[{"role": "user", "content": rows[i % len(rows)]["question"]}] for i in range(args.prompts)]
    generator = TransformersGenerator(str(materialize_smollm2()), progress=False)
    generator.batch_size = 1
    generator.generate(prompts[:1], SamplingParams(max_tokens=4))  # warm-up
    # Every sample runs to the token budget: equal work on both sides.
    generate = generator.model.generate
    generator.model.generate = lambda *a, **kw: generate(*a, min_new_tokens=args.max_tokens, **kw)
    sampled = SamplingParams(max_tokens=args.max_tokens, temperature=0.7, n=args.samples, seed=0)
    single = SamplingParams(max_tokens=args.max_tokens, temperature=0.7, n=1, seed=0)

    print(f"{os.cpu_count()} cores, torch {torch.__version__}, load average before {os.getloadavg()[0]:.2f}")
    print(f"SmolLM2-135M-Instruct (fp32, CPU), {args.prompts} prompts x {args.samples} samples, temperature 0.7, "
          f"{args.max_tokens} new tokens each\n")
    header = f"{'method':<44} {'calls':>6} {'seconds':>8} {'samples/s':>10} {'tokens/s':>9} {'speed-up':>9}"
    print(header)
    print("-" * len(header))

    start = time.perf_counter()
    loop_tokens = 0
    for prompt in prompts:
        for _ in range(args.samples):
            loop_tokens += generator.generate([prompt], single)[0][0].completion_tokens
    loop = time.perf_counter() - start
    total = args.prompts * args.samples
    print(f"{'loop: one generate call per sample':<44} {total:>6} {loop:>8.1f} {total / loop:>10.2f} "
          f"{loop_tokens / loop:>9.1f} {1.0:>8.2f}x")

    generator.batch_size = args.batch_size
    start = time.perf_counter()
    results = generator.generate(prompts, sampled)
    batched = time.perf_counter() - start
    tokens = sum(c.completion_tokens for r in results for c in r)
    calls = -(-args.prompts // args.batch_size)
    distinct = sum(len({c.text for c in r}) for r in results) / len(results)
    print(f"{f'batched: n={args.samples}, {args.batch_size} prompts per call':<44} {calls:>6} {batched:>8.1f} "
          f"{total / batched:>10.2f} {tokens / batched:>9.1f} {loop / batched:>8.2f}x")
    print(f"\nload average after {os.getloadavg()[0]:.2f}; distinct samples per prompt (batched): {distinct:.1f} of "
          f"{args.samples}; target: batched >= 5x ({'met' if loop / batched >= 5 else 'MISSED'})")


if __name__ == "__main__":
    main()
