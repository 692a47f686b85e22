"""Each reported query's proponents, opponents and score histogram, reading no more than it must.

Proponents come from the run's ``topk`` table. No table keeps the lowest scores, so a streamed
pass over ``scores`` keeps a bottom-k per query (the top-k of the negated scores: memory k x
queries); its first entry is the query's lowest score and the top-k's first its highest, which
fixes the bins a second streamed pass counts the scores into. Only the reported queries'
columns are ranked and counted.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from rayattr.codec import vectors_of
from rayattr.config import RayattrError
from rayattr.store import ScoreTable, read_topk
from rayattr.topk import TopK

HISTOGRAM_BINS = 40
BATCH_VALUES = 1 << 22  # scores per streamed batch (16 MiB of float32), whatever the query count


@dataclass(frozen=True)
class Ranking:
    """One query's highest and lowest scored training rows, and how all its scores spread."""

    column: int  # the query's position in the score table
    query_id: int
    top_ids: np.ndarray
    top_scores: np.ndarray
    bottom_ids: np.ndarray  # lowest first
    bottom_scores: np.ndarray
    counts: np.ndarray  # [HISTOGRAM_BINS] rows per bin
    edges: np.ndarray  # [HISTOGRAM_BINS + 1] bin edges, lowest score to highest


def rank_queries(scores: ScoreTable, k: int, queries: int | None) -> list[Ranking]:
    """Rankings of the first ``queries`` queries (all: None) of the run whose score table is ``scores``."""
    rows = scores.count()
    if not rows:
        raise RayattrError(f"the scores table of {scores.uri} is empty; finish the run (rerun it to resume) first")
    top, query_ids = read_topk(scores.uri)
    if k > top.ids.shape[1] and rows > top.ids.shape[1]:
        raise RayattrError(f"the topk table of {scores.uri} keeps {top.ids.shape[1]} rows per query; pass --k "
                           f"{top.ids.shape[1]} or less, or score again with --top-k {k}")
    columns = np.arange(len(query_ids))[:queries]
    bottom = _bottom_k(scores, k, columns)
    low = -bottom.scores[:, 0].astype(np.float64)
    high = top.scores[columns, 0].astype(np.float64)
    flat = high <= low  # every score equal: one bin around it
    low, high = np.where(flat, low - 0.5, low), np.where(flat, high + 0.5, high)
    counts = _histograms(scores, columns, low, high)
    edges = low[:, None] + (high - low)[:, None] * np.linspace(0.0, 1.0, HISTOGRAM_BINS + 1)[None, :]
    return [Ranking(int(c), int(query_ids[c]), top.ids[c, :k], top.scores[c, :k], bottom.ids[i], -bottom.scores[i],
                    counts[i], edges[i]) for i, c in enumerate(columns)]


def _batches(scores: ScoreTable, columns: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(ids [n], scores [n, len(columns)])`` of the whole table, streamed."""
    width = scores.meta.width
    for batch in scores.iter_batches(["id", "scores"], batch_size=max(1, BATCH_VALUES // width)):
        yield batch.column("id").to_numpy(), vectors_of(batch.column("scores"), width)[:, columns]


def _bottom_k(scores: ScoreTable, k: int, columns: np.ndarray) -> TopK:
    """The ``k`` lowest scores of each column (negated: the best entry is the lowest score)."""
    bottom = TopK.empty(k, len(columns))
    for ids, block in _batches(scores, columns):
        bottom = bottom.merge(TopK.of_block(k, ids, -block))
    return bottom


def _histograms(scores: ScoreTable, columns: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """``[len(columns), HISTOGRAM_BINS]`` counts of each column's finite scores in equal bins from low to high."""
    counts = np.zeros(len(columns) * HISTOGRAM_BINS, np.int64)
    offsets = np.arange(len(columns)) * HISTOGRAM_BINS
    for _, block in _batches(scores, columns):
        position = (block - low) / (high - low) * HISTOGRAM_BINS
        finite = np.isfinite(position)
        bins = np.clip(np.floor(np.where(finite, position, 0)), 0, HISTOGRAM_BINS - 1).astype(np.int64)
        counts += np.bincount((bins + offsets)[finite], minlength=counts.size)
    return counts.reshape(len(columns), HISTOGRAM_BINS)
