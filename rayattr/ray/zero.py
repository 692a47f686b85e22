"""ZeRO mode: one model partitioned over a Ray Train worker group, for models that do not fit one device.

Each worker of a ``TorchTrainer`` group builds the model inside ``deepspeed.zero.Init`` (through
transformers' ZeRO-3 loading), so it only ever allocates its own slice of every parameter, and wraps it
with ``deepspeed.initialize`` and no optimizer: DeepSpeed's module hooks gather a module's parameters
just before its forward (and again before its backward) and free them after. The gradient hooks,
projections and accumulators are the very ones replica mode uses, so rows and statistics equal replica
mode's, and tables are interchangeable.

Gathering a module's parameters is a collective, so the workers move in lock-step: before each step they
agree on the most forward+backward passes any of them needs, and a worker with fewer runs idle passes.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import ray
import torch
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from torch import nn

from rayattr.config import RunSpec
from rayattr.data import TokenizedDocs
from rayattr.grads.engine import GradientEngine, engine_for
from rayattr.grads.normalizer import NormalizerKind
from rayattr.hessian.methods import FitSummary, StatsPass, check_method, fit_statistics
from rayattr.hessian.stats import Sums
from rayattr.ray.checkpoint import PartialWriter, load_partials, pass_directory, remove_partials
from rayattr.ray.fit import CHECKPOINT_SECONDS, DOCS_PER_STEP, same_meta
from rayattr.ray.lockstep import Step, run_lockstep
from rayattr.ray.mailbox import Mailbox, WorkerReport
from rayattr.ray.pipeline import DOCS_PER_WRITE, GradientWorker, prepare, shard_items, token_stream, user_errors
from rayattr.ray.progress import BuildProgress, count_summaries, peak_rss_mb
from rayattr.ray.combine import eigh_all, tree_sum
from rayattr.ray.replicas import WorkerResources, release_replicas
from rayattr.ray.score import ScoringWorker
from rayattr.ray.stream import WholeSplit
from rayattr.ray.tablepass import TablePass
from rayattr.space import TableMeta
from rayattr.store import GRADIENTS, SCORES, GradientTable, committed_ids

DOCS = "docs"  # the Ray Train dataset name of the token stream
POLL_SECONDS = 0.5  # how often the driver collects build summaries while the group runs
GROUP_RESTARTS = 3  # a group that loses a worker restarts this often before the run fails


def deepspeed_config(precision: str) -> dict:
    """ZeRO-3 with every parameter partitioned and no optimizer section.

    Persistence threshold 0: DeepSpeed would otherwise keep small parameters
    (biases, norms) whole on every worker. The batch size is required by the
    config schema only; batching is the engine's.
    """
    return {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
    }


@contextmanager
def partitioned_engine(spec: RunSpec) -> Iterator[tuple[GradientEngine, TableMeta]]:
    """The run's gradient engine on a ZeRO-3 partitioned model (inside a worker group).

    DeepSpeed gets no optimizer (it builds its parameter-offload hooks alone)
    and every parameter stays frozen, so nothing can update the weights. The
    engine calls the module itself: the partitioning hooks live on the modules,
    and the DeepSpeed engine's forward only adds training machinery.
    """
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    config = deepspeed_config(spec.model.precision)
    zero3 = HfDeepSpeedConfig(config)  # while it lives, from_pretrained builds inside deepspeed.zero.Init
    engine, meta = engine_for(spec)
    wrapped, *_ = deepspeed.initialize(model=engine.model, config=config)
    try:
        yield engine, meta
    finally:
        engine.close()
        wrapped.destroy()
        del zero3


def partition_numel(model: nn.Module) -> tuple[int, int]:
    """``(parameter elements this worker holds, elements of the whole model)``."""
    params = list(model.parameters())
    held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
    return held, sum(getattr(p, "ds_numel", p.numel()) for p in params)


@dataclass
class ZeroBuildProgress(BuildProgress):
    """A build's progress, plus each worker's report once the group has finished."""

    workers: list[WorkerReport] = field(default_factory=list)


class _Job(Protocol):
    """What a worker group does with its shards: a step per worker, a result per worker."""

    docs_per_step: int

    def start(self, spec: RunSpec, engine: GradientEngine, meta: TableMeta, mailbox: Any) -> Step: ...

    resumed_past: int  # documents of the stream left out by ``pending``

    def pending(self, batch: pa.Table) -> pa.Table: ...

    def result(self) -> Any: ...


class _SkipsCommitted:
    """For jobs that write rows: a group restarted after losing a worker re-reads the
    stream from the start, and each worker skips the ids already committed to its
    table, so the restart resumes from the last committed batch."""

    run_path: str
    table: str
    _committed: np.ndarray | None = None

    def _read_committed(self) -> None:
        self._committed = committed_ids(self.run_path, self.table)

    resumed_past: int = 0  # documents of this worker's stream found committed

    def pending(self, batch: pa.Table) -> pa.Table:
        if self._committed is None or not self._committed.size:
            return batch
        todo = ~np.isin(batch.column("id").to_numpy(), self._committed)
        self.resumed_past += int((~todo).sum())
        return batch.filter(pa.array(todo))


@dataclass
class _WriteRows(_SkipsCommitted):
    """Build: every step goes through a GradientWorker (the replica pool's writer) on the partitioned engine."""

    run_path: str
    table: str
    docs_per_step: int

    def start(self, spec: RunSpec, engine: GradientEngine, meta: TableMeta, mailbox: Any) -> Step:
        self._read_committed()
        writer = GradientWorker(spec, self.run_path, torch.get_num_threads(), self.table, loaded=(engine, meta))
        return Step(writer.passes, lambda batch: mailbox.post.remote(writer(batch)))

    def result(self) -> None:
        return None


@dataclass
class _AccumulateStats:
    """Statistics: partial sums of one pass over this worker's shard (fit's StatsPass), checkpointed as a
    replica fit's are, so a restarted group or a rerun skips the documents that the checkpoints cover."""

    method: str
    eigenbases: ray.ObjectRef | None
    directory: str  # the pass's checkpoints (``checkpoint.pass_directory``)
    checkpoint_seconds: float
    docs_per_step: int = DOCS_PER_STEP
    resumed_past: int = 0
    _stats: StatsPass | None = None
    _checkpoints: PartialWriter | None = None
    _covered: np.ndarray | None = None  # ids the pass's checkpoints held when this worker started

    def start(self, spec: RunSpec, engine: GradientEngine, meta: TableMeta, mailbox: Any) -> Step:
        self._covered = np.concatenate([np.zeros(0, np.int64)] + [p.ids for p in load_partials(self.directory)])
        self._stats = StatsPass(engine, self.method, ray.get(self.eigenbases) if self.eigenbases is not None else None)
        self._checkpoints = PartialWriter(self.directory, self.checkpoint_seconds)
        return Step(lambda batch: engine.passes(TokenizedDocs.from_arrow(batch)), self._accumulate)

    def _accumulate(self, batch: pa.Table) -> None:
        docs = TokenizedDocs.from_arrow(batch)
        self._stats(docs)
        self._checkpoints.covered(docs.ids)
        self._checkpoints.maybe_save(lambda: self._stats.accumulator.sums)

    def pending(self, batch: pa.Table) -> pa.Table:
        todo = ~np.isin(batch.column("id").to_numpy(), self._covered)  # set by ``start``, before any batch
        self.resumed_past += int((~todo).sum())
        return batch.filter(pa.array(todo))

    def result(self) -> Sums:
        """This worker's sums, checkpointed a last time: the driver reduces the checkpoints, which
        cover disjoint documents (each worker skips those covered when it starts)."""
        self._checkpoints.maybe_save(lambda: self._stats.accumulator.sums, force=True)
        return self._stats.close()


@dataclass
class _ScoreRows(_SkipsCommitted):
    """On-the-fly scoring: every step goes through a ScoringWorker (the replica pool's scorer) on the partitioned engine."""

    run_path: str
    queries: ray.ObjectRef
    settings: Any  # ScoreSettings
    docs_per_step: int
    table: str = SCORES

    def start(self, spec: RunSpec, engine: GradientEngine, meta: TableMeta, mailbox: Any) -> Step:
        self._read_committed()
        scorer = ScoringWorker(self.run_path, torch.get_num_threads(), self.queries, self.settings, spec,
                               loaded=(engine, meta))
        return Step(scorer.passes, lambda batch: mailbox.post.remote(scorer(batch)))

    def result(self) -> None:
        return None


def _worker_loop(config: dict) -> None:
    """One Ray Train worker: load the partitioned model, run the job over this worker's
    shard in lock-step, leave the report and result in the mailbox."""
    spec, job, mailbox = config["spec"], config["job"], config["mailbox"]
    torch.set_num_threads(config["threads"])
    with partitioned_engine(spec) as (engine, meta):
        step = job.start(spec, engine, meta, mailbox)
        started = time.perf_counter()
        batches = ray.train.get_dataset_shard(DOCS).iter_batches(batch_size=job.docs_per_step, batch_format="pyarrow")
        passes, idle = run_lockstep((job.pending(batch) for batch in batches), engine, step)
        rank = ray.train.get_context().get_world_rank()
        report = WorkerReport(rank, *partition_numel(engine.model), passes, idle, job.resumed_past,
                              time.perf_counter() - started, peak_rss_mb())
        ray.get(mailbox.finish.remote(rank, report, meta, job.result()))


def _run_group(spec: RunSpec, dataset: ray.data.Dataset, workers: int, job: _Job, mailbox: Any) -> None:
    """Run ``job`` on a ZeRO-3 worker group over ``dataset`` (a token stream)."""
    release_replicas()  # the group needs the CPUs (GPUs) a warm replica pool holds
    resources = WorkerResources.plan(workers)
    per_worker = {"CPU": resources.num_cpus} | ({"GPU": resources.num_gpus} if resources.num_gpus else {})
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"spec": spec, "job": job, "mailbox": mailbox, "threads": resources.threads},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=resources.num_gpus > 0, resources_per_worker=per_worker),
        datasets={DOCS: dataset},
        dataset_config=WholeSplit(),
        run_config=RunConfig(name=f"rayattr-zero-{uuid.uuid4().hex[:12]}",
                             failure_config=FailureConfig(max_failures=GROUP_RESTARTS)),
    )
    with user_errors():
        trainer.fit()


def _posted(mailbox: Any, running: Future) -> Iterator[pa.Table]:
    """The workers' build summaries as they arrive, until the group has finished."""
    while True:
        finished = bool(wait([running], timeout=POLL_SECONDS).done)
        yield from ray.get(mailbox.take.remote())
        if finished:
            return


def drain_group(spec: RunSpec, dataset: ray.data.Dataset, workers: int, job: _Job, progress: BuildProgress,
                on_progress: Callable[[BuildProgress], None] | None) -> list[WorkerReport]:
    """Run a writing job (build, score) on a worker group, counting its summaries into
    ``progress`` while it runs; returns the workers' reports."""
    mailbox = Mailbox.remote()
    with ThreadPoolExecutor(max_workers=1) as pool:
        running = pool.submit(_run_group, spec, dataset, workers, job, mailbox)
        count_summaries(_posted(mailbox, running), progress, on_progress)
        running.result()
    return ray.get(mailbox.reports.remote())[0]


def zero_build(
    run_path: str,
    spec: RunSpec,
    *,
    workers: int = 2,
    ray_address: str | None = None,
    on_progress: Callable[[BuildProgress], None] | None = None,
    docs_per_write: int = DOCS_PER_WRITE,
    table: str = GRADIENTS,
) -> ZeroBuildProgress:
    """``build`` with the model partitioned over ``workers`` (ZeRO-3) instead of replicated.

    Same table, rows and metadata as replica mode; resumes an existing table the same way.
    """
    progress = ZeroBuildProgress(total_docs=0)
    tables = TablePass(run_path, {table: GradientTable}, prepare(spec, ray_address, workers, start_replicas=False))
    if tables.start(progress):
        job = _WriteRows(run_path, table, docs_per_write)
        progress.workers = drain_group(spec, token_stream(spec, tables.items), workers, job, progress, on_progress)
    tables.finish(progress)
    progress.finish()
    return progress


def zero_score(run_path: str, spec: RunSpec, dataset: ray.data.Dataset, queries: ray.ObjectRef, settings: Any, *,
               workers: int, docs_per_write: int, progress: BuildProgress,
               on_progress: Callable[[BuildProgress], None] | None) -> list[WorkerReport]:
    """On-the-fly scoring of ``dataset`` with the model partitioned over ``workers``:
    the same ScoringWorker steps and score rows as the replica pool."""
    return drain_group(spec, dataset, workers, _ScoreRows(run_path, queries, settings, docs_per_write), progress, on_progress)


def zero_fit(out_dir: str, spec: RunSpec, method: str, *, workers: int = 2, ray_address: str | None = None,
             normalizer_kind: NormalizerKind = "adafactor", checkpoint_seconds: float = CHECKPOINT_SECONDS) -> FitSummary:
    """``fit`` with the model partitioned over ``workers`` (ZeRO-3): each worker accumulates
    its own documents, the partial sums are tree-reduced and finished exactly as ``fit`` does.

    Each pass is one worker group (EK-FAC's second pass starts a second one). Workers checkpoint
    their partial sums every ``checkpoint_seconds`` as replica fits do; rerunning an interrupted
    fit with the same arguments resumes from them.
    """
    check_method(method, spec)
    start = time.perf_counter()
    items = shard_items(prepare(spec, ray_address, workers, start_replicas=False))
    reports: list[WorkerReport] = []
    summary = fit_statistics(out_dir, spec, method,
                             partial(_stats_pass, out_dir, spec, items, workers, checkpoint_seconds, reports), eigh_all,
                             normalizer_kind)
    remove_partials(out_dir)
    return replace(summary, seconds=time.perf_counter() - start,
                   worker_compute_seconds=max(r.seconds for r in reports),
                   worker_peak_rss_mb=max(r.peak_rss_mb for r in reports),
                   resumed_examples=sum(r.resumed_past for r in reports))


def _stats_pass(out_dir: str, spec: RunSpec, items: list[dict], workers: int, checkpoint_seconds: float,
                reports: list[WorkerReport], method: str, eigenbases: Sums | None) -> tuple[Sums, TableMeta]:
    """One statistics pass on a worker group: the sums of its checkpoints (this run's and those of an
    interrupted one) tree-reduced as in ``fit``."""
    mailbox = Mailbox.remote()
    bases = ray.put(eigenbases) if eigenbases is not None else None
    directory = pass_directory(out_dir, spec, method, eigenbases)
    _run_group(spec, token_stream(spec, items), workers,
               _AccumulateStats(method, bases, directory, checkpoint_seconds), mailbox)
    group_reports, metas = ray.get(mailbox.reports.remote())
    reports.extend(group_reports)
    partials = [ray.put(p.sums) for p in load_partials(directory)]
    # No checkpoint: no worker saw a loss token, and their (empty) sums are all there is.
    sums = ray.get(tree_sum(partials or [mailbox.result.remote(rank) for rank in range(workers)]))
    return sums, same_meta(metas)
