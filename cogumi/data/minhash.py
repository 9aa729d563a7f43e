"""MinHash signatures and an LSH index, vectorised with numpy: the reusable core of dedup.

Why not datasketch's own loop: ``MinHash.update`` per shingle runs at about 39 documents/s on
a 2-core machine for ~3,900-character documents (``bulk``: 288/s), so the spec's 640K examples
took hours. Here a batch of documents is shingled in one pass over its concatenated code
points, every shingle gets a 32-bit base hash, and each permutation is one vectorised
multiply-add over the whole batch followed by ``np.minimum.reduceat`` at the document
boundaries. That runs at thousands of documents per second per core without a compiler.

The permutation step is datasketch's own ``affine32`` scheme (the default since datasketch
2.0): ``fmix32(h)`` then ``a * h + b mod 2**32`` with the same ``a``, ``b`` that
``datasketch.MinHash(num_perm, seed)`` draws. Only the base hash of a shingle differs between
the hash families:

- ``"fast"`` (default): the shingle's code points packed into an integer, mixed with the 64-bit
  MurmurHash3 finalizer; no per-shingle Python work.
- ``"datasketch"``: ``sha1_hash32(shingle.encode("utf-8"))``, datasketch's default hash, so
  the signature equals ``MinHash(num_perm, seed)`` updated with :func:`shingles` — for users
  who mix these signatures with MinHash objects datasketch computed.
- ``"datasketch-legacy"``: the scheme of datasketch before 2.0 (SHA-1 base hash, ``a * h + b
  mod (2**61 - 1)`` truncated to 32 bits), for indexes built with those versions.

Signatures are ``uint32`` arrays of shape ``(n, num_perm)``; :func:`to_lean_minhash` turns a row
into a ``datasketch.LeanMinHash`` that ``datasketch.MinHashLSH`` accepts. Two signatures are
comparable only if they share ``num_perm``, ``seed``, the shingling and the hash family.

Typical use (deduplication, or decontamination: index one set, query with another)::

    sigs = compute_signatures(texts, num_perm=128, ngram=3, workers=2)
    index = LSHIndex(num_perm=128, threshold=0.8)
    index.insert(sigs)
    i, j, est = index.duplicate_pairs()          # verified pairs inside the index
    labels = connected_components(len(sigs), i, j)
    index.query_many(compute_signatures(test_texts), verify=True)
"""

from __future__ import annotations

import collections
import functools
import hashlib
import itertools
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

Mode = Literal["char", "word"]
HashFamily = Literal["fast", "datasketch", "datasketch-legacy"]
HASH_FAMILIES = ("fast", "datasketch", "datasketch-legacy")
MODES = ("char", "word")

#: The value of every slot of an empty set's signature (datasketch's too).
EMPTY_VALUE = 0xFFFFFFFF

_U32 = np.uint32
_U64 = np.uint64
_MERSENNE_61 = np.uint64((1 << 61) - 1)
_LOW32 = np.uint64(0xFFFFFFFF)
#: One past the last Unicode code point: pads a text shorter than ``ngram`` into one shingle.
_PAD_CODE = 0x110000
_PAD_WORD = 0xD6E8FEB86659FD93
#: An odd 64-bit multiplier for combining units when they do not fit in 64 bits by packing.
_MUL = np.uint64(0x9E3779B97F4A7C15)  # odd: 2**64 / golden ratio
_CODE_BITS = 21  # every Unicode code point (and the pad) fits in 21 bits
_SHA1_CACHE_LIMIT = 2_000_000
DEFAULT_BATCH = 128  # documents per batch: keeps one permutation pass in the CPU cache


# ----------------------------------------------------------------------------- shingles

def normalize(text: str) -> str:
    """The spec's text normalisation: lowercase, strip surrounding whitespace."""
    return text.lower().strip()


def shingles(text: str, ngram: int = 3, mode: Mode = "char", *, normalized: bool = False) -> set[str]:
    """The set of shingles of ``text`` — exactly what the ``datasketch`` hash families hash.

    ``mode="char"``: substrings of ``ngram`` code points. ``mode="word"``: ``ngram``
    whitespace-separated words joined by one space. A non-empty text shorter than one shingle
    is a single shingle (itself), so two short identical texts still match; an empty text has
    no shingles.
    """
    _check_shingling(ngram, mode)
    if not normalized:
        text = normalize(text)
    if mode == "char":
        if not text:
            return set()
        if len(text) <= ngram:
            return {text}
        return {text[i : i + ngram] for i in range(len(text) - ngram + 1)}
    words = text.split()
    if not words:
        return set()
    if len(words) <= ngram:
        return {" ".join(words)}
    return {" ".join(words[i : i + ngram]) for i in range(len(words) - ngram + 1)}


def jaccard(a: str, b: str, *, ngram: int = 3, mode: Mode = "char") -> float:
    """Exact Jaccard similarity of two texts' shingle sets (the quantity MinHash estimates).

    Two texts without shingles (empty after normalisation) give 0.0: there is no evidence that
    they are duplicates, which is how the dedup stage treats empty rows.
    """
    sa, sb = shingles(a, ngram, mode), shingles(b, ngram, mode)
    union = len(sa | sb)
    return len(sa & sb) / union if union else 0.0


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray | float:
    """Estimated Jaccard from signatures: the fraction of equal slots (row-wise for 2-D input)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"signatures differ in num_perm: {a.shape[-1]} vs {b.shape[-1]}")
    equal = np.count_nonzero(a == b, axis=-1) / a.shape[-1]
    return float(equal) if np.ndim(equal) == 0 else equal


def _check_shingling(ngram: int, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(ngram, bool) or not isinstance(ngram, int) or ngram < 1:
        raise ValueError(f"ngram must be a positive integer, got {ngram!r}")


# ----------------------------------------------------------------------------- hashing

def _fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer (in place): a fast bijection that spreads every bit."""
    h ^= h >> _U64(33)
    h *= _U64(0xFF51AFD7ED558CCD)
    h ^= h >> _U64(33)
    h *= _U64(0xC4CEB9FE1A85EC53)
    h ^= h >> _U64(33)
    return h


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer, as datasketch's affine32 scheme applies it (in place)."""
    h ^= h >> _U32(16)
    h *= _U32(0x85EBCA6B)
    h ^= h >> _U32(13)
    h *= _U32(0xC2B2AE35)
    h ^= h >> _U32(16)
    return h


@functools.lru_cache(maxsize=32)
def permutations(num_perm: int, seed: int = 1, scheme: Literal["affine32", "legacy"] = "affine32"):
    """The ``(a, b)`` permutation parameters ``datasketch.MinHash(num_perm, seed, scheme=...)`` draws.

    Reimplemented (same ``numpy.random.RandomState`` calls in the same order) so that
    signing needs no datasketch import; a test checks them against datasketch's.
    """
    gen = np.random.RandomState(seed)
    if scheme == "legacy":
        pairs = np.array(
            [(gen.randint(1, _MERSENNE_61, dtype=np.uint64), gen.randint(0, _MERSENNE_61, dtype=np.uint64))
             for _ in range(num_perm)],
            dtype=np.uint64,
        ).T
        a, b = pairs[0].copy(), pairs[1].copy()
    elif scheme == "affine32":
        a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * _U32(2) + _U32(1)
        b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)
    else:
        raise ValueError(f"unknown scheme {scheme!r}")
    a.setflags(write=False)
    b.setflags(write=False)
    return a, b


def _window_hashes(units: np.ndarray, lengths: np.ndarray, ngram: int, pack: bool) -> np.ndarray:
    """64-bit hashes of every window of ``ngram`` units that lies inside one document.

    ``units`` is the concatenation of the documents' units (code points or word hashes) and
    ``lengths`` their counts (each already ``>= ngram`` or 0). With ``pack`` the units are
    shifted into one integer (exact for up to three code points), otherwise combined with a
    multiply; either way the result goes through ``fmix64``.
    """
    counts = np.where(lengths > 0, lengths - ngram + 1, 0)
    total = len(units) - ngram + 1
    if total <= 0 or not counts.any():
        return np.empty(0, dtype=np.uint64)
    acc = units[:total].copy()
    for j in range(1, ngram):
        if pack:
            acc <<= _U64(_CODE_BITS)
            acc |= units[j : j + total]
        else:
            acc *= _MUL
            acc += units[j : j + total]
    # Drop the ngram - 1 windows at each document's end that run into the next document.
    ends = np.cumsum(lengths)[lengths > 0]
    crossing = (ends[:, None] - np.arange(1, ngram)[None, :]).ravel()
    keep = np.ones(total, dtype=bool)
    keep[crossing[crossing < total]] = False
    return _fmix64(acc[keep])


def _padded_lengths(lengths: np.ndarray, ngram: int) -> np.ndarray:
    return np.where(lengths > 0, np.maximum(lengths, ngram), 0)


def _fast_char_hashes(texts: Sequence[str], ngram: int) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    pad = np.array([_PAD_CODE], dtype="<u4").tobytes()
    parts = []
    for text, length in zip(texts, lengths.tolist()):
        parts.append(text.encode("utf-32-le", "surrogatepass"))
        if 0 < length < ngram:
            parts.append(pad * (ngram - length))
    codes = np.frombuffer(b"".join(parts), dtype="<u4").astype(np.uint64)
    padded = _padded_lengths(lengths, ngram)
    hashes = _window_hashes(codes, padded, ngram, pack=ngram * _CODE_BITS <= 64)
    return (hashes >> _U64(32)).astype(np.uint32), np.where(padded > 0, padded - ngram + 1, 0)


_WORD_HASHES: dict[str, int] = {}


def _word_hash(word: str) -> int:
    value = _WORD_HASHES.get(word)
    if value is None:
        if len(_WORD_HASHES) > _SHA1_CACHE_LIMIT:
            _WORD_HASHES.clear()
        digest = hashlib.blake2b(word.encode("utf-8", "surrogatepass"), digest_size=8).digest()
        value = _WORD_HASHES[word] = int.from_bytes(digest, "little")
    return value


def _fast_word_hashes(texts: Sequence[str], ngram: int) -> tuple[np.ndarray, np.ndarray]:
    words: list[str] = []
    lengths = np.empty(len(texts), dtype=np.int64)
    for d, text in enumerate(texts):
        tokens = text.split()
        lengths[d] = len(tokens)
        words.extend(tokens)
        if 0 < len(tokens) < ngram:
            words.extend([""] * (ngram - len(tokens)))  # "" never comes out of split()
    units = np.fromiter((_PAD_WORD if not w else _word_hash(w) for w in words), dtype=np.uint64, count=len(words))
    padded = _padded_lengths(lengths, ngram)
    hashes = _window_hashes(units, padded, ngram, pack=False)
    return (hashes >> _U64(32)).astype(np.uint32), np.where(padded > 0, padded - ngram + 1, 0)


_SHA1_HASHES: dict[str, int] = {}


def _sha1_hashes(texts: Sequence[str], ngram: int, mode: Mode) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's ``sha1_hash32`` of each distinct shingle (cached: shingle vocabularies are small)."""
    cache = _SHA1_HASHES
    if len(cache) > _SHA1_CACHE_LIMIT:
        cache.clear()
    counts = np.empty(len(texts), dtype=np.int64)
    values: list[int] = []
    for d, text in enumerate(texts):
        found = shingles(text, ngram, mode, normalized=True)
        counts[d] = len(found)
        for shingle in found:
            value = cache.get(shingle)
            if value is None:
                digest = hashlib.sha1(shingle.encode("utf-8", "surrogatepass")).digest()
                value = cache[shingle] = int.from_bytes(digest[:4], "little")
            values.append(value)
    return np.array(values, dtype=np.uint32), counts


def _min_over_documents(hashes: np.ndarray, counts: np.ndarray, num_perm: int, seed: int,
                        legacy: bool) -> np.ndarray:
    """Apply every permutation to every base hash and take each document's minimum.

    Returns ``(num_perm, n)``. One permutation at a time over the whole batch keeps the
    working set (one ``uint32`` per shingle) in cache; ``reduceat`` gives the per-document
    minima. Documents without shingles keep :data:`EMPTY_VALUE`.
    """
    out = np.full((num_perm, len(counts)), EMPTY_VALUE, dtype=np.uint32)
    present = counts > 0
    if not present.any():
        return out
    offsets = np.cumsum(counts[present]) - counts[present]
    block = np.empty((num_perm, len(offsets)), dtype=np.uint32)
    if legacy:
        a, b = permutations(num_perm, seed, "legacy")
        base = hashes.astype(np.uint64)
        work = np.empty_like(base)
        for k in range(num_perm):
            np.multiply(base, a[k], out=work)  # wraps mod 2**64, as datasketch's numpy does
            np.add(work, b[k], out=work)
            np.remainder(work, _MERSENNE_61, out=work)
            np.bitwise_and(work, _LOW32, out=work)
            block[k] = np.minimum.reduceat(work, offsets)
    else:
        a, b = permutations(num_perm, seed, "affine32")
        base = _fmix32(hashes.astype(np.uint32, copy=True))
        work = np.empty_like(base)
        for k in range(num_perm):
            np.multiply(base, a[k], out=work)  # wraps mod 2**32: the affine32 permutation
            np.add(work, b[k], out=work)
            np.minimum.reduceat(work, offsets, out=block[k])
    out[:, present] = block
    return out


# ----------------------------------------------------------------------------- signatures

@dataclass(frozen=True)
class SignatureParams:
    """Everything that determines a signature (and, with bands/rows, its LSH band keys)."""

    num_perm: int = 128
    ngram: int = 3
    mode: Mode = "char"
    hash_family: HashFamily = "fast"
    seed: int = 1
    bands: int = 0
    rows: int = 0

    def __post_init__(self) -> None:
        _check_shingling(self.ngram, self.mode)
        if self.hash_family not in HASH_FAMILIES:
            raise ValueError(f"hash_family must be one of {HASH_FAMILIES}, got {self.hash_family!r}")
        if not 1 <= self.num_perm <= 1 << 16:
            raise ValueError(f"num_perm must be in 1..65536, got {self.num_perm}")
        if self.bands * self.rows > self.num_perm:
            raise ValueError(f"bands * rows = {self.bands * self.rows} exceeds num_perm = {self.num_perm}")

    @property
    def scheme(self) -> str:
        """The datasketch permutation scheme these signatures follow."""
        return "legacy" if self.hash_family == "datasketch-legacy" else "affine32"


def sign_normalized(texts: Sequence[str], params: SignatureParams) -> np.ndarray:
    """Signatures ``(n, num_perm)`` of already-normalised texts (see :func:`normalize`)."""
    if params.hash_family == "fast":
        if params.mode == "char":
            hashes, counts = _fast_char_hashes(texts, params.ngram)
        else:
            hashes, counts = _fast_word_hashes(texts, params.ngram)
    else:
        hashes, counts = _sha1_hashes(texts, params.ngram, params.mode)
    by_perm = _min_over_documents(hashes, counts, params.num_perm, params.seed,
                                  legacy=params.hash_family == "datasketch-legacy")
    return np.ascontiguousarray(by_perm.T)


def sign_batch(texts: Sequence[str], params: SignatureParams) -> tuple[np.ndarray, np.ndarray | None]:
    """One unit of parallel work: signatures and, when ``params`` has bands, their band keys.

    Module-level so that process pools and Ray tasks can run it by reference.
    """
    sigs = sign_normalized(texts, params)
    keys = band_keys(sigs, params.bands, params.rows) if params.bands else None
    return sigs, keys


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def sign_batches(
    batches: Iterable[Sequence[str]],
    params: SignatureParams,
    *,
    workers: int = 1,
    backend: Literal["local", "ray"] = "local",
    ray_address: str | None = None,
    progress: Callable[[int], Any] | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """Sign batches of normalised texts in parallel; yield ``(signatures, band_keys)`` in order.

    ``backend="local"`` uses ``workers`` processes (none for ``workers=1`` or a single batch,
    so small inputs pay no start-up). ``backend="ray"`` runs each batch as a Ray task: on the
    cluster at ``ray_address``, on an already initialised Ray, or else on a local Ray started
    here with ``workers`` CPUs and shut down afterwards. At most ``2 * workers`` batches are in
    flight, so memory does not grow with the input. ``progress`` is called with each finished
    batch's size. Results are identical for every backend and worker count.
    """
    if backend == "ray":
        yield from _sign_with_ray(batches, params, workers, ray_address, progress)
        return
    if backend != "local":
        raise ValueError(f"backend must be 'local' or 'ray', got {backend!r}")
    iterator = iter(batches)
    head = [batch for batch in (next(iterator, None), next(iterator, None)) if batch is not None]
    if workers <= 1 or len(head) < 2:
        for texts in itertools.chain(head, iterator):
            yield _report(len(texts), sign_batch(texts, params), progress)
        return
    import concurrent.futures
    import multiprocessing

    # spawn, not fork: safe whatever threads the parent runs, and the same on every OS.
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        yield from _in_order(lambda texts: pool.submit(sign_batch, texts, params), lambda f: f.result(),
                             itertools.chain(head, iterator), 2 * workers, progress)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _sign_with_ray(batches, params, workers, ray_address, progress):
    try:
        import ray
    except ImportError as exc:
        raise ImportError("backend 'ray' needs Ray; install the extra: pip install 'cogumi[ray]'") from exc
    started = not ray.is_initialized()
    if started:
        ray.init(address=ray_address or None, num_cpus=None if ray_address else max(1, workers),
                 include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        task = ray.remote(num_cpus=1)(sign_batch)
        params_ref = ray.put(params)
        in_flight = 2 * max(1, workers, int(ray.cluster_resources().get("CPU", 1)))
        yield from _in_order(lambda texts: task.remote(list(texts), params_ref), ray.get,
                             batches, in_flight, progress)
    finally:
        if started:
            ray.shutdown()


def _in_order(submit, get, batches, limit, progress):
    """Submit batches with at most ``limit`` outstanding; yield their results in input order."""
    pending: collections.deque = collections.deque()
    for texts in batches:
        pending.append((len(texts), submit(texts)))
        if len(pending) >= limit:
            size, handle = pending.popleft()
            yield _report(size, get(handle), progress)
    while pending:
        size, handle = pending.popleft()
        yield _report(size, get(handle), progress)


def _report(size, value, progress):
    if progress is not None:
        progress(size)
    return value


def batched(items: Iterable, size: int) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def compute_signatures(
    texts: Iterable[str],
    *,
    num_perm: int = 128,
    ngram: int = 3,
    mode: Mode = "char",
    hash_family: HashFamily = "fast",
    seed: int = 1,
    workers: int = 1,
    batch_size: int = DEFAULT_BATCH,
    progress: bool = False,
) -> np.ndarray:
    """MinHash signatures of ``texts`` (normalised here), ``uint32`` of shape ``(n, num_perm)``.

    ``workers > 1`` signs batches in that many processes (``0``: all CPUs). An empty text gets
    the empty-set signature (every slot :data:`EMPTY_VALUE`), as in datasketch — so two empty
    texts look identical; callers that must not match them should drop them first.
    """
    params = SignatureParams(num_perm=num_perm, ngram=ngram, mode=mode, hash_family=hash_family, seed=seed)
    normalized = (normalize(t) for t in texts)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(unit="docs", desc="minhash", total=len(texts) if isinstance(texts, Sequence) else None)
    try:
        blocks = [sigs for sigs, _ in sign_batches(
            batched(normalized, batch_size), params, workers=workers or available_cpus(),
            progress=bar.update if bar is not None else None)]
    finally:
        if bar is not None:
            bar.close()
    if not blocks:
        return np.empty((0, num_perm), dtype=np.uint32)
    return np.concatenate(blocks)


def to_lean_minhash(signature: np.ndarray, *, seed: int = 1, hash_family: HashFamily = "fast"):
    """A ``datasketch.LeanMinHash`` holding one signature row, for datasketch's LSH and friends.

    All hash families produce datasketch ``affine32`` hash values except
    ``"datasketch-legacy"`` (scheme ``"legacy"``). A LeanMinHash from the ``"fast"`` family
    can be indexed, queried and compared with others from the same family; only the
    ``"datasketch"`` families also agree with MinHash objects datasketch computed itself.
    """
    from datasketch import LeanMinHash

    scheme = "legacy" if hash_family == "datasketch-legacy" else "affine32"
    return LeanMinHash(seed=seed, hashvalues=np.asarray(signature), scheme=scheme)


# ----------------------------------------------------------------------------- LSH

@functools.lru_cache(maxsize=256)
def optimal_bands(threshold: float, num_perm: int, weights: tuple[float, float] = (0.5, 0.5)) -> tuple[int, int]:
    """``(bands, rows)`` minimising the weighted false-positive and false-negative areas.

    The same search and integrals as ``datasketch.MinHashLSH`` (its ``_optimal_param``), so
    the default choice equals datasketch's for the same threshold, ``num_perm`` and
    ``weights = (false_positive_weight, false_negative_weight)``. Because the dedup stage
    verifies every candidate by its estimated Jaccard, false positives cost only time;
    a larger false-negative weight trades time for recall.
    """
    from scipy.integrate import quad

    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    fp_weight, fn_weight = weights
    best, choice = float("inf"), (0, 0)
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            b, r = float(bands), float(rows)
            fp, _ = quad(lambda s, b=b, r=r: 1 - (1 - s**r) ** b, 0.0, threshold)
            fn, _ = quad(lambda s, b=b, r=r: 1 - (1 - (1 - s**r) ** b), threshold, 1.0)
            error = fp * fp_weight + fn * fn_weight
            if error < best:
                best, choice = error, (bands, rows)
    return choice


def band_keys(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One 64-bit key per band: equal keys mean (up to a 2**-64 chance) equal band values."""
    signatures = np.asarray(signatures)
    n = signatures.shape[0]
    keys = np.empty((n, bands), dtype=np.uint64)
    for band in range(bands):
        h = np.full(n, band + 1, dtype=np.uint64)
        for col in range(band * rows, (band + 1) * rows):
            h ^= signatures[:, col]
            h *= _MUL
        keys[:, band] = _fmix64(h)
    return keys


_compute_band_keys = band_keys  # for methods whose argument shadows the name


def _equal_runs(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For sorted ``values``: the run id of each element and the size of each run."""
    if len(values) == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    starts = np.empty(len(values), dtype=bool)
    starts[0] = True
    np.not_equal(values[1:], values[:-1], out=starts[1:])
    run_id = np.cumsum(starts) - 1
    return run_id, np.bincount(run_id)


class LSHIndex:
    """Banded MinHash LSH over numpy arrays: sorted band keys instead of a dict of buckets.

    Items are inserted as signature rows (optionally with keys; default: their positions).
    :meth:`query` / :meth:`query_many` return the items sharing at least one band with a
    signature — like ``datasketch.MinHashLSH.query`` — optionally verified by estimated
    Jaccard. :meth:`duplicate_pairs` finds all verified pairs inside the index, which is what
    deduplication needs. Memory is the signatures plus 12 bytes per item and band.

    Args:
        num_perm: signature length.
        threshold: the Jaccard similarity the bands are tuned for and that verification uses.
        bands, rows: LSH parameters; chosen by :func:`optimal_bands` when both are ``None``
            (one of them given: the other is ``num_perm // given``).
        weights: ``(false_positive_weight, false_negative_weight)`` for :func:`optimal_bands`.
    """

    def __init__(self, num_perm: int = 128, threshold: float = 0.8, *, bands: int | None = None,
                 rows: int | None = None, weights: tuple[float, float] = (0.5, 0.5)):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        if bands is None and rows is None:
            bands, rows = optimal_bands(threshold, num_perm, tuple(weights))
        elif rows is None:
            rows = num_perm // bands
        elif bands is None:
            bands = num_perm // rows
        if bands < 1 or rows < 1 or bands * rows > num_perm:
            raise ValueError(f"need bands >= 1, rows >= 1 and bands * rows <= num_perm ({num_perm}); "
                             f"got bands={bands}, rows={rows}")
        self.num_perm, self.threshold, self.bands, self.rows = num_perm, threshold, bands, rows
        self._sig_blocks: list[np.ndarray] = []
        self._key_blocks: list[np.ndarray] = []
        self._keys: list | None = None
        self.candidates_checked = 0
        self._size = 0
        self._sigs: np.ndarray | None = None
        self._bands: np.ndarray | None = None
        self._sorted: list[tuple[np.ndarray, np.ndarray]] | None = None

    def __len__(self) -> int:
        return self._size

    def insert(self, signatures: np.ndarray, keys: Sequence | None = None, *,
               band_keys: np.ndarray | None = None) -> None:
        """Add signature rows; ``band_keys`` may be passed if already computed (same bands/rows)."""
        signatures = np.asarray(signatures, dtype=np.uint32)
        if signatures.ndim == 1:
            signatures = signatures[None, :]
        if signatures.shape[1] != self.num_perm:
            raise ValueError(f"signatures have {signatures.shape[1]} slots, the index {self.num_perm}")
        n = len(signatures)
        if keys is not None and len(keys) != n:
            raise ValueError(f"{len(keys)} keys for {n} signatures")
        if band_keys is None:
            band_keys = _compute_band_keys(signatures, self.bands, self.rows)
        elif band_keys.shape != (n, self.bands):
            raise ValueError(f"band_keys shape {band_keys.shape} != {(n, self.bands)}")
        if keys is not None and self._keys is None:
            self._keys = list(range(self._size))
        if self._keys is not None:
            self._keys.extend(keys if keys is not None else range(self._size, self._size + n))
        self._sig_blocks.append(signatures)
        self._key_blocks.append(band_keys)
        self._size += n
        self._sigs = self._bands = self._sorted = None

    @property
    def signatures(self) -> np.ndarray:
        if self._sigs is None:
            self._consolidate()
        return self._sigs

    def _consolidate(self) -> None:
        if len(self._sig_blocks) == 1:
            self._sigs, self._bands = self._sig_blocks[0], self._key_blocks[0]
        elif self._sig_blocks:
            self._sigs, self._bands = np.concatenate(self._sig_blocks), np.concatenate(self._key_blocks)
            self._sig_blocks, self._key_blocks = [self._sigs], [self._bands]
        else:
            self._sigs = np.empty((0, self.num_perm), dtype=np.uint32)
            self._bands = np.empty((0, self.bands), dtype=np.uint64)

    def _sorted_bands(self) -> list[tuple[np.ndarray, np.ndarray]]:
        if self._sorted is None:
            self.signatures  # noqa: B018 - consolidates the blocks
            index_type = np.int32 if self._size < 2**31 else np.int64
            self._sorted = []
            for band in range(self.bands):
                order = np.argsort(self._bands[:, band], kind="stable").astype(index_type)
                self._sorted.append((self._bands[order, band], order))
        return self._sorted

    def _key(self, position: int):
        return position if self._keys is None else self._keys[position]

    def query_positions(self, signature: np.ndarray, *, verify: bool = False) -> np.ndarray:
        """Positions of inserted items sharing a band with ``signature`` (sorted)."""
        return self.query_positions_many(np.asarray(signature).reshape(1, -1), verify=verify)[0]

    def query_positions_many(self, signatures: np.ndarray, *, verify: bool = False) -> list[np.ndarray]:
        """:meth:`query_positions` for many signatures at once: one vectorised lookup per band
        (Python work only for the queries that hit a bucket)."""
        signatures = np.asarray(signatures, dtype=np.uint32)
        keys = band_keys(signatures, self.bands, self.rows)
        found: list[list[np.ndarray]] = [[] for _ in range(len(signatures))]
        for band, (sorted_keys, order) in enumerate(self._sorted_bands()):
            lo = np.searchsorted(sorted_keys, keys[:, band], side="left")
            hi = np.searchsorted(sorted_keys, keys[:, band], side="right")
            for q in np.flatnonzero(hi > lo):
                found[q].append(order[lo[q] : hi[q]])
        results = []
        for q, parts in enumerate(found):
            positions = np.unique(np.concatenate(parts)).astype(np.int64) if parts else np.empty(0, dtype=np.int64)
            if verify and len(positions):
                positions = positions[estimated_jaccard(self.signatures[positions], signatures[q]) >= self.threshold]
            results.append(positions)
        return results

    def query(self, signature: np.ndarray, *, verify: bool = False) -> list:
        """Keys of the candidates for ``signature`` (verified by estimated Jaccard if asked)."""
        return [self._key(int(p)) for p in self.query_positions(signature, verify=verify)]

    def query_many(self, signatures: np.ndarray, *, verify: bool = False) -> list[list]:
        """:meth:`query` for each row of ``signatures``."""
        return [[self._key(int(p)) for p in positions]
                for positions in self.query_positions_many(signatures, verify=verify)]

    def duplicate_pairs(self, *, max_bucket: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All pairs ``i < j`` of inserted positions that share a band and whose estimated
        Jaccard is >= threshold; returns ``(i, j, estimated_jaccard)`` sorted by ``(i, j)``.

        Rows with identical signatures are linked to the first of them directly (so mass exact
        duplicates cost linear time) and only that one is bucketed. Candidates are verified
        band by band, so memory holds one band's candidates, not all of them. A bucket of more
        than ``max_bucket`` distinct signatures is resolved greedily instead of pair by pair: its
        first member is compared with the rest, the matches are linked to it and leave, and so
        on — linear per leader, at the price of edges between two non-leaders of such a
        bucket. :attr:`candidates_checked` counts the verifications (a pair proposed by several
        bands counts once per band).
        """
        sigs = self.signatures
        n = len(sigs)
        self.candidates_checked = 0
        if n < 2:
            none = np.empty(0, dtype=np.int64)
            return none, none, np.empty(0)
        # 1. identical signatures: link each to its first occurrence; bucket only that one.
        whole = _compute_band_keys(sigs, 1, self.num_perm)[:, 0]
        order = np.argsort(whole, kind="stable")
        run_id, sizes = _equal_runs(whole[order])
        first = order[np.cumsum(sizes) - sizes]  # the smallest position of each run
        linked = first[run_id] != order
        verified = [self._verify(first[run_id][linked].astype(np.int64) * n + order[linked], n)]
        distinct = np.sort(first)
        # 2. pairs within each band's buckets (runs of equal keys), verified band by band.
        for band in range(self.bands):
            keys = self._bands[distinct, band]
            order = np.argsort(keys, kind="stable")
            run_id, sizes = _equal_runs(keys[order])
            members = distinct[order]  # ascending inside a run: stable sort of ascending input
            size_of = sizes[run_id]
            small = (size_of >= 2) & (size_of <= max_bucket)
            pos, run = members[small].astype(np.int64), run_id[small]
            codes = []
            for d in range(1, int(size_of[small].max(initial=1))):
                same_run = run[d:] == run[:-d]  # the pairs d apart inside one run
                codes.append(pos[:-d][same_run] * n + pos[d:][same_run])
            for r in np.flatnonzero(sizes > max_bucket):
                codes.append(self._leader_pairs(members[run_id == r].astype(np.int64), n))
            if codes:
                verified.append(self._verify(np.unique(np.concatenate(codes)), n))
        pairs = np.unique(np.concatenate(verified))
        i, j = pairs // n, pairs % n
        return i, j, self._estimate(i, j)

    def _estimate(self, i: np.ndarray, j: np.ndarray, chunk: int = 1 << 14) -> np.ndarray:
        sigs, est = self.signatures, np.empty(len(i))
        for start in range(0, len(i), chunk):
            part = slice(start, start + chunk)
            est[part] = estimated_jaccard(sigs[i[part]], sigs[j[part]])
        return est

    def _verify(self, codes: np.ndarray, n: int) -> np.ndarray:
        """The pair codes ``i * n + j`` whose estimated Jaccard reaches the threshold."""
        self.candidates_checked += len(codes)
        return codes[self._estimate(codes // n, codes % n) >= self.threshold]

    def _leader_pairs(self, members: np.ndarray, n: int) -> np.ndarray:
        sigs, found = self.signatures, []
        while len(members) > 1:
            head, rest = members[0], members[1:]
            match = estimated_jaccard(sigs[rest], sigs[head]) >= self.threshold
            found.append(head * n + rest[match])
            members = rest[~match]
        return np.concatenate(found) if found else np.empty(0, dtype=np.int64)


def connected_components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Union-find over the pairs ``(i[k], j[k])``: a component label per item (0..n-1 range).

    Items in no pair are their own component. Labels are numbered by first appearance, so the
    same pairs always give the same labels.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components as components

    if n == 0:
        return np.empty(0, dtype=np.int64)
    graph = coo_matrix((np.ones(len(i), dtype=np.int8), (np.asarray(i), np.asarray(j))), shape=(n, n))
    _, labels = components(graph, directed=False)
    # renumber by first appearance for stable, readable labels
    _, first = np.unique(labels, return_index=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[labels]
