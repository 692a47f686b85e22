"""Ray plans for the query side (``reduce``) and for scoring (``score``).

``reduce`` is a build whose workers precondition and unit-normalize rows
before writing them, followed by a streaming aggregation. ``score`` puts the
query vectors in the object store once and streams the training set through
``ScoringWorker``s on the replica pool: either tokenized documents (gradients computed on the
fly, nothing stored but scores) or batches of an existing gradient table.
Top-k per query is cut per block on the workers and merged on the driver.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray
import torch

from rayattr.codec import RowCodec, vectors_of
from rayattr.config import RayattrError, RunSpec, stable_hash
from rayattr.data import TokenizedDocs
from rayattr.grads.engine import GradientEngine, GradientRows, engine_for
from rayattr.ray.pipeline import Appends, drain, ensure_ray, prepare, replica_build, token_stream
from rayattr.ray.progress import BuildProgress, summary_rows
from rayattr.ray.queries import QuerySet, ScoreSettings, SelfInfluence, load_queries, self_influence
from rayattr.ray.replicas import TOKENIZE_CPUS, Job, replicas
from rayattr.ray.tablepass import TablePass
from rayattr.score import Aggregation, QueryPreprocess, aggregate
from rayattr.space import TableMeta
from rayattr.store import (
    GRADIENTS, META_KEY, SCORES, TOKEN_SCORES, TOPK, GradientTable, ScoreMeta, ScoreTable, committed_ids, connect,
    table_exists,
)
from rayattr.store import read_topk as read_topk  # read here before it moved down to the store layer
from rayattr.topk import TopK

EXAMPLES = "examples"  # per-example query rows kept beside their aggregate
TOPK_BLOCK_ROWS = 65536
INDEX_ROWS_PER_BATCH = 4096  # scoring a stored table is a matmul: bigger batches than on the fly


def reduce(
    run_path: str, spec: RunSpec, *, aggregation: Aggregation = "mean", unit_normalize: bool = False,
    hessian: str | None = None, workers: int = 1, ray_address: str | None = None,
    on_progress: Callable[[BuildProgress], None] | None = None,
) -> BuildProgress:
    """Query vectors of ``spec.data`` in ``run_path``'s gradient table.

    Rows are preconditioned (``H^-1``, or ``H^-1/2`` with ``unit_normalize``),
    unit-normalized, then kept (``none``) or aggregated to one row; the
    per-example rows of an aggregate stay in the ``examples`` table.
    """
    aggregate(torch.zeros(1, 1), aggregation)  # validates the name before any work
    if spec.grads.per_token:
        raise RayattrError("query gradients are per document; drop --per-token when reducing a query set")
    spec = dataclasses.replace(spec, grads=dataclasses.replace(spec.grads, dtype="float32"))
    query = QueryPreprocess(hessian, unit_normalize, aggregation)
    table = GRADIENTS if aggregation == "none" else EXAMPLES
    progress = replica_build(run_path, spec, workers=workers, ray_address=ray_address, on_progress=on_progress,
                     table=table, query=query)
    if aggregation != "none":
        _write_aggregate(run_path, GradientTable.open(run_path, EXAMPLES), aggregation)
    return progress


def _write_aggregate(run_path: str, examples: GradientTable, aggregation: Aggregation) -> None:
    """Stream the per-example rows into one summed (or mean) row, replacing any earlier aggregate."""
    if not examples.count():
        raise RayattrError(f"the query set in {run_path} produced no gradients (empty, or no document had a loss token)")
    total = np.zeros(examples.meta.dim, np.float64)
    count = tokens = 0
    loss = 0.0
    for batch in examples.iter_batches([*examples.codec.columns, "num_tokens", "loss"]):
        total += examples.codec.decode(batch).sum(0, dtype=np.float64)
        count += batch.num_rows
        tokens += int(batch.column("num_tokens").to_numpy().sum())
        loss += float(batch.column("loss").to_numpy().sum(dtype=np.float64))
    row = total / count if aggregation == "mean" else total
    if table_exists(run_path, GRADIENTS):
        connect(run_path).drop_table(GRADIENTS)
    aggregated = GradientTable.create(run_path, examples.meta, GRADIENTS)
    aggregated.append(pa.table({
        "id": pa.array([0], pa.int64()), "num_tokens": pa.array([tokens], pa.int32()),
        "loss": pa.array([loss / count if aggregation == "mean" else loss], pa.float32()),
        **aggregated.codec.encode(row[None].astype(np.float32))[1],
    }))


class ScoringWorker:
    """Scores batches of training rows (on a Replica actor) against the broadcast queries.

    With ``spec`` it holds a model replica and computes gradients on the fly;
    without, batches are rows of a gradient table.
    """

    def __init__(self, run_path: str, threads: int, queries, settings: ScoreSettings, spec: RunSpec | None = None,
                 loaded: tuple[GradientEngine, TableMeta] | None = None, index: RowCodec | None = None) -> None:
        """``loaded``: an engine the caller built (a ZeRO-3 worker's), instead of a replica from ``spec``;
        ``index``: how the rows of the scored table are stored (without ``spec``)."""
        torch.set_num_threads(threads)
        queries = ray.get(queries) if isinstance(queries, ray.ObjectRef) else queries
        self.scorer = queries.scorer(settings)
        self.index = index
        self.engine = self.gradients = None
        if spec is not None:
            self.engine, meta = loaded or engine_for(spec)
            self.appends = Appends(self.engine.spec.token_batch_size)
            queries.check(meta)
            if settings.keep_gradients:
                self.gradients = GradientTable.create(run_path, meta)
        self.scores = ScoreTable.open(run_path, SCORES)
        self.token_scores = ScoreTable.open(run_path, TOKEN_SCORES) if settings.per_token else None
        self.ready_at = time.time()

    def passes(self, batch: pa.Table) -> int:
        """How many forward+backward passes ``__call__(batch)`` runs (ZeRO-3 lock-step)."""
        return 0 if self.engine is None else self.appends.passes(self.engine, batch)

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.engine is None:
            ids = batch.column("id").to_numpy()
            num_tokens = batch.column("num_tokens").to_numpy()
            scores = self.scorer.score(torch.from_numpy(self.index.decode(batch).copy()))
            self.scores.append(_score_rows(ids, num_tokens, scores))
            return summary_rows(ids, batch.column("num_tokens"), np.ones(len(ids), bool), ready_at=self.ready_at)
        return self.appends.write(batch, self._score, self.ready_at)

    def _score(self, docs: TokenizedDocs) -> GradientRows:
        """Gradients of ``docs`` on the fly, scored and appended (kept too with ``keep_gradients``)."""
        rows = self.engine.rows(docs)
        if self.gradients is not None:  # before the scores: a resumed batch rewrites both, dedup repairs
            self.gradients.append(rows.to_arrow())
        grads = torch.from_numpy(rows.grads)
        if self.token_scores is None:
            self.scores.append(_score_rows(rows.ids, rows.num_tokens, self.scorer.score(grads)))
            return rows
        doc_ids, row_doc = np.unique(rows.ids, return_inverse=True)
        tokens, per_doc = self.scorer.score_tokens(grads, torch.from_numpy(row_doc), len(doc_ids))
        self.token_scores.append(_score_rows(rows.ids, rows.num_tokens, tokens, rows.token_pos))
        lengths = np.zeros(len(doc_ids), np.int32)
        lengths[row_doc] = rows.num_tokens
        self.scores.append(_score_rows(doc_ids, lengths, per_doc))
        return rows


def _score_rows(ids: np.ndarray, num_tokens: np.ndarray, scores: torch.Tensor, token_pos: np.ndarray | None = None) -> pa.Table:
    columns = {"id": pa.array(ids, pa.int64()), "num_tokens": pa.array(num_tokens, pa.int32())}
    if token_pos is not None:
        columns["token_pos"] = pa.array(token_pos, pa.int32())
    flat = pa.array(scores.numpy().astype(np.float32).reshape(-1))
    columns["scores"] = pa.FixedSizeListArray.from_arrays(flat, scores.shape[1])
    return pa.table(columns)


@dataclass
class ScoreResult:
    progress: BuildProgress
    topk: TopK
    query_ids: np.ndarray


# Scores a token stream on a worker group instead of the replica pool: (spec, stream, queries in
# the object store, progress) -> None. How ``rayattr.ray.entry.score`` runs ZeRO-3.
GroupScorer = Callable[[RunSpec, ray.data.Dataset, ray.ObjectRef, BuildProgress], object]


def score(
    run_path: str, query_path: str | None, settings: ScoreSettings, *, spec: RunSpec | None = None,
    index_path: str | None = None, step: str | None = None, workers: int = 1, ray_address: str | None = None,
    docs_per_write: int = 256, on_progress: Callable[[BuildProgress], None] | None = None,
    group: GroupScorer | None = None,
) -> ScoreResult:
    """Score a training set (``spec``: on the fly; ``index_path``: a gradient table) against a query table,
    or (``settings.self_influence``, no ``query_path``) each row against itself.

    Writes ``scores`` (and ``token_scores`` with ``per_token``) and ``topk``
    into ``run_path``; a rerun with the same settings resumes. With ``group``
    the on-the-fly gradients come from that worker group, not from replicas.
    ``step`` picks the rows of a train-time index (``IndexRows``).
    """
    if (spec is None) == (index_path is None):
        raise RayattrError("score either a dataset on the fly (--model/--dataset) or a gradient table (--index-path), not both")
    progress = BuildProgress(total_docs=0)  # its clocks start with the command, as a build's do
    if settings.self_influence == (query_path is not None):
        raise RayattrError("score against queries (--query-path) or each document's self-influence (--self), one of them")
    queries = self_influence(settings) if settings.self_influence else load_queries(query_path, settings)
    if spec is not None:
        spec = dataclasses.replace(spec, grads=dataclasses.replace(spec.grads, per_token=settings.per_token))
        shards = prepare(spec, ray_address, workers, start_replicas=group is None)
    else:
        index = IndexRows(_checked_index(index_path, queries, settings), step)
        ensure_ray(ray_address)
    individual = settings.mode == "individual" and not settings.self_influence
    meta = ScoreMeta(
        width=len(queries.ids) if individual else 1, per_token=False,
        query_ids=queries.ids.tolist() if individual else [-1],
        settings={"mode": "self" if settings.self_influence else settings.mode, "unit_normalize": settings.unit_normalize,
                  "preconditioner": queries.index_side.preconditioner.fingerprint if queries.index_side.preconditioner else None,
                  "queries": queries.fingerprint, "index": index_path or stable_hash(dataclasses.asdict(spec.data))}
        | ({"step": step} if step is not None else {}),
    )
    table = ScoreTable.create(run_path, meta, SCORES)
    outputs: dict = {SCORES: ScoreTable}  # scores last in a batch: resume reads them
    if settings.per_token:
        ScoreTable.create(run_path, dataclasses.replace(meta, per_token=True), TOKEN_SCORES)
        outputs[TOKEN_SCORES] = ScoreTable
    if spec is not None and settings.keep_gradients:
        outputs[GRADIENTS] = GradientTable  # created by the workers that compute them
    if spec is not None:
        tables = TablePass(run_path, outputs, shards)
        dataset = token_stream(spec, tables.items) if tables.start(progress) else None
    else:
        tables = TablePass(run_path, outputs, rows=index.count())
        dataset = index.stream(run_path, table, meta) if tables.start(progress) else None
    if dataset is not None and group is not None:
        group(spec, dataset, ray.put(queries), progress)
    elif dataset is not None:
        pool = replicas(workers)
        job = Job(ScoringWorker, {"run_path": run_path, "threads": pool.resources.threads, "queries": ray.put(queries),
                                  "settings": settings, "spec": spec, "index": None if spec is not None else index.codec})
        drain(pool.map(job, dataset, docs_per_write if spec is not None else INDEX_ROWS_PER_BATCH), progress, on_progress)
    tables.finish(progress)
    top = distributed_topk(ScoreTable.open(run_path, SCORES), settings.top_k)
    write_topk(run_path, top, np.asarray(meta.query_ids), meta)
    progress.finish()
    return ScoreResult(progress, top, np.asarray(meta.query_ids))


def _checked_index(index_path: str, queries: QuerySet | SelfInfluence, settings: ScoreSettings) -> GradientTable:
    index = GradientTable.open(index_path)
    queries.check(index.meta)
    if index.meta.per_token:
        raise RayattrError(
            f"{index_path} holds per-token rows; score per document, or score on the fly with --per-token"
        )
    if settings.per_token or settings.keep_gradients:
        raise RayattrError("--per-token and --keep-gradients need gradients computed on the fly (--model/--dataset), "
                           "not --index-path")
    if index.meta.preconditioner or index.meta.unit_normalized:
        raise RayattrError(f"{index_path} holds preprocessed query rows, not raw index gradients; pass a `rayattr build` table")
    return index


class IndexRows:
    """The rows of a gradient table that a score reads: all of a build's; of a train-time table
    (a row per example and step), one step's, or (``"all"``) each example's rows summed over the
    steps weighted by their learning rate, TracIn's sum over checkpoints."""

    def __init__(self, index: GradientTable, step: str | None) -> None:
        if index.meta.train_time and step is None:
            raise RayattrError(f"{index.uri} holds train-time rows of many steps; pick them with --step S or --step all")
        if step is not None and not index.meta.train_time:
            raise RayattrError(f"--step picks rows of a train-time table, and {index.uri} was written by a build; drop it")
        if step is not None and step != "all" and not step.isdigit():
            raise RayattrError(f"--step takes a step number or `all`, got {step!r}")
        self.index, self.step = index, step
        self.filter = f"step = {int(step)}" if step not in (None, "all") else None
        # Summed rows are float32 whatever the table stores.
        self.codec = RowCodec("float32", index.meta.dim) if step == "all" else index.codec

    def count(self) -> int:
        """Rows the score table will hold: one per row read, or per example when steps are summed."""
        if self.step == "all":
            return len(committed_ids(self.index.uri, self.index.table.name))
        return self.index.table.count_rows(self.filter)

    def stream(self, run_path: str, table: ScoreTable, meta: ScoreMeta) -> ray.data.Dataset:
        """Batches of the rows, into a score table emptied of a partial earlier pass."""
        if table.count():
            connect(run_path).drop_table(SCORES)
            ScoreTable.create(run_path, meta, SCORES)
        columns = ["id", "num_tokens", *self.index.codec.columns]
        if self.step != "all":
            return ray.data.read_lance(self.index.lance_uri, columns=columns, filter=self.filter,
                                       num_cpus=TOKENIZE_CPUS)
        rows = ray.data.read_lance(self.index.lance_uri, columns=[*columns, "lr"], num_cpus=TOKENIZE_CPUS)
        return rows.groupby("id").map_groups(functools.partial(_lr_weighted_sum, codec=self.index.codec),
                                             batch_format="pyarrow")


def _lr_weighted_sum(rows: pa.Table, codec: RowCodec) -> pa.Table:
    """Ray Data UDF: one example's rows (all its steps) as ``sum_s lr_s g_s``, stored float32."""
    weights = rows.column("lr").to_numpy().astype(np.float64)
    total = (weights[:, None] * codec.decode(rows).astype(np.float64)).sum(0, keepdims=True).astype(np.float32)
    _, stored = RowCodec("float32", codec.dim).encode(total)
    return pa.table({"id": rows.column("id").slice(0, 1), "num_tokens": rows.column("num_tokens").slice(0, 1)} | stored)


def _block_topk(batch: pa.Table, k: int) -> pa.Table:
    """Ray Data UDF: one row holding a block's top-k per query."""
    if not batch.num_rows:
        return pa.table({"ids": pa.array([], pa.list_(pa.int64())), "scores": pa.array([], pa.list_(pa.float32()))})
    top = _topk_of(batch, k)
    return pa.table({"ids": [top.ids.reshape(-1)], "scores": [top.scores.reshape(-1)]})


def _topk_of(batch: pa.Table | pa.RecordBatch, k: int) -> TopK:
    column = batch.column("scores")
    return TopK.of_block(k, batch.column("id").to_numpy(), vectors_of(column, column.type.list_size))


def distributed_topk(table: ScoreTable, k: int) -> TopK:
    """Top-k per query of a score table: per-block top-k on Ray tasks, merged on the driver.

    A table of at most one block streams through the driver instead: a Ray Data
    execution costs seconds to start (5.7 s on 384 rows, 2 cores), the merge milliseconds.
    """
    width = table.meta.width
    merged = TopK.empty(k, width)
    rows = table.count()
    if not rows:
        return merged
    if rows <= TOPK_BLOCK_ROWS:
        for batch in table.iter_batches(["id", "scores"]):
            merged = merged.merge(_topk_of(batch, k))
        return merged
    blocks = ray.data.read_lance(table.lance_uri, columns=["id", "scores"], num_cpus=TOKENIZE_CPUS).map_batches(
        _block_topk, batch_size=TOPK_BLOCK_ROWS, batch_format="pyarrow", fn_kwargs={"k": k}, num_cpus=TOKENIZE_CPUS,
    )
    for part in blocks.iter_batches(batch_size=None, batch_format="pyarrow"):
        for ids, scores in zip(part.column("ids").to_numpy(zero_copy_only=False),
                               part.column("scores").to_numpy(zero_copy_only=False)):
            merged = merged.merge(TopK(k, np.asarray(ids).reshape(width, -1), np.asarray(scores).reshape(width, -1)))
    return merged


def write_topk(run_path: str, top: TopK, query_ids: np.ndarray, meta: ScoreMeta) -> None:
    """The ``topk`` table (``query_id, rank, id, score``), replaced whole."""
    rows = top.to_arrow(query_ids)
    rows = rows.replace_schema_metadata({META_KEY: meta.to_json()})
    # "overwrite" only over an existing table: lance warns when it overwrites nothing
    connect(run_path).create_table(TOPK, rows, mode="overwrite" if table_exists(run_path, TOPK) else "create")
