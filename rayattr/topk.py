"""Running top-k per query over a stream of score blocks.

Every block is cut to its own top-k before it is merged, so memory stays at
``k x Q`` however many rows stream past; merging top-k lists is associative,
so blocks can be cut on workers and merged on the driver in any grouping.
Ties break toward the smaller id, which makes the result independent of the
order blocks arrive in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa


@dataclass
class TopK:
    """The ``k`` highest scores per query seen so far, with their ids."""

    k: int
    ids: np.ndarray  # [Q, m] int64, m <= k, best first
    scores: np.ndarray  # [Q, m] float32

    @classmethod
    def empty(cls, k: int, num_queries: int) -> TopK:
        if k < 1:
            raise ValueError(f"top-k needs k >= 1, got {k}")
        return cls(k, np.zeros((num_queries, 0), np.int64), np.zeros((num_queries, 0), np.float32))

    @classmethod
    def of_block(cls, k: int, ids: np.ndarray, scores: np.ndarray) -> TopK:
        """Top-k of one block: ``ids [N]``, ``scores [N, Q]`` (NaN scores never rank)."""
        scores = np.asarray(scores, np.float32).T  # [Q, N]
        ids = np.broadcast_to(np.asarray(ids, np.int64), scores.shape)
        return cls._select(k, ids, scores)

    def merge(self, other: TopK) -> TopK:
        """Top-k of the union of two top-k lists over the same queries."""
        if self.ids.shape[0] != other.ids.shape[0]:
            raise ValueError(f"cannot merge top-k lists of {self.ids.shape[0]} and {other.ids.shape[0]} queries")
        return self._select(self.k, np.concatenate([self.ids, other.ids], 1),
                            np.concatenate([self.scores, other.scores], 1))

    @staticmethod
    def _select(k: int, ids: np.ndarray, scores: np.ndarray) -> TopK:
        """Per row of ``[Q, n]`` candidates, the best ``k``: score descending, then id ascending."""
        keyed = np.where(np.isnan(scores), -np.inf, scores)
        order = np.lexsort((ids, -keyed), axis=1)[:, :k]
        return TopK(k, np.take_along_axis(ids, order, 1), np.take_along_axis(scores, order, 1).astype(np.float32))

    def to_arrow(self, query_ids: np.ndarray | None = None) -> pa.Table:
        """The top-k table: ``query_id, rank, id, score`` (rank 1 is the best)."""
        num_queries, width = self.ids.shape
        query_ids = np.arange(num_queries) if query_ids is None else np.asarray(query_ids)
        return pa.table({
            "query_id": pa.array(np.repeat(query_ids, width), pa.int64()),
            "rank": pa.array(np.tile(np.arange(1, width + 1), num_queries), pa.int32()),
            "id": pa.array(self.ids.reshape(-1), pa.int64()),
            "score": pa.array(self.scores.reshape(-1), pa.float32()),
        })
