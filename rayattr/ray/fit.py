"""Statistics passes on Ray: StatsWorkers on the replica pool accumulate, Ray tasks reduce and decompose.

The driver deals the token stream's batches out to the replicas (the least
busy first); each keeps one model and float64 partial sums, and returns only
those sums at the end of the pass. EK-FAC runs a second pass over the same
workers with the K-FAC eigenbases broadcast through the object store.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import pyarrow as pa
import ray
import torch

from rayattr.config import RayattrError, RunSpec
from rayattr.data import Shard, TokenizedDocs
from rayattr.grads.engine import engine_for
from rayattr.grads.normalizer import NormalizerKind
from rayattr.hessian.methods import FitSummary, StatsPass, check_method, fit_statistics
from rayattr.hessian.stats import Sums
from rayattr.ray.checkpoint import PartialWriter, load_partials, pass_directory, remove_partials
from rayattr.ray.pipeline import prepare, token_stream, user_errors
from rayattr.ray.tablepass import resume_plan
from rayattr.ray.progress import peak_rss_mb
from rayattr.ray.combine import eigh_all, tree_sum
from rayattr.ray.replicas import Job, ReplicaPool, replicas
from rayattr.space import TableMeta

DOCS_PER_STEP = 256
CHECKPOINT_SECONDS = 60.0  # how often a worker saves its partial sums


class StatsWorker:
    """A model replica that turns the batches of tokenized docs it is sent into partial sums.

    A pass is ``begin``, batches (``__call__``), ``finish``: the sums live in
    this actor between calls, so batch calls are never retried (a restarted
    replica has lost them; the rerun resumes from the checkpoints).
    """

    def __init__(self, spec: RunSpec, threads: int) -> None:
        torch.set_num_threads(threads)
        self.engine, self.meta = engine_for(spec)
        self.busy_seconds = 0.0
        self.stats: StatsPass | None = None
        self.checkpoints: PartialWriter | None = None

    def begin(self, method: str, eigenbases: Sums | None, checkpoints: PartialWriter) -> None:
        """Start a pass with zero sums, checkpointed to ``checkpoints``."""
        if self.stats is not None:
            self.stats.close()  # a pass that failed half-way must not keep its hooks
        self.stats, self.checkpoints = StatsPass(self.engine, method, eigenbases), checkpoints

    def _current(self) -> tuple[StatsPass, PartialWriter]:
        if self.stats is None or self.checkpoints is None:
            raise RayattrError("a statistics worker restarted during a pass and lost its sums; "
                               "rerun the fit: it resumes from its checkpoints")
        return self.stats, self.checkpoints

    def __call__(self, batch: pa.Table) -> int:
        """Add a batch to the running sums (and maybe checkpoint them); returns its document count."""
        stats, checkpoints = self._current()
        docs = TokenizedDocs.from_arrow(batch)
        started = time.perf_counter()
        stats(docs)
        checkpoints.covered(docs.ids)
        checkpoints.maybe_save(lambda: stats.accumulator.sums)
        self.busy_seconds += time.perf_counter() - started
        return len(docs.ids)

    def finish(self) -> Sums:
        """The pass's partial sums, checkpointed a last time."""
        stats, checkpoints = self._current()
        checkpoints.maybe_save(lambda: stats.accumulator.sums, force=True)
        self.stats = self.checkpoints = None
        return stats.close()

    def table_meta(self) -> TableMeta:
        return self.meta

    def report(self) -> tuple[float, float]:
        """``(seconds spent computing, peak RSS in MB)`` of this actor, for the fit summary."""
        return self.busy_seconds, peak_rss_mb()


@dataclass
class _Passes:
    """Replica passes of one fit: streaming splits over the actors, checkpointed under ``out_dir``."""

    spec: RunSpec
    shards: list[Shard]
    pool: ReplicaPool
    job: Job
    out_dir: str
    checkpoint_seconds: float
    resumed: int = 0  # documents whose sums came from checkpoints of an interrupted run

    def __call__(self, method: str, eigenbases: Sums | None = None) -> tuple[Sums, TableMeta]:
        """One pass: the documents no checkpoint covers, dealt out to the actors batch by batch; old and
        new partial sums reduced in a tree."""
        directory = pass_directory(self.out_dir, self.spec, method, eigenbases)
        restored = load_partials(directory)
        self.resumed += sum(len(p.ids) for p in restored)
        items = resume_plan(self.shards, (p.ids for p in restored))
        partials = [ray.put(p.sums) for p in restored]
        if items:
            bases = ray.put(eigenbases) if eigenbases is not None else None
            ray.get(self.pool.call_each(self.job, "begin", [
                (method, bases, PartialWriter(directory, self.checkpoint_seconds)) for _ in range(self.pool.size)]))
            with user_errors():
                for _ in self.pool.map(self.job, token_stream(self.spec, items), DOCS_PER_STEP, retried=False):
                    pass
                partials += self.pool.call_each(self.job, "finish")
        meta = same_meta(ray.get(self.pool.call_each(self.job, "table_meta")))
        return ray.get(tree_sum(partials)), meta


def same_meta(metas: list[TableMeta]) -> TableMeta:
    """The one table description all workers agree on."""
    if any(m != metas[0] for m in metas):
        raise RayattrError("workers loaded different models or settings; make every node load the same checkpoint")
    return metas[0]


def replica_fit(out_dir: str, spec: RunSpec, method: str, *, workers: int = 1, ray_address: str | None = None,
                normalizer_kind: NormalizerKind = "adafactor",
                checkpoint_seconds: float = CHECKPOINT_SECONDS) -> FitSummary:
    """Fit ``method`` statistics of ``spec.data`` on model replicas and save them under ``out_dir``.

    second-moment: ``H = E[p p^T]`` per module with its eigendecomposition;
    kfac: ``A``, ``S`` and their eigenbases; ekfac: K-FAC plus the corrected
    eigenvalues ``Lambda``; normalizer: an Adam/Adafactor normalizer fitted from data.
    Workers checkpoint their partial sums every ``checkpoint_seconds``; rerunning
    an interrupted fit with the same arguments resumes from them.
    (``rayattr.ray.entry.fit`` also runs ZeRO-3.)
    """
    check_method(method, spec)
    start = time.perf_counter()
    shards = prepare(spec, ray_address, workers)
    pool = replicas(workers)
    passes = _Passes(spec, shards, pool, Job(StatsWorker, {"spec": spec, "threads": pool.resources.threads}), out_dir,
                     checkpoint_seconds)
    summary = fit_statistics(out_dir, spec, method, passes, eigh_all, normalizer_kind)
    remove_partials(out_dir)
    busy, rss = _report(pool, passes.job)
    return replace(summary, seconds=time.perf_counter() - start, worker_compute_seconds=busy, worker_peak_rss_mb=rss,
                   resumed_examples=passes.resumed)


def _report(pool: ReplicaPool, job: Job) -> tuple[float, float]:
    reports = ray.get(pool.call_each(job, "report"))
    return max(busy for busy, _ in reports), max(rss for _, rss in reports)
