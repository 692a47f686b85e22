"""The driver's running count of worker summaries: totals and the steady-state rate (no Ray)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from rayattr.ray.progress import BuildProgress, count_summaries


def _summary(worker: str, ids: list[int], tokens: list[int], stamps: list[float], written: list[bool] | None = None,
             ready_at: float = np.nan) -> pa.Table:
    """What ``summary_rows`` returns for one call, with given clocks (no Ray runtime needed)."""
    n = len(ids)
    return pa.table({
        "id": pa.array(ids, pa.int64()), "num_tokens": pa.array(tokens, pa.int32()),
        "written": pa.array(written if written is not None else [True] * n),
        "non_finite": pa.array([False] * n), "written_at": pa.array(np.asarray(stamps, float)),
        "ready_at": pa.array(np.full(n, ready_at)),
        "node_id": pa.array(["node"] * n), "worker_id": pa.array([worker] * n), "peak_rss_mb": pa.array([1.0] * n),
    })


def test_steady_rate_leaves_out_each_workers_first_write_and_the_end_of_the_pass():
    progress = BuildProgress(total_docs=7)
    t0 = progress.wall_start
    calls = [
        _summary("a", [0, 1], [100, 100], [t0 + 10, t0 + 10], ready_at=t0 + 8.5),  # a's first write: start-up, not counted
        _summary("b", [2], [50], [t0 + 12]),  # b's first write: not counted either
        _summary("a", [3, 4], [300, 200], [t0 + 12, t0 + 14]),
        _summary("b", [5, 6], [100, 400], [t0 + 13, t0 + 20], written=[False, True]),  # id 5 had no loss token
    ]
    count_summaries(calls, progress, None)
    assert progress.tokens == 1250 and progress.written == 6 and progress.skipped_ids == [5]
    # counted: a's 300 + 200 after t0+10, b's 400 after t0+12; over t0+10 .. t0+20
    assert progress.steady.tokens == 900
    assert progress.steady_tokens_per_second == pytest.approx(90.0)
    assert progress.first_row_seconds == pytest.approx(10.0)
    assert progress.first_row_after_load_seconds == pytest.approx(1.5)
    assert progress.end_seconds == pytest.approx(progress.seconds - 20.0)


def test_steady_rate_is_unknown_until_two_writes_apart():
    progress = BuildProgress(total_docs=1)
    assert progress.steady_tokens_per_second is None and progress.end_seconds is None
    count_summaries([_summary("a", [0], [10], [progress.wall_start + 1])], progress, None)
    assert progress.steady_tokens_per_second is None
