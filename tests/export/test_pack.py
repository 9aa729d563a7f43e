"""cogumi pack / unpack: bit-exact round trips (GGUF, safetensors, any file), corrupt and
truncated containers refused with nothing left behind, cogumi's codec against plain zstd on each
tensor kind, the dictionary trial, and the CLI. Real files, real zstd; nothing is mocked."""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from support import words

from cogumi.cli import main
from cogumi.export.pack import (
    QUANT_LAYOUTS,
    VALUE_CODECS,
    PackError,
    _k_scales,
    pack_file,
    parse_gguf,
    quant_values,
    read_header,
    unpack_file,
)
from cogumi.stage import run_stage


def normal(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.02, shape).astype(np.float32)


def prune_2_4(weights: np.ndarray) -> np.ndarray:
    """Zero the two smallest-magnitude weights of every group of four along the rows."""
    groups = weights.reshape(-1, 4).copy()
    smallest = np.argsort(np.abs(groups), axis=1)[:, :2]
    np.put_along_axis(groups, smallest, 0, axis=1)
    return groups.reshape(weights.shape)


def write_gguf(path: Path, tensors: dict[str, tuple[np.ndarray, str]]) -> Path:
    """A GGUF with some metadata and the tensors, each (float32 values, ggml type name)."""
    import gguf
    from gguf.quants import quantize

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("pack-test")
    writer.add_context_length(128)
    writer.add_token_list([f"token{i}" for i in range(500)])
    for name, (values, type_name) in tensors.items():
        qtype = gguf.GGMLQuantizationType[type_name]
        if type_name in ("F32", "F16"):
            writer.add_tensor(name, values.astype(np.float32 if type_name == "F32" else np.float16))
        else:
            writer.add_tensor(name, quantize(values, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_safetensors(path: Path, tensors: dict) -> Path:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory) -> Path:
    return write_gguf(tmp_path_factory.mktemp("gguf") / "model.gguf", {
        "token_embd.weight": (normal((512, 256), 1), "F16"),
        "blk.0.attn_norm.weight": (1 + normal((256,), 2), "F32"),
        "blk.0.attn_q.weight": (normal((256, 256), 3), "BF16"),
        "blk.0.attn_k.weight": (normal((256, 256), 4), "Q8_0"),
        "blk.0.attn_v.weight": (normal((256, 256), 5), "Q4_0"),
        "blk.0.ffn_up.weight": (normal((512, 256), 6), "Q5_1"),
        "output.weight": (normal((512, 256), 7), "Q4_1"),
    })


@pytest.fixture(scope="module")
def safetensors_file(tmp_path_factory) -> Path:
    import torch

    torch.manual_seed(0)
    return write_safetensors(tmp_path_factory.mktemp("st") / "model.safetensors", {
        "embed.weight": (torch.randn(512, 128) * 0.02).to(torch.bfloat16),
        "layer.q.weight": (torch.randn(128, 128) * 0.02).to(torch.float16),
        "layer.norm.weight": torch.ones(128) + torch.randn(128) * 0.01,
        "layer.pruned.weight": torch.from_numpy(prune_2_4(normal((128, 128), 9))).to(torch.bfloat16),
        "position_ids": torch.arange(300, dtype=torch.int64),
    })


@pytest.fixture(scope="module")
def random_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("raw") / "notes.bin"
    rng = np.random.default_rng(0)
    path.write_bytes(rng.bytes(600_000) + b"some text that repeats. " * 20_000)
    return path


def round_trip(src: Path, tmp_path: Path, **options) -> tuple[dict, Path]:
    report = pack_file(src, tmp_path / "packed" / (src.name + ".pack"), **options)
    back = tmp_path / "back" / src.name
    unpack_file(report["output"], back)
    assert back.read_bytes() == src.read_bytes()
    return report, back


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


# ----------------------------------------------------------------------------- round trips

def test_gguf_round_trip_is_bit_exact(gguf_file, tmp_path):
    report, _ = round_trip(gguf_file, tmp_path)
    assert report["format"] == "gguf" and report["codec"] == "cogumi"
    kinds = report["kinds"]
    assert {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q5_1", "Q4_1", "metadata"} <= set(kinds)
    assert kinds["Q8_0"]["transforms"] == {"fields": 1} and kinds["BF16"]["transforms"] == {"planes": 1}
    assert sum(k.get("bytes_in", 0) for k in kinds.values()) == report["original_bytes"]
    assert sum(k["bytes_out"] for k in kinds.values()) == report["packed_bytes"]
    assert report["sha256"] == read_header(report["output"])["sha256"]


def test_safetensors_round_trip_is_bit_exact(safetensors_file, tmp_path):
    report, _ = round_trip(safetensors_file, tmp_path)
    assert report["format"] == "safetensors"
    kinds = report["kinds"]
    assert kinds["BF16"]["tensors"] == 2 and kinds["BF16"]["transforms"] == {"planes": 1, "sparse": 1}
    assert kinds["F16"]["transforms"] == {"planes": 1} and kinds["F32"]["transforms"] == {"planes": 1}
    assert kinds["I64"]["transforms"] == {"raw": 1}


def test_any_file_round_trips_as_standard_zstd(random_file, tmp_path):
    import zstandard

    report = pack_file(random_file, tmp_path / "notes.bin.zst")
    assert (report["format"], report["codec"]) == ("raw", "zstd")
    packed = Path(report["output"]).read_bytes()
    # The container is an ordinary zstd stream: our records are skippable frames.
    reader = zstandard.ZstdDecompressor().stream_reader(packed, read_across_frames=True)
    assert reader.read() == random_file.read_bytes()
    if shutil.which("zstd"):
        subprocess.run(["zstd", "-q", "-d", report["output"], "-o", str(tmp_path / "cli.bin")], check=True)
        assert (tmp_path / "cli.bin").read_bytes() == random_file.read_bytes()
    back = tmp_path / "back.bin"
    unpack_file(report["output"], back)
    assert back.read_bytes() == random_file.read_bytes()


def test_cogumi_container_is_refused_by_plain_zstd(gguf_file, tmp_path):
    import zstandard

    report = pack_file(gguf_file, tmp_path / "model.gguf.czst")
    with pytest.raises(zstandard.ZstdError):
        zstandard.ZstdDecompressor().stream_reader(Path(report["output"]).read_bytes(), read_across_frames=True).read()


@pytest.mark.parametrize("codec", ["cogumi", "zstd"])
def test_empty_and_tiny_files_round_trip(tmp_path, codec):
    for content in (b"", b"x", b"GGUF"):
        src = tmp_path / f"f{len(content)}.bin"
        src.write_bytes(content)
        report, _ = round_trip(src, tmp_path / codec / src.name, codec=codec)
        assert report["original_bytes"] == len(content)


def test_small_chunks_and_one_thread_give_the_same_bytes(safetensors_file, tmp_path):
    report, _ = round_trip(safetensors_file, tmp_path / "a", chunk_mb=1 / 16, threads=1)
    assert report["chunks"] > 3
    again = pack_file(safetensors_file, tmp_path / "b.czst", chunk_mb=1 / 16, threads=2)
    assert Path(again["output"]).read_bytes() == Path(report["output"]).read_bytes()


def test_gguf_parser_agrees_with_ggufreader(gguf_file):
    from gguf import GGUFReader

    expected = sorted((int(t.data_offset), int(t.n_bytes), t.tensor_type.name) for t in GGUFReader(gguf_file).tensors)
    found = [(p.offset, p.length, p.kind) for p in parse_gguf(gguf_file) if p.kind != "metadata"]
    assert found == expected


def test_quant_layouts_tile_their_blocks():
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    for name, (block, fields) in QUANT_LAYOUTS.items():
        assert GGML_QUANT_SIZES[GGMLQuantizationType[name]][1] == block, name
        assert fields[0][1] == 0 and fields[-1][2] == block, name
        assert all(a[2] == b[1] for a, b in itertools.pairwise(fields)), name
        assert all(role in ("f16", "bytes", "q") for *_, role in fields), name


# ----------------------------------------------------------------------------- bad containers

@pytest.fixture(scope="module")
def packed_gguf(gguf_file, tmp_path_factory) -> Path:
    return Path(pack_file(gguf_file, tmp_path_factory.mktemp("packed") / "model.gguf.czst")["output"])


def damaged(packed: Path, tmp_path: Path, how: str) -> Path:
    data = bytearray(packed.read_bytes())
    if how == "flip-middle":
        data[len(data) // 2] ^= 0x40
    elif how == "flip-header":
        data[20] ^= 0x01
    elif how == "flip-last-frame":
        data[-40] ^= 0x01
    elif how == "truncated-half":
        data = data[: len(data) // 2]
    elif how == "truncated-end":
        data = data[:-1]
    elif how == "trailing-bytes":
        data += b"extra"
    path = tmp_path / "in" / packed.name
    path.parent.mkdir()
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("how", ["flip-middle", "flip-header", "flip-last-frame", "truncated-half",
                                 "truncated-end", "trailing-bytes"])
def test_damaged_container_is_refused_and_leaves_nothing(packed_gguf, tmp_path, how):
    bad = damaged(packed_gguf, tmp_path, how)
    out_dir = tmp_path / "out"
    with pytest.raises(PackError) as error:
        unpack_file(bad, out_dir / "model.gguf")
    message = str(error.value)
    assert str(bad) in message
    assert ("truncated" if how.startswith("truncated") else "corrupt") in message
    assert leftovers(out_dir) == []


def test_a_damaged_model_file_still_round_trips(gguf_file, tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(gguf_file.read_bytes()[:300])  # GGUF magic, header cut short
    report, _ = round_trip(broken, tmp_path)
    assert report["codec"] == "cogumi" and "could not parse as gguf" in report["note"]


def test_not_a_container_is_refused(gguf_file, tmp_path):
    with pytest.raises(PackError, match="not a cogumi pack container"):
        unpack_file(gguf_file, tmp_path / "x")
    assert leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- codec vs plain zstd

def packed_sizes(path: Path, tmp_path: Path) -> tuple[int, int, dict]:
    """(cogumi bytes, plain zstd bytes) at the same level, and cogumi's report."""
    ours = pack_file(path, tmp_path / (path.name + ".czst"), codec="cogumi")
    plain = pack_file(path, tmp_path / (path.name + ".zst"), codec="zstd")
    return ours["packed_bytes"], plain["packed_bytes"], ours


@pytest.mark.parametrize("kind", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("pruned", [False, True], ids=["dense", "2:4-pruned"])
def test_codec_beats_plain_zstd_on_float_weights(tmp_path, kind, pruned):
    import torch

    weights = normal((1024, 1024), 11)
    if pruned:
        weights = prune_2_4(weights)
    dtype = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[kind]
    path = write_safetensors(tmp_path / "w.safetensors", {"w": torch.from_numpy(weights).to(dtype)})
    ours, plain, report = packed_sizes(path, tmp_path)
    assert ours < plain
    assert report["kinds"][kind]["transforms"] == {"sparse" if pruned else "planes": 1}
    if kind == "BF16" and not pruned:  # ZipNN's 1.51x; the issue's target 1.4x
        assert report["ratio"] >= 1.4


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
@pytest.mark.parametrize("pruned", [False, True], ids=["dense", "2:4-pruned"])
def test_codec_beats_plain_zstd_on_quantized_blocks(tmp_path, kind, pruned):
    weights = normal((512, 1024), 12)
    if pruned:
        weights = prune_2_4(weights)
    path = write_gguf(tmp_path / "q.gguf", {"blk.0.ffn_up.weight": (weights, kind)})
    ours, plain, report = packed_sizes(path, tmp_path)
    assert ours < plain
    transforms = report["kinds"][kind]["transforms"]
    if kind not in VALUE_CODECS:
        assert transforms == {"fields": 1}
    elif pruned:  # the zero code fills half the values: stored relative to it, they pay
        assert transforms == {"values": 1} and report["kinds"][kind]["ratio"] > 1.3


@pytest.mark.parametrize("kind", ["Q4_1", "Q5_0", "Q5_1"])
def test_quant_values_match_ggml_dequantization(kind):
    """The value planes are read in ggml's element order: dequantizing them by hand gives
    exactly what gguf's dequantizer gives (the K-quants are checked on SmolLM2 below)."""
    import gguf
    from gguf.quants import dequantize, quantize

    blocks = quantize(normal((64, 256), 13), gguf.GGMLQuantizationType[kind]).reshape(-1)
    assert np.array_equal(dequantize_by_hand(kind, blocks),
                          dequantize(blocks.reshape(-1, QUANT_LAYOUTS[kind][0]), gguf.GGMLQuantizationType[kind])
                          .reshape(-1, 32).astype(np.float64))


def dequantize_by_hand(kind: str, blocks: np.ndarray) -> np.ndarray:
    block = QUANT_LAYOUTS[kind][0]
    fields = {name: blocks.reshape(-1, block)[:, start:stop].copy() for name, start, stop, _ in QUANT_LAYOUTS[kind][1]}
    values = quant_values(kind, blocks).astype(np.float64)
    n = len(values)

    def f16(name):
        return fields[name].view(np.float16).astype(np.float64)

    if kind in ("Q4_1", "Q5_1"):
        return f16("d") * values + f16("m")
    if kind == "Q5_0":
        return f16("d") * (values - 16)
    if kind == "Q6_K":
        scales = fields["scales"].view(np.int8).astype(np.float64)
        return (f16("d")[:, :, None] * scales[:, :, None] * (values.reshape(n, 16, 16) - 32)).reshape(n, 256)
    scales, mins = _k_scales(fields["scales"])  # Q4_K, Q5_K
    return (f16("d")[:, :, None] * scales[:, :, None] * values.reshape(n, 8, 32)
            - f16("dmin")[:, :, None] * mins[:, :, None]).reshape(n, 256)


@pytest.mark.slow
def test_smollm2_k_quants_round_trip_and_beat_plain_zstd(smollm2_gguf, tmp_path):
    """SmolLM2 requantized by llama.cpp to Q5_K_M (Q5_1, Q5_K, Q6_K, Q8_0 and F32 tensors) and
    Q4_K_M (Q4_K, Q5_0, ...): round trips, sizes, and the K-quant value layouts."""
    import ctypes

    llama_cpp = pytest.importorskip("llama_cpp")
    import gguf
    from gguf import GGUFReader
    from gguf.quants import dequantize

    q5km = tmp_path / "smollm2-q5_k_m.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M
    params.allow_requantize = True
    assert llama_cpp.llama_model_quantize(str(smollm2_gguf).encode(), str(q5km).encode(), ctypes.byref(params)) == 0
    expected = sorted((int(t.data_offset), int(t.n_bytes), t.tensor_type.name) for t in GGUFReader(q5km).tensors)
    assert [(p.offset, p.length, p.kind) for p in parse_gguf(q5km) if p.kind != "metadata"] == expected
    report, _ = round_trip(q5km, tmp_path)
    plain = pack_file(q5km, tmp_path / "plain.zst", codec="zstd")
    assert report["packed_bytes"] < plain["packed_bytes"]
    for kind in ("Q5_1", "Q5_K", "Q6_K", "Q8_0"):
        entry = report["kinds"][kind]
        assert entry["tensors"] > 0 and entry["ratio"] > 1.0, (kind, entry)
    q4km = tmp_path / "smollm2-q4_k_m.gguf"
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert llama_cpp.llama_model_quantize(str(smollm2_gguf).encode(), str(q4km).encode(), ctypes.byref(params)) == 0
    round_trip(q4km, tmp_path / "q4km")
    for path, kind in ((q5km, "Q5_K"), (q5km, "Q6_K"), (q4km, "Q4_K")):  # the K-quant layouts vs gguf
        piece = next(p for p in parse_gguf(path) if p.kind == kind)
        blocks = np.fromfile(path, dtype=np.uint8, count=piece.length, offset=piece.offset)
        expected = dequantize(blocks.reshape(-1, QUANT_LAYOUTS[kind][0]), gguf.GGMLQuantizationType[kind])
        assert np.array_equal(dequantize_by_hand(kind, blocks), expected.reshape(-1, 256).astype(np.float64)), kind


# ----------------------------------------------------------------------------- dictionary

def test_dictionary_is_kept_only_when_it_helps(random_file, tmp_path):
    # Small chunks of text that repeat little inside a chunk but share a vocabulary across chunks.
    rng = random.Random(0)
    vocabulary = [words(rng, 1) + words(rng, 1) for _ in range(3000)]
    text = tmp_path / "words.txt"
    text.write_text(" ".join(rng.choice(vocabulary) for _ in range(150_000)))
    with_dict, _ = round_trip(text, tmp_path / "a", dictionary=True, chunk_mb=1 / 16)
    without = pack_file(text, tmp_path / "b.zst", chunk_mb=1 / 16)
    assert with_dict["dictionary"]["used"] is True
    assert with_dict["packed_bytes"] < without["packed_bytes"]
    assert read_header(with_dict["output"])["dictionary"] is True

    noise, _ = round_trip(random_file, tmp_path / "c", dictionary=True)
    assert noise["dictionary"]["tried"] is True and noise["dictionary"]["used"] is False


# ----------------------------------------------------------------------------- stages and CLI

def test_cli_pack_and_unpack(safetensors_file, tmp_path, capsys):
    out = tmp_path / "pack"
    assert main(["pack", str(safetensors_file), "-o", str(out), "--no-progress"]) == 0
    packed = out / "model.safetensors.czst"
    report = json.loads((out / "pack_report.json").read_text())
    assert packed.is_file() and report["ratio"] > 1.2
    assert main(["unpack", str(packed), "-o", str(tmp_path / "unpack"), "--no-progress"]) == 0
    assert (tmp_path / "unpack" / "model.safetensors").read_bytes() == safetensors_file.read_bytes()
    assert main(["pack", str(safetensors_file), "-o", str(out), "--no-progress"]) == 0
    assert "skipped: up to date" in capsys.readouterr().out

    bad = tmp_path / "bad" / "model.safetensors.czst"
    bad.parent.mkdir()
    bad.write_bytes(packed.read_bytes()[:-100])
    assert main(["unpack", str(bad), "-o", str(tmp_path / "unpack2"), "--no-progress"]) == 2
    assert "truncated container" in capsys.readouterr().err
    assert not (tmp_path / "unpack2" / "model.safetensors").exists()


def test_stage_outputs_and_codec_option(random_file, tmp_path):
    result = run_stage("pack", {"file": str(random_file), "output_dir": str(tmp_path / "p"), "codec": "cogumi",
                                "progress": False})
    assert Path(result.outputs["packed"]).name == "notes.bin.czst"
    assert result.metrics["codec"] == "cogumi"
    unpacked = run_stage("unpack", {"file": result.outputs["packed"], "output_dir": str(tmp_path / "u"),
                                    "progress": False})
    assert Path(unpacked.outputs["file"]).read_bytes() == random_file.read_bytes()
    assert sorted(os.listdir(tmp_path / "u")) == ["manifest.json", "notes.bin"]


def test_container_name_is_known_before_the_file_exists(gguf_file, random_file, tmp_path):
    # A recipe binds the pack step's output name while the GGUF is still to be written.
    from cogumi.export.pack import PackConfig

    future = PackConfig(file=str(tmp_path / "later" / "model-Q8_0.gguf"), output_dir=str(tmp_path / "p"))
    assert future.outputs()["packed"].name == "model-Q8_0.gguf.czst"
    assert PackConfig(file=str(tmp_path / "notes.txt"), output_dir=str(tmp_path / "p")).outputs()["packed"].name \
        == "notes.txt.zst"
    # Once the file exists a name that lies about its content is refused, naming the file.
    liar = tmp_path / "fake.gguf"
    shutil.copy(random_file, liar)
    with pytest.raises(PackError, match=r"fake\.gguf: the name says gguf but the content is raw"):
        run_stage("pack", {"file": str(liar), "output_dir": str(tmp_path / "q"), "progress": False})
    assert not (tmp_path / "q" / "fake.gguf.czst").exists()
    forced = run_stage("pack", {"file": str(liar), "output_dir": str(tmp_path / "r"), "codec": "zstd",
                                "progress": False})
    assert Path(forced.outputs["packed"]).name == "fake.gguf.zst"
