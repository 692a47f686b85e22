"""Ray Data plans: shards -> tokenize tasks -> GradientWorker actor pool -> LanceDB.

The driver only plans (shard list, table metadata, what is already written)
and reads back a small summary row per document; vectors go from the actors
straight into the table, one committed append per Ray batch.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch

from rayattr.config import DataSpec, GradSpec, RayattrError, RunSpec, check_zero_stage
from rayattr.data import Shard, TokenizedDocs, balance_shards, plan_shards, read_shard, tokenize
from rayattr.grads.collector import select_modules
from rayattr.grads.engine import GradientEngine, engine_for
from rayattr.model import load_config, load_tokenizer, max_positions
from rayattr.score import QueryPreprocess
from rayattr.store import GRADIENTS, Completion, GradientTable, TableMeta, table_exists

DOCS_PER_WRITE = 256
TOKENIZE_CPUS = 0.5


def ensure_ray(address: str | None = None) -> None:
    """Connect to ``address`` / ``RAY_ADDRESS`` when given, else start an embedded local Ray."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    try:
        if address:
            _probe(address)
            ray.init(address=address, log_to_driver=True)
        else:
            ray.init(include_dashboard=False, log_to_driver=True)
    except ConnectionError as exc:
        raise RayattrError(f"cannot reach a Ray cluster at {address!r} ({exc}); check --ray-address / RAY_ADDRESS") from exc
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False


def _probe(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds on a ``host:port`` nobody listens on (``ray.init`` would retry for minutes)."""
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        return  # "auto", ray:// clients: Ray's own errors are prompt there
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ConnectionError(f"nothing answers at {address} ({exc})") from exc


@dataclass(frozen=True)
class WorkerResources:
    """What one GradientWorker actor asks of Ray, and how many torch threads it runs."""

    num_cpus: float
    num_gpus: float
    threads: int

    @classmethod
    def plan(cls, workers: int) -> WorkerResources:
        """One GPU per actor when the cluster has GPUs; otherwise share the CPUs,
        leaving room on every node for one tokenize task so the stream never starves
        (free CPU fragmented across nodes would not fit a task)."""
        resources = ray.cluster_resources()
        cpus = resources.get("CPU", 1.0)
        if resources.get("GPU", 0) >= 1:
            return cls(num_cpus=1.0, num_gpus=1.0, threads=max(1, int(cpus // workers) - 1))
        nodes = sum(1 for node in ray.nodes() if node["Alive"] and node["Resources"].get("CPU", 0) > 0)
        share = min(1.0, (cpus - TOKENIZE_CPUS * max(nodes, 1)) / workers)
        if share <= 0:
            raise RayattrError(f"the Ray cluster has {cpus} CPUs: too few for {workers} worker(s); lower --workers")
        return cls(num_cpus=share, num_gpus=0.0, threads=max(1, int(cpus // workers)))

    def pool(self, workers: int) -> dict:
        """``map_batches`` arguments for a pool of ``workers`` actors, spread over the nodes
        (model replicas on different nodes share no memory or GPU)."""
        # Two batches in flight per actor keep it busy without letting the first actor
        # to start take the whole queue while the others load their models.
        # A dead actor is restarted and its batches retried (what it had committed is
        # repaired by the final de-duplication), however often a preemptible node goes away.
        return {"compute": ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=2), "num_cpus": self.num_cpus,
                "num_gpus": self.num_gpus, "scheduling_strategy": "SPREAD", "max_restarts": -1, "max_task_retries": -1}


def read_and_tokenize(shards: pa.Table, data: DataSpec, tokenizer_name: str, revision: str | None, max_length: int) -> Iterator[pa.Table]:
    """Ray Data UDF: read each shard (skipping ids already written) and tokenize it."""
    tokenizer = load_tokenizer(tokenizer_name, revision)
    for item in shards.to_pylist():
        done = set(item.pop("done_ids") or ())
        for table in read_shard(data, Shard(**item)):
            if done:
                keep = np.fromiter((i not in done for i in table.column("id").to_numpy()), bool, table.num_rows)
                table = table.filter(pa.array(keep))
            if table.num_rows:
                yield tokenize(table, data, tokenizer, max_length)


class GradientWorker:
    """Actor holding a model replica: tokenized docs in, rows appended to LanceDB, summary out.

    With ``query`` (``reduce``), rows are preconditioned and unit-normalized
    before they are written, and the table's metadata says so.
    """

    def __init__(self, spec: RunSpec, run_path: str, threads: int, table: str = GRADIENTS,
                 query: QueryPreprocess | None = None, loaded: tuple[GradientEngine, TableMeta] | None = None) -> None:
        """``loaded``: an engine the caller built (a ZeRO-3 worker's), instead of a replica from ``spec``."""
        torch.set_num_threads(threads)
        self.engine, meta = loaded or engine_for(spec)
        self.preprocess = None
        if query is not None:
            self.preprocess = query.load()
            if self.preprocess.preconditioner is not None:
                self.preprocess.preconditioner.check(meta)
            meta = query.annotate(meta, self.preprocess)
        # Every worker creates-or-verifies the table from its own model, so a
        # node that loaded a different checkpoint fails instead of mixing rows.
        self.table = GradientTable.create(run_path, meta, table)

    def __call__(self, batch: pa.Table) -> pa.Table:
        docs = TokenizedDocs.from_arrow(batch)
        rows = self.engine.rows(docs)
        if self.preprocess is not None:
            rows.grads = self.preprocess(torch.from_numpy(rows.grads)).numpy()
        self.table.append(rows.to_arrow())
        return summary_rows(docs.ids, batch.column("num_tokens"), np.isin(docs.ids, rows.ids),
                            np.isin(docs.ids, rows.non_finite))


def peak_rss_mb() -> float:
    """This process's resident-set high-water mark (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def summary_rows(ids: np.ndarray, num_tokens: pa.Array, written: np.ndarray,
                 non_finite: np.ndarray | None = None) -> pa.Table:
    """What a worker tells the driver about a batch: which ids it wrote (the others had no
    loss token, or a non-finite loss or gradient), when, on which node, and its peak RSS so far."""
    context = ray.get_runtime_context()
    return pa.table({
        "id": pa.array(ids, pa.int64()),
        "num_tokens": num_tokens,
        "written": pa.array(written),
        "non_finite": pa.array(np.zeros(len(ids), bool) if non_finite is None else non_finite),
        "written_at": pa.array(np.full(len(ids), time.time())),
        "node_id": pa.array([context.get_node_id()] * len(ids), pa.string()),
        "worker_id": pa.array([context.get_worker_id()] * len(ids), pa.string()),
        "peak_rss_mb": pa.array(np.full(len(ids), peak_rss_mb())),
    })


def check_modules(model_config, grads: GradSpec) -> None:
    """Fail on the driver, before any worker starts, when the module globs select nothing.

    The model is instantiated on the meta device: names and shapes, no weights.
    """
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(model_config)
    except ValueError as exc:
        raise RayattrError(
            f"the model is not a causal LM ({model_config.model_type}: {str(exc).splitlines()[0]}); "
            "pass a decoder-only model that AutoModelForCausalLM loads"
        ) from exc
    select_modules(skeleton, grads.modules, grads.exclude_modules)


SHARDS_PER_WORKER = 4  # enough blocks that no worker waits for another's last shard


def prepare(spec: RunSpec, ray_address: str | None, workers: int) -> list[Shard]:
    """Driver-side checks that need no worker (model exists, modules match, data
    readable and non-empty), then Ray; returns the dataset's shards, at least a
    few per worker."""
    check_modules(load_config(spec.model), spec.grads)
    shards = balance_shards(plan_shards(spec.data), SHARDS_PER_WORKER * workers)
    ensure_ray(ray_address)
    return shards


def token_stream(spec: RunSpec, items: list[dict]) -> ray.data.Dataset:
    """Ray Data plan reading and tokenizing shard items (dicts of Shard fields + ``done_ids``)."""
    max_length = min(spec.data.max_length or 10**9, max_positions(load_config(spec.model)))
    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        read_and_tokenize,
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=TOKENIZE_CPUS,
        fn_kwargs=dict(data=spec.data, tokenizer_name=spec.model.model, revision=spec.model.revision, max_length=max_length),
    )


def shard_items(shards: list[Shard]) -> list[dict]:
    """Shard items for a stream that reads everything (no resume)."""
    return [dataclasses.asdict(shard) | {"done_ids": []} for shard in shards]


@dataclass
class BuildProgress:
    """What the driver knows while a build runs (passed to the progress callback)."""

    total_docs: int
    docs: int = 0
    tokens: int = 0
    written: int = 0
    skipped_ids: list[int] = field(default_factory=list)  # documents with no loss token (never written)
    non_finite_ids: list[int] = field(default_factory=list)  # documents with a NaN/Inf loss or gradient (never written)
    seconds: float = 0.0
    first_row_seconds: float | None = None
    duplicates_removed: int = 0
    nodes: set[str] = field(default_factory=set)  # Ray node ids of the workers that wrote rows
    worker_peak_rss_mb: dict[str, float] = field(default_factory=dict)  # Ray worker id -> RSS high-water mark at its last batch
    started: float = field(default_factory=time.perf_counter)
    wall_start: float = field(default_factory=time.time)

    @property
    def skipped(self) -> int:
        return len(self.skipped_ids)

    def finish(self) -> None:
        """Bring ``seconds`` up to now."""
        self.seconds = time.perf_counter() - self.started

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def resume_plan(shards: list[Shard], done: Iterable[np.ndarray] = ()) -> list[dict]:
    """Shard items with the ids of each already done (streamed from a table's ``iter_ids``,
    or a checkpoint's); complete shards drop out."""
    starts = np.array([s.first_id for s in shards], np.int64)
    done_ids: list[list[np.ndarray]] = [[] for _ in shards]
    for ids in done:
        slot = np.searchsorted(starts, ids, side="right") - 1
        for index in np.unique(slot):
            if index >= 0:
                done_ids[index].append(ids[slot == index])
    items = []
    for shard, parts in zip(shards, done_ids):
        done = np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
        done = done[(done >= shard.first_id) & (done < shard.first_id + shard.num_rows)]
        if len(done) < shard.num_rows:
            items.append(dataclasses.asdict(shard) | {"done_ids": done.tolist()})
    return items


def build(
    run_path: str,
    spec: RunSpec,
    *,
    workers: int = 1,
    ray_address: str | None = None,
    docs_per_write: int = DOCS_PER_WRITE,
    on_progress: Callable[[BuildProgress], None] | None = None,
    table: str = GRADIENTS,
    query: QueryPreprocess | None = None,
    zero_stage: int = 0,
) -> BuildProgress:
    """Write the gradient table of ``spec.data`` into ``run_path``; resumes an existing one.

    ``zero_stage=3`` partitions the model over the workers instead of giving
    each a replica (``rayattr.ray.zero``); the table is the same.
    """
    check_zero_stage(zero_stage)
    if zero_stage:
        if query is not None:
            raise RayattrError("query sets are small: reduce them with model replicas (drop --zero-stage)")
        from rayattr.ray.zero import zero_build

        return zero_build(run_path, spec, workers=workers, ray_address=ray_address, on_progress=on_progress,
                          docs_per_write=docs_per_write, table=table)
    progress = BuildProgress(total_docs=0)
    items, shards = plan_build(run_path, spec, ray_address, table, progress, workers)
    resources = WorkerResources.plan(workers)
    if items:
        dataset = token_stream(spec, items).map_batches(
            GradientWorker,
            batch_size=docs_per_write,
            batch_format="pyarrow",
            **resources.pool(workers),
            fn_constructor_kwargs=dict(spec=spec, run_path=run_path, threads=resources.threads, table=table, query=query),
        )
        drain(dataset, progress, on_progress)
    finish_build(run_path, table, progress, shards)
    progress.finish()
    return progress


def plan_build(run_path: str, spec: RunSpec, ray_address: str | None, table: str,
               progress: BuildProgress, workers: int) -> tuple[list[dict], list[Shard]]:
    """The shard items a build still has to write (ids already in the table drop out) and all
    the dataset's shards; sets ``progress.total_docs`` and marks the table partial."""
    shards = prepare(spec, ray_address, workers)
    items = resume_plan(shards, GradientTable.open(run_path, table).iter_ids() if table_exists(run_path, table) else ())
    progress.total_docs = sum(s["num_rows"] - len(s["done_ids"]) for s in items)
    Completion.clear(run_path, table)
    return items, shards


def finish_build(run_path: str, table: str, progress: BuildProgress, shards: list[Shard]) -> None:
    """Repair rows committed twice (retried blocks, leftover workers), compact the table, and
    record it complete. Skipped documents are re-read by every resume, so this run saw them all."""
    written = GradientTable.open(run_path, table)
    progress.duplicates_removed = written.deduplicate()
    written.optimize()
    completion(table, shards, progress).save(run_path)


def completion(table: str, shards: list[Shard], progress: BuildProgress) -> Completion:
    """The completion record of a pass over ``shards`` whose summaries ``progress`` counted."""
    return Completion.of_shards(table, [(s.first_id, s.num_rows) for s in shards], progress.skipped_ids,
                                progress.non_finite_ids)


def drain(dataset: ray.data.Dataset, progress: BuildProgress, on_progress: Callable[[BuildProgress], None] | None) -> None:
    """Run a plan whose workers return summary rows, counting them into ``progress``."""
    with user_errors():
        count_summaries(dataset.iter_batches(batch_size=None, batch_format="pyarrow"), progress, on_progress)


def count_summaries(summaries: Iterable[pa.Table], progress: BuildProgress,
                    on_progress: Callable[[BuildProgress], None] | None) -> None:
    """Count workers' summary rows (``summary_rows``) into ``progress`` as they arrive."""
    for summary in summaries:
        ids = summary.column("id").to_numpy()
        written = summary.column("written").to_numpy(zero_copy_only=False)
        non_finite = summary.column("non_finite").to_numpy(zero_copy_only=False)
        skipped = ~written & ~non_finite
        progress.docs += summary.num_rows
        progress.written += int(written.sum())
        progress.skipped_ids.extend(ids[skipped].tolist())
        progress.non_finite_ids.extend(ids[non_finite].tolist())
        progress.tokens += int(pc.sum(summary.column("num_tokens")).as_py() or 0)
        progress.nodes.update(pc.unique(summary.column("node_id")).to_pylist())
        _count_peaks(summary, progress.worker_peak_rss_mb)
        progress.finish()
        if progress.first_row_seconds is None and progress.written:
            progress.first_row_seconds = float(pc.min(summary.column("written_at")).as_py()) - progress.wall_start
        if on_progress:
            on_progress(progress)


def _count_peaks(summary: pa.Table, peaks: dict[str, float]) -> None:
    """Raise each worker's entry in ``peaks`` to the highest peak RSS its summary rows report."""
    per_worker = summary.group_by("worker_id").aggregate([("peak_rss_mb", "max")])
    for worker, peak in zip(per_worker.column("worker_id").to_pylist(), per_worker.column("peak_rss_mb_max").to_pylist()):
        peaks[worker] = max(peak, peaks.get(worker, 0.0))


@contextmanager
def user_errors() -> Iterator[None]:
    """Re-raise a RayattrError from inside a worker as itself, not wrapped in Ray's errors."""
    try:
        yield
    except RayattrError:
        raise
    except Exception as exc:
        cause = find_user_error(exc)
        if cause is None:
            raise
        raise RayattrError(str(cause)) from exc


def find_user_error(exc: BaseException | None) -> RayattrError | None:
    """The RayattrError behind a Ray error: in the cause chain, or only in the
    text of an actor's death report (actor constructors lose the exception object)."""
    marker = f"{RayattrError.__module__}.{RayattrError.__name__}: "
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc)
        if marker in text:
            return RayattrError(text.rsplit(marker, 1)[1].strip().splitlines()[0])
        if isinstance(exc, RayattrError):
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    return None
