"""Where a ZeRO worker group leaves what the driver reads (``rayattr.ray.zero``).

Kept apart from the model code on purpose: the mailbox actor unpickles every worker's
report and table metadata, and a class defined in ``rayattr.ray.zero`` would make it
import torch, transformers and Ray Train first, seconds that the whole group spends
waiting at its end. This module imports none of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import ray

from rayattr.space import TableMeta


@dataclass(frozen=True)
class WorkerReport:
    """What one worker of the group did and held."""

    rank: int
    partition_numel: int  # parameter elements this worker holds (its ZeRO-3 slices)
    model_numel: int  # parameter elements of the whole model
    passes: int  # forward+backward passes over real documents
    idle_passes: int  # passes over the empty batch, to keep lock-step
    resumed_past: int  # documents skipped as already committed (after a group restart, or on resume)
    seconds: float  # time in the lock-step loop, collectives included
    peak_rss_mb: float


@ray.remote(num_cpus=0)
class Mailbox:
    """Where a group's workers leave what the driver reads: build summaries as they
    are written, and each worker's report, table metadata and result at the end."""

    def __init__(self) -> None:
        self.summaries: list[pa.Table] = []
        self.finished: dict[int, tuple[WorkerReport, TableMeta, Any]] = {}

    def post(self, summary: pa.Table) -> None:
        self.summaries.append(summary)

    def take(self) -> list[pa.Table]:
        taken, self.summaries = self.summaries, []
        return taken

    def finish(self, rank: int, report: WorkerReport, meta: TableMeta, result: Any) -> None:
        self.finished[rank] = (report, meta, result)

    def reports(self) -> tuple[list[WorkerReport], list[TableMeta]]:
        ranks = sorted(self.finished)
        return [self.finished[r][0] for r in ranks], [self.finished[r][1] for r in ranks]

    def result(self, rank: int) -> Any:
        return self.finished[rank][2]
