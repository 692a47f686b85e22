"""The retrain bank: models retrained on random subsets of the training set, kept as what they
measured (each query's loss after training), so every later evaluation reuses them.

A bank path is a LanceDB database with table ``bank``: one row per retrained subset, ``run``
(its index), ``subset`` (the training ids it trained on) and ``losses`` (each query's mean
token loss after training, in the order of the metadata's ``query_ids``). The metadata also
fixes what a run means (model, data, recipe, subset fraction and seed), so a resumed bank
refuses different settings instead of mixing them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from rayattr.config import RayattrError
from rayattr.store import META_KEY, connect, table_exists

BANK = "bank"


@dataclass(frozen=True)
class BankMeta:
    """What every run of a bank shares."""

    query_ids: list[int]
    train_ids: int  # documents of the training set the subsets are drawn from
    fraction: float  # alpha: each subset holds round(alpha * train_ids) documents
    seed: int
    settings: dict[str, Any]  # model, data and recipe, as configured (their fingerprint decides a resume)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()


def subset_of(train_ids: np.ndarray, fraction: float, seed: int, run: int) -> np.ndarray:
    """The sorted training ids of run ``run``: a uniform draw without replacement, the same on every
    machine and in every resume (seeded by the bank's seed and the run index)."""
    size = int(round(fraction * len(train_ids)))
    if not 0 < size < len(train_ids):
        raise RayattrError(f"--fraction {fraction} of {len(train_ids)} documents leaves an empty or full subset; "
                           "choose a fraction strictly between them (0.5 is the usual one)")
    picked = np.random.default_rng([seed, run]).choice(len(train_ids), size=size, replace=False)
    return np.sort(np.asarray(train_ids, np.int64)[picked])


def bank_schema(meta: BankMeta) -> pa.Schema:
    return pa.schema([pa.field("run", pa.int32()), pa.field("subset", pa.list_(pa.int64())),
                      pa.field("losses", pa.list_(pa.float32(), len(meta.query_ids)))],
                     metadata={META_KEY: meta.to_json()})


class Bank:
    """The ``bank`` table of a bank path: append finished runs, list them, read them back."""

    def __init__(self, table, meta: BankMeta, uri: str) -> None:
        self.table, self.meta, self.uri = table, meta, uri

    @classmethod
    def create(cls, uri: str, meta: BankMeta) -> Bank:
        """Create the bank, or reopen it to resume when it was made with the same settings."""
        if table_exists(uri, BANK):
            existing = cls.open(uri)
            if existing.meta != meta:
                differing = [k for k, v in asdict(meta).items() if asdict(existing.meta)[k] != v]
                raise RayattrError(f"the bank in {uri} was made with other settings ({', '.join(differing)}); use a "
                                   "new BANK path, or rerun with the settings it was made with to resume it")
            return existing
        return cls(connect(uri).create_table(BANK, schema=bank_schema(meta)), meta, uri)

    @classmethod
    def open(cls, uri: str) -> Bank:
        if not table_exists(uri, BANK):
            raise RayattrError(f"no retrain bank in {uri}; make one with `rayattr retrain {uri} ...`")
        table = connect(uri).open_table(BANK)
        raw = (table.schema.metadata or {}).get(META_KEY)
        if raw is None:
            raise RayattrError(f"table {BANK!r} in {uri} was not written by rayattr; make a bank with `rayattr retrain`")
        return cls(table, BankMeta(**json.loads(raw)), uri)

    def append(self, run: int, subset: np.ndarray, losses: np.ndarray) -> None:
        """Record one finished run (one commit: a killed writer leaves the run absent, never partial)."""
        row = pa.table({"run": pa.array([run], pa.int32()), "subset": pa.array([subset.tolist()], pa.list_(pa.int64())),
                        "losses": pa.array([np.asarray(losses, np.float32).tolist()],
                                           pa.list_(pa.float32(), len(self.meta.query_ids)))})
        self.table.add(row.cast(bank_schema(self.meta)))

    def finished(self) -> set[int]:
        """Runs already recorded (a run retried after a crash may be recorded twice; ``read`` keeps one)."""
        batches = self.table.to_lance().to_batches(columns=["run"])
        return {int(r) for batch in batches for r in batch.column(0).to_numpy()}

    def read(self) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
        """``(runs [M], subsets (M sorted id arrays), losses [M, Q])``, one row per run, by run."""
        table = self.table.to_arrow().sort_by("run")
        runs = table.column("run").to_numpy()
        keep = np.flatnonzero(np.r_[True, runs[1:] != runs[:-1]])
        subsets = [np.asarray(s, np.int64) for s in table.column("subset").take(keep).to_pylist()]
        losses = np.stack(table.column("losses").take(keep).to_numpy(zero_copy_only=False)).astype(np.float64) \
            if keep.size else np.zeros((0, len(self.meta.query_ids)))
        return runs[keep], subsets, losses
