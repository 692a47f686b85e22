"""Lock-step stepping of a ZeRO-3 worker group.

Gathering a module's partitioned parameters is a collective, so every worker must run the same
number of forward+backward passes: before each step the workers agree on the most any of them
needs, and a worker with fewer runs idle passes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pyarrow as pa
import torch
import torch.distributed as dist

from rayattr.grads.engine import GradientEngine


@dataclass(frozen=True)
class Step:
    """What a worker does with each batch, and how many forward+backward passes that takes
    (counted by the consumer itself: a writer that appends in parts runs more than one plan)."""

    passes: Callable[[pa.Table], int]
    run: Callable[[pa.Table], None]


def run_lockstep(batches: Iterator[pa.Table], engine: GradientEngine, step: Step) -> tuple[int, int]:
    """Feed this worker's batches to ``step`` in lock-step with the group.

    Every worker runs the same number of forward+backward passes per step (the
    most any worker needs; the others pad with idle passes), and all keep
    stepping until every shard is exhausted. Returns ``(passes, idle passes)``.
    """
    passes = idle = 0
    while True:
        batch = next(batches, None)
        needed = 0 if batch is None else step.passes(batch)
        most, pending = _max_over_workers(engine.device, needed, batch is not None)
        if not pending:
            return passes, idle
        if batch is not None:
            step.run(batch)
        for _ in range(most - needed):
            engine.idle_pass()
        passes, idle = passes + needed, idle + most - needed


def _max_over_workers(device: torch.device, *values: int) -> list[int]:
    """Elementwise maximum of small integers over the worker group (an all-reduce)."""
    tensor = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()
