"""pass@k, AUROC and calibration against values computed by hand."""

from __future__ import annotations

import math
from itertools import combinations

import pytest

from cogumi.evaluate.metrics import (
    auroc,
    calibration_bins,
    expected_calibration_error,
    pass_at_k,
    reliability_plot,
)


@pytest.mark.parametrize("n, c, k, expected", [
    (1, 1, 1, 1.0), (1, 0, 1, 0.0),
    (5, 2, 1, 0.4),               # c / n
    (5, 2, 2, 0.7),               # 1 - C(3,2)/C(5,2) = 1 - 3/10
    (10, 3, 5, 1 - 21 / 252),     # 1 - C(7,5)/C(10,5)
    (10, 6, 5, 1.0),              # fewer than k failures: some pick always passes
    (200, 13, 100, 1 - math.comb(187, 100) / math.comb(200, 100)),
])
def test_pass_at_k_known_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_pass_at_k_equals_the_fraction_of_passing_subsets():
    # The estimator's definition: over all k-subsets of n samples, the share containing a pass.
    samples = [True, False, False, True, False, False]
    for k in range(1, len(samples) + 1):
        subsets = list(combinations(samples, k))
        assert pass_at_k(len(samples), sum(samples), k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))


def test_pass_at_k_rejects_impossible_arguments():
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_auroc_hand_computed():
    # positives 0.9, 0.6; negatives 0.7, 0.2: pairs (0.9>0.7) (0.9>0.2) (0.6<0.7) (0.6>0.2) -> 3/4
    assert auroc([0.9, 0.7, 0.6, 0.2], [True, False, True, False]) == pytest.approx(0.75)
    assert auroc([3, 2, 1], [True, True, False]) == 1.0
    assert auroc([1, 2, 3], [True, True, False]) == 0.0
    # ties count half: one positive and one negative with equal scores
    assert auroc([0.5, 0.5], [True, False]) == pytest.approx(0.5)
    # positives 0.8, 0.5; negatives 0.5, 0.1: (0.8>0.5) (0.8>0.1) (0.5=0.5 -> 1/2) (0.5>0.1) -> 3.5/4
    assert auroc([0.8, 0.5, 0.5, 0.1], [True, True, False, False]) == pytest.approx(0.875)
    assert auroc([0.1, 0.2], [True, True]) is None


def test_ece_hand_computed():
    # bin [0.9, 1.0]: confidences 0.9, 0.95 -> mean 0.925, accuracy 1/2 -> gap 0.425, weight 2/4
    # bin [0.2, 0.3): confidences 0.2, 0.25 -> mean 0.225, accuracy 0 -> gap 0.225, weight 2/4
    confidences = [0.9, 0.95, 0.2, 0.25]
    correct = [True, False, False, False]
    assert expected_calibration_error(confidences, correct, bins=10) == pytest.approx(0.5 * 0.425 + 0.5 * 0.225)
    # perfectly calibrated in one bin
    assert expected_calibration_error([0.75] * 4, [True, True, True, False], bins=4) == pytest.approx(0.0)
    # a confidence of exactly 1.0 lands in the last bin
    table = calibration_bins([1.0, 0.0], [True, False], bins=5)
    assert table[-1]["count"] == 1 and table[0]["count"] == 1
    assert expected_calibration_error([], [], bins=10) is None
    with pytest.raises(ValueError, match="probabilities"):
        expected_calibration_error([1.5], [True])


def test_reliability_plot_writes_a_png(tmp_path):
    path = reliability_plot({"demo": ([0.9, 0.8, 0.3, 0.2], [True, True, False, True])}, tmp_path / "r.png", bins=5)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
