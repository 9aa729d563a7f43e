"""Benchmark GGUF export on SmolLM2-135M: size, bits per weight and parity with transformers for
each llama.cpp type.

    .venv/bin/python scripts/bench_export.py                     # every row; ~15 minutes on 2 cores
    .venv/bin/python scripts/bench_export.py --types F16 Q8_0 Q5_K_M Q4_K_M \
        --texts gsm8k_style.jsonl distill_problems.jsonl --seq-len 200 --max-tokens 800   # math only

Every row goes through the real stages: ``export-gguf`` (cogumi's converter, then llama.cpp's
quantizer from an F32 GGUF, then llama.cpp's load check) and ``export-verify`` (the same token
windows through transformers and llama.cpp: perplexity of each, mean KL, top-1 agreement).
"Δ ppl vs F16" compares llama.cpp's perplexity with the F16 GGUF's, measured in the same run.

Text (default): the repository's demo text — math word problems (recipes/data/gsm8k_style.jsonl),
instructions with answers (demo_train.jsonl) and judge prompts — 2,048 tokens in windows of 512.

Rows after the plain types are per-tensor choices (the stretch goal of issue #8): SmolLM2's
rows of 576 values are no multiple of 256, so llama.cpp's K-quant mixes fall back for most
tensors; the variants pick those tensors' types explicitly.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT_FILES = ["gsm8k_style.jsonl", "demo_train.jsonl", "judge_prompts.jsonl"]
#: The matrices whose rows (576) do not fit a K-quant's super-block of 256.
NARROW = r"attn_(q|k|v|output)\.weight|ffn_(gate|up)\.weight"

PLAIN = ["F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_1",
         "Q4_0", "Q3_K_M", "IQ4_NL"]
#: name -> export-gguf settings
VARIANTS = {
    "Q5_K_M, narrow→Q5_0": {"type": "Q5_K_M", "tensor_types": {NARROW: "Q5_0"}},
    "Q5_K_M, narrow→Q8_0": {"type": "Q5_K_M", "tensor_types": {NARROW: "Q8_0"}},
    "Q4_K_M, narrow→Q4_1": {"type": "Q4_K_M", "tensor_types": {NARROW: "Q4_1"}},
    "Q5_K_M, pure": {"type": "Q5_K_M", "pure": True},
}


def held_out(work: Path, files: list[str]) -> Path:
    rows = []
    for name in files:
        rows += (ROOT / "recipes" / "data" / name).read_text(encoding="utf-8").splitlines()
    path = work / "held_out.jsonl"
    path.write_text("\n".join(r for r in rows if r.strip()) + "\n", encoding="utf-8")
    return path


def fmt_fallbacks(report: dict) -> str:
    quantization = report["quantization"]
    fallbacks = quantization["fallbacks"]
    text = "none"
    if fallbacks["count"]:
        by_type = ", ".join(f"{n} → {t}" for t, n in fallbacks["by_type"].items())
        text = f"{fallbacks['count']} of {len(quantization['tensors'])} ({by_type})"
    chosen = quantization.get("overridden") or {}
    if chosen.get("count"):
        text += f"; {chosen['count']} set by the variant"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--types", nargs="+", default=[*PLAIN, *VARIANTS], help="Rows (plain types or variant names).")
    parser.add_argument("--texts", nargs="+", default=TEXT_FILES, help="Held-out files under recipes/data/.")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--workdir", default="", help="Keep the GGUFs and reports here (default: a temp dir).")
    parser.add_argument("--json", default="", help="Also write the rows as JSON to this file.")
    args = parser.parse_args()

    from cogumi.models.fixtures import materialize_smollm2
    from cogumi.stage import run_stage

    model = materialize_smollm2()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-export-"))
    work.mkdir(parents=True, exist_ok=True)
    data = held_out(work, args.texts)
    rows = []
    for i, name in enumerate(args.types):
        settings = VARIANTS.get(name, {"type": name})
        out = work / f"{i:02d}-{settings['type']}"
        export = run_stage("export-gguf", {"model": str(model), "output_dir": str(out), **settings})
        report = json.loads((out / "export.json").read_text())
        gguf = export.outputs["gguf"]
        verify = run_stage("export-verify", {"model": str(model), "gguf": gguf, "data": str(data),
                                             "seq_len": args.seq_len, "max_tokens": args.max_tokens,
                                             "output_dir": str(out / "verify"), "progress": False})
        figures = json.loads((out / "verify" / "verify.json").read_text())
        row = {"name": name, "settings": settings, "size_mb": report["quantization"]["size_mb"],
               "bits_per_weight": report["quantization"]["bits_per_weight"],
               "ppl_transformers": figures["ppl_transformers"], "ppl_llamacpp": figures["ppl_llamacpp"],
               "kl_mean": figures["kl_mean"], "top1": figures["top1_agreement"], "positions": figures["positions"],
               "tensor_types": report["quantization"]["tensor_types"], "fallbacks": fmt_fallbacks(report),
               "tokenization_agreement": figures["tokenization"]["agreement"]}
        rows.append(row)
        print(f"{name}: {row['size_mb']} MB, ppl {row['ppl_llamacpp']:.4f}, top-1 {row['top1']:.4f} "
              f"({verify.duration_s:.0f} s)", flush=True)
    f16 = next((r["ppl_llamacpp"] for r in rows if r["name"] == "F16"), None)
    print()
    print(f"SmolLM2-135M-Instruct, {rows[0]['positions']} scored positions of {', '.join(args.texts)} "
          f"(windows of {args.seq_len} tokens)\n")
    print("| type | size MB | bits/weight | ppl transformers | ppl llama.cpp | Δ ppl vs F16 | top-1 vs transformers "
          "| KL (nats) | tensors that fell back |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for row in rows:
        delta = f"{100 * (row['ppl_llamacpp'] / f16 - 1):+.2f}%" if f16 else "n/a"
        print(f"| {row['name']} | {row['size_mb']:.1f} | {row['bits_per_weight']:.2f} | {row['ppl_transformers']:.4f} "
              f"| {row['ppl_llamacpp']:.4f} | {delta} | {100 * row['top1']:.2f}% | {row['kl_mean']:.4f} "
              f"| {row['fallbacks']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
