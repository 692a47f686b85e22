"""Searching a gradient index: exact streaming top-k, LanceDB ANN, query gradients, tracing.

A query is a gradient vector in the index's space. ``query_gradients``
recomputes it for texts with the exact settings the index records, and
``Attributor.trace`` captures it from any forward/backward a user runs. The
preprocessing is the scoring one (``rayattr.score``): inner product puts ``H^-1`` on the
query only; cosine puts ``H^-1/2`` on the query and on every index row before
unit-normalizing both (TrackStar).

Exact search streams the table batch by batch and keeps a running top-k, so
memory is bounded by the batch size. ANN search uses a LanceDB IVF-PQ index on
the ``grad`` column, which holds the raw rows: it can serve inner products
(with ``H^-1`` on the query) and plain cosine, but not cosine with ``H^-1/2``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from rayattr.codec import FLOAT_TYPES, GRAD
from rayattr.config import (
    DataSpec,
    GradSpec,
    ModelSpec,
    RayattrError,
    RunSpec,
    from_dict,
)
from rayattr.data import TokenizedDocs, plan_shards, read_shard, reward_baselines, tokenize
from rayattr.grads.collector import GradientCollector
from rayattr.grads.engine import engine_for
from rayattr.grads.normalizer import Normalizer
from rayattr.model import max_positions, model_fingerprint, tokenizer_source
from rayattr.tokenizer import load_tokenizer
from rayattr.score import Preprocess, QueryPreprocess, Scorer
from rayattr.store import (
    GRADIENTS,
    GradientTable,
    TableMeta,
    require_compatible,
)
from rayattr.topk import TopK

METRICS = ("cosine", "dot")
# 8-bit product quantization trains 256 centroids per sub-vector: fewer rows cannot train it.
MIN_ANN_ROWS = 256
# Dimensions per PQ sub-vector by default (LanceDB's SIMD kernels take 8 or 16). On 1024-dim
# rows 8 (128 sub-vectors) beat 16 on recall at about the same build time. Narrow rows keep
# at least 16: a few wide codebooks on 64-dim rows cut recall@10 below 0.9.
SUB_VECTOR_WIDTH = 8
MIN_SUB_VECTORS = 16
# k-means iterations for the IVF centroids and the PQ codebooks (LanceDB's default is 50).
# LanceDB's float16 k-means runs ~10x slower than its float32 one, and 50 iterations cost
# 3.5x the build time of 10 (20,000 float16 rows); recall@10 after the refine step stays
# >= 0.95 at 1e5 and 1e6 rows (benchmarks/query.py).
MAX_ITERATIONS = 10
# Training vectors per IVF partition (LanceDB's default is 256): the IVF k-means costs
# partitions x sample, which at sqrt(rows) partitions grows linearly with the rows.
SAMPLE_RATE = 64
# Candidates re-ranked exactly per result, as a multiple of k. With 128 sub-vectors over 1e6
# rows, 10 left recall@10 at 0.94-0.95 whatever nprobes; 20 reached 0.99 for ~1 ms more.
REFINE_FACTOR = 20


@dataclass
class SearchResult:
    """Top-k per query, best first (an ANN query with fewer hits is padded with id -1, score NaN)."""

    ids: np.ndarray  # [Q, k] int64 dataset row ids
    scores: np.ndarray  # [Q, k] float32 inner products or cosines


@dataclass(frozen=True)
class AnnIndex:
    """The IVF-PQ index that ``build_ann_index`` made."""

    metric: str
    num_partitions: int
    num_sub_vectors: int
    rows: int


class Index:
    """A gradient table opened for search."""

    def __init__(self, table: GradientTable) -> None:
        self.table = table

    @classmethod
    def open(cls, uri: str, table: str = GRADIENTS) -> Index:
        return cls(GradientTable.open(uri, table))

    @property
    def meta(self) -> TableMeta:
        return self.table.meta

    def search(
        self, queries: np.ndarray | torch.Tensor, k: int = 10, *, unit_normalize: bool = False,
        hessian: str | Path | None = None, ann: bool = False, nprobes: int = 20, refine_factor: int = REFINE_FACTOR,
        batch_size: int = 8192,
    ) -> SearchResult:
        """Top-``k`` index rows per query (``[Q, D]`` or ``[D]``) by inner product or cosine.

        ``hessian`` is a statistics directory: ``H^-1`` goes on the query for
        inner products, ``H^-1/2`` on both sides for cosine. ``ann`` uses the
        IVF-PQ index from ``build_ann_index`` (``nprobes`` partitions searched,
        ``refine_factor * k`` candidates re-ranked exactly).
        """
        if k < 1:
            raise RayattrError(f"k must be at least 1, got {k}")
        if self.meta.per_token:
            raise RayattrError(f"index {self.table.uri} holds per-token rows; search a per-document index "
                               "(build it without --per-token)")
        if ann and hessian and unit_normalize:
            raise RayattrError(
                "ANN search cannot apply H^-1/2 to the index side: the ANN index holds raw rows; "
                "drop --ann (exact search) or --hessian, or search by inner product (no --unit-norm)"
            )
        rows = self._query_rows(queries)
        query_side = QueryPreprocess(str(hessian) if hessian else None, unit_normalize).load()
        if query_side.preconditioner is not None:
            query_side.preconditioner.check(self.meta)
        if ann:
            return self._ann(query_side(rows).numpy(), k, "cosine" if unit_normalize else "dot", nprobes, refine_factor)
        index_side = Preprocess(query_side.preconditioner if unit_normalize else None, unit_normalize)
        return self._exact(Scorer(query_side(rows), index_side), k, batch_size)

    def _query_rows(self, queries: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Queries as ``[Q, D]`` float32 rows; a dimension other than the index's is an error."""
        if torch.is_tensor(queries):
            rows = queries.detach().float().cpu()
        else:
            rows = torch.tensor(np.asarray(queries), dtype=torch.float32)
        rows = rows.reshape(-1, rows.shape[-1])
        if rows.shape[1] != self.meta.dim:
            raise RayattrError(
                f"queries have {rows.shape[1]} dimensions but index {self.table.uri} has {self.meta.dim}; "
                "compute them with the index's settings (rayattr.search.query_gradients)"
            )
        return rows

    def _exact(self, scorer: Scorer, k: int, batch_size: int) -> SearchResult:
        """Score the streamed table batch by batch, keeping a running top-k."""
        best = TopK.empty(k, scorer.queries.shape[0])
        for batch in self.table.iter_batches(["id", *self.table.codec.columns], batch_size):
            rows = torch.tensor(self.table.codec.decode(batch), dtype=torch.float32)
            best = best.merge(TopK.of_block(k, batch.column("id").to_numpy(), scorer.score(rows).numpy()))
        return SearchResult(best.ids, best.scores)

    def _ann(self, queries: np.ndarray, k: int, metric: str, nprobes: int, refine_factor: int) -> SearchResult:
        """One LanceDB vector search per query; LanceDB distances are ``1 - dot`` and ``1 - cosine``."""
        built = ann_metric(self.table)
        uri = self.table.uri
        if built is None:
            raise RayattrError(f"index {uri} has no ANN index; run `rayattr index {uri} --ann` first, or search without --ann")
        if built != metric:
            raise RayattrError(f"the ANN index of {uri} was built for metric {built!r} but this search needs {metric!r}; "
                               f"rebuild it with `rayattr index {uri} --ann --metric {metric}`")
        ids = np.full((len(queries), k), -1, np.int64)
        scores = np.full((len(queries), k), np.nan, np.float32)
        width = 0
        for row, query in enumerate(queries):
            hits = (self.table.table.search(query, vector_column_name=GRAD).distance_type(metric).nprobes(nprobes)
                    .refine_factor(refine_factor).limit(k).select(["id", "_distance"]).to_arrow())
            ids[row, : hits.num_rows] = hits.column("id").to_numpy()
            scores[row, : hits.num_rows] = 1.0 - hits.column("_distance").to_numpy()
            width = max(width, hits.num_rows)
        return SearchResult(ids[:, :width], scores[:, :width])


def ann_metric(table: GradientTable) -> str | None:
    """The metric of the vector index on ``grad``, or None when there is none.

    Checks out the table's latest version first, so an index built since the
    table was opened (e.g. by `rayattr index` in another process) is seen.
    """
    table.table.checkout_latest()
    for config in table.table.list_indices():
        if list(config.columns) == [GRAD]:
            return table.table.index_stats(config.name).distance_type
    return None


def build_ann_index(
    uri: str, metric: str = "cosine", num_partitions: int | None = None, num_sub_vectors: int | None = None,
    table: str = GRADIENTS, *, accelerator: str | None = None,
) -> AnnIndex:
    """Build (or replace) a LanceDB IVF-PQ index on the ``grad`` column.

    Defaults: ``sqrt(rows)`` partitions, at most one per 256 rows (what the
    IVF training can fill), and one PQ sub-vector per 8 dimensions (at least 16).
    ``accelerator="cuda"`` trains on the GPU (LanceDB then uses its own
    sample rate and iterations).
    """
    from lancedb.index import IvfPq

    if metric not in METRICS:
        raise RayattrError(f"unknown --metric {metric!r}; choose cosine (for --unit-norm searches) or dot")
    gradients = GradientTable.open(uri, table)
    if gradients.meta.dtype not in FLOAT_TYPES:
        raise RayattrError(f"table {table!r} in {uri} stores {gradients.meta.dtype} codes, which LanceDB's vector index "
                           "cannot read; search it exactly (without --ann), or build the table with --dtype float16")
    rows, dim = gradients.count(), gradients.meta.dim
    if rows < MIN_ANN_ROWS:
        raise RayattrError(f"table {table!r} in {uri} has {rows} rows; an IVF-PQ index needs at least {MIN_ANN_ROWS}, "
                           "and exact search (without --ann) is fast at this size")
    num_partitions = num_partitions or max(1, min(round(math.sqrt(rows)), rows // MIN_ANN_ROWS))
    num_sub_vectors = num_sub_vectors or default_sub_vectors(dim)
    if dim % num_sub_vectors:
        raise RayattrError(f"--num-sub-vectors {num_sub_vectors} does not divide the vector dimension {dim}; pick a divisor")
    config = IvfPq(distance_type=metric, num_partitions=num_partitions, num_sub_vectors=num_sub_vectors,
                   sample_rate=SAMPLE_RATE, max_iterations=MAX_ITERATIONS, accelerator=accelerator)
    gradients.table.create_index(GRAD, config=config, replace=True)
    return AnnIndex(metric, num_partitions, num_sub_vectors, rows)


def default_sub_vectors(dim: int) -> int:
    """The smallest divisor of ``dim`` that gives sub-vectors of at most ``SUB_VECTOR_WIDTH``
    dimensions and at least ``MIN_SUB_VECTORS`` of them (or ``dim``, one per dimension)."""
    wanted = max(math.ceil(dim / SUB_VECTOR_WIDTH), min(dim, MIN_SUB_VECTORS))
    return next(n for n in range(wanted, dim + 1) if dim % n == 0)


def query_gradients(meta: TableMeta, texts: list[str], model: str | None = None) -> np.ndarray:
    """``[Q, D]`` float32 gradients of ``texts`` (loss on every token) as the index would store them.

    ``model`` overrides where the index's model is loaded from (e.g. a copy on
    this machine); its weights must still be the index's.
    """
    if not texts:
        raise RayattrError("no query text given; pass at least one text")
    data = DataSpec("query texts", max_length=meta.data.get("max_length"), truncation=meta.data.get("truncation", False))
    table = pa.table({"text": pa.array(texts, pa.string()), "id": pa.array(np.arange(len(texts)), pa.int64())})
    return _gradients(meta, data, [table], model)[1]


def dataset_gradients(meta: TableMeta, data: DataSpec, model: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, [Q, D] float32 gradients)`` of a query dataset, with the index's gradient settings."""
    shards = plan_shards(data)
    return _gradients(meta, data, (table for shard in shards for table in read_shard(data, shard)), model)


def _gradients(meta: TableMeta, data: DataSpec, tables: Iterable[pa.Table], model: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Gradient rows of raw rows through an engine built from the index's recorded specs."""
    spec = RunSpec(model_spec(meta, model), data, grad_spec(meta))
    engine, made = engine_for(spec)
    try:
        check_model(meta, made.model)
        require_compatible(meta, replace(made, model=meta.model))
        tokenizer = load_tokenizer(tokenizer_source(spec.model), spec.model.revision)
        max_length = min(data.max_length or 10**9, max_positions(engine.model))
        baselines = reward_baselines(data)
        chunks = [engine.rows(TokenizedDocs.from_arrow(tokenize(table, data, tokenizer, max_length, baselines)))
                  for table in tables]
    finally:
        engine.close()
    skipped = np.concatenate([chunk.skipped for chunk in chunks])
    if skipped.size:
        raise RayattrError(f"query row(s) {skipped[:5].tolist()} have no loss token (empty, or a single token); "
                           "give every query at least two tokens")
    return np.concatenate([c.ids for c in chunks]), np.concatenate([c.grads for c in chunks])


def grad_spec(meta: TableMeta) -> GradSpec:
    """The index's gradient settings, for one float32 row per query document."""
    if not meta.source.get("grads"):
        raise RayattrError("the index does not record how its gradients were made (built by an older rayattr); "
                           "rebuild it with `rayattr build`")
    return replace(from_dict(GradSpec, meta.source["grads"]), per_token=False, dtype="float32")


def model_spec(meta: TableMeta, model: str | None = None) -> ModelSpec:
    """How the index's model was loaded, with ``model`` replacing its path when given."""
    recorded = meta.source.get("model")
    if recorded is None and model is None:
        raise RayattrError(f"the index does not record where its model {meta.model['name']!r} was loaded from; pass --model")
    spec = from_dict(ModelSpec, recorded) if recorded else ModelSpec(model)
    return replace(spec, model=model) if model else spec


def check_model(meta: TableMeta, fingerprint: dict[str, str]) -> None:
    """The same architecture and weights as the index's model (names and paths may differ)."""
    differing = [key for key in ("config", "weights") if fingerprint.get(key) != meta.model.get(key)]
    if differing:
        key = differing[0]
        raise RayattrError(
            f"the model differs from the index's model {meta.model['name']!r} ({key} digest {fingerprint.get(key)} "
            f"vs {meta.model.get(key)}); use the checkpoint the index was built with, or rebuild the index"
        )


@dataclass
class Trace:
    """What ``Attributor.trace`` yields; filled in when the ``with`` block ends."""

    gradient: np.ndarray | None = None  # [D] gradient of everything backpropagated in the block
    ids: np.ndarray | None = None  # [k] best index rows
    scores: np.ndarray | None = None  # [k]


class Attributor:
    """Attribute any loss a user backpropagates to the training rows of an index.

    The gradient is captured with the index's modules, projection and
    normalizer, summed over batch and tokens into one query vector, and
    searched exactly (see ``Index.search``).
    """

    def __init__(self, index: Index, k: int = 10, unit_normalize: bool = False, hessian: str | Path | None = None) -> None:
        self.index = index
        self.k = k
        self.unit_normalize = unit_normalize
        self.hessian = hessian
        self.grads = grad_spec(index.meta)
        self.normalizer = Normalizer.load(self.grads.normalizer) if self.grads.normalizer else None

    @contextmanager
    def trace(self, model: nn.Module) -> Iterator[Trace]:
        """Hook ``model`` for the block; run a forward and ``loss.backward()`` inside it.

        On exit the hooks are removed and every parameter's ``requires_grad``
        is restored (parameters are frozen inside, so no weight gradient is
        computed), then the gradient is searched.
        """
        check_model(self.index.meta, model_fingerprint(model, ModelSpec(self.index.meta.model["name"])))
        flags = [(param, param.requires_grad) for param in model.parameters()]
        collector = GradientCollector(model, self.grads, self.normalizer)
        traced = Trace()
        try:
            collector.begin_sum()
            yield traced
            gradient = collector.end_sum().cpu().numpy()
        finally:
            collector.close()
            for param, flag in flags:
                param.requires_grad_(flag)
        if not gradient.any():
            raise RayattrError("no gradient reached the index's modules; run the forward pass and loss.backward() "
                               "inside the `with attributor.trace(model)` block")
        found = self.index.search(gradient, self.k, unit_normalize=self.unit_normalize, hessian=self.hessian)
        traced.gradient, traced.ids, traced.scores = gradient, found.ids[0], found.scores[0]
