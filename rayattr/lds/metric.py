"""The linear datamodeling score (LDS): do attribution scores predict retraining?

For each query ``q`` and each retrained subset ``S_j`` of the training set, an attribution
method predicts the effect of training on ``S_j`` as the sum of its scores over ``S_j``;
the retrain bank measured the query's loss after training on ``S_j``. The LDS of ``q`` is
the Spearman rank correlation between the predictions and the negated losses (a higher
score means more helpful, so it should mean a lower loss), and a method's LDS is the mean
over queries, with a bootstrap interval over queries.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from rayattr.config import RayattrError

BOOTSTRAP_SAMPLES = 1000
CONFIDENCE = 0.95


def average_ranks(values: np.ndarray) -> np.ndarray:
    """0-based ranks of a 1-D array, tied values sharing their average rank (as Spearman's rho needs)."""
    values = np.asarray(values, np.float64)
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], values.size]
    ranks = np.empty(values.size)
    ranks[order] = np.repeat((starts + ends - 1) / 2.0, ends - starts)
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's rho of each row of ``a`` with the same row of ``b`` (``[Q, M]`` each); NaN for a constant row."""
    ra = np.stack([average_ranks(row) for row in np.atleast_2d(a)])
    rb = np.stack([average_ranks(row) for row in np.atleast_2d(b)])
    ra -= ra.mean(-1, keepdims=True)
    rb -= rb.mean(-1, keepdims=True)
    denominator = np.sqrt((ra * ra).sum(-1) * (rb * rb).sum(-1))
    return np.divide((ra * rb).sum(-1), denominator, out=np.full(len(ra), np.nan), where=denominator > 0)


@dataclass(frozen=True)
class LDSResult:
    """A method's LDS: the mean over queries and its bootstrap interval, and each query's rho."""

    lds: float
    low: float
    high: float
    queries: int
    subsets: int
    per_query: list[float]

    def to_dict(self) -> dict:
        return asdict(self)


def linear_datamodeling_score(predicted: np.ndarray, losses: np.ndarray, bootstrap: int = BOOTSTRAP_SAMPLES,
                              seed: int = 0) -> LDSResult:
    """LDS of ``predicted[M, Q]`` (a method's summed scores over each of M subsets) against ``losses[M, Q]``
    (each query's loss after retraining on that subset).

    Queries whose losses or predictions do not vary over the subsets have no rank correlation; they are
    left out (and counted out of ``queries``). The interval is the percentile bootstrap of the mean over
    queries resampled with replacement (``bootstrap`` draws from ``seed``).
    """
    predicted, losses = np.asarray(predicted, np.float64), np.asarray(losses, np.float64)
    if predicted.shape != losses.shape or predicted.ndim != 2:
        raise RayattrError(f"predictions {predicted.shape} and losses {losses.shape} must both be [subsets, queries]")
    if predicted.shape[0] < 3:
        raise RayattrError(f"an LDS needs at least 3 retrained subsets, the bank has {predicted.shape[0]}; "
                           "retrain more (`rayattr retrain --runs M`)")
    rho = spearman(predicted.T, -losses.T)
    kept = rho[np.isfinite(rho)]
    if not kept.size:
        raise RayattrError("no query's predictions and losses vary over the subsets; nothing to correlate")
    draws = np.random.default_rng(seed).integers(0, kept.size, size=(bootstrap, kept.size))
    means = kept[draws].mean(1)
    tail = (1 - CONFIDENCE) / 2
    return LDSResult(float(kept.mean()), float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail)),
                     int(kept.size), int(predicted.shape[0]), [float(r) for r in rho])


def subset_sums(membership: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """``[M, Q]``: each subset's summed scores, from ``membership[M, B]`` (does subset j hold row b) and
    ``scores[B, Q]`` of a batch of training rows; callers add the batches of a streamed score table."""
    return membership.astype(np.float64) @ np.asarray(scores, np.float64)
