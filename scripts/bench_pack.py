"""Benchmark `cogumi pack`: size ratio and speed of cogumi's codec against plain zstd 10 and 19.

    .venv/bin/python scripts/bench_pack.py                          # ~5 minutes on 2 cores
    .venv/bin/python scripts/bench_pack.py --gguf Q5KM.gguf --pruned-gguf PRUNED_Q5KM.gguf
    .venv/bin/python scripts/bench_pack.py --make-pruned             # build the pruned GGUF here

Inputs (issue #8, item 5):
  (i)   SmolLM2-135M Q5_K_M GGUF: ``--gguf``, or the shipped Q4_1 GGUF re-quantized to Q5_K_M
        by llama.cpp (``llama_model_quantize``, ``allow_requantize``).
  (ii)  SmolLM2 2:4-pruned Q5_K_M GGUF: ``--pruned-gguf``; without it the row is skipped, unless
        ``--make-pruned``: magnitude 2:4 on the dequantized Q4_1 weights of the decoder
        projections (embeddings and norms dense), written as F16 GGUF, quantized to Q5_K_M.
  (iii) a BF16 safetensors Llama of ~60M parameters, normal-initialised (std 0.02, seeded),
        saved by transformers ``save_pretrained``.

Every row goes file to file through ``pack_file`` / ``unpack_file`` (plain zstd rows with
``codec="zstd"``), so all rows pay the same reading, SHA-256, writing and fsync; speeds are
MB (10^6 bytes) of the original per second, the best of ``--repeat`` runs (zstd 19: one run).
Targets: on every input cogumi's ratio >= zstd 19's, compression >= 50 MB/s, decompression
>= 500 MB/s; on BF16 safetensors a ratio >= 1.4x.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

#: The decoder projections cogumi's prune stage prunes (GGUF names).
PRUNED = re.compile(r"blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight")


def quantize_q5_k_m(src: Path, dst: Path) -> Path:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M
    params.allow_requantize = True
    params.nthread = os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"llama.cpp could not quantize {src}")
    return dst


def make_pruned_gguf(src: Path, work: Path) -> Path:
    """2:4 magnitude pruning of the dequantized decoder projections, then Q5_K_M."""
    import gguf
    import numpy as np
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(src)
    f16 = work / "smollm2-pruned-f16.gguf"
    writer = gguf.GGUFWriter(str(f16), reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub_type)
    for tensor in reader.tensors:
        values = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        if PRUNED.fullmatch(tensor.name):
            groups = values.reshape(-1, 4)
            np.put_along_axis(groups, np.argsort(np.abs(groups), axis=1)[:, :2], 0, axis=1)
        writer.add_tensor(tensor.name, values.astype(np.float16) if values.ndim == 2 else values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return quantize_q5_k_m(f16, work / "smollm2-pruned-q5_k_m.gguf")


def make_bf16_llama(work: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=8, initializer_range=0.02,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    target = work / "llama-60m-bf16"
    model.save_pretrained(target)
    params = sum(p.numel() for p in model.parameters())
    print(f"BF16 Llama: {params / 1e6:.1f}M parameters, normal(0, 0.02) init, seed 0")
    return target / "model.safetensors"


def measure(path: Path, work: Path, codec: str, level: int, repeat: int) -> dict:
    from cogumi.export.pack import pack_file, unpack_file

    packed = work / f"{path.name}.{codec}{level}"
    back = work / f"{path.name}.back"
    best_pack = best_unpack = None
    for _ in range(repeat):
        report = pack_file(path, packed, codec=codec, level=level)
        best_pack = report if best_pack is None or report["seconds"] < best_pack["seconds"] else best_pack
        unpacked = unpack_file(packed, back)
        best_unpack = unpacked if best_unpack is None or unpacked["seconds"] < best_unpack["seconds"] else best_unpack
    same = back.read_bytes() == path.read_bytes()
    cli = None
    if codec == "zstd" and shutil.which("zstd"):  # the floor: zstd's own CLI on the same .zst
        seconds = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            subprocess.run(["zstd", "-q", "-d", "-f", str(packed), "-o", str(back)], check=True)
            seconds.append(time.perf_counter() - t0)
        cli = path.stat().st_size / 1e6 / min(seconds)
    packed.unlink()
    back.unlink()
    if not same:
        raise SystemExit(f"{path}: round trip is not bit-exact ({codec} {level})")
    return {"ratio": best_pack["original_bytes"] / best_pack["packed_bytes"], "packed": best_pack["packed_bytes"],
            "compress": best_pack["mb_per_s"], "decompress": best_unpack["mb_per_s"], "kinds": best_pack["kinds"],
            "cli": cli}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", type=Path, help="SmolLM2 Q5_K_M GGUF (default: re-quantize the shipped Q4_1).")
    parser.add_argument("--pruned-gguf", type=Path, help="SmolLM2 2:4-pruned Q5_K_M GGUF (default: skipped).")
    parser.add_argument("--make-pruned", action="store_true", help="Without --pruned-gguf, build one here.")
    parser.add_argument("--repeat", type=int, default=3, help="Runs per speed figure (best kept; zstd 19: 1).")
    parser.add_argument("--kinds", action="store_true", help="Also print cogumi's bytes in/out per tensor kind.")
    args = parser.parse_args()

    from cogumi.models.fixtures import smollm2_gguf_path

    work = Path(tempfile.mkdtemp(prefix="bench-pack-"))
    try:
        inputs: list[tuple[str, Path | None, str]] = []
        gguf_path = args.gguf or quantize_q5_k_m(smollm2_gguf_path(), work / "smollm2-q5_k_m.gguf")
        inputs.append(("SmolLM2 Q5_K_M GGUF", gguf_path, "given" if args.gguf else "re-quantized from the Q4_1"))
        if args.pruned_gguf:
            inputs.append(("SmolLM2 2:4 Q5_K_M GGUF", args.pruned_gguf, "given"))
        elif args.make_pruned:
            inputs.append(("SmolLM2 2:4 Q5_K_M GGUF", make_pruned_gguf(smollm2_gguf_path(), work),
                           "magnitude 2:4 on the dequantized Q4_1, re-quantized"))
        else:
            inputs.append(("SmolLM2 2:4 Q5_K_M GGUF", None, "skipped: no --pruned-gguf given"))
        inputs.append(("Llama-60M BF16 safetensors", make_bf16_llama(work), "normal(0, 0.02), seed 0"))

        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"\n{os.cpu_count()} CPU cores, load average {load:.2f} at the start; file to file, SHA-256 "
              f"verified, fsync; best of {args.repeat} (zstd 19: 1 run)\n")
        header = (f"{'input':<28} {'size MB':>8} {'method':<12} {'ratio':>7} {'packed MB':>10} "
                  f"{'compress MB/s':>14} {'decompress MB/s':>16}")
        print(header)
        print("-" * len(header))
        checks = []
        for name, path, note in inputs:
            if path is None:
                print(f"{name:<28} {'-':>8} {note}")
                continue
            size = path.stat().st_size / 1e6
            rows = {}
            for method, codec, level, repeat in (("zstd -10", "zstd", 10, args.repeat), ("zstd -19", "zstd", 19, 1),
                                                 ("cogumi", "cogumi", 10, args.repeat)):
                row = rows[method] = measure(path, work, codec, level, repeat)
                print(f"{name:<28} {size:>8.1f} {method:<12} {row['ratio']:>6.3f}x {row['packed'] / 1e6:>10.1f} "
                      f"{row['compress']:>14.1f} {row['decompress']:>16.1f}")
            if args.kinds:
                for kind, entry in rows["cogumi"]["kinds"].items():
                    if entry.get("bytes_in"):
                        print(f"{'':<28} {'':>8} {'  ' + kind:<12} {entry['bytes_in'] / entry['bytes_out']:>6.3f}x "
                              f"{entry['bytes_out'] / 1e6:>10.2f}   ({', '.join(entry['transforms'])})")
            print(f"{'':<28} ({note})")
            if rows["zstd -10"]["cli"]:
                print(f"{'':<28} (zstd's own CLI decompresses the zstd -10 file at {rows['zstd -10']['cli']:.1f} MB/s: "
                      "no SHA-256, no fsync)")
            ours = rows["cogumi"]
            checks.append((f"{name}: cogumi ratio {ours['ratio']:.3f}x >= zstd -19 {rows['zstd -19']['ratio']:.3f}x",
                           ours["ratio"] >= rows["zstd -19"]["ratio"]))
            checks.append((f"{name}: compression {ours['compress']:.1f} MB/s >= 50", ours["compress"] >= 50))
            checks.append((f"{name}: decompression {ours['decompress']:.1f} MB/s >= 500", ours["decompress"] >= 500))
            if "BF16" in name:
                checks.append((f"{name}: ratio {ours['ratio']:.3f}x >= 1.4x", ours["ratio"] >= 1.4))
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"\nload average {load:.2f} at the end")
        print("\ntargets (issue #8):")
        for text, met in checks:
            print(f"  [{'met' if met else 'MISSED'}] {text}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
