"""MinHash signatures and the LSH index: datasketch parity, interop, shingling, pairs."""

from __future__ import annotations

import random

import numpy as np
import pytest
from datasketch import LeanMinHash, MinHash, MinHashLSH
from support import edit, words

from cogumi.data import minhash as mh

PARAGRAPHS = [
    "MinHash estimates the Jaccard similarity of two sets from short signatures. Near-duplicate "
    "instruction data wastes training compute and skews evaluation, so the Cogumi method removes "
    "pairs above a threshold of 0.8 before fine-tuning.",
    "Ünïcode matters: naïve café owners write “smart quotes”, emoji 😀🎉 and CJK 漢字 too; the "
    "signature must hash code points, not bytes, exactly as datasketch's users shingle strings.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # 5",
    "ab",
    "x",
    "",
    "   ",
]


def datasketch_signature(text: str, ngram: int, mode: str, scheme: str, num_perm: int = 128, seed: int = 1):
    m = MinHash(num_perm=num_perm, seed=seed, scheme=scheme)
    for shingle in mh.shingles(text, ngram, mode):
        m.update(shingle.encode("utf8"))
    return m.hashvalues


@pytest.mark.parametrize(("family", "scheme"), [("datasketch", "affine32"), ("datasketch-legacy", "legacy")])
@pytest.mark.parametrize(("mode", "ngram"), [("char", 3), ("char", 5), ("word", 2)])
def test_datasketch_family_equals_datasketch_minhash_update(family, scheme, mode, ngram):
    sigs = mh.compute_signatures(PARAGRAPHS, hash_family=family, mode=mode, ngram=ngram)
    assert sigs.shape == (len(PARAGRAPHS), 128) and sigs.dtype == np.uint32
    for text, sig in zip(PARAGRAPHS, sigs):
        np.testing.assert_array_equal(sig, datasketch_signature(text, ngram, mode, scheme), err_msg=repr(text))


def test_permutations_are_datasketch_s_for_other_seeds_and_sizes():
    for num_perm, seed in ((64, 7), (200, 12345)):
        ours = mh.compute_signatures(PARAGRAPHS[:2], num_perm=num_perm, seed=seed, hash_family="datasketch")
        for text, sig in zip(PARAGRAPHS[:2], ours):
            np.testing.assert_array_equal(sig, datasketch_signature(text, 3, "char", "affine32", num_perm, seed))
        a, b = mh.permutations(num_perm, seed, "legacy")
        reference = MinHash(num_perm=num_perm, seed=seed, scheme="legacy").permutations
        np.testing.assert_array_equal(a, reference[0])
        np.testing.assert_array_equal(b, reference[1])


def test_fast_signatures_work_in_datasketch_lsh_as_lean_minhash():
    rng = random.Random(0)
    docs = {f"doc{i}": words(rng, 120) for i in range(20)}
    near = edit(rng, docs["doc3"], 2)
    sigs = mh.compute_signatures([*docs.values(), near])
    lsh = MinHashLSH(threshold=0.8, num_perm=128)
    for key, sig in zip(docs, sigs):
        lsh.insert(key, mh.to_lean_minhash(sig))
    query = mh.to_lean_minhash(sigs[-1])
    assert isinstance(query, LeanMinHash)
    assert lsh.query(query) == ["doc3"]
    assert query.jaccard(mh.to_lean_minhash(sigs[3])) == pytest.approx(mh.estimated_jaccard(sigs[-1], sigs[3]))
    assert mh.jaccard(near, docs["doc3"]) > 0.8


def test_datasketch_family_mixes_with_minhash_objects_datasketch_made():
    rng = random.Random(1)
    docs = [words(rng, 100) for _ in range(10)]
    ours = mh.compute_signatures(docs, hash_family="datasketch")
    lsh = MinHashLSH(threshold=0.8, num_perm=128)
    for i, sig in enumerate(ours):
        lsh.insert(i, mh.to_lean_minhash(sig, hash_family="datasketch"))
    theirs = MinHash(num_perm=128)  # built by datasketch alone, as a user of the spec's code would
    for shingle in mh.shingles(edit(rng, docs[6], 1)):
        theirs.update(shingle.encode("utf8"))
    assert lsh.query(theirs) == [6]
    legacy = mh.to_lean_minhash(mh.compute_signatures(docs[:1], hash_family="datasketch-legacy")[0],
                                hash_family="datasketch-legacy")
    assert legacy.scheme == "legacy"


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.8, 0.9])
def test_optimal_bands_match_datasketch(threshold):
    lsh = MinHashLSH(threshold=threshold, num_perm=128)
    assert mh.optimal_bands(threshold, 128) == (lsh.b, lsh.r)
    weighted = MinHashLSH(threshold=threshold, num_perm=64, weights=(0.2, 0.8))
    assert mh.optimal_bands(threshold, 64, (0.2, 0.8)) == (weighted.b, weighted.r)


def test_shingles_normalise_and_handle_short_and_empty_texts():
    assert mh.normalize("  Hello World \n") == "hello world"
    assert mh.shingles("ABcd") == {"abc", "bcd"}
    assert mh.shingles("Ab") == {"ab"}  # shorter than one shingle: the text itself
    assert mh.shingles(" \t") == set()
    assert mh.shingles("One two  Three four", 2, "word") == {"one two", "two three", "three four"}
    assert mh.shingles("one", 3, "word") == {"one"}
    sigs = mh.compute_signatures(["", "ab", "AB ", "abc"])
    assert (sigs[0] == mh.EMPTY_VALUE).all()
    assert (sigs[1] == sigs[2]).all()  # normalised before hashing
    assert mh.estimated_jaccard(sigs[1], sigs[3]) < 0.1
    assert mh.jaccard("", "") == 0.0
    assert mh.jaccard("abcd", "abce") == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="mode must be one of"):
        mh.shingles("x", 3, "chars")


def test_word_mode_compares_words_not_characters():
    text = "the cat sat on the mat while the dog slept by the warm fire"
    shuffled = " ".join(reversed(text.split()))
    char = mh.compute_signatures([text, shuffled], mode="char", ngram=3)
    unigram = mh.compute_signatures([text, shuffled], mode="word", ngram=1)
    bigram = mh.compute_signatures([text, shuffled], mode="word", ngram=2)
    assert (unigram[0] == unigram[1]).all()  # the same set of words
    assert mh.estimated_jaccard(bigram[0], bigram[1]) < 0.2  # no bigram survives the reversal
    assert 0.3 < mh.estimated_jaccard(char[0], char[1]) < 0.95


def test_estimates_track_exact_jaccard():
    rng = random.Random(2)
    base = words(rng, 400)
    for changes in (5, 40, 120):
        other = edit(rng, base, changes)
        exact = mh.jaccard(base, other)
        for family in ("fast", "datasketch"):
            sigs = mh.compute_signatures([base, other], num_perm=256, hash_family=family)
            assert mh.estimated_jaccard(sigs[0], sigs[1]) == pytest.approx(exact, abs=0.1)


def test_signatures_do_not_depend_on_batching_or_workers():
    rng = random.Random(3)
    texts = [words(rng, rng.randint(0, 60)) for _ in range(300)]
    one = mh.compute_signatures(texts, batch_size=1000)
    np.testing.assert_array_equal(one, mh.compute_signatures(texts, batch_size=7))
    np.testing.assert_array_equal(one, mh.compute_signatures(texts, batch_size=50, workers=2))
    for mode, ngram in (("word", 3), ("char", 7)):
        whole = mh.compute_signatures(texts, mode=mode, ngram=ngram)
        np.testing.assert_array_equal(whole[5], mh.compute_signatures([texts[5]], mode=mode, ngram=ngram)[0])


def _planted(rng, originals=30, copies=((0, 2), (3, 1), (10, 1))):
    """Unrelated documents, then copies: (index of the original, word changes)."""
    docs = [words(rng, 150) for _ in range(originals)]
    docs += [edit(rng, docs[i], changes) if changes else docs[i] for i, changes in copies]
    return docs


def test_lsh_index_finds_planted_pairs_and_only_them():
    rng = random.Random(4)
    docs = _planted(rng)
    n = len(docs)
    index = mh.LSHIndex(128, 0.8)
    index.insert(mh.compute_signatures(docs))
    assert (index.bands, index.rows) == (9, 13)
    i, j, est = index.duplicate_pairs()
    assert set(zip(i.tolist(), j.tolist())) == {(0, n - 3), (3, n - 2), (10, n - 1)}
    assert (est >= 0.8).all()
    assert index.candidates_checked >= 3
    labels = mh.connected_components(n, i, j)
    assert labels[0] == labels[n - 3] and labels[3] == labels[n - 2] != labels[0]
    assert len(set(labels.tolist())) == n - 3


def test_identical_signatures_and_oversized_buckets_still_link_everything():
    rng = random.Random(5)
    base = words(rng, 200)
    docs = [base] * 6 + [edit(rng, base, 1) for _ in range(5)] + [words(rng, 200) for _ in range(5)]
    for max_bucket in (256, 2):  # 2: every bucket of near-copies takes the greedy path
        index = mh.LSHIndex(128, 0.8)
        index.insert(mh.compute_signatures(docs))
        i, j, _ = index.duplicate_pairs(max_bucket=max_bucket)
        labels = mh.connected_components(len(docs), i, j)
        assert len(set(labels[:11].tolist())) == 1
        assert len(set(labels.tolist())) == 6


def test_lsh_index_query_with_keys_and_verification():
    rng = random.Random(6)
    docs = [words(rng, 120) for _ in range(15)]
    index = mh.LSHIndex(128, 0.8, bands=16, rows=8)
    sigs = mh.compute_signatures(docs)
    index.insert(sigs[:10], keys=[f"train-{k}" for k in range(10)])
    index.insert(sigs[10:])  # no keys: positions
    probe = mh.compute_signatures([edit(rng, docs[12], 1), edit(rng, docs[4], 3), words(rng, 120)])
    assert index.query_many(probe, verify=True) == [[12], ["train-4"], []]
    assert "train-4" in index.query(probe[1])
    many = index.query_positions_many(probe)
    assert [list(p) for p in many] == [list(index.query_positions(p)) for p in probe]
    with pytest.raises(ValueError, match="bands \\* rows <= num_perm"):
        mh.LSHIndex(128, 0.8, bands=20, rows=10)
    with pytest.raises(ValueError, match="120 slots, the index 128"):
        index.insert(np.zeros((1, 120), dtype=np.uint32))
