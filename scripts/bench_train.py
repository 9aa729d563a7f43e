"""Benchmark ``cogumi train``: training tokens/s with and without packing, same data, same model.

    .venv/bin/python scripts/bench_train.py                  # SmolLM2-135M, QLoRA, CPU: ~6 minutes on 2 cores
    .venv/bin/python scripts/bench_train.py --quantization none --steps 6

Both runs go through the real stage (``cogumi.train.sft.run``): SmolLM2-135M-Instruct, LoRA r 64
on q/k/v/o/gate/up/down, 4-bit NF4 base by default, assistant-only labels. The data is
generated (seeded): instruction/response rows whose answers range from a few words to a few
hundred tokens, the long-tailed mix that makes padding expensive.

* without packing: ``--rows-per-step`` examples per step, padded to the longest of the batch;
* with packing: the examples packed best-fit-decreasing into ``--max-length`` rows, trained
  padding-free (per-example positions), as many rows per step as hold the same number of real
  tokens on average.

Tokens/s counts real (non-padding) tokens from the second logged step to the last (the first
step pays for warm-up), from the stage's metrics log. Also printed: how much of the computed
positions were padding, the supervised-token share, and on CUDA the peak GPU memory. The
machine's load average is printed before and after: on a shared machine, compare the two
columns of one run, not figures from different runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import tempfile
from pathlib import Path

WORDS = ("model data train token answer question value function result number list string code "
         "python return first second example because therefore compute check error memory speed "
         "layer weight input output batch step loss rate small large simple clear short long").split()


def make_rows(n: int, seed: int) -> list[dict]:
    """Instruction/response rows with a long-tailed answer length (about 5 to 400 words)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 25)))
        length = min(400, max(5, int(rng.lognormvariate(math.log(40), 1.0))))
        answer = " ".join(rng.choice(WORDS) for _ in range(length))
        rows.append({"instruction": f"Question {i}: {question}?", "response": answer.capitalize() + "."})
    return rows


def bench(packing: bool, data: Path, work: Path, args) -> dict:
    """One stage run; tokens/s and the rest read back from its metrics log and report."""
    from cogumi.models.fixtures import materialize_smollm2
    from cogumi.train.sft import TrainConfig, run

    out = work / ("packing" if packing else "no-packing")
    config = TrainConfig(
        data=str(data), model=str(materialize_smollm2()), output_dir=str(out), quantization=args.quantization,
        packing=packing, batch_size=args.packed_rows if packing else args.rows_per_step, grad_accum=1,
        max_steps=args.steps, max_length=args.max_length, learning_rate=1e-4, warmup_steps=0, logging_steps=1,
        save_steps=10_000, val_fraction=0.0, gradient_checkpointing=False, progress=False,
    )
    result = run(config, force=True)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in logged if "loss" in r]
    first, last = steps[0], steps[-1]
    tokens = last["num_tokens"] - first["num_tokens"]
    seconds = last["time"] - first["time"]
    report = json.loads((out / "train_report.json").read_text())
    return {
        "mode": "packing" if packing else "no packing",
        "rows_per_step": config.batch_size,
        "steps": len(steps),
        "tokens_per_step": tokens / max(1, len(steps) - 1),
        "tokens_per_s": tokens / seconds,
        "seconds_per_step": seconds / max(1, len(steps) - 1),
        "padding_share": result.metrics.get("padding_share", 0.0),
        "supervised_share": report["train_data"]["supervised_share"],
        "gpu_peak_gib": result.metrics.get("gpu_peak_memory_gib"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=96, help="Generated training rows.")
    parser.add_argument("--steps", type=int, default=8, help="Optimizer steps per mode.")
    parser.add_argument("--max-length", type=int, default=512, help="Tokens per example and packed row.")
    parser.add_argument("--rows-per-step", type=int, default=8, help="Examples per step without packing.")
    parser.add_argument("--packed-rows", type=int, default=0,
                        help="Packed rows per step (0: as many as hold --rows-per-step average examples).")
    parser.add_argument("--quantization", choices=["nf4", "none"], default="nf4")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    from cogumi.models.fixtures import materialize_smollm2
    from cogumi.train.data import ChatFormatter, encode_rows, prepare_tokenizer

    rows = make_rows(args.rows, args.seed)
    tokenizer = AutoTokenizer.from_pretrained(materialize_smollm2())
    prepare_tokenizer(tokenizer)
    _, fmt = encode_rows(rows, ChatFormatter(tokenizer), max_length=args.max_length)
    mean_tokens = fmt.tokens / fmt.kept
    if not args.packed_rows:
        args.packed_rows = max(1, round(args.rows_per_step * mean_tokens / args.max_length))

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"device: {device}; torch {torch.__version__}; {platform.platform()}")
    print(f"data: {fmt.kept} rows, {mean_tokens:.0f} tokens on average, {fmt.truncated} truncated to {args.max_length}")
    print(f"model: SmolLM2-135M-Instruct, LoRA r 64, base {args.quantization}; {args.steps} steps per mode")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "bench.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        for packing in (False, True):
            results.append(bench(packing, data, Path(tmp), args))
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print()
    header = ("mode", "rows/step", "tokens/step", "s/step", "tokens/s", "padding", "supervised", "GPU peak GiB")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for r in results:
        gpu = f"{r['gpu_peak_gib']:.2f}" if r["gpu_peak_gib"] is not None else "n/a (CPU)"
        print(f"| {r['mode']} | {r['rows_per_step']} | {r['tokens_per_step']:.0f} | {r['seconds_per_step']:.2f} | "
              f"{r['tokens_per_s']:.0f} | {100 * r['padding_share']:.1f}% | {100 * r['supervised_share']:.1f}% | {gpu} |")
    speedup = results[1]["tokens_per_s"] / results[0]["tokens_per_s"]
    print(f"\npacking: {speedup:.2f}x the tokens/s of padded batches")


if __name__ == "__main__":
    main()
