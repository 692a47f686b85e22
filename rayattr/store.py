"""LanceDB gradient tables: schema, metadata, appends, resume, streaming reads.

A run path is a LanceDB database (local directory or any URI LanceDB accepts).
The gradient table holds one row per document (or per token) with its vector
in a fixed-size-list column, and carries a JSON description of how those
vectors were made in its Arrow schema metadata, so anyone who opens the table
with plain ``lancedb`` knows what the numbers mean and rayattr can refuse to
compare vectors from different subspaces.
"""

from __future__ import annotations

import errno
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from rayattr import __version__, storage
from rayattr.codec import RowCodec
from rayattr.config import RayattrError
from rayattr.space import FORMAT_VERSION, GRADIENTS, SPACE_FIELDS, VECTOR_FIELDS, TableMeta, space_mismatches
from rayattr.topk import TopK

SCORES = "scores"
TOKEN_SCORES = "token_scores"
TOPK = "topk"
ORDER = "order"  # a training run's step, epoch and id of every example each step saw
META_KEY = b"rayattr"
RECORDS_DIR = "_rayattr"  # completion records, beside the tables of a run path


def require_compatible(index: TableMeta, query: TableMeta) -> None:
    """Refuse to compare vectors from different models, subspaces or normalizers."""
    differing = space_mismatches(index, query)
    if differing:
        name = differing[0]
        raise RayattrError(
            f"query and index disagree on {', '.join(differing)} (index {name}={getattr(index, name)!r}, "
            f"query {name}={getattr(query, name)!r}); rebuild the query with the index's settings"
        )


def gradient_schema(meta: TableMeta) -> pa.Schema:
    """Arrow schema of a gradient table, with the metadata attached."""
    fields = [pa.field("id", pa.int64()), pa.field("num_tokens", pa.int32()), pa.field("loss", pa.float32())]
    if meta.per_token:
        fields.append(pa.field("token_pos", pa.int32()))
    if meta.train_time:  # the optimizer step that trained on the row's example (0: the initial weights)
        fields += [pa.field("step", pa.int32()), pa.field("epoch", pa.int32()), pa.field("lr", pa.float32())]
    fields += RowCodec.of(meta).fields()
    return pa.schema(fields, metadata={META_KEY: meta.to_json()})


def connect(uri: str):
    """A LanceDB connection to a run path (local directory or object-store URI)."""
    import lancedb

    return lancedb.connect(str(uri))


def table_exists(uri: str, name: str) -> bool:
    return name in connect(uri).list_tables().tables


def committed_ids(uri: str, name: str) -> np.ndarray:
    """Sorted distinct ids of table ``name`` (empty when it does not exist), read a column at a time."""
    if not table_exists(uri, name):
        return np.zeros(0, np.int64)
    batches = connect(uri).open_table(name).to_lance().to_batches(columns=["id"])
    return np.unique(np.concatenate([np.zeros(0, np.int64)] + [b.column(0).to_numpy() for b in batches]))


class RowTable:
    """A LanceDB table of rows keyed by dataset id (and token position in per-token tables).

    Appends are single commits; reads stream in record batches, so nothing
    here holds a whole table in memory.
    """

    def __init__(self, table, uri: str, schema: pa.Schema, per_token: bool) -> None:
        self.table = table
        self.uri = uri
        self.schema = schema
        self.per_token = per_token
        self.appended = False  # whether this handle has committed rows

    @classmethod
    def _create_or_resume(cls, uri: str, name: str, meta: Any, schema: pa.Schema,
                          conflicts: Callable[[Any], list[str]]) -> Any:
        """Create ``name``, or reopen it to resume when ``conflicts(existing)`` is empty.

        Reopening also covers losing a creation race to another worker.
        """

        def reopen():
            existing = cls.open(uri, name)
            differing = conflicts(existing)
            if differing:
                raise RayattrError(
                    f"table {name!r} in {uri} was made with other settings ({', '.join(differing)}); "
                    "use a new RUN_PATH, or rerun with the settings it was made with to resume"
                )
            return existing

        if table_exists(uri, name):
            return reopen()
        try:
            return cls(connect(uri).create_table(name, schema=schema), meta, uri)
        except (ValueError, OSError):
            if not table_exists(uri, name):
                raise
            return reopen()

    @staticmethod
    def _open_lance(uri: str, name: str, hint: str) -> tuple[Any, bytes]:
        """The LanceDB table and its rayattr metadata; missing table or metadata is an error."""
        try:
            table = connect(uri).open_table(name)
        except (ValueError, FileNotFoundError) as exc:
            raise RayattrError(f"no table {name!r} in {uri}; {hint}") from exc
        metadata = table.schema.metadata or {}
        if META_KEY not in metadata:
            raise RayattrError(
                f"table {name!r} in {uri} has no rayattr metadata, so its vectors cannot be interpreted; "
                f"it was not written by rayattr: {hint}"
            )
        return table, metadata[META_KEY]

    @property
    def lance_uri(self) -> str:
        """URI of the underlying Lance dataset (what ``ray.data.read_lance`` takes)."""
        return self.table.to_lance().uri

    def append(self, rows: pa.Table) -> None:
        """Append rows in one commit (atomic: a killed writer leaves no partial batch).

        Workers that create a table at the same moment can both succeed, the later create landing
        as an overwrite of the empty table, and an append based on the version before it is refused.
        Before this handle has committed anything, the overwrite removed none of its rows: the
        append goes to the latest version. After, it may have: the pass fails, and a rerun resumes.
        """
        if not rows.num_rows:
            return
        try:
            self.table.add(rows.cast(self.schema))
        except (OSError, RuntimeError) as exc:
            # A full disk: the errno, or (Lance's Rust IO errors) the OS error their text quotes.
            if getattr(exc, "errno", None) == errno.ENOSPC or any(s in str(exc) for s in ("No space left", "os error 28")):
                raise RayattrError(f"no space left on the device of {self.uri} while appending to table {self.table.name!r}; "
                                   "free space there, then rerun the same command: it resumes from the committed rows") from exc
            if "Incompatible transaction" not in str(exc) or "Overwrite" not in str(exc):
                raise
            if self.appended:
                raise RayattrError(f"table {self.table.name!r} in {self.uri} was overwritten by another writer while "
                                   "this pass appended to it; rerun the command to resume") from exc
            self.table.checkout_latest()
            self.table.add(rows.cast(self.schema))
        self.appended = True

    def count(self) -> int:
        return self.table.count_rows()

    def iter_batches(self, columns: list[str] | None = None, batch_size: int = 8192,
                     where: str | None = None) -> Iterator[pa.RecordBatch]:
        """Stream the table (the rows matching the SQL filter ``where``) in record batches (memory bounded by
        ``batch_size``).

        A table whose files are missing or damaged fails here with a message
        naming it, not with Lance's internal error.
        """
        try:
            yield from self.table.to_lance().to_batches(columns=columns, batch_size=batch_size, filter=where)
        except (OSError, RuntimeError, ValueError) as exc:
            raise RayattrError(
                f"table {self.table.name!r} in {self.uri} is corrupt or partly written ({str(exc).splitlines()[0]}); "
                f"`rayattr verify {self.uri}` lists what is wrong: rebuild it in a new RUN_PATH, or restore its files"
            ) from exc

    def iter_ids(self, batch_size: int = 65536) -> Iterator[np.ndarray]:
        """Stream the ids present, for resuming without loading the vectors."""
        for batch in self.iter_batches(["id"], batch_size):
            yield batch.column(0).to_numpy()

    def row_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """``(rows held, rows expected)`` per id (indexed by id), streamed: one small integer pair per id.

        A document has one row, or per token one per input position but the last, label or not (prompt positions
        carry gradient through attention); documents are appended whole, so more means repeated keys.
        """
        counts = np.zeros(0, np.uint32)
        expected = np.zeros(0, np.uint32)
        for batch in self.iter_batches(["id", "num_tokens"]):
            ids = batch.column("id").to_numpy()
            if ids.size and ids.max() >= counts.size:
                extra = np.zeros(max(int(ids.max()) + 1, 2 * counts.size) - counts.size, np.uint32)
                counts, expected = np.concatenate([counts, extra]), np.concatenate([expected, extra])
            np.add.at(counts, ids, 1)
            rows_per_id = batch.column("num_tokens").to_numpy() - 1 if self.per_token else 1
            expected[ids] = rows_per_id
        return counts, expected

    def deduplicate(self, expected_ids: int | None = None) -> int:
        """Keep one copy of every row written more than once; returns the rows removed.

        Appends are at-least-once: a retried block or a killed job's leftover
        actor can commit a row that another writer also commits. Rows of one
        id are identical, so the repair is exact. Counting uses one small
        integer per id (streamed), then rewrites only the duplicated ids; a
        crash between the delete and the re-append loses those ids, which the
        next resume recomputes.

        ``expected_ids`` (a finished pass's completion record): that pass
        committed every expected id at least once, so a per-document table
        holding exactly that many rows has no duplicate and is not scanned.
        """
        if expected_ids is not None and not self.per_token and self.count() == expected_ids:
            return 0
        counts, expected = self.row_counts()
        duplicated = np.flatnonzero(counts > expected)
        removed = 0
        for chunk in np.array_split(duplicated, max(1, duplicated.size // 1000)) if duplicated.size else ():
            predicate = f"id IN ({','.join(map(str, chunk.tolist()))})"
            rows = self.table.to_lance().to_table(filter=predicate)
            key = [rows.column(k).to_numpy() for k in (["id", "token_pos"] if self.per_token else ["id"])]
            _, first = np.unique(np.stack(key, axis=1), axis=0, return_index=True)
            self.table.delete(predicate)
            self.append(rows.take(np.sort(first)))
            removed += rows.num_rows - first.size
        return removed

    def optimize(self) -> None:
        """Compact the fragments that many small appends leave behind, then let LanceDB tidy
        indices and old versions (it finds nothing left to compact).

        Compaction copies the pages as written where the files allow: LanceDB's own decodes and
        re-encodes them, which took driver memory growing with the table (benchmarks/memory.py).
        It always pays: 8, 32 and 128 appended fragments compact in 0.015, 0.028 and 0.09 s and
        then read 2-4x faster, so only a single-fragment table skips it.
        """
        if len(self.table.to_lance().get_fragments()) <= 1:
            return  # one write, or already compacted: nothing to merge, no index or old version to tidy
        self.table.to_lance().optimize.compact_files(compaction_mode="try_binary_copy")
        self.table.checkout_latest()
        self.table.optimize()


@dataclass(frozen=True)
class Completion:
    """What a finished pass promises about one table: the ids it holds.

    Written last, after de-duplication and compaction, and removed when a
    pass on the table starts, so a table without one is partial (a killed
    or running job) and ``rayattr verify`` says so. Expected ids are the
    dataset's shard ranges less the documents skipped for having no loss
    token or a non-finite loss or gradient; a table scored from a stored
    index lists no ranges, only a count.
    """

    table: str
    rows: int  # distinct ids the table must hold
    ranges: list[tuple[int, int]] | None = None  # (first id, rows) of every shard read
    skipped: list[int] = field(default_factory=list)  # ids of documents with no loss token
    non_finite: list[int] = field(default_factory=list)  # ids of documents with a NaN/Inf loss or gradient

    @staticmethod
    def uri(run_path: str, table: str) -> str:
        return storage.join(run_path, RECORDS_DIR, f"{table}.json")

    @classmethod
    def of_shards(cls, table: str, ranges: list[tuple[int, int]], skipped: list[int], non_finite: list[int]) -> Completion:
        rows = sum(n for _, n in ranges) - len(skipped) - len(non_finite)
        return cls(table, rows, [tuple(r) for r in ranges], sorted(skipped), sorted(non_finite))

    def expected_ids(self) -> np.ndarray | None:
        """Every id the table must hold, sorted (None when only the count is known)."""
        if self.ranges is None:
            return None
        ids = np.concatenate([np.arange(first, first + n, dtype=np.int64) for first, n in self.ranges] or [np.zeros(0, np.int64)])
        return np.setdiff1d(ids, np.asarray(self.skipped + self.non_finite, np.int64))

    def save(self, run_path: str) -> None:
        storage.write_bytes(self.uri(run_path, self.table), json.dumps(asdict(self)).encode())

    @classmethod
    def load(cls, run_path: str, table: str) -> Completion | None:
        uri = cls.uri(run_path, table)
        if not storage.exists(uri):
            return None
        payload = json.loads(storage.read_bytes(uri))
        return cls(**payload | {"ranges": None if payload["ranges"] is None else [tuple(r) for r in payload["ranges"]]})

    @classmethod
    def clear(cls, run_path: str, table: str) -> None:
        """Mark the table partial: a pass that writes it has started."""
        storage.remove(cls.uri(run_path, table))


class GradientTable(RowTable):
    """A LanceDB table of gradient rows plus the metadata that explains them."""

    def __init__(self, table, meta: TableMeta, uri: str) -> None:
        super().__init__(table, uri, gradient_schema(meta), meta.per_token)
        self.meta = meta
        self.codec = RowCodec.of(meta)

    @classmethod
    def create(cls, uri: str, meta: TableMeta, name: str = GRADIENTS) -> GradientTable:
        """Create the table, or open it for resuming when it holds the same kind of rows."""
        fields = SPACE_FIELDS + VECTOR_FIELDS + ("per_token", "data", "preconditioner", "unit_normalized", "train_time")
        return cls._create_or_resume(uri, name, meta, gradient_schema(meta), lambda t: t.meta.mismatches(meta, fields))

    @classmethod
    def open(cls, uri: str, name: str = GRADIENTS) -> GradientTable:
        """Open an existing table; a missing table or missing metadata is an error."""
        table, raw = cls._open_lance(uri, name, f"run `rayattr build {uri} ...` first")
        return cls(table, TableMeta.from_json(raw, f"table {name!r} in {uri}"), uri)

    def read_matrix(self, batch_size: int = 8192) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, vectors)`` sorted by id (then token position), filled batch by batch."""
        total = self.count()
        vectors = np.empty((total, self.meta.dim), np.float16 if self.meta.dtype == "float16" else np.float32)
        ids = np.empty(total, np.int64)
        pos = np.zeros(total, np.int32)
        columns = ["id", *self.codec.columns] + (["token_pos"] if self.meta.per_token else [])
        row = 0
        for batch in self.iter_batches(columns, batch_size):
            n = batch.num_rows
            ids[row : row + n] = batch.column("id").to_numpy()
            vectors[row : row + n] = self.codec.decode(batch)
            if self.meta.per_token:
                pos[row : row + n] = batch.column("token_pos").to_numpy()
            row += n
        order = np.lexsort((pos[:row], ids[:row]))
        return ids[order], vectors[order]


@dataclass(frozen=True)
class ScoreMeta:
    """What a score table's columns mean: the queries and the scoring settings."""

    width: int  # scores per row: one per query, or one in mean/nearest mode
    per_token: bool
    query_ids: list[int]
    settings: dict[str, Any]  # mode, unit_normalize, preconditioner, query table fingerprint...
    kind: str = SCORES
    format_version: int = FORMAT_VERSION
    rayattr_version: str = __version__

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()


def score_schema(meta: ScoreMeta) -> pa.Schema:
    fields = [pa.field("id", pa.int64()), pa.field("num_tokens", pa.int32())]
    if meta.per_token:
        fields.append(pa.field("token_pos", pa.int32()))
    fields.append(pa.field("scores", pa.list_(pa.float32(), meta.width)))
    return pa.schema(fields, metadata={META_KEY: meta.to_json()})


class ScoreTable(RowTable):
    """Scores of every training row against every query: ``id, num_tokens, [token_pos,] scores[width]``."""

    def __init__(self, table, meta: ScoreMeta, uri: str) -> None:
        super().__init__(table, uri, score_schema(meta), meta.per_token)
        self.meta = meta

    @classmethod
    def create(cls, uri: str, meta: ScoreMeta, name: str) -> ScoreTable:
        """Create the table, or reopen it to resume when it was made with the same settings."""
        return cls._create_or_resume(uri, name, meta, score_schema(meta),
                                     lambda t: [] if t.meta == meta else ["queries or scoring settings"])

    @classmethod
    def open(cls, uri: str, name: str = SCORES) -> ScoreTable:
        table, raw = cls._open_lance(uri, name, f"run `rayattr score {uri} ...` first")
        payload = json.loads(raw)
        payload.pop("format_version", None), payload.pop("rayattr_version", None)
        return cls(table, ScoreMeta(**payload), uri)


def read_topk(run_path: str) -> tuple[TopK, np.ndarray]:
    """The ``topk`` table of a run as ``(TopK, query ids)`` in the score table's query order."""
    if not table_exists(run_path, TOPK):
        raise RayattrError(f"no topk table in {run_path}; run `rayattr score` or `rayattr trackstar` first")
    table = connect(run_path).open_table(TOPK).to_arrow()
    query_ids = np.asarray(json.loads(table.schema.metadata[META_KEY])["query_ids"], np.int64)
    rows = table.sort_by([("query_id", "ascending"), ("rank", "ascending")])
    width = len(query_ids)
    order = np.argsort(np.argsort(query_ids))  # position of each query among the sorted query ids
    ids = rows.column("id").to_numpy().reshape(width, -1)[order]
    scores = rows.column("score").to_numpy().reshape(width, -1)[order]
    return TopK(ids.shape[1], ids, scores), query_ids
