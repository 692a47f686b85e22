"""The tables of a training run's rows: ``gradients`` (with step, epoch and lr) and ``order``.

Rows reach LanceDB in committed appends; a run resumed from a checkpoint first removes
the rows of every step at or after it (``rewind``), which the resumed run writes again,
so each (step, id) is held once whatever was killed when.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from rayattr.config import RayattrError
from rayattr.grads.live import LiveRows
from rayattr.space import SPACE_FIELDS, VECTOR_FIELDS, TableMeta
from rayattr.store import ORDER, GradientTable, connect, table_exists

ORDER_SCHEMA = pa.schema([pa.field("step", pa.int32()), pa.field("epoch", pa.int32()), pa.field("id", pa.int64())])
# Compared when a run reopens its table: a resumed run's weights (and so its model fingerprint) have moved on.
REOPEN_FIELDS = tuple(f for f in SPACE_FIELDS if f != "model") + VECTOR_FIELDS + ("per_token", "train_time")


class TrainTables:
    """One training process's view of the run path's tables."""

    def __init__(self, run_path: str, gradients: GradientTable, track_order: bool) -> None:
        self.run_path, self.gradients = run_path, gradients
        self.order = _order_table(run_path) if track_order else None

    @classmethod
    def open(cls, run_path: str, meta: TableMeta, track_order: bool, resuming: bool) -> TrainTables:
        """Create the tables, or reopen them: a resumed run keeps the fingerprint of the weights the
        run started from, a fresh one must start from the same weights."""
        if resuming and table_exists(run_path, "gradients"):
            table = GradientTable.open(run_path)
            differing = table.meta.mismatches(meta, REOPEN_FIELDS)
            if differing:
                raise RayattrError(f"the gradients table in {run_path} was written with other settings "
                                   f"({', '.join(differing)}); resume with the settings it was made with, or use a new run path")
        else:
            table = GradientTable.create(run_path, meta)
        return cls(run_path, table, track_order)

    def rewind(self, step: int) -> None:
        """Remove the rows of steps ``>= step``: the resumed run trains on them again."""
        self.gradients.table.delete(f"step >= {int(step)}")
        if self.order is not None:
            self.order.delete(f"step >= {int(step)}")

    def write(self, steps: list[tuple[int, int, float, LiveRows, np.ndarray]]) -> None:
        """``(step, epoch, lr, rows, ids seen)`` of finished steps, one commit per table."""
        if not steps:
            return
        parts, order = [], []
        for step, epoch, lr, rows, seen in steps:
            grads = rows.grads.numpy()
            finite = np.isfinite(rows.loss) & np.isfinite(grads).all(axis=1)  # as in build: no row for NaN/Inf
            _, stored = self.gradients.codec.encode(grads if finite.all() else grads[finite])
            count = int(finite.sum())
            parts.append(pa.table({
                "id": pa.array(rows.ids[finite], pa.int64()),
                "num_tokens": pa.array(rows.num_tokens[finite], pa.int32()),
                "loss": pa.array(rows.loss[finite], pa.float32()),
                "step": pa.array(np.full(count, step), pa.int32()),
                "epoch": pa.array(np.full(count, epoch), pa.int32()),
                "lr": pa.array(np.full(count, lr), pa.float32()),
            } | stored))
            order.append(pa.table({"step": pa.array(np.full(len(seen), step), pa.int32()),
                                   "epoch": pa.array(np.full(len(seen), epoch), pa.int32()),
                                   "id": pa.array(seen, pa.int64())}))
        self.gradients.append(pa.concat_tables(parts))
        if self.order is not None:
            self.order.add(pa.concat_tables(order))


def _order_table(run_path: str):
    if table_exists(run_path, ORDER):
        return connect(run_path).open_table(ORDER)
    try:
        return connect(run_path).create_table(ORDER, schema=ORDER_SCHEMA)
    except (ValueError, OSError):  # another process created it first
        return connect(run_path).open_table(ORDER)
