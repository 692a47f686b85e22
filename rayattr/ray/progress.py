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
                 non_finite: np.ndarray | None = None, written_at: np.ndarray | None = None) -> pa.Table:
    """What a worker tells the driver about a batch: which ids it wrote (the others had no
    loss token, or a non-finite loss or gradient), when (default: now), on which node, and its
    peak RSS so far."""
    context = ray.get_runtime_context()
    return pa.table({
        "id": pa.array(ids, pa.int64()),
        "num_tokens": num_tokens,
        "written": pa.array(written),
        "non_finite": pa.array(np.zeros(len(ids), bool) if non_finite is None else non_finite),
        "written_at": pa.array(np.full(len(ids), time.time()) if written_at is None else written_at),
        "node_id": pa.array([context.get_node_id()] * len(ids), pa.string()),
        "worker_id": pa.array([context.get_worker_id()] * len(ids), pa.string()),
        "peak_rss_mb": pa.array(np.full(len(ids), peak_rss_mb())),
    })


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
