"""Build plans: shards -> Ray Data tokenize tasks -> GradientWorker on the replica pool -> LanceDB.

The driver only plans (shard list, table metadata, what is already written)
and reads back a small summary row per document; vectors go from the actors
straight into the table, in committed appends bounded by tokens (``APPEND_TOKENS``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypedDict

import numpy as np
import pyarrow as pa
import ray
import torch

from rayattr.config import DataSpec, GradSpec, ModelSpec, RayattrError, RunSpec, verbose
from rayattr.data import RewardSums, Shard, TokenizedDocs, balance_shards, plan_shards, reward_baselines, shard_reward_sums
from rayattr.grads.collector import select_modules
from rayattr.grads.engine import GradientEngine, GradientRows, engine_for
from rayattr.model import load_config, max_positions, model_skeleton, tokenizer_source
from rayattr.ray.progress import BuildProgress, count_summaries, summary_rows
from rayattr.ray.replicas import TOKENIZE_CPUS, Job, replicas
from rayattr.ray.stream import read_and_tokenize
from rayattr.ray.tablepass import TablePass
from rayattr.score import QueryPreprocess
from rayattr.space import TableMeta
from rayattr.store import GRADIENTS, GradientTable

DOCS_PER_WRITE = 256  # documents per replica call: the unit of retries and of the driver's progress
# Table appends within a batch are bounded by tokens instead: a worker's first append covers one
# token batch, so its first row lands one forward and backward after its model has loaded, and
# later appends gather up to APPEND_TOKENS (few fragments; compaction merges them at the end).
APPEND_TOKENS = 65_536


def ensure_ray(address: str | None = None) -> None:
    """Connect to ``address`` / ``RAY_ADDRESS`` when given, else start an embedded local Ray
    (or join one that ``ray start`` left running here; ``"local"`` always starts a new one)."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    # Ray's own logs and the workers' output (transformers' bars...) only with --verbose.
    level = logging.INFO if verbose() else logging.ERROR
    quiet = {"log_to_driver": verbose(), "logging_level": level}
    try:
        if address and address != "local":
            _probe(address)
            ray.init(address=address, **quiet)
        else:  # "local": a new embedded Ray even where another one runs on this machine
            ray.init(address=address, include_dashboard=False, **quiet)
    except ConnectionError as exc:
        raise RayattrError(f"cannot reach a Ray cluster at {address!r} ({exc}); check --ray-address / RAY_ADDRESS") from exc
    logging.getLogger("ray.data").setLevel(level)
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


class Appends:
    """How a worker cuts each batch into table appends: consecutive slices of at most
    ``APPEND_TOKENS`` tokens, the first of the worker's life one token batch (so its first
    row lands one forward and backward after its model has loaded), at least one document each."""

    def __init__(self, token_batch_size: int) -> None:
        self.token_batch_size = token_batch_size
        self.appended = False  # whether the worker has appended rows yet

    def parts(self, batch: pa.Table) -> list[tuple[slice, TokenizedDocs]]:
        docs = TokenizedDocs.from_arrow(batch)
        return [(part, docs.take(part)) for part in self.slices(batch.column("num_tokens").to_numpy())]

    def slices(self, num_tokens: np.ndarray) -> list[slice]:
        parts, start, limit = [], 0, APPEND_TOKENS if self.appended else self.token_batch_size
        ends = np.cumsum(num_tokens)
        while start < len(num_tokens):
            base = ends[start - 1] if start else 0
            stop = max(int(np.searchsorted(ends, base + limit, side="right")), start + 1)
            parts.append(slice(start, stop))
            start, limit = stop, APPEND_TOKENS
        return parts

    def write(self, batch: pa.Table, write_part: Callable[[TokenizedDocs], GradientRows], ready_at: float) -> pa.Table:
        """``write_part`` (compute and append one part's rows, return them) over the batch's parts;
        the batch's summary rows, each document stamped with its part's append time."""
        ids = batch.column("id").to_numpy().astype(np.int64)
        written, non_finite = np.zeros(len(ids), bool), np.zeros(len(ids), bool)
        written_at = np.zeros(len(ids))
        for part, part_docs in self.parts(batch):
            rows = write_part(part_docs)
            self.appended = True
            written[part] = np.isin(part_docs.ids, rows.ids)
            non_finite[part] = np.isin(part_docs.ids, rows.non_finite)
            written_at[part] = time.time()
        return summary_rows(ids, batch.column("num_tokens"), written, non_finite, written_at, ready_at)

    def passes(self, engine: GradientEngine, batch: pa.Table) -> int:
        """How many forward+backward passes writing ``batch`` runs: ZeRO-3 workers agree on it
        before each step (every pass gathers each module's parameters)."""
        return sum(engine.passes(part_docs) for _, part_docs in self.parts(batch))


class GradientWorker:
    """A model replica on a Replica actor: tokenized docs in, rows appended to LanceDB, summary out.

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
        self.appends = Appends(self.engine.spec.token_batch_size)
        self.ready_at = time.time()

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.appends.write(batch, self._write, self.ready_at)

    def _write(self, docs: TokenizedDocs) -> GradientRows:
        rows = self.engine.rows(docs)
        if self.preprocess is not None:
            rows.encode(self.table.codec, self.preprocess(torch.from_numpy(rows.grads)).numpy())
        self.table.append(rows.to_arrow())
        return rows

    def passes(self, batch: pa.Table) -> int:
        """How many forward+backward passes the next ``__call__(batch)`` runs (ZeRO-3 lock-step)."""
        return self.appends.passes(self.engine, batch)


def check_modules(model: ModelSpec, grads: GradSpec) -> None:
    """Fail on the driver, before any worker starts, when the module globs select nothing
    (on the model's meta-device skeleton: names and shapes, no weights)."""
    select_modules(model_skeleton(model), grads.modules, grads.exclude_modules)


SHARDS_PER_WORKER = 4  # enough blocks that no worker waits for another's last shard


def prepare(spec: RunSpec, ray_address: str | None, workers: int, start_replicas: bool = True) -> list[Shard]:
    """Driver-side checks that need no worker (model exists, modules match, data readable
    and non-empty), then Ray and (``start_replicas``) the replica pool; returns the
    dataset's shards, at least a few per worker."""
    # The checks import the model's code before Ray starts: in a `ray job submit` driver the
    # current directory is gone once the first actor has started (Ray's working_dir runtime
    # env), and imports that read it (torch._dynamo's) then fail.
    check_modules(spec.model, spec.grads)
    shards = plan_shards(spec.data)
    ensure_ray(ray_address)
    if start_replicas:  # their processes start and import while the driver plans the stream
        replicas(workers)
    return balance_shards(shards, SHARDS_PER_WORKER * workers)


def token_stream(spec: RunSpec, items: list[dict]) -> ray.data.Dataset:
    """Ray Data plan reading and tokenizing shard items (dicts of Shard fields + ``done_ids``)."""
    max_length = min(spec.data.max_length or 10**9, max_positions(load_config(spec.model)))
    baselines = reward_baselines(spec.data, functools.partial(_reward_sums_as_tasks, spec.data))
    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        read_and_tokenize,
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=TOKENIZE_CPUS,
        fn_kwargs=dict(data=spec.data, tokenizer_name=tokenizer_source(spec.model), revision=spec.model.revision,
                       max_length=max_length, baselines=baselines),
    )


def _reward_sums_as_tasks(data: DataSpec, shards: list[Shard]) -> list[RewardSums]:
    """Each shard's reward sums per prompt group, one Ray task per shard (the driver reads no rows)."""
    sums = ray.remote(num_cpus=TOKENIZE_CPUS)(shard_reward_sums)
    return ray.get([sums.remote(data, shard) for shard in shards])


def shard_items(shards: list[Shard]) -> list[dict]:
    """Shard items for a stream that reads everything (no resume)."""
    return [dataclasses.asdict(shard) | {"done_ids": []} for shard in shards]


class BuildOptions(TypedDict, total=False):
    """How a build runs, whichever executor runs it (``entry.build`` passes them on)."""

    workers: int
    ray_address: str | None
    docs_per_write: int
    on_progress: Callable[[BuildProgress], None] | None
    table: str


def replica_build(
    run_path: str,
    spec: RunSpec,
    *,
    workers: int = 1,
    ray_address: str | None = None,
    docs_per_write: int = DOCS_PER_WRITE,
    on_progress: Callable[[BuildProgress], None] | None = None,
    table: str = GRADIENTS,
    query: QueryPreprocess | None = None,
) -> BuildProgress:
    """Write the gradient table of ``spec.data`` into ``run_path`` with a pool of model
    replicas; resumes an existing one. (``rayattr.ray.entry.build`` also runs ZeRO-3.)"""
    progress = BuildProgress(total_docs=0)
    tables = TablePass(run_path, {table: GradientTable}, prepare(spec, ray_address, workers))
    if tables.start(progress):
        pool = replicas(workers)
        job = Job(GradientWorker, dict(spec=spec, run_path=run_path, threads=pool.resources.threads, table=table, query=query))
        drain(pool.map(job, token_stream(spec, tables.items), docs_per_write), progress, on_progress)
    tables.finish(progress)
    progress.finish()
    return progress


def drain(summaries: Iterable[pa.Table], progress: BuildProgress, on_progress: Callable[[BuildProgress], None] | None) -> None:
    """Run a pass whose workers return summary rows, counting them into ``progress``."""
    with user_errors():
        count_summaries(summaries, progress, on_progress)


@contextmanager
def user_errors() -> Iterator[None]:
    """Re-raise a RayattrError from inside a worker as its one line, not wrapped in Ray's errors (Ray's
    wrapper is itself a RayattrError subclass whose text is the worker's traceback)."""
    try:
        yield
    except Exception as exc:
        cause = find_user_error(exc)
        if cause is None or cause is exc:
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
