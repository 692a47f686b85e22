"""`rayattr verify`: check a run path's tables and statistics before trusting its scores.

Every table is streamed once (memory: a small integer per id): each expected
id present exactly once, vectors of the width and dtype the metadata states,
no NaN/Inf, a completion record (a table without one is partial). Statistics
and normalizer directories are loaded with their checksums, and their
fingerprints (model, modules, projection, normalizer) are compared with the
gradient tables beside them. Sub-runs (trackstar's ``query``) are checked too.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from rayattr import storage
from rayattr.codec import RowCodec, vectors_of
from rayattr.config import RayattrError
from rayattr.grads.normalizer import MANIFEST as NORMALIZER_MANIFEST, Normalizer
from rayattr.hessian.factors import MANIFEST as STATS_MANIFEST, load_stats
from rayattr.space import space_mismatches
from rayattr.store import (
    META_KEY, ORDER, SCORES, TOPK, Completion, GradientTable, RowTable, ScoreTable, TableMeta, connect,
)

STATS_DIRS = ("stats", "index_stats", "query_stats", "mixed")
NORMALIZER_DIRS = ("normalizer",)
SUB_RUNS = ("query",)
SHOWN_IDS = 10  # ids listed per problem


@dataclass
class VerifyReport:
    """What was checked and what is wrong (an empty ``problems`` means the run is sound)."""

    checked: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(run_path: str) -> VerifyReport:
    """Check every table, statistics and normalizer directory under ``run_path``."""
    if not storage.exists(run_path):
        raise RayattrError(f"{run_path} does not exist; pass the RUN_PATH of a build, score or trackstar run")
    report = VerifyReport()
    metas = _verify_tables(run_path, report)
    for directory in STATS_DIRS:
        _verify_stats(storage.join(run_path, directory), metas, report)
    for directory in NORMALIZER_DIRS:
        _verify_normalizer(storage.join(run_path, directory), metas, report)
    if not report.checked and not report.problems:
        raise RayattrError(f"{run_path} holds no rayattr tables or statistics; pass the RUN_PATH of a build, score or trackstar run")
    return report


def _verify_tables(run_path: str, report: VerifyReport) -> dict[str, TableMeta]:
    """Check the tables of ``run_path`` and its sub-runs; returns the gradient tables' metadata by name."""
    metas: dict[str, TableMeta] = {}
    for name in sorted(connect(run_path).list_tables().tables):
        where = f"{run_path} table {name!r}"
        try:
            meta = _verify_table(run_path, name, report, where)
        except (RayattrError, OSError, ValueError, pa.ArrowException) as exc:
            report.problems.append(f"{where}: unreadable ({exc}); rebuild it")
            continue
        report.checked.append(where)
        if meta is not None:
            metas[where] = meta
    for sub in SUB_RUNS:
        if storage.exists(sub_path := storage.join(run_path, sub)):
            metas |= _verify_tables(sub_path, report)
    return metas


def _verify_table(run_path: str, name: str, report: VerifyReport, where: str) -> TableMeta | None:
    """Check one table; returns a gradient table's metadata (for the fingerprint checks)."""
    if name == TOPK:
        return None  # rewritten whole from the score table by every score run
    if name == ORDER:  # a training run's (step, epoch, id) of every example each step saw
        _verify_step_keys(connect(run_path).open_table(name).to_lance(), ["step", "id"], report, where)
        return None
    raw = (connect(run_path).open_table(name).schema.metadata or {}).get(META_KEY)
    if raw is None:
        report.problems.append(f"{where}: no rayattr metadata; it was not written by rayattr")
        return None
    kind = json.loads(raw).get("kind")
    if kind == SCORES:
        table: RowTable = ScoreTable.open(run_path, name)
        width = table.meta.width
        fields = [pa.field("scores", pa.list_(pa.float32(), width))]
        decode: Callable[[pa.RecordBatch], np.ndarray] = lambda batch: vectors_of(batch.column("scores"), width)  # noqa: E731
    else:
        table = GradientTable.open(run_path, name)
        codec = RowCodec.of(table.meta)
        fields, decode = codec.fields(), codec.decode
    for wanted in fields:
        stored = table.table.schema.field(wanted.name).type if wanted.name in table.table.schema.names else None
        if stored != wanted.type:
            report.problems.append(f"{where}: column {wanted.name!r} is {stored} but the metadata says {wanted.type}; "
                                   "rebuild the table")
            return None
    _verify_rows(table, [f.name for f in fields], decode, report, where)
    return table.meta if isinstance(table, GradientTable) else None  # preprocessed query rows too: same space


def _verify_rows(table: RowTable, columns: list[str], decode: Callable[[pa.RecordBatch], np.ndarray],
                 report: VerifyReport, where: str) -> None:
    """Ids exactly once (against the completion record) and finite vectors, in one stream plus one id count.
    A training run's rows hold an id once per step that saw it, and each step commits whole (a resumed run
    rewinds to its checkpoint), so there they are checked for one row per step and id, with no record."""
    bad: list[np.ndarray] = []
    for batch in table.iter_batches(["id", *columns]):
        finite = np.isfinite(decode(batch)).all(axis=1)
        bad.append(batch.column("id").to_numpy()[~finite])
    non_finite = np.unique(np.concatenate(bad)) if bad else np.zeros(0, np.int64)
    if non_finite.size:
        report.problems.append(f"{where}: {non_finite.size} id(s) with NaN/Inf vectors ({_ids(non_finite)}); "
                               "their loss or gradients overflowed: check --precision, or exclude them")
    if isinstance(table, GradientTable) and table.meta.train_time:
        _verify_step_keys(table.table.to_lance(), ["step", "id"] + (["token_pos"] if table.per_token else []), report,
                          where)
        return
    counts, expected = table.row_counts()
    duplicated = np.flatnonzero(counts > expected)
    if duplicated.size:
        report.problems.append(f"{where}: {duplicated.size} id(s) stored more than once ({_ids(duplicated)}); "
                               "rerun the command that wrote it (it de-duplicates when it finishes)")
    incomplete = np.flatnonzero((counts > 0) & (counts < expected))
    if incomplete.size:
        report.problems.append(f"{where}: {incomplete.size} id(s) lack some of their token rows ({_ids(incomplete)}); "
                               "rows were removed outside rayattr: rebuild it in a new RUN_PATH")
    done = Completion.load(table.uri, table.table.name)
    if done is None:
        report.problems.append(f"{where}: no completion record, so the table is partial (a killed or running job); "
                               "rerun the same command to resume it")
        return
    present = np.flatnonzero(counts)
    wanted = done.expected_ids()
    if wanted is None:
        if present.size != done.rows:
            report.problems.append(f"{where}: holds {present.size} ids, its completion record {done.rows}; rerun to repair")
        return
    missing, extra = np.setdiff1d(wanted, present), np.setdiff1d(present, wanted)
    if missing.size:
        report.problems.append(f"{where}: {missing.size} expected id(s) missing ({_ids(missing)}); rerun the same command to resume")
    if extra.size:
        report.problems.append(f"{where}: {extra.size} id(s) outside the dataset ({_ids(extra)}); rebuild it in a new RUN_PATH")


def _verify_step_keys(dataset, key: list[str], report: VerifyReport, where: str) -> None:
    """Each ``key`` (step, id...) of a training run's table held once: the keys are read once, as one
    integer column each."""
    columns = dataset.to_table(columns=key)
    if not columns.num_rows:
        return
    keys = np.stack([columns.column(name).to_numpy().astype(np.int64) for name in key], axis=1)
    unique, counts = np.unique(keys, axis=0, return_counts=True)
    repeated = unique[counts > 1]
    if repeated.size:
        report.problems.append(f"{where}: {len(repeated)} ({', '.join(key)}) held more than once (ids "
                               f"{_ids(np.unique(repeated[:, 1]))}); rows were written outside rayattr: rebuild it")


def _verify_stats(directory: str, metas: dict[str, TableMeta], report: VerifyReport) -> None:
    if not storage.exists(storage.join(directory, STATS_MANIFEST)):
        return
    try:
        _, manifest = load_stats(directory)  # checksums, shapes
    except RayattrError as exc:
        report.problems.append(f"statistics {directory}: {exc}")
        return
    report.checked.append(f"statistics {directory}")
    for where, meta in metas.items():
        differing = space_mismatches(manifest, meta)
        if differing:
            report.problems.append(f"statistics {directory} disagree with {where} on {', '.join(differing)}; "
                                   "refit the statistics with the table's settings")


def _verify_normalizer(directory: str, metas: dict[str, TableMeta], report: VerifyReport) -> None:
    if not storage.exists(storage.join(directory, NORMALIZER_MANIFEST)):
        return
    try:
        normalizer = Normalizer.load(directory)
    except RayattrError as exc:
        report.problems.append(f"normalizer {directory}: {exc}")
        return
    report.checked.append(f"normalizer {directory}")
    for where, meta in metas.items():
        if meta.normalizer not in (None, normalizer.fingerprint):
            report.problems.append(f"normalizer {directory} (fingerprint {normalizer.fingerprint}) is not the one "
                                   f"{where} was built with ({meta.normalizer}); rebuild one of them")


def _ids(ids: np.ndarray) -> str:
    listed = ", ".join(str(int(i)) for i in ids[:SHOWN_IDS])
    return listed + (f", ... {ids.size - SHOWN_IDS} more" if ids.size > SHOWN_IDS else "")
