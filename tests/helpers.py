"""Assertions the tests share."""

from __future__ import annotations

import os
import signal

import numpy as np
import psutil

from rayattr.config import DataSpec, GradSpec
from rayattr.grads.engine import GradientEngine, GradientRows
from rayattr.ray.progress import BuildProgress
from rayattr.space import TableMeta
from rayattr.store import ScoreTable


def assert_rows_close(actual: np.ndarray, expected: np.ndarray, tol: float = 1e-5) -> None:
    """Gradient rows equal up to float32 summation order: error relative to each row's largest entry.

    Other batch compositions reorder float32 sums, which moves small entries of a
    row by ~1e-7 of the row's scale; an elementwise rtol would flag those.
    """
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = np.maximum(np.abs(expected).max(axis=1, keepdims=True), 1e-30)
    worst = float((np.abs(actual.astype(np.float64) - expected) / scale).max())
    assert worst <= tol, f"rows differ by {worst:.3g} of their scale (> {tol})"


def read_scores(run_path: str) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, scores[n, Q])`` of a run's score table, sorted by id."""
    table = ScoreTable.open(run_path).table.to_arrow().sort_by("id")
    return table.column("id").to_numpy(), np.stack(table.column("scores").to_numpy(zero_copy_only=False))


def engine_rows(model, spec: GradSpec, docs, padding_side: str = "right") -> tuple[GradientRows, GradientEngine, TableMeta]:
    """Rows of ``docs``, the (closed) engine that made them, and its table metadata."""
    engine = GradientEngine(model, spec, model.config.pad_token_id, padding_side=padding_side)
    try:
        return engine.rows(docs), engine, engine.table_meta({"name": "fixture"}, DataSpec("d"))
    finally:
        engine.close()


class KillOneWorker:
    """A progress callback that SIGKILLs one worker process (its command line names
    ``process``) once ``after`` documents are done."""

    def __init__(self, process: str, after: int) -> None:
        self.process, self.after = process, after
        self.killed: int | None = None
        self.docs_at_kill = 0

    def __call__(self, progress: BuildProgress) -> None:
        if self.killed is None and progress.docs >= self.after:
            # Only this test process's own Ray workers: other test processes may run Ray beside it.
            workers = [p for p in psutil.Process().children(recursive=True)
                       if any(self.process in part for part in _cmdline(p))]
            assert workers, f"no {self.process} process found"
            self.killed, self.docs_at_kill = workers[0].pid, progress.docs
            os.kill(self.killed, signal.SIGKILL)


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:  # exited meanwhile
        return []


def make_meta(dtype: str = "float32", dim: int = 12, per_token: bool = False, **overrides) -> TableMeta:
    fields = dict(
        model={"name": "tiny", "revision": "", "config": "c0ffee", "weights": "beef"},
        modules=[
            {"name": "a", "out_features": 2, "in_features": 3, "p_out": 2, "p_in": 3, "offset": 0, "width": 6},
            {"name": "b", "out_features": 3, "in_features": 2, "p_out": 3, "p_in": 2, "offset": 6, "width": 6},
        ],
        projection={"type": "rademacher", "dim": 0, "seed": 0, "fingerprint": GradSpec(projection_dim=0).projection_fingerprint()},
        dtype=dtype,
        dim=dim,
        per_token=per_token,
        data={"dataset": "train.parquet", "split": "train"},
    )
    fields.update(overrides)
    return TableMeta(**fields)
