"""Scores computed from per-example results: pass@k, AUROC, expected calibration error.

``pass_at_k`` is the unbiased estimator of Chen et al. (2021): with ``n`` samples of which
``c`` pass, the chance that at least one of ``k`` drawn without replacement passes is
``1 - C(n-c, k) / C(n, k)``, computed as a product so it stays exact for large ``n``.

``auroc`` is the Mann-Whitney U statistic divided by the number of (positive, negative)
pairs, with tied scores counted as half: the probability that a randomly chosen correct
example gets a higher confidence than a randomly chosen wrong one. ``expected_calibration_error``
bins confidences into equal-width bins and averages |accuracy - mean confidence| weighted by
bin size (Guo et al., 2017).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of ``k`` of ``n`` samples (``c`` correct) is correct."""
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0
    # 1 - prod_{i=n-c+1}^{n} (1 - k/i)  ==  1 - C(n-c, k) / C(n, k)
    failing = 1.0
    for i in range(n - c + 1, n + 1):
        failing *= 1.0 - k / i
    return 1.0 - failing


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Area under the ROC curve of ``scores`` for predicting ``labels`` (True = positive).

    None when only one class is present (the AUROC is undefined there).
    """
    if len(scores) != len(labels):
        raise ValueError(f"auroc: {len(scores)} scores but {len(labels)} labels")
    positives = sum(1 for label in labels if label)
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return None
    # Average ranks (1-based) with ties sharing the mean rank; U = sum of positive ranks - P(P+1)/2.
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and scores[order[end + 1]] == scores[order[start]]:
            end += 1
        mean_rank = (start + end) / 2 + 1
        for position in range(start, end + 1):
            ranks[order[position]] = mean_rank
        start = end + 1
    rank_sum = sum(rank for rank, label in zip(ranks, labels) if label)
    u = rank_sum - positives * (positives + 1) / 2
    return u / (positives * negatives)


def calibration_bins(confidences: Sequence[float], correct: Sequence[bool], bins: int = 10) -> list[dict]:
    """Per equal-width confidence bin: ``lower``, ``upper``, ``count``, ``confidence`` (mean), ``accuracy``.

    A confidence of exactly 1.0 falls in the last bin; empty bins are listed with count 0.
    """
    if len(confidences) != len(correct):
        raise ValueError(f"calibration: {len(confidences)} confidences but {len(correct)} labels")
    if bins < 1:
        raise ValueError(f"calibration: bins must be >= 1, got {bins}")
    for value in confidences:
        if not 0.0 <= value <= 1.0 or math.isnan(value):
            raise ValueError(f"calibration: confidences must be probabilities in [0, 1], got {value}")
    members: list[list[int]] = [[] for _ in range(bins)]
    for i, value in enumerate(confidences):
        members[min(int(value * bins), bins - 1)].append(i)
    table = []
    for b, indices in enumerate(members):
        count = len(indices)
        table.append({
            "lower": b / bins, "upper": (b + 1) / bins, "count": count,
            "confidence": sum(confidences[i] for i in indices) / count if count else None,
            "accuracy": sum(1 for i in indices if correct[i]) / count if count else None,
        })
    return table


def expected_calibration_error(confidences: Sequence[float], correct: Sequence[bool], bins: int = 10) -> float | None:
    """Bin-size-weighted mean of |accuracy - confidence| over equal-width bins (None if empty)."""
    table = calibration_bins(confidences, correct, bins)
    total = sum(row["count"] for row in table)
    if total == 0:
        return None
    return sum(row["count"] * abs(row["accuracy"] - row["confidence"]) for row in table if row["count"]) / total


def reliability_plot(curves: dict[str, tuple[Sequence[float], Sequence[bool]]], path: str | Path, *,
                     bins: int = 10, title: str = "Reliability") -> Path:
    """A reliability diagram (accuracy against confidence per bin, one line per confidence
    measure, with the ECE in the legend), written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cogumi.io import atomic_write

    figure, axis = plt.subplots(figsize=(5.5, 5))
    axis.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect calibration")
    for name, (confidences, correct) in curves.items():
        table = [row for row in calibration_bins(confidences, correct, bins) if row["count"]]
        if not table:
            continue
        ece = expected_calibration_error(confidences, correct, bins)
        axis.plot([row["confidence"] for row in table], [row["accuracy"] for row in table], marker="o",
                  label=f"{name} (ECE {ece:.3f}, n={len(confidences)})")
    if not curves:
        axis.text(0.5, 0.5, "no confidence values\n(the outputs came without log-probabilities)",
                  ha="center", va="center", fontsize=9)
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1)
    axis.set_xlabel("confidence (mean of bin)")
    axis.set_ylabel("accuracy")
    axis.set_title(title)
    axis.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    path = Path(path)
    with atomic_write(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=110)
    plt.close(figure)
    return path


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


__all__ = ["auroc", "calibration_bins", "expected_calibration_error", "mean", "pass_at_k", "reliability_plot"]
