"""The life of the tables one distributed pass writes: partial while it runs, resumed from what
is committed, then repaired, compacted and recorded complete.

Build and score (replicas or ZeRO-3, on the fly or from a stored index) all go through it, so a
table's completion record means the same whichever pass wrote the table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from rayattr.data import Shard
from rayattr.ray.progress import BuildProgress
from rayattr.store import Completion, GradientTable, ScoreTable, table_exists


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


@dataclass
class TablePass:
    """The tables one pass writes into ``run_path`` (name -> table class), in the order a batch
    reaches them: the first is written last, so the ids it holds are done in all of them.

    ``shards``: the dataset the pass reads, resumed id by id. Without, the pass scores a stored
    index of ``rows`` rows, whose ids it does not know: resumed all or nothing.
    """

    run_path: str
    tables: dict[str, type[GradientTable] | type[ScoreTable]]
    shards: list[Shard] | None = None
    rows: int | None = None
    items: list[dict] = field(default_factory=list, init=False)  # shard items still to do, after start

    def start(self, progress: BuildProgress) -> int:
        """Mark every table partial and plan what is left (``items``); returns the documents
        still to do, counted into ``progress.total_docs``."""
        for name in self.tables:
            Completion.clear(self.run_path, name)
        name, kind = next(iter(self.tables.items()))
        written = kind.open(self.run_path, name) if table_exists(self.run_path, name) else None
        if self.shards is None:
            progress.total_docs = 0 if written is not None and written.count() == self.rows else self.rows
        else:
            self.items = resume_plan(self.shards, written.iter_ids() if written is not None else ())
            progress.total_docs = sum(item["num_rows"] - len(item["done_ids"]) for item in self.items)
        return progress.total_docs

    def finish(self, progress: BuildProgress) -> None:
        """Repair rows committed twice (retried blocks, leftover workers), compact, and record
        every table complete; one no worker created (kept gradients) stays absent."""
        for name, kind in self.tables.items():
            if not table_exists(self.run_path, name):
                continue
            table = kind.open(self.run_path, name)
            record = self.completion(name, progress)
            progress.duplicates_removed += table.deduplicate(record.rows)
            table.optimize()
            record.save(self.run_path)

    def completion(self, name: str, progress: BuildProgress) -> Completion:
        """Table ``name``'s record once ``progress`` has counted every summary. Skipped documents
        are re-read by every resume, so this pass saw them all."""
        if self.shards is None:
            return Completion(name, self.rows)
        return Completion.of_shards(name, [(s.first_id, s.num_rows) for s in self.shards], progress.skipped_ids,
                                    progress.non_finite_ids)
