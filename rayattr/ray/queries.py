"""The query side of scoring: a reduced query table with its preprocessing finished, or
self-influence, where each training row is scored against itself.

Both offer the same two things to a scoring worker: ``check(meta)`` (the rows to
score live in the right space) and ``scorer(settings)``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch

from rayattr.config import RayattrError
from rayattr.hessian.precondition import Preconditioner
from rayattr.score import Preprocess, ScoreSettings, Scorer, SelfScorer
from rayattr.space import TableMeta
from rayattr.store import GradientTable, require_compatible


@dataclass
class QuerySet:
    """Preprocessed query vectors and the index-side preprocessing that matches them."""

    ids: np.ndarray
    vectors: torch.Tensor
    meta: TableMeta
    index_side: Preprocess

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.vectors.numpy().tobytes()).hexdigest()[:16]

    def check(self, meta: TableMeta) -> None:
        """The training rows must live in the queries' space."""
        require_compatible(meta, self.meta)

    def scorer(self, settings: ScoreSettings) -> Scorer:
        return Scorer(self.vectors, self.index_side, settings.mode, settings.query_batch_size)


@dataclass
class SelfInfluence:
    """Each training row scored against itself: ``g^T H^-1 g`` with statistics, else ``|g|^2``."""

    preconditioner: Preconditioner | None
    ids: np.ndarray = field(default_factory=lambda: np.array([-1]))  # one score column, no query
    fingerprint: str = "self"

    @property
    def index_side(self) -> Preprocess:
        return Preprocess(self.preconditioner)

    def check(self, meta: TableMeta) -> None:
        if self.preconditioner is not None:
            self.preconditioner.check(meta)

    def scorer(self, settings: ScoreSettings) -> SelfScorer:
        return SelfScorer(self.preconditioner)


def self_influence(settings: ScoreSettings) -> SelfInfluence:
    """Self-influence scoring with the settings' statistics (``H^-1``, power -1)."""
    return SelfInfluence(Preconditioner.load(settings.hessian, power=-1.0) if settings.hessian else None)


def load_queries(query_path: str, settings: ScoreSettings) -> QuerySet:
    """Read a query table and finish its preprocessing for these settings.

    ``reduce`` may already have applied the preconditioner; scoring applies
    it here otherwise, so both routes give the same vectors. Combinations
    that cannot be repaired (a query unit-normalized before preconditioning,
    preconditioned for cosine but scored by inner product...) are errors.
    """
    table = GradientTable.open(query_path)
    meta = table.meta
    if meta.per_token:
        raise RayattrError(f"{query_path} holds per-token rows; make the query with `rayattr reduce` (per document)")
    if meta.unit_normalized and not settings.unit_normalize:
        raise RayattrError(
            f"the query in {query_path} is unit-normalized but scoring is by inner product; "
            "pass --unit-normalize, or reduce the query again without it"
        )
    power = -0.5 if settings.unit_normalize else -1.0
    wanted = Preconditioner.load(settings.hessian, power=power) if settings.hessian else None
    if wanted is not None:
        wanted.check(meta)
    query_side = _query_preconditioning(query_path, meta, wanted)
    ids, vectors = table.read_matrix()
    if not len(ids):
        raise RayattrError(f"the query table in {query_path} is empty; reduce a query set with at least one document")
    rows = Preprocess(query_side, settings.unit_normalize)(torch.from_numpy(vectors))
    index_side = Preprocess(wanted if settings.unit_normalize else None, settings.unit_normalize)
    return QuerySet(ids, rows, meta, index_side)


def _query_preconditioning(query_path: str, meta: TableMeta, wanted: Preconditioner | None) -> Preconditioner | None:
    """The preconditioner still to apply to the stored query rows (None when done or not wanted)."""
    applied = meta.preconditioner
    reduce = meta.source.get("reduce") or {}
    if applied is None:
        if wanted is not None and meta.unit_normalized:
            raise RayattrError(
                f"the query in {query_path} was unit-normalized without a preconditioner, so H^-1/2 cannot be "
                "applied before the normalization any more; reduce it again with --hessian-path"
            )
        return wanted
    if wanted is not None and applied == wanted.fingerprint:
        return None
    if wanted is None and reduce.get("power") == -1.0 and not meta.unit_normalized:
        return None  # inner product: H^-1 on the query only, index raw
    raise RayattrError(
        f"the query in {query_path} was reduced with preconditioner {applied} (statistics {reduce.get('hessian')}, "
        f"power {reduce.get('power')}), which does not match this scoring's "
        f"{'preconditioner ' + wanted.fingerprint if wanted else 'lack of --hessian-path'}; "
        "pass the same --hessian-path and --unit-normalize as the reduce"
    )


