"""What workers report about each batch they wrote, and the driver's running count of it."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray


def peak_rss_mb() -> float:
    """This process's resident-set high-water mark (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def summary_rows(ids: np.ndarray, num_tokens: pa.Array, written: np.ndarray,
                 non_finite: np.ndarray | None = None, written_at: np.ndarray | None = None,
                 ready_at: float | None = None) -> pa.Table:
    """What a worker tells the driver about a batch: which ids it wrote (the others had no
    loss token, or a non-finite loss or gradient), when (default: now), when the worker had its
    model loaded (``ready_at``), on which node, and its peak RSS so far."""
    context = ray.get_runtime_context()
    return pa.table({
        "id": pa.array(ids, pa.int64()),
        "num_tokens": num_tokens,
        "written": pa.array(written),
        "non_finite": pa.array(np.zeros(len(ids), bool) if non_finite is None else non_finite),
        "written_at": pa.array(np.full(len(ids), time.time()) if written_at is None else written_at),
        "ready_at": pa.array(np.full(len(ids), np.nan if ready_at is None else ready_at)),
        "node_id": pa.array([context.get_node_id()] * len(ids), pa.string()),
        "worker_id": pa.array([context.get_worker_id()] * len(ids), pa.string()),
        "peak_rss_mb": pa.array(np.full(len(ids), peak_rss_mb())),
    })


@dataclass
class SteadyRate:
    """The pass's rate on the workers' clocks: tokens of the rows each worker wrote after its own
    first write, over the time from the first write of any worker to the last write of any.

    A worker's first write follows its start-up (process, imports, model load), so it is left out;
    the time after the last write (the driver's end of the pass) is too. Conservative where workers
    start at different times: the later ones' start-up stays in the time."""

    tokens: int = 0
    last: float | None = None  # the last write of any worker
    worker_first: dict[str, float] = field(default_factory=dict)  # each worker's first write

    def count(self, summary: pa.Table) -> None:
        """Add one worker call's summary rows (their ``written_at`` stamps)."""
        written = summary.filter(summary.column("written"))
        if not written.num_rows:
            return
        stamps = written.column("written_at").to_numpy()
        tokens = written.column("num_tokens").to_numpy()
        workers = np.asarray(written.column("worker_id").to_pylist())
        for worker in np.unique(workers):
            mine = workers == worker
            start = self.worker_first.setdefault(worker, float(stamps[mine].min()))
            self.tokens += int(tokens[mine & (stamps > start)].sum())
        self.last = max(self.last or -np.inf, float(stamps.max()))

    @property
    def tokens_per_second(self) -> float | None:
        first = min(self.worker_first.values(), default=None)
        if first is None or self.last <= first:
            return None
        return self.tokens / (self.last - first)


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
    first_row_after_load_seconds: float | None = None  # from the writing worker's model load to its first row
    steady: SteadyRate = field(default_factory=SteadyRate)
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

    @property
    def steady_tokens_per_second(self) -> float | None:
        """Tokens/s once every worker is up: start-up and the end of the pass left out (``SteadyRate``)."""
        return self.steady.tokens_per_second

    @property
    def end_seconds(self) -> float | None:
        """Seconds from the last row written to the end of the pass (de-duplication, compaction, top-k)."""
        return None if self.steady.last is None else self.seconds - (self.steady.last - self.wall_start)


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
        progress.steady.count(summary)
        progress.finish()
        if progress.first_row_seconds is None and progress.written:
            first = float(pc.min(summary.column("written_at")).as_py())
            progress.first_row_seconds = first - progress.wall_start
            ready = pc.min(summary.column("ready_at")).as_py()
            progress.first_row_after_load_seconds = None if np.isnan(ready) else first - ready
        if on_progress:
            on_progress(progress)


def _count_peaks(summary: pa.Table, peaks: dict[str, float]) -> None:
    """Raise each worker's entry in ``peaks`` to the highest peak RSS its summary rows report."""
    per_worker = summary.group_by("worker_id").aggregate([("peak_rss_mb", "max")])
    for worker, peak in zip(per_worker.column("worker_id").to_pylist(), per_worker.column("peak_rss_mb_max").to_pylist()):
        peaks[worker] = max(peak, peaks.get(worker, 0.0))
