"""``cogumi pack FILE`` / ``cogumi unpack FILE.czst``: lossless, verified zstd packing with a
codec that beats plain zstd on model files.

**Container.** A sequence of records ``u32 magic | u32 size | payload`` (little-endian), with
zstd frames between them:

* ``HEAD``: format version, the original size, the SHA-256 of the original, a CRC-32 of the
  header, and a JSON part naming the codec and its parameters. In a plain-zstd container the
  records are zstd *skippable frames* (magic ``0x184D2A5C``), so the file is an ordinary
  ``.zst`` that any zstd tool decompresses to the original. A cogumi-codec container starts
  with magic ``CGMZ`` instead: a zstd tool refuses it rather than writing transformed bytes.
* ``DICT`` (optional): the trained zstd dictionary the frames use.
* per chunk of about ``chunk_mb`` MiB of the original: ``CHNK`` (CRC-32 + JSON: the chunk's
  pieces — offset, length, tensor kind, transform — and its frames' sizes), then the frames.
* ``END!``: the original size and the number of chunks, so truncation is always noticed.

Chunks are independent: they are compressed and decompressed in parallel threads and streamed,
so a multi-GB file is never held in memory. Every frame carries zstd's content checksum, every
record a CRC-32, and unpacking checks the size and SHA-256 of the result before the output
appears under its final name (written to a temporary file in the same directory, renamed last,
removed on any error).

**Codec** (``codec="cogumi"``; ``"auto"`` uses it for GGUF and safetensors files and plain zstd
for anything else). The file is parsed — GGUF by its header's tensor table, safetensors by its
JSON header — into metadata and tensors, and each tensor's bytes are reversibly transformed into
streams of alike bytes before zstd sees them (the ZipNN idea):

* F32/F16/BF16/F64 (``planes``): each element is rotated left by one bit (the sign goes to the
  lowest bit, so the top byte holds only exponent bits) and split into byte planes. The
  exponent plane of BF16 weights has about 2.7 bits of entropy; the mantissa planes are noise.
* the same with 5% or more exact zeros, e.g. 2:4-pruned weights (``sparse``): a bitmap of the
  non-zero elements, then the byte planes of the non-zero elements only.
* quantized GGUF blocks (``fields``): each block field (f16 scales and mins, packed sub-block
  scales, high bits, quantized values) becomes its own stream; f16 fields are split into their
  low and high bytes.
* Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K (``values``, when it measures smaller on a sample of the
  piece): the scale fields as above, and the quantized values unpacked from their nibbles and
  high-bit fields to one byte each, minus the code that 0.0 quantizes to in their block. On
  2:4-pruned weights half of them become 0.
* metadata and other tensor types (``raw``): as they are, at the configured zstd level.

Streams of the same kind within a chunk are concatenated into one zstd frame. Transformed
streams are mostly independent bytes whose only redundancy is their skewed distribution; zstd's
LZ search finds spurious short matches there that cost more than they save (level 10 makes the
BF16 exponent plane *worse* than level 1, and at 17 MB/s), so they are compressed with a fast,
match-averse parameter set that leaves them to zstd's Huffman coding of literals (``ENTROPY``
below; measured: 3.07x on that plane at 700 MB/s, level 19's 3.07x at 1 MB/s). Frames under
1 MiB are also tried at the configured level and keep the smaller result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import tempfile
import threading
import time
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

from cogumi.io import write_json
from cogumi.stage import ConfigError, StageConfig, StageError, StageResult, option, stage

log = logging.getLogger("cogumi")

FORMAT_VERSION = 1
MAGIC_SKIPPABLE = 0x184D2A5C  # a zstd skippable frame: zstd tools step over it
MAGIC_COGUMI = 0x5A4D4743  # b"CGMZ": not a zstd frame, so zstd tools refuse the file
SUFFIX_COGUMI = ".czst"
SUFFIX_ZSTD = ".zst"
DEFAULT_CHUNK_MB = 16.0
#: Frames at most this large are also tried at the configured level (the smaller result is kept).
SMALL_FRAME = 1 << 20
#: A float tensor piece with at least this share of exact zeros is stored as bitmap + non-zeros.
SPARSE_MIN_ZEROS = 0.05
#: Quantized pieces: blocks of a sample on which the ``values`` and ``fields`` transforms are compared.
TRIAL_BLOCKS = 2048
#: Dictionary trials: the dictionary's size and about how many bytes it learns from.
DICT_BYTES = 112_640
DICT_SAMPLE_BYTES = 4 << 20

_HEAD = struct.Struct("<4sHHQ32sI")  # tag, version, reserved, original size, sha256, crc32
_RECORD = struct.Struct("<II")  # magic, payload size
_END = struct.Struct("<4sQQ")  # tag, original size, chunks

#: Transformed streams: fast strategy, smallest hash table, longest minimum match. Few LZ
#: matches are found, so the bytes go to zstd's Huffman-coded literals.
ENTROPY = {"strategy": "fast", "window_log": 17, "hash_log": 6, "chain_log": 6, "search_log": 1,
           "min_match": 7}

#: Element width in bytes of the float types whose elements are split into byte planes.
FLOAT_WIDTHS = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}

#: GGUF quantized blocks: (block bytes, fields). A field is ``(name, start, stop, role)``: the
#: bytes ``start:stop`` of every block, with role ``f16`` (a scale or min: one stream per byte),
#: ``bytes`` (one stream) or ``q`` (quantized values' bits). Layouts follow ggml's ``ggml-common.h``.
QUANT_LAYOUTS: dict[str, tuple[int, tuple[tuple[str, int, int, str], ...]]] = {
    "Q4_0": (18, (("d", 0, 2, "f16"), ("qs", 2, 18, "q"))),
    "Q4_1": (20, (("d", 0, 2, "f16"), ("m", 2, 4, "f16"), ("qs", 4, 20, "q"))),
    "Q5_0": (22, (("d", 0, 2, "f16"), ("qh", 2, 6, "q"), ("qs", 6, 22, "q"))),
    "Q5_1": (24, (("d", 0, 2, "f16"), ("m", 2, 4, "f16"), ("qh", 4, 8, "q"), ("qs", 8, 24, "q"))),
    "Q8_0": (34, (("d", 0, 2, "f16"), ("qs", 2, 34, "q"))),
    "Q2_K": (84, (("scales", 0, 16, "bytes"), ("qs", 16, 80, "q"), ("d", 80, 82, "f16"), ("dmin", 82, 84, "f16"))),
    "Q3_K": (110, (("hmask", 0, 32, "q"), ("qs", 32, 96, "q"), ("scales", 96, 108, "bytes"), ("d", 108, 110, "f16"))),
    "Q4_K": (144, (("d", 0, 2, "f16"), ("dmin", 2, 4, "f16"), ("scales", 4, 16, "bytes"), ("qs", 16, 144, "q"))),
    "Q5_K": (176, (("d", 0, 2, "f16"), ("dmin", 2, 4, "f16"), ("scales", 4, 16, "bytes"), ("qh", 16, 48, "q"),
                   ("qs", 48, 176, "q"))),
    "Q6_K": (210, (("ql", 0, 128, "q"), ("qh", 128, 192, "q"), ("scales", 192, 208, "bytes"), ("d", 208, 210, "f16"))),
    "IQ4_NL": (18, (("d", 0, 2, "f16"), ("qs", 2, 18, "q"))),
    "IQ4_XS": (136, (("d", 0, 2, "f16"), ("scales_h", 2, 4, "bytes"), ("scales_l", 4, 8, "bytes"),
                     ("qs", 8, 136, "q"))),
    "MXFP4": (17, (("e", 0, 1, "bytes"), ("qs", 1, 17, "q"))),
}

#: Block types whose quantized values are unpacked to one byte each and stored relative to the
#: block's zero point (the code of 0.0): (values per block, bits per value). The other types
#: keep their ``q`` fields as bytes (Q4_0 and Q8_0 gain nothing from it: their zero point is
#: fixed and their values already are whole nibbles / bytes).
VALUE_CODECS = {"Q4_1": (32, 4), "Q5_0": (32, 5), "Q5_1": (32, 5), "Q4_K": (256, 4), "Q5_K": (256, 5),
                "Q6_K": (256, 6)}

Codec = Literal["auto", "cogumi", "zstd"]


class PackError(StageError):
    """A container that is corrupt, truncated or not a container, or a file that cannot be
    packed; the message names the file and what is wrong."""


# ----------------------------------------------------------------------------- file formats

@dataclass(frozen=True)
class Piece:
    """A contiguous range of the original file and how its bytes are interpreted."""

    offset: int
    length: int
    kind: str  # "metadata", a FLOAT_WIDTHS or QUANT_LAYOUTS key, or another tensor type


def detect_format(path: str | os.PathLike) -> str:
    """``"gguf"``, ``"safetensors"`` or ``"raw"``, from the first bytes of the file."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    size = os.path.getsize(path)
    if head[:4] == b"GGUF":
        return "gguf"
    if len(head) == 9 and head[8:9] == b"{":
        (header_len,) = struct.unpack("<Q", head[:8])
        if 2 <= header_len <= min(size - 8, 100 << 20):
            return "safetensors"
    return "raw"


def unit_of(kind: str) -> int:
    """Bytes of the smallest unit a piece of this kind may be cut at."""
    if kind in FLOAT_WIDTHS:
        return FLOAT_WIDTHS[kind]
    if kind in QUANT_LAYOUTS:
        return QUANT_LAYOUTS[kind][0]
    return 1


def _tensor_segments(tensors: list[tuple[int, int, str]], size: int) -> list[Piece]:
    """Tensors (offset, length, kind) plus the bytes between them as metadata, covering the file."""
    segments, position = [], 0
    for offset, length, kind in sorted(tensors):
        if offset < position or offset + length > size:
            raise ValueError(f"tensor data at {offset}..{offset + length} overlaps another or runs "
                             f"past the end of the file ({size} bytes)")
        if offset > position:
            segments.append(Piece(position, offset - position, "metadata"))
        if length:
            # a tensor whose bytes do not divide into its type's units is kept as it is
            segments.append(Piece(offset, length, kind if length % unit_of(kind) == 0 else f"{kind}:unaligned"))
        position = offset + length
    if position < size:
        segments.append(Piece(position, size - position, "metadata"))
    return segments


_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _gguf_skip_value(handle, value_type: int) -> Any:
    """Read (or step over) one GGUF metadata value; returns scalars, None for strings/arrays."""
    if value_type in _GGUF_SCALARS:
        fmt = "<" + _GGUF_SCALARS[value_type]
        return struct.unpack(fmt, handle.read(struct.calcsize(fmt)))[0]
    if value_type == 8:  # string
        (length,) = struct.unpack("<Q", handle.read(8))
        handle.seek(length, os.SEEK_CUR)
        return None
    if value_type == 9:  # array
        item_type, count = struct.unpack("<IQ", handle.read(12))
        if item_type in _GGUF_SCALARS:
            handle.seek(count * struct.calcsize(_GGUF_SCALARS[item_type]), os.SEEK_CUR)
        else:
            for _ in range(count):
                _gguf_skip_value(handle, item_type)
        return None
    raise ValueError(f"unknown GGUF metadata value type {value_type} at byte {handle.tell() - 4}")


def parse_gguf(path: str | os.PathLike) -> list[Piece]:
    """The GGUF file as metadata and tensor pieces (kinds are ggml type names).

    Reads only the header's tensor table. ``gguf.GGUFReader`` finds the same offsets (a test
    checks) but also decodes every metadata value — 4-6 s for SmolLM2's 49,152-token
    vocabulary, which would halve the packing speed of a 100 MB file.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    size = os.path.getsize(path)
    with open(path, "rb", buffering=1 << 20) as handle:
        magic, version, n_tensors, n_kv = struct.unpack("<4sIQQ", handle.read(24))
        if magic != b"GGUF" or version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported (2 and 3 are)")
        alignment = 32
        for _ in range(n_kv):
            (key_len,) = struct.unpack("<Q", handle.read(8))
            key = handle.read(key_len)
            (value_type,) = struct.unpack("<I", handle.read(4))
            value = _gguf_skip_value(handle, value_type)
            if key == b"general.alignment" and isinstance(value, int):
                alignment = value
        infos = []
        for _ in range(n_tensors):
            (name_len,) = struct.unpack("<Q", handle.read(8))
            handle.seek(name_len, os.SEEK_CUR)
            (n_dims,) = struct.unpack("<I", handle.read(4))
            dims = struct.unpack(f"<{n_dims}Q", handle.read(8 * n_dims))
            ggml_type, offset = struct.unpack("<IQ", handle.read(12))
            infos.append((dims, ggml_type, offset))
        data_start = -(-handle.tell() // alignment) * alignment
    tensors = []
    for dims, ggml_type, offset in infos:
        kind = GGMLQuantizationType(ggml_type)
        block, type_size = GGML_QUANT_SIZES[kind]
        elements = 1
        for dim in dims:
            elements *= dim
        tensors.append((data_start + offset, elements // block * type_size, kind.name))
    return _tensor_segments(tensors, size)


def parse_safetensors(path: str | os.PathLike) -> list[Piece]:
    """The safetensors file as its header and tensor pieces (kinds are safetensors dtypes)."""
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_len))
    base = 8 + header_len
    tensors = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        tensors.append((base + int(begin), int(end) - int(begin), entry["dtype"]))  # F32, BF16, ... I64
    return _tensor_segments(tensors, size)


def plan_chunks(segments: list[Piece], chunk_bytes: int) -> list[list[Piece]]:
    """Cut the segments into chunks of at most ``chunk_bytes``, at unit boundaries of each kind."""
    chunks: list[list[Piece]] = []
    current: list[Piece] = []
    fill = 0
    for segment in segments:
        unit = unit_of(segment.kind)
        position, end = segment.offset, segment.offset + segment.length
        while position < end:
            room = chunk_bytes - fill
            take = min(end - position, room // unit * unit)
            if take == 0:
                chunks.append(current)
                current, fill = [], 0
                continue
            current.append(Piece(position, take, segment.kind))
            position += take
            fill += take
            if fill >= chunk_bytes:
                chunks.append(current)
                current, fill = [], 0
    if current:
        chunks.append(current)
    return chunks


# ----------------------------------------------------------------------------- transforms

def _uint(width: int):
    import numpy as np

    return {2: np.uint16, 4: np.uint32, 8: np.uint64}[width]


def _planes(values, width: int) -> list:
    """Rotate each element left by one bit (sign to the lowest bit) and split it into bytes."""
    import numpy as np

    bits = 8 * width
    rotated = (values << 1) | (values >> (bits - 1))
    return [(rotated >> (8 * j)).astype(np.uint8) for j in range(width)]


def _unplanes(planes: list, width: int, out) -> None:
    """Inverse of :func:`_planes`, written into ``out`` (unsigned integers of ``width`` bytes)."""
    import numpy as np

    np.copyto(out, planes[width - 1], casting="unsafe")
    for j in range(width - 2, -1, -1):
        out <<= 8
        out |= planes[j]
    low = out >> 1
    out <<= 8 * width - 1
    out |= low


# ---- quantized blocks: every field is read and written through a structured view of the
# blocks (one strided copy per field), and nibbles are split and joined eight bytes at a time
# on uint64 words, so no numpy call loops over blocks.

_NIBBLE = 0x0F0F0F0F0F0F0F0F
_BIT = 0x0101010101010101


def _records(kind: str, data):
    """The piece's bytes as one record per block, with the fields of QUANT_LAYOUTS."""
    import numpy as np

    block, fields = QUANT_LAYOUTS[kind]
    dtype = np.dtype({"names": [f[0] for f in fields], "offsets": [f[1] for f in fields],
                      "formats": [f"V{f[2] - f[1]}" for f in fields], "itemsize": block})
    return data.view(dtype)


def _get(records, name: str):
    """A field of every block, as contiguous bytes."""
    import numpy as np

    return np.ascontiguousarray(records[name]).view(np.uint8)


def _put(records, name: str, data) -> None:
    records[name] = data.view(records.dtype.fields[name][0])


def _u64(data):
    import numpy as np

    return np.ascontiguousarray(data).view(np.uint64)


def _bytes_of(words):
    import numpy as np

    return words.view(np.uint8)


def _interleave(parts: list, width: int):
    """Rows of ``width`` bytes taken in turn from each part: part0 row i, part1 row i, ..."""
    import numpy as np

    out = np.empty(sum(p.size for p in parts), dtype=np.uint8)
    rows = out.view(np.dtype([(f"p{j}", f"V{width}") for j in range(len(parts))]))
    for j, part in enumerate(parts):
        rows[f"p{j}"] = part.view(f"V{width}")
    return out


def _deinterleave(data, count: int, width: int) -> list:
    """Inverse of :func:`_interleave` for ``count`` parts."""
    import numpy as np

    rows = data.view(np.dtype([(f"p{j}", f"V{width}") for j in range(count)]))
    return [np.ascontiguousarray(rows[f"p{j}"]).view(np.uint8) for j in range(count)]


def _f16_values(records, name: str):
    import numpy as np

    return _get(records, name).view(np.float16).astype(np.float32)


def _k_scales(scales):
    """ggml's ``get_scale_min_k4``: the eight 6-bit scales and mins packed in 12 bytes, (n, 8) each."""
    import numpy as np

    scales = scales.reshape(-1, 12)
    sc = np.empty((len(scales), 8), dtype=np.uint8)
    mn = np.empty_like(sc)
    sc[:, :4] = scales[:, 0:4] & 63
    mn[:, :4] = scales[:, 4:8] & 63
    sc[:, 4:] = (scales[:, 8:12] & 15) | ((scales[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (scales[:, 8:12] >> 4) | ((scales[:, 4:8] >> 6) << 4)
    return sc, mn


def _zero_points(kind: str, records):
    """The code 0.0 quantizes to: one per block (n, 1), or per 32-value sub-block for Q4_K and
    Q5_K (n, 8). Computed in float32 from the block's stored scales: f16 values and 6-bit
    integers multiply exactly, and IEEE division and rounding give the same codes on every
    machine (NaN and infinities included, through fmax/fmin). Only the ratio depends on it,
    never the round trip."""
    import numpy as np

    top = (1 << VALUE_CODECS[kind][1]) - 1
    if kind in ("Q5_0", "Q6_K"):  # symmetric: 0.0 is always the middle code
        return np.full((len(records), 1), (top + 1) // 2, dtype=np.uint8)
    if kind in ("Q4_1", "Q5_1"):  # x = d * q + m
        numerator, denominator = -_f16_values(records, "m")[:, None], _f16_values(records, "d")[:, None]
    else:  # Q4_K, Q5_K: x = d * sc * q - dmin * mn
        sc, mn = _k_scales(_get(records, "scales"))
        numerator = _f16_values(records, "dmin")[:, None] * mn
        denominator = _f16_values(records, "d")[:, None] * sc
    with np.errstate(all="ignore"):
        codes = np.rint(numerator / denominator)
    return np.fmin(np.fmax(codes, 0), top).astype(np.uint8)


def _value_planes(kind: str, records) -> list:
    """The quantized values, one byte each, as planes (see :func:`quant_values` for the order)."""
    import numpy as np

    nibble, bit = np.uint64(_NIBBLE), np.uint64(_BIT)
    if kind == "Q6_K":  # ql nibbles: quarters 0-1 low, 2-3 high; qh: 2 bits per quarter
        ql, qh = _u64(_get(records, "ql")), _u64(_get(records, "qh"))
        planes = []
        for low_nibble, shift in ((ql & nibble, 0), (ql >> np.uint64(4) & nibble, 4)):
            high = [_bytes_of(qh >> np.uint64(shift + 2 * a) & np.uint64(3 * _BIT)) for a in (0, 1)]
            planes.append(_bytes_of(low_nibble | _u64(_interleave(high, 32)) << np.uint64(4)))
        return planes
    qs = _u64(_get(records, "qs"))
    planes = [_bytes_of(qs & nibble), _bytes_of(qs >> np.uint64(4) & nibble)]
    if kind in ("Q5_0", "Q5_1"):  # bit j of the 32-bit qh: the fifth bit of element j
        halves = _get(records, "qh").view(np.uint16)
        for i in (0, 1):
            bits = np.unpackbits(np.ascontiguousarray(halves[i::2]).view(np.uint8), bitorder="little")
            planes[i] = _bytes_of(_u64(planes[i]) | _u64(bits) << np.uint64(4))
    elif kind == "Q5_K":  # bit k of qh[l]: the fifth bit of element 32 k + l
        qh = _u64(_get(records, "qh"))
        for i in (0, 1):
            high = [_bytes_of(qh >> np.uint64(2 * g + i) & bit) for g in range(4)]
            planes[i] = _bytes_of(_u64(planes[i]) | _u64(_interleave(high, 32)) << np.uint64(4))
    return planes


def _put_value_planes(kind: str, planes: list, records) -> None:
    """Inverse of :func:`_value_planes`: write the values' bits into the blocks. Bits above a
    value's width are ignored, and the planes are used as scratch space (overwritten)."""
    import numpy as np

    nibble, bit, four = np.uint64(_NIBBLE), np.uint64(_BIT), np.uint64(4)
    words = [_u64(p) for p in planes]
    if kind == "Q6_K":
        qh = np.zeros(len(records) * 8, dtype=np.uint64)
        for shift, plane in ((0, words[0]), (4, words[1])):
            for a, high in enumerate(_deinterleave(_bytes_of(plane >> four & np.uint64(3 * _BIT)), 2, 32)):
                qh |= _u64(high) << np.uint64(shift + 2 * a)
        _put(records, "qh", _bytes_of(qh))
    elif kind in ("Q5_0", "Q5_1"):
        halves = np.empty(len(records) * 2, dtype=np.uint16)
        for i in (0, 1):
            halves[i::2] = np.packbits(_bytes_of(words[i] >> four & bit), bitorder="little").view(np.uint16)
        _put(records, "qh", halves.view(np.uint8))
    elif kind == "Q5_K":
        qh = np.zeros(len(records) * 4, dtype=np.uint64)
        for i in (0, 1):
            for g, high in enumerate(_deinterleave(_bytes_of(words[i] >> four & bit), 4, 32)):
                qh |= _u64(high) << np.uint64(2 * g + i)
        _put(records, "qh", _bytes_of(qh))
    # The high bits are out: the low nibbles are joined in place, with no temporaries.
    low, high = words
    np.bitwise_and(low, nibble, out=low)
    np.bitwise_and(high, nibble, out=high)
    np.left_shift(high, four, out=high)
    np.bitwise_or(low, high, out=low)
    _put(records, "ql" if kind == "Q6_K" else "qs", _bytes_of(low))


def _add_zero_points(kind: str, planes: list, records) -> None:
    """Add each value's zero point back, in place, eight values at a time. A stored value and
    its zero point are both below 2^bits <= 64, so their sum never carries into the next byte;
    it is the original code plus 0 or 2^bits, and the bits above ``bits`` are ignored later."""
    import numpy as np

    zero = _zero_points(kind, records).astype(np.uint64) * np.uint64(_BIT)
    n = len(records)
    for i, plane in enumerate(planes):
        words = _u64(plane)
        if kind in ("Q5_0", "Q6_K"):  # one zero point for all
            if n:
                np.add(words, zero[0, 0], out=words)
        elif zero.shape[1] == 8:  # Q4_K, Q5_K: plane i holds sub-blocks i, i + 2, ... (4 words each)
            grouped = words.reshape(n, 4, 4)
            np.add(grouped, zero[:, i::2, None], out=grouped)
        else:  # Q4_1, Q5_1: 16 values (2 words) of each block per plane
            grouped = words.reshape(n, 2)
            np.add(grouped, zero, out=grouped)


def _plane_zero_points(kind: str, records) -> list:
    """The zero point of every value of each plane (or one scalar for all of them)."""
    import numpy as np

    zero = _zero_points(kind, records)
    if zero.shape[1] == 8:  # Q4_K, Q5_K: plane 0 holds sub-blocks 0, 2, 4, 6; plane 1 the odd ones
        return [np.repeat(zero[:, i::2], 32) for i in (0, 1)]
    if kind in ("Q5_0", "Q6_K"):
        return [zero[0, 0] if len(zero) else 0] * 2
    return [np.repeat(zero[:, 0], 16)] * 2


def quant_values(kind: str, data):
    """The quantized values of every block in element order, (blocks, values): documents the
    planes' order and lets tests check it against ``gguf``'s dequantizers."""
    import numpy as np

    planes = [p.reshape(len(data) // QUANT_LAYOUTS[kind][0], -1) for p in _value_planes(kind, _records(kind, data))]
    n = len(planes[0])
    if kind in ("Q4_1", "Q5_0", "Q5_1"):  # plane 0: elements 0-15, plane 1: 16-31
        return np.concatenate(planes, axis=1)
    if kind in ("Q4_K", "Q5_K"):  # plane i, group g, index l: element 64 g + 32 i + l
        return np.stack([p.reshape(n, 4, 32) for p in planes], axis=2).reshape(n, 256)
    # Q6_K: plane i, half h, a, index l: element 128 h + 64 i + 32 a + l
    return np.stack([p.reshape(n, 2, 64) for p in planes], axis=2).reshape(n, 256)


def _field_streams(kind: str, records, with_q: bool) -> list[tuple[str, Any]]:
    """The non-``q`` fields (f16 fields split into their low and high bytes), and with
    ``with_q`` the ``q`` fields too, each as one stream."""
    streams = []
    for name, _, _, role in QUANT_LAYOUTS[kind][1]:
        if role == "f16":
            data = _get(records, name)
            streams += [(f"{name}0", data[0::2].copy()), (f"{name}1", data[1::2].copy())]
        elif role == "bytes" or with_q:
            streams.append((name, _get(records, name)))
    return streams


def _value_streams(kind: str, records) -> list[tuple[str, Any]]:
    """The non-``q`` fields, then the value planes relative to their zero points."""
    import numpy as np

    mask = (1 << VALUE_CODECS[kind][1]) - 1
    streams = _field_streams(kind, records, with_q=False)
    for i, (plane, zero) in enumerate(zip(_value_planes(kind, records), _plane_zero_points(kind, records))):
        np.subtract(plane, zero, out=plane, casting="unsafe")
        streams.append((f"v{i}", np.bitwise_and(plane, mask, out=plane)))
    return streams


def split_piece(kind: str, data, codec: str) -> tuple[str, int, list[tuple[str, Any]]]:
    """(transform, non-zero count, named streams) for one piece's bytes (a uint8 array)."""
    import numpy as np

    if codec == "cogumi" and kind in FLOAT_WIDTHS:
        width = FLOAT_WIDTHS[kind]
        values = data.view(_uint(width))
        nonzero = int(np.count_nonzero(values))
        if values.size and 1 - nonzero / values.size >= SPARSE_MIN_ZEROS:
            mask = values != 0
            streams = [("mask", np.packbits(mask, bitorder="little"))]
            streams += [(f"s{j}", plane) for j, plane in enumerate(_planes(values[mask], width))]
            return "sparse", nonzero, streams
        return "planes", 0, [(f"p{j}", plane) for j, plane in enumerate(_planes(values, width))]
    if codec == "cogumi" and kind in QUANT_LAYOUTS:
        records = _records(kind, data)
        if kind in VALUE_CODECS:
            # Decided by measurement on a sample of the piece's blocks: values relative to the
            # zero point win on pruned weights (the zero code fills half of them) and on most
            # others; the fields as they are win where the values sit on a coarser grid (a
            # re-quantized Q4_1, like the SmolLM2 GGUF) whose bit patterns repeat.
            sample = _records(kind, np.ascontiguousarray(records[:: max(1, len(records) // TRIAL_BLOCKS)]).view(np.uint8))
            entropy = _compressor(None, None)
            size = {transform: sum(len(entropy.compress(stream)) for _, stream in streams(kind, sample))
                    for transform, streams in (("values", _value_streams),
                                               ("fields", partial(_field_streams, with_q=True)))}
            if size["values"] <= size["fields"]:
                return "values", 0, _value_streams(kind, records)
        return "fields", 0, _field_streams(kind, records, with_q=True)
    return "raw", 0, [("raw", data)]


def stream_sizes(kind: str, transform: str, length: int, nonzero: int) -> list[tuple[str, int]]:
    """The names and byte sizes of the streams :func:`split_piece` makes (for decoding)."""
    if transform == "raw":
        return [("raw", length)]
    if transform in ("planes", "sparse"):
        width = FLOAT_WIDTHS[kind]
        count = length // width
        if transform == "planes":
            return [(f"p{j}", count) for j in range(width)]
        return [("mask", (count + 7) // 8)] + [(f"s{j}", nonzero) for j in range(width)]
    if transform in ("fields", "values"):
        block, fields = QUANT_LAYOUTS[kind]
        count = length // block
        sizes = []
        for name, start, stop, role in fields:
            if role == "f16":
                sizes += [(f"{name}0", count), (f"{name}1", count)]
            elif role == "bytes" or transform == "fields":
                sizes.append((name, count * (stop - start)))
        if transform == "values":
            sizes += [("v0", count * VALUE_CODECS[kind][0] // 2), ("v1", count * VALUE_CODECS[kind][0] // 2)]
        return sizes
    raise ValueError(f"unknown transform '{transform}'")


def join_piece(kind: str, transform: str, length: int, nonzero: int, streams: list, out) -> None:
    """Write the original bytes of one piece into ``out`` (a uint8 array of ``length``)."""
    import numpy as np

    if transform == "raw":
        out[:] = streams[0]
    elif transform == "planes":
        width = FLOAT_WIDTHS[kind]
        _unplanes(streams, width, out.view(_uint(width)))
    elif transform == "sparse":
        width = FLOAT_WIDTHS[kind]
        values = out.view(_uint(width))
        mask = np.unpackbits(streams[0], count=values.size, bitorder="little").view(bool)
        if int(np.count_nonzero(mask)) != nonzero:
            raise ValueError(f"the zero bitmap marks {int(np.count_nonzero(mask))} non-zero elements, "
                             f"the chunk record {nonzero}")
        nonzeros = np.empty(nonzero, dtype=values.dtype)
        _unplanes(streams[1:], width, nonzeros)
        values[:] = 0
        values[mask] = nonzeros
    elif transform in ("fields", "values"):
        records = _records(kind, out)
        position = 0
        for name, _, _, role in QUANT_LAYOUTS[kind][1]:
            if role == "f16":
                data = np.empty(2 * len(records), dtype=np.uint8)
                data[0::2], data[1::2] = streams[position], streams[position + 1]
                _put(records, name, data)
                position += 2
            elif role == "bytes" or transform == "fields":
                _put(records, name, streams[position])
                position += 1
        if transform == "values":  # the scales are in place: the zero points can be recomputed
            planes = list(streams[position:])  # decompressed scratch: changed in place
            _add_zero_points(kind, planes, records)
            _put_value_planes(kind, planes, records)
    else:
        raise ValueError(f"unknown transform '{transform}'")


# ----------------------------------------------------------------------------- zstd

_local = threading.local()


def _compressor(level: int | None, dictionary):
    """A per-thread zstd compressor: ``level`` None means the ENTROPY parameters."""
    import zstandard

    cache = _local.__dict__.setdefault("compressors", {})
    key = (level, id(dictionary))  # the cache keeps the dictionary alive, so its id stays unique
    if key not in cache or cache[key][0] is not dictionary:
        if level is None:
            strategy = {"fast": zstandard.STRATEGY_FAST}[ENTROPY["strategy"]]
            params = zstandard.ZstdCompressionParameters(
                **{**ENTROPY, "strategy": strategy}, write_checksum=1, write_content_size=1)
            cache[key] = dictionary, zstandard.ZstdCompressor(compression_params=params, dict_data=dictionary)
        else:
            cache[key] = dictionary, zstandard.ZstdCompressor(level=level, write_checksum=True, dict_data=dictionary)
    return cache[key][1]


def _compress_stream(data, name: str, level: int, dictionary) -> bytes:
    if name.endswith(".raw"):
        return _compressor(level, dictionary).compress(data)
    packed = _compressor(None, dictionary).compress(data)
    if data.nbytes <= SMALL_FRAME:
        other = _compressor(level, dictionary).compress(data)
        if len(other) < len(packed):
            packed = other
    return packed


@dataclass
class _Settings:
    path: str
    fd: int  # the source, opened for reading; workers read their chunk with os.pread
    codec: str  # "cogumi" or "zstd" (resolved)
    level: int
    dictionary: Any = None  # zstandard.ZstdCompressionDict or None


def _pread(fd: int, size: int, offset: int) -> bytes:
    data = os.pread(fd, size, offset)
    while len(data) < size:  # a short read is allowed by POSIX; an empty one is the end of the file
        more = os.pread(fd, size - len(data), offset + len(data))
        if not more:
            break
        data += more
    return data


def _pwrite(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _encode_chunk(settings: _Settings, pieces: list[Piece]) -> tuple[bytes, dict, list[bytes], dict]:
    """Read, transform and compress one chunk: (original bytes, record JSON, frames, streams)."""
    import numpy as np

    start = pieces[0].offset
    total = sum(p.length for p in pieces)
    raw = _pread(settings.fd, total, start)
    if len(raw) != total:
        raise PackError(f"{settings.path}: the file shrank while it was being packed")
    data = np.frombuffer(raw, dtype=np.uint8)
    groups: dict[str, list] = {}
    entries = []
    for piece in pieces:
        part = data[piece.offset - start: piece.offset - start + piece.length]
        transform, nonzero, streams = split_piece(piece.kind, part, settings.codec)
        entries.append([piece.offset, piece.length, piece.kind, transform, nonzero])
        for name, stream in streams:
            groups.setdefault(f"{piece.kind}.{name}", []).append(stream)
    streams = {name: parts[0].reshape(-1) if len(parts) == 1 else np.concatenate([p.reshape(-1) for p in parts])
               for name, parts in groups.items()}
    frames = [_compress_stream(s, name, settings.level, settings.dictionary) for name, s in streams.items()]
    record = {"pieces": entries,
              "frames": [[name, int(s.nbytes), len(f)] for (name, s), f in zip(streams.items(), frames)]}
    return raw, record, frames, streams


class _Buffers:
    """Chunk-sized output buffers, handed back once hashed: reusing them spares the page faults
    of fresh memory, which cost as much as the decoding itself on small machines."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._free: list = []
        self._lock = threading.Lock()

    def take(self):
        import numpy as np

        with self._lock:
            if self._free:
                return self._free.pop()
        return np.empty(self.size, dtype=np.uint8)

    def give(self, buffer) -> None:
        with self._lock:
            self._free.append(buffer)


def _scratch(size: int):
    """A per-thread buffer of at least ``size`` bytes for decompressed streams."""
    import numpy as np

    buffer = getattr(_local, "scratch", None)
    if buffer is None or buffer.size < size:
        buffer = _local.scratch = np.empty(max(size, 1), dtype=np.uint8)
    return buffer[:size]


def _decompress_into(decompressor, frame, out) -> int:
    reader = decompressor.stream_reader(frame)
    done = 0
    while done < out.size:
        count = reader.readinto(memoryview(out[done:]))
        if not count:
            break
        done += count
    if reader.read(1):
        done += 1  # more than the chunk record says
    return done


def _decode_chunk(record: dict, src_fd: int, frames_at: int, out_fd: int, dictionary, buffers: _Buffers):
    """Read one chunk's frames from the container at ``frames_at``, rebuild the original bytes
    in a buffer from ``buffers``, write them at their offset in ``out_fd`` and return
    ``(buffer, bytes)`` (for the SHA-256; give the buffer back afterwards). A ValueError says
    what is wrong with the chunk."""
    import zstandard

    packed_total = sum(frame[2] for frame in record["frames"])
    packed = _pread(src_fd, packed_total, frames_at)
    if len(packed) != packed_total:
        raise ValueError(f"the container ends inside the chunk's frames (byte {frames_at + len(packed)})")
    decompressor = zstandard.ZstdDecompressor(dict_data=dictionary)
    scratch = _scratch(sum(frame[1] for frame in record["frames"]))
    streams: dict[str, Any] = {}
    position = written = 0
    for name, raw_len, packed_len in record["frames"]:
        frame = memoryview(packed)[position: position + packed_len]
        position += packed_len
        data = scratch[written: written + raw_len]
        written += raw_len
        try:
            size = _decompress_into(decompressor, frame, data)
        except zstandard.ZstdError as exc:
            raise ValueError(f"zstd frame '{name}' does not decompress ({exc})") from None
        if size != raw_len:
            raise ValueError(f"zstd frame '{name}' holds {size}{'+' if size > raw_len else ''} bytes, the chunk "
                             f"record says {raw_len}")
        streams[name] = data
    cursors = dict.fromkeys(streams, 0)
    start = record["pieces"][0][0]
    total = sum(entry[1] for entry in record["pieces"])
    if total > buffers.size:
        raise ValueError(f"the chunk holds {total} bytes, more than the header's chunk size {buffers.size}")
    buffer = buffers.take()
    try:
        out = buffer[:total]
        for offset, length, kind, transform, nonzero in record["pieces"]:
            parts = []
            for name, size in stream_sizes(kind, transform, length, nonzero):
                key = f"{kind}.{name}"
                if key not in streams or cursors[key] + size > streams[key].size:
                    raise ValueError(f"stream '{key}' is missing or too short for the piece at byte {offset}")
                parts.append(streams[key][cursors[key]: cursors[key] + size])
                cursors[key] += size
            join_piece(kind, transform, length, nonzero, parts, out[offset - start: offset - start + length])
        leftover = [key for key, used in cursors.items() if used != streams[key].size]
        if leftover:
            raise ValueError(f"streams {', '.join(leftover)} hold more bytes than the pieces use")
        _pwrite(out_fd, out, start)
    except BaseException:
        buffers.give(buffer)
        raise
    return buffer, out


# ----------------------------------------------------------------------------- records

def _record(magic: int, payload: bytes) -> bytes:
    return _RECORD.pack(magic, len(payload)) + payload


def _chunk_record(record: dict) -> bytes:
    body = json.dumps(record, separators=(",", ":")).encode()
    return _record(MAGIC_SKIPPABLE, b"CHNK" + struct.pack("<I", zlib.crc32(body)) + body)


def _header_payload(info: dict, size: int, sha256: bytes) -> bytes:
    body = json.dumps(info, separators=(",", ":")).encode()
    fixed = _HEAD.pack(b"HEAD", FORMAT_VERSION, 0, size, sha256, 0)
    crc = zlib.crc32(fixed[:-4] + body)
    return fixed[:-4] + struct.pack("<I", crc) + body


def _read_exact(handle, size: int, src: Path, what: str) -> bytes:
    data = handle.read(size)
    if len(data) != size:
        raise PackError(f"{src}: truncated container: {what} needs {size} bytes at byte "
                        f"{handle.tell() - len(data)}, only {len(data)} are left")
    return data


def _read_record(handle, src: Path, what: str, *, magics=(MAGIC_SKIPPABLE,)) -> tuple[int, bytes]:
    magic, size = _RECORD.unpack(_read_exact(handle, _RECORD.size, src, what))
    if magic not in magics:
        raise PackError(f"{src}: corrupt container: expected {what} at byte {handle.tell() - 8}, "
                        f"found magic 0x{magic:08x}")
    if size > 1 << 30:
        raise PackError(f"{src}: corrupt container: {what} claims {size} bytes")
    return magic, _read_exact(handle, size, src, what)


def read_header(path: str | os.PathLike) -> dict:
    """The container's header: its JSON part plus ``original_size``, ``sha256`` and ``version``."""
    src = Path(path)
    with open(src, "rb") as handle:
        return _read_header(handle, src)


def _read_header(handle, src: Path) -> dict:
    head = handle.read(8)
    if len(head) >= 4 and head[:4] == b"\x28\xb5\x2f\xfd":
        raise PackError(f"{src}: a plain zstd file, not a cogumi pack container: decompress it with zstd -d")
    if len(head) < 8 or _RECORD.unpack(head)[0] not in (MAGIC_SKIPPABLE, MAGIC_COGUMI):
        raise PackError(f"{src}: not a cogumi pack container (no header at the start of the file)")
    handle.seek(0)
    magic, payload = _read_record(handle, src, "the header", magics=(MAGIC_SKIPPABLE, MAGIC_COGUMI))
    if len(payload) < _HEAD.size or payload[:4] != b"HEAD":
        raise PackError(f"{src}: not a cogumi pack container (a zstd file without a cogumi header)")
    _, version, _, size, sha256, crc = _HEAD.unpack(payload[:_HEAD.size])
    if zlib.crc32(payload[:_HEAD.size - 4] + payload[_HEAD.size:]) != crc:
        raise PackError(f"{src}: corrupt container: the header's checksum does not match")
    if version != FORMAT_VERSION:
        raise PackError(f"{src}: container format version {version}; this cogumi reads version {FORMAT_VERSION}")
    info = json.loads(payload[_HEAD.size:])
    if (magic == MAGIC_COGUMI) != (info.get("codec") == "cogumi"):
        raise PackError(f"{src}: corrupt container: header magic and codec '{info.get('codec')}' disagree")
    return {**info, "original_size": size, "sha256": sha256.hex(), "version": version}


# ----------------------------------------------------------------------------- pack / unpack

def format_by_name(path: str | os.PathLike) -> str:
    """``"gguf"``, ``"safetensors"`` or ``"raw"``, from the file name alone (for a file that a
    recipe's earlier step has not written yet)."""
    suffix = Path(path).suffix.lower()
    return {".gguf": "gguf", ".safetensors": "safetensors"}.get(suffix, "raw")


def resolve_codec(path: str | os.PathLike, codec: str) -> str:
    """``"cogumi"`` or ``"zstd"``: what ``codec`` means for this file (``auto``: by its format,
    read from its first bytes, or from its name while it does not exist yet)."""
    if codec == "auto":
        found = detect_format(path) if os.path.exists(path) else format_by_name(path)
        return "cogumi" if found in ("gguf", "safetensors") else "zstd"
    if codec not in ("cogumi", "zstd"):
        raise ValueError(f"codec must be auto, cogumi or zstd, got {codec!r}")
    return codec


def container_suffix(path: str | os.PathLike, codec: str = "auto") -> str:
    """``.czst`` for the cogumi codec, ``.zst`` for plain zstd (a file zstd tools read)."""
    return SUFFIX_COGUMI if resolve_codec(path, codec) == "cogumi" else SUFFIX_ZSTD


def unpacked_name(path: str | os.PathLike) -> str:
    """``model.gguf.czst`` -> ``model.gguf``; a name without a container suffix gets ``.unpacked``."""
    name = Path(path).name
    for suffix in (SUFFIX_COGUMI, SUFFIX_ZSTD):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name + ".unpacked"


def _workers(threads: int) -> int:
    return (os.cpu_count() or 1) if threads in (0, -1) else max(1, threads)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=not enabled, dynamic_ncols=True)


def _segments(src: Path, codec: str, size: int) -> tuple[str, list[Piece], str]:
    """(source format, segments, note) for the file."""
    fmt = detect_format(src)
    whole = [Piece(0, size, "metadata" if codec == "cogumi" else "data")] if size else []
    if codec != "cogumi" or fmt == "raw":
        return fmt, whole, ""
    try:
        return fmt, parse_gguf(src) if fmt == "gguf" else parse_safetensors(src), ""
    except Exception as exc:  # a damaged or unusual file still packs, without the tensor transforms
        note = f"could not parse as {fmt} ({type(exc).__name__}: {exc}); packed as plain bytes"
        log.warning("%s: %s", src, note)
        return fmt, whole, note


def _try_dictionary(settings: _Settings, chunks: list[list[Piece]]) -> tuple[Any, dict]:
    """Train a zstd dictionary on some chunks' streams and measure it on others.

    Chunks spread over the file, about ``2 * DICT_SAMPLE_BYTES`` of them, are encoded: every
    other one trains the dictionary, the rest are compressed with and without it. The saving
    per chunk, times the number of chunks, minus the dictionary's own bytes, must be positive
    for it to be used (exact for a one-chunk file; an estimate otherwise).
    """
    import zstandard

    chunk_bytes = max(1, sum(p.length for p in chunks[0]))
    count = max(1, min(len(chunks), 2 * DICT_SAMPLE_BYTES // chunk_bytes))
    picks = sorted({round(i * (len(chunks) - 1) / max(1, count - 1)) for i in range(count)})
    train, test = picks[::2], picks[1::2] or picks
    samples = []
    for index in train:
        streams = _encode_chunk(settings, chunks[index])[3]
        per_stream = max(4096, DICT_SAMPLE_BYTES // len(train) // max(1, len(streams)))
        for stream in streams.values():
            data = stream.tobytes()
            step = max(4096, len(data) // max(1, per_stream // 4096))
            samples += [data[i: i + 4096] for i in range(0, len(data), step)]
    info = {"tried": True, "used": False, "bytes": 0, "trial_chunks": len(picks)}
    try:
        dictionary = zstandard.train_dictionary(DICT_BYTES, samples)
    except zstandard.ZstdError as exc:
        return None, {**info, "reason": f"training failed: {exc}"}
    with_dict = _Settings(settings.path, settings.fd, settings.codec, settings.level, dictionary)
    plain = sum(len(f) for i in test for f in _encode_chunk(settings, chunks[i])[2])
    smaller = sum(len(f) for i in test for f in _encode_chunk(with_dict, chunks[i])[2])
    size = len(dictionary.as_bytes())
    saving = round((plain - smaller) / len(test) * len(chunks)) - size
    info.update(bytes=size, estimated_saving_bytes=saving, used=saving > 0)
    return (dictionary if saving > 0 else None), info


def pack_file(src: str | os.PathLike, dst: str | os.PathLike | None = None, *, level: int = 10,
              threads: int = 0, codec: Codec = "auto", dictionary: bool = False,
              chunk_mb: float = DEFAULT_CHUNK_MB, progress: bool = False) -> dict:
    """Pack ``src`` into the container ``dst`` (default: ``src`` + ``.czst`` or ``.zst``).

    Args:
        level: zstd level of metadata, unrecognised bytes and plain-zstd containers.
        threads: worker threads (0 or -1: one per CPU core).
        codec: ``auto`` (cogumi's codec for GGUF and safetensors, plain zstd otherwise),
            ``cogumi`` or ``zstd``.
        dictionary: try a zstd dictionary trained on samples of the file; it is kept only when
            the chunks it is tried on, scaled to the whole file, pack smaller with it by more
            than its own bytes.
        chunk_mb: MiB of the original per chunk (the unit of parallelism and of memory use).

    Returns the report: sizes, ratio, speed, SHA-256 and the bytes in/out per tensor kind.
    """
    src = Path(src)
    resolved = resolve_codec(src, codec)
    dst = Path(dst) if dst is not None else src.with_name(src.name + container_suffix(src, codec))
    if dst.resolve() == src.resolve():
        raise PackError(f"{src}: the output would overwrite the input")
    t0 = time.perf_counter()
    workers = _workers(threads)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    tmp = Path(tmp_name)
    try:
        with open(src, "rb") as source, os.fdopen(fd, "wb") as out:
            size = os.fstat(source.fileno()).st_size
            fmt, segments, note = _segments(src, resolved, size)
            chunk_bytes = max(4096, int(chunk_mb * (1 << 20)))
            chunks = plan_chunks(segments, chunk_bytes)
            settings = _Settings(str(src), source.fileno(), resolved, level)
            dict_info: dict = {"tried": False, "used": False}
            if dictionary and chunks:
                settings.dictionary, dict_info = _try_dictionary(settings, chunks)
            info = {"codec": resolved, "format": fmt, "name": src.name, "level": level,
                    "chunk_bytes": chunk_bytes, "entropy_params": ENTROPY if resolved == "cogumi" else None,
                    "sparse_min_zeros": SPARSE_MIN_ZEROS if resolved == "cogumi" else None,
                    "dictionary": settings.dictionary is not None, "created_by": _created_by()}
            kinds = {segment.kind: {"tensors": 0, "bytes_in": 0, "bytes_out": 0, "transforms": {}}
                     for segment in segments}
            for segment in segments:
                kinds[segment.kind]["tensors"] += segment.kind not in ("metadata", "data")
            head_magic = MAGIC_COGUMI if resolved == "cogumi" else MAGIC_SKIPPABLE
            out.write(_record(head_magic, _header_payload(info, size, bytes(32))))
            if settings.dictionary is not None:
                out.write(_record(MAGIC_SKIPPABLE, b"DICT" + settings.dictionary.as_bytes()))
            digest = _write_chunks(settings, chunks, out, kinds, workers,
                                   _progress(size, f"pack {src.name}", progress))
            out.write(_record(MAGIC_SKIPPABLE, _END.pack(b"END!", size, len(chunks))))
            packed = out.tell()
            out.seek(0)
            out.write(_record(head_magic, _header_payload(info, size, digest.digest())))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dst)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise PackError(f"{src} -> {dst}: cannot pack ({exc})") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    seconds = time.perf_counter() - t0
    frames_out = 0
    for entry in kinds.values():
        entry["ratio"] = round(entry["bytes_in"] / entry["bytes_out"], 4) if entry["bytes_out"] else None
        frames_out += entry["bytes_out"]
    report = {
        "input": str(src), "output": str(dst), "format": fmt, "codec": resolved, "level": level,
        "threads": workers, "chunk_bytes": chunk_bytes, "chunks": len(chunks),
        "original_bytes": size, "packed_bytes": packed,
        "ratio": round(size / packed, 4) if packed else None,
        "seconds": round(seconds, 3), "mb_per_s": round(size / 1e6 / seconds, 1) if seconds else None,
        "sha256": digest.hexdigest(), "dictionary": dict_info,
        "kinds": {**kinds, "container": {"bytes_out": packed - frames_out}},
    }
    if note:
        report["note"] = note
    return report


def _write_chunks(settings: _Settings, chunks: list[list[Piece]], out, kinds: dict, workers: int, bar):
    """Encode the chunks in ``workers`` threads and write them in order; returns the SHA-256 of
    the original and adds each kind's bytes in and out to ``kinds``."""
    digest = hashlib.sha256()
    pending: deque = deque()

    def finish() -> None:
        raw, record, frames, _ = pending.popleft().result()
        out.write(_chunk_record(record))
        for frame in frames:
            out.write(frame)
        digest.update(raw)
        for _offset, length, kind, transform, _ in record["pieces"]:
            kinds[kind]["bytes_in"] += length
            kinds[kind]["transforms"][transform] = kinds[kind]["transforms"].get(transform, 0) + 1
        for name, _, packed in record["frames"]:
            kinds[name.rsplit(".", 1)[0]]["bytes_out"] += packed
        bar.update(len(raw))

    with bar, ThreadPoolExecutor(workers) as pool:
        try:
            for pieces in chunks:
                pending.append(pool.submit(_encode_chunk, settings, pieces))
                if len(pending) >= workers + 2:
                    finish()
            while pending:
                finish()
        finally:
            for future in pending:
                future.cancel()
    return digest


def _iter_chunks(handle, src: Path, size: int):
    """Yield ``(index, record, offset of its frames)`` per chunk record, then check the end record."""
    file_size = os.fstat(handle.fileno()).st_size
    position = index = 0
    while True:
        _, payload = _read_record(handle, src, f"chunk {index} or the end record")
        if payload[:4] == b"END!":
            break
        if payload[:4] != b"CHNK" or len(payload) < 8:
            raise PackError(f"{src}: corrupt container: unknown record where chunk {index} should be")
        body = payload[8:]
        if zlib.crc32(body) != struct.unpack("<I", payload[4:8])[0]:
            raise PackError(f"{src}: corrupt container: chunk {index}'s record fails its checksum")
        record = json.loads(body)
        if not record["pieces"] or record["pieces"][0][0] != position:
            raise PackError(f"{src}: corrupt container: chunk {index} does not continue at byte {position}")
        frames_at = handle.tell()
        packed = sum(frame[2] for frame in record["frames"])
        if frames_at + packed > file_size:
            raise PackError(f"{src}: truncated container: chunk {index}'s frames need {packed} bytes at byte "
                            f"{frames_at}, only {max(0, file_size - frames_at)} are left")
        handle.seek(packed, os.SEEK_CUR)
        yield index, record, frames_at
        position += sum(entry[1] for entry in record["pieces"])
        index += 1
    if len(payload) != _END.size:
        raise PackError(f"{src}: corrupt container: malformed end record")
    _, end_size, end_chunks = _END.unpack(payload)
    if (end_size, end_chunks) != (size, index) or position != size:
        raise PackError(f"{src}: corrupt container: it holds {position} bytes in {index} chunks, its header "
                        f"and end record say {size} and {end_size} bytes in {end_chunks} chunks")
    if handle.read(1):
        raise PackError(f"{src}: corrupt container: there are bytes after its end record")


def unpack_file(src: str | os.PathLike, dst: str | os.PathLike | None = None, *, threads: int = 0,
                progress: bool = False) -> dict:
    """Unpack the container ``src`` into ``dst`` (default: ``src`` without its suffix) after
    checking every frame, the size and the SHA-256. A corrupt or truncated container raises
    :class:`PackError` and leaves no output behind."""
    import zstandard

    src = Path(src)
    dst = Path(dst) if dst is not None else src.with_name(unpacked_name(src))
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such file")
    if dst.exists() and dst.resolve() == src.resolve():
        raise PackError(f"{src}: the output would overwrite the input")
    t0 = time.perf_counter()
    workers = _workers(threads)
    digest = hashlib.sha256()
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    tmp = Path(tmp_name)
    try:
        with open(src, "rb") as handle, os.fdopen(fd, "wb", buffering=0) as out, \
                ThreadPoolExecutor(workers) as pool:
            header = _read_header(handle, src)
            size = header["original_size"]
            dictionary = None
            if header.get("dictionary"):
                _, payload = _read_record(handle, src, "the dictionary")
                if payload[:4] != b"DICT":
                    raise PackError(f"{src}: corrupt container: the dictionary record is missing")
                dictionary = zstandard.ZstdCompressionDict(payload[4:])
            pending: deque = deque()
            buffers = _Buffers(int(header.get("chunk_bytes") or 0))
            with _progress(size, f"unpack {src.name}", progress) as bar:

                def finish() -> None:
                    index, future = pending.popleft()
                    try:
                        buffer, data = future.result()
                    except ValueError as exc:
                        raise PackError(f"{src}: corrupt container: chunk {index}: {exc}") from None
                    digest.update(data)
                    bar.update(data.size)
                    buffers.give(buffer)

                try:
                    for index, record, frames_at in _iter_chunks(handle, src, size):
                        pending.append((index, pool.submit(_decode_chunk, record, handle.fileno(), frames_at,
                                                           out.fileno(), dictionary, buffers)))
                        if len(pending) >= workers + 2:
                            finish()
                    while pending:
                        finish()
                finally:
                    for _, future in pending:
                        future.cancel()
            if digest.hexdigest() != header["sha256"]:
                raise PackError(f"{src}: corrupt container: the unpacked data's SHA-256 is {digest.hexdigest()}, "
                                f"the header records {header['sha256']}")
            os.fsync(out.fileno())
        os.replace(tmp, dst)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise PackError(f"{src} -> {dst}: cannot unpack ({exc})") from exc
    except (json.JSONDecodeError, KeyError, TypeError, IndexError) as exc:
        tmp.unlink(missing_ok=True)
        raise PackError(f"{src}: corrupt container: unreadable record ({type(exc).__name__}: {exc})") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    seconds = time.perf_counter() - t0
    return {"input": str(src), "output": str(dst), "codec": header["codec"], "format": header.get("format"),
            "bytes": size, "sha256": header["sha256"], "seconds": round(seconds, 3),
            "mb_per_s": round(size / 1e6 / seconds, 1) if seconds else None}


def _created_by() -> str:
    from cogumi import __version__

    return f"cogumi {__version__}"


# ----------------------------------------------------------------------------- stages

@dataclass(kw_only=True)
class PackConfig(StageConfig):
    file: str = option(help="The file to pack: a GGUF or safetensors file gets cogumi's codec (.czst), any "
                       "other file plain zstd (.zst).", input=True, positional=True)
    codec: Codec = option("auto", help="auto (cogumi for GGUF and safetensors, zstd otherwise), cogumi or zstd.")
    level: int = option(10, help="zstd level (1-22) of metadata, unrecognised bytes and plain-zstd containers.")
    dictionary: bool = option(False, help="Try a zstd dictionary trained on samples of the file; kept only when "
                              "it makes the output smaller, its own bytes included (it helps small chunks).")
    chunk_mb: float = option(DEFAULT_CHUNK_MB, help="MiB of the original per chunk (chunks are compressed in "
                             "parallel; memory use is a few chunks per thread).")
    threads: int = option(0, help="Worker threads (0 or -1: one per CPU core).", hashed=False)
    progress: bool = option(True, help="Show a progress bar.", hashed=False)

    def check(self) -> None:
        if not 1 <= self.level <= 22:
            raise ConfigError(f"PackConfig.level: a zstd level in 1..22, got {self.level}")
        if self.threads < -1:
            raise ConfigError(f"PackConfig.threads: 0 or -1 (all cores) or a positive count, got {self.threads}")
        if not 1 / 16 <= self.chunk_mb <= 1024:
            raise ConfigError(f"PackConfig.chunk_mb: between 0.0625 and 1024, got {self.chunk_mb}")

    def outputs(self) -> dict[str, Path]:
        name = Path(self.file).name + container_suffix(self.file, self.codec)
        return {"packed": self.out(name), "report": self.out("pack_report.json")}


@stage("pack", PackConfig, help="Pack a file losslessly with zstd and a SHA-256 check; GGUF and safetensors "
       "tensors are split into byte planes and fields first, which beats plain zstd.")
def run_pack(config: PackConfig) -> StageResult:
    if config.codec == "auto" and os.path.exists(config.file):
        # A recipe names the container before the file exists, from the file's name: a name that
        # disagrees with the content would send the next step to a file that is never written.
        by_name, by_content = format_by_name(config.file), detect_format(config.file)
        if by_name != by_content:
            raise PackError(f"{config.file}: the name says {by_name} but the content is {by_content}; rename the "
                            "file or pass --codec cogumi|zstd")
    outputs = config.outputs()
    try:
        report = pack_file(config.file, outputs["packed"], level=config.level, threads=config.threads,
                           codec=config.codec, dictionary=config.dictionary, chunk_mb=config.chunk_mb,
                           progress=config.progress)
    except OSError as exc:
        raise PackError(f"{config.file}: cannot read ({exc})") from exc
    write_json(outputs["report"], report)
    return StageResult(counts={"original_bytes": report["original_bytes"], "packed_bytes": report["packed_bytes"]},
                       metrics={"ratio": report["ratio"], "mb_per_s": report["mb_per_s"], "codec": report["codec"],
                                "dictionary_used": report["dictionary"]["used"]})


@dataclass(kw_only=True)
class UnpackConfig(StageConfig):
    file: str = option(help="A container written by cogumi pack (.czst or .zst).", input=True, positional=True)
    threads: int = option(0, help="Worker threads (0 or -1: one per CPU core).", hashed=False)
    progress: bool = option(True, help="Show a progress bar.", hashed=False)

    def check(self) -> None:
        if self.threads < -1:
            raise ConfigError(f"UnpackConfig.threads: 0 or -1 (all cores) or a positive count, got {self.threads}")

    def outputs(self) -> dict[str, Path]:
        return {"file": self.out(unpacked_name(self.file))}


@stage("unpack", UnpackConfig, help="Unpack a cogumi pack container, verifying its size and SHA-256; a corrupt "
       "or truncated container is refused and leaves no output.")
def run_unpack(config: UnpackConfig) -> StageResult:
    info = unpack_file(config.file, config.outputs()["file"], threads=config.threads, progress=config.progress)
    return StageResult(counts={"bytes": info["bytes"]},
                       metrics={"mb_per_s": info["mb_per_s"], "codec": info["codec"], "sha256": info["sha256"]})


__all__ = [
    "FLOAT_WIDTHS", "QUANT_LAYOUTS", "VALUE_CODECS", "PackConfig", "PackError", "Piece", "UnpackConfig",
    "container_suffix", "detect_format", "format_by_name", "pack_file", "parse_gguf", "parse_safetensors", "plan_chunks",
    "quant_values", "read_header", "run_pack", "run_unpack", "unpack_file", "unpacked_name",
]
