"""Scoring gradient rows against query vectors: preprocessing, reduction, scores.

Plain torch, no Ray. The order of operations is fixed:
normalize (during collection) -> precondition -> unit-normalize -> aggregate.
Inner product puts ``H^-1`` on the query only; cosine puts ``H^-1/2`` on both
sides before unit normalization (TrackStar).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch

from rayattr.config import RayattrError, setting, shared
from rayattr.hessian.precondition import Preconditioner
from rayattr.space import TableMeta

Aggregation = Literal["none", "mean", "sum"]
ScoreMode = Literal["individual", "mean", "nearest", "max"]
AGGREGATIONS = ("none", "mean", "sum")
SCORE_MODES = ("individual", "mean", "nearest", "max")  # max: another name of nearest

_TINY = 1e-30


def unit_normalize(rows: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm (all-zero rows stay zero)."""
    return rows / rows.norm(dim=1, keepdim=True).clamp_min(_TINY)


def aggregate(rows: torch.Tensor, aggregation: Aggregation) -> torch.Tensor:
    """``[N, D]`` -> ``[1, D]`` mean or sum; ``none`` keeps every row."""
    if aggregation not in AGGREGATIONS:
        raise RayattrError(f"unknown aggregation {aggregation!r}; choose one of {', '.join(AGGREGATIONS)}")
    if aggregation == "none":
        return rows
    return rows.mean(0, keepdim=True) if aggregation == "mean" else rows.sum(0, keepdim=True)


@dataclass
class Preprocess:
    """One side's preprocessing after collection: precondition, then unit-normalize."""

    preconditioner: Preconditioner | None = None
    unit_normalize: bool = False

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        rows = rows.float()
        if self.preconditioner is not None:
            rows = self.preconditioner.apply(rows)
        return unit_normalize(rows) if self.unit_normalize else rows


def canonical_mode(mode: str) -> ScoreMode:
    """The mode's one name (``max`` is ``nearest``), or a one-line error for an unknown one."""
    if mode not in SCORE_MODES:
        raise RayattrError(f"unknown --score {mode!r}; choose one of {', '.join(SCORE_MODES)}")
    return "nearest" if mode == "max" else mode


@dataclass
class Scorer:
    """Query vectors (already preprocessed) and the index side's preprocessing.

    ``mode`` individual keeps a score per query; mean averages them (equal to
    scoring against the mean query, since the index side does not depend on
    the query); nearest (or max) keeps the best query's score. Queries are multiplied
    ``query_batch_size`` at a time, so the temporary ``[rows, queries]`` block
    stays bounded however many queries there are.
    """

    queries: torch.Tensor  # [Q, D] float32
    index_side: Preprocess
    mode: ScoreMode = "individual"
    query_batch_size: int = 1024

    def __post_init__(self) -> None:
        self.mode = canonical_mode(self.mode)
        if self.queries.shape[0] == 0:
            raise RayattrError("the query set has no gradients (empty, or no document had a loss token)")
        if self.mode == "mean":
            self.queries = self.queries.mean(0, keepdim=True)

    @property
    def dim(self) -> int:
        return self.queries.shape[1]

    @property
    def width(self) -> int:
        """Scores per row: one per query, or one in mean/nearest mode."""
        return self.queries.shape[0] if self.mode == "individual" else 1

    def check_dim(self, dim: int) -> None:
        if dim != self.dim:
            raise RayattrError(
                f"query vectors have {self.dim} dimensions but the index has {dim}; "
                "collect both with the same model, modules and --projection-dim"
            )

    def score(self, rows: torch.Tensor) -> torch.Tensor:
        """``[N, D]`` raw gradient rows -> ``[N, width]`` scores (float32)."""
        self.check_dim(rows.shape[1])
        return self._reduce_queries(self._raw(self.index_side(rows)))

    def score_tokens(self, rows: torch.Tensor, row_doc: torch.Tensor, num_docs: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token rows -> ``(token scores [R, width], document scores [num_docs, width])``.

        Token rows sum to the document row and preconditioning is linear, so a
        token's score is its preconditioned row times the query, divided by the
        norm of its whole document's preconditioned row under cosine: token
        scores then sum exactly to the document score.
        """
        self.check_dim(rows.shape[1])
        side = Preprocess(self.index_side.preconditioner, unit_normalize=False)
        tokens = side(rows)
        raw = self._raw(tokens)
        if self.index_side.unit_normalize:
            docs = torch.zeros(num_docs, tokens.shape[1], dtype=tokens.dtype).index_add_(0, row_doc, tokens)
            raw = raw / docs.norm(dim=1).clamp_min(_TINY)[row_doc, None]
        doc_raw = torch.zeros(num_docs, raw.shape[1], dtype=raw.dtype).index_add_(0, row_doc, raw)
        if self.mode == "nearest":  # each token keeps the score for its document's nearest query
            best = doc_raw.argmax(1)
            return raw.gather(1, best[row_doc, None]), doc_raw.gather(1, best[:, None])
        return raw, doc_raw

    def _raw(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows @ queries^T`` in query slices."""
        out = torch.empty(rows.shape[0], self.queries.shape[0], dtype=torch.float32)
        for start in range(0, self.queries.shape[0], self.query_batch_size):
            block = self.queries[start : start + self.query_batch_size].to(rows.device, torch.float32)
            out[:, start : start + block.shape[0]] = (rows.float() @ block.T).cpu()
        return out

    def _reduce_queries(self, scores: torch.Tensor) -> torch.Tensor:
        return scores.max(1, keepdim=True).values if self.mode == "nearest" else scores


@dataclass
class SelfScorer:
    """Each row's self-influence, ``g^T H^-1 g`` (``|g|^2`` without a preconditioner): one score per row.

    The preconditioner is loaded at power -1; ``g^T H^-1 g = |H^-1/2 g|^2``, so it is
    also the squared norm of the row TrackStar's cosine would unit-normalize.
    """

    preconditioner: Preconditioner | None = None
    width: int = 1

    def score(self, rows: torch.Tensor) -> torch.Tensor:
        """``[N, D]`` raw gradient rows -> ``[N, 1]`` self-influence (float64 sums, float32 out)."""
        rows = rows.float()
        applied = self.preconditioner.apply(rows) if self.preconditioner is not None else rows
        return (rows.double() * applied.double()).sum(1, keepdim=True).float()


@dataclass(frozen=True)
class QueryPreprocess:
    """How ``reduce`` turns collected query gradients into query vectors.

    Inner product puts ``H^-1`` on the query (the index stays raw); with
    ``unit_normalize`` the query gets ``H^-1/2`` and the index side will too.
    Recorded in the query table's metadata so scoring can check it.
    """

    hessian: str | None = shared("hessian")
    unit_normalize: bool = shared("unit_normalize")
    aggregation: Aggregation = setting("mean", "mean or sum to one vector; none keeps every query")

    @property
    def power(self) -> float:
        return -0.5 if self.unit_normalize else -1.0

    def load(self) -> Preprocess:
        preconditioner = Preconditioner.load(self.hessian, power=self.power) if self.hessian else None
        return Preprocess(preconditioner, self.unit_normalize)

    def annotate(self, meta: TableMeta, preprocess: Preprocess) -> TableMeta:
        """The metadata of query rows made with this preprocessing."""
        applied = preprocess.preconditioner.fingerprint if preprocess.preconditioner else None
        reduce = {"aggregation": self.aggregation, "hessian": self.hessian, "power": self.power if applied else None}
        return replace(meta, preconditioner=applied, unit_normalized=self.unit_normalize,
                       source=meta.source | {"reduce": reduce})


@dataclass(frozen=True)
class ScoreSettings:
    """How training rows are scored against the queries."""

    mode: ScoreMode = setting("individual", "A score per query, their mean, or the nearest query's (max)",
                              flags=("--score",))
    unit_normalize: bool = shared("unit_normalize")
    hessian: str | None = shared("hessian")
    per_token: bool = shared("per_token_scores")
    top_k: int = shared("top_k")
    query_batch_size: int = shared("query_batch_size")
    keep_gradients: bool = shared("keep_gradients")
    self_influence: bool = setting(False, "Each document's self-influence g^T H^-1 g (with --hessian-path; |g|^2 "
                                          "without) instead of queries", flags=("--self",))

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", canonical_mode(self.mode))
        if self.top_k < 1 or self.query_batch_size < 1:
            raise RayattrError(f"--top-k and --query-batch-size must be >= 1, got {self.top_k} and {self.query_batch_size}")
        if self.self_influence and (self.unit_normalize or self.per_token):
            raise RayattrError("--self scores each document's g^T H^-1 g: drop --unit-normalize (a cosine with "
                               "itself is 1) and --per-token")
