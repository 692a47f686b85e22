"""Documents in, token sequences out: sources, shards, tokenization, batching.

A dataset is split into shards (a parquet row group, or a fixed range of rows
of a Hugging Face dataset) that any worker can read by itself, so nothing is
collected on the driver and no shared filesystem is assumed: parquet is read
through ``pyarrow.fs`` (local paths, ``s3://``, ``gs://``...), and Hugging Face
datasets (hub names, ``save_to_disk`` directories, json/jsonl/csv files) are
opened memory-mapped in each process. Every row keeps its index in the full
split as ``id``, which makes writes idempotent and runs resumable.
"""

from __future__ import annotations

import dataclasses

import functools
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rayattr.chat import advantages, conversation_texts, group_keys, messages_of, rewards_of, tokenize_conversations
from rayattr.config import DataSpec, RayattrError

SHARD_ROWS = 1024  # rows per shard: the unit of parallelism and of resume bookkeeping
_SPLIT = re.compile(r"^(?P<name>[\w\-.]+)(\[(?P<start>-?\d*):(?P<stop>-?\d*)\])?$")


@dataclass(frozen=True)
class Shard:
    """A contiguous run of rows that one task reads on its own."""

    first_id: int
    num_rows: int
    path: str = ""  # parquet file; empty for Hugging Face datasets
    row_group: int = -1
    offset: int = 0  # rows to skip at the start of the row group


@dataclass
class TokenizedDocs:
    """Token sequences of a set of documents, in columns."""

    ids: np.ndarray  # int64 [N]
    tokens: list[np.ndarray]  # int64 each
    label_start: np.ndarray  # int64 [N]: tokens at positions >= label_start are loss targets
    label_masks: list[np.ndarray] | None = None  # bool per token (conversations): targets also need True here
    loss_weights: np.ndarray | None = None  # float32 [N] (rewards): each document's loss is scaled by it

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, index: np.ndarray | slice) -> TokenizedDocs:
        """The documents at ``index``, every column with them."""
        picked = np.arange(len(self))[index]
        return TokenizedDocs(
            self.ids[picked], [self.tokens[i] for i in picked], self.label_start[picked],
            None if self.label_masks is None else [self.label_masks[i] for i in picked],
            None if self.loss_weights is None else self.loss_weights[picked],
        )

    @classmethod
    def from_arrow(cls, table: pa.Table) -> TokenizedDocs:
        """Rebuild from a tokenized Arrow table without per-row Python conversion."""
        names = table.schema.names
        return cls(
            ids=table.column("id").to_numpy().astype(np.int64),
            tokens=_lists(table, "input_ids", np.int64),
            label_start=table.column("label_start").to_numpy().astype(np.int64),
            label_masks=_lists(table, "label_mask", np.bool_) if "label_mask" in names else None,
            loss_weights=table.column("loss_weight").to_numpy().astype(np.float32) if "loss_weight" in names else None,
        )


def _lists(table: pa.Table, name: str, dtype: type) -> list[np.ndarray]:
    """A list column as one numpy view per row (the values converted once, not per row)."""
    column = table.column(name).combine_chunks()
    offsets = column.offsets.to_numpy()
    values = column.values.to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    return [values[offsets[i] : offsets[i + 1]] for i in range(len(column))]


def parse_split(split: str) -> tuple[str, int, int | None]:
    """``'train[10:20]'`` -> ``('train', 10, 20)``; open ends become 0 / None."""
    match = _SPLIT.match(split.strip())
    if not match:
        raise RayattrError(f"cannot parse --split {split!r}; use a name with an optional slice, e.g. 'train[:1000]'")
    start, stop = match["start"], match["stop"]
    if (start and int(start) < 0) or (stop and int(stop) < 0):
        raise RayattrError(f"--split {split!r}: negative slice bounds are not supported")
    return match["name"], int(start or 0), int(stop) if stop else None


def _is_parquet(dataset: str) -> bool:
    if dataset.endswith(".parquet"):
        return True
    fs, path = _filesystem(dataset)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.Directory:
        return False
    return any(f.path.endswith(".parquet") for f in fs.get_file_info(pafs.FileSelector(path, recursive=True)))


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), str(uri)


def _parquet_files(dataset: str) -> tuple[pafs.FileSystem, list[str]]:
    fs, path = _filesystem(dataset)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise RayattrError(f"dataset {dataset!r} does not exist")
    if info.type == pafs.FileType.File:
        return fs, [path]
    files = sorted(f.path for f in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if f.path.endswith(".parquet"))
    return fs, files


@functools.lru_cache(maxsize=4)
def _hf_dataset(dataset: str, subset: str | None, split_name: str):
    """Open a Hugging Face dataset memory-mapped (once per process)."""
    import datasets

    local = _filesystem(dataset)[0].get_file_info(dataset).type != pafs.FileType.NotFound if "://" not in dataset else False
    try:
        if local and any(dataset.endswith(ext) for ext in (".json", ".jsonl", ".csv")):
            kind = "csv" if dataset.endswith(".csv") else "json"
            return datasets.load_dataset(kind, data_files=dataset, split="train")
        if local:
            loaded = datasets.load_from_disk(dataset)
            if isinstance(loaded, datasets.DatasetDict):
                if split_name not in loaded:
                    raise RayattrError(f"dataset {dataset!r} has no split {split_name!r}; it has {list(loaded)}")
                return loaded[split_name]
            return loaded
        return datasets.load_dataset(dataset, subset, split=split_name)
    except RayattrError:
        raise
    except Exception as exc:  # noqa: BLE001 - the loader's own errors are varied; name the input instead
        raise RayattrError(
            f"cannot load dataset {dataset!r} ({type(exc).__name__}: {exc}); pass a parquet file/dir, "
            "a save_to_disk directory, a .json/.jsonl/.csv file, or a Hugging Face hub name"
        ) from exc


def plan_shards(spec: DataSpec) -> list[Shard]:
    """Check the dataset (columns, rows) and cut it into independently readable shards."""
    split_name, start, stop = parse_split(spec.split)
    if _is_parquet(spec.dataset):
        fs, files = _parquet_files(spec.dataset)
        if not files:
            raise RayattrError(f"dataset directory {spec.dataset!r} holds no .parquet files")
        columns = pq.read_schema(files[0], filesystem=fs).names
        pieces = []
        first_id = 0
        for path in files:
            metadata = pq.ParquetFile(path, filesystem=fs).metadata
            for group in range(metadata.num_row_groups):
                rows = metadata.row_group(group).num_rows
                pieces += [Shard(first_id + lo, min(SHARD_ROWS, rows - lo), path, group, lo) for lo in range(0, rows, SHARD_ROWS)]
                first_id += rows
        total = first_id
    else:
        table = _hf_dataset(spec.dataset, spec.subset, split_name)
        columns = table.column_names
        total = len(table)
        pieces = [Shard(i, min(SHARD_ROWS, total - i)) for i in range(0, total, SHARD_ROWS)]
    _check_columns(spec, columns)
    stop = total if stop is None else min(stop, total)
    shards = [clipped for piece in pieces if (clipped := _clip(piece, start, stop)) is not None]
    if not shards:
        raise RayattrError(f"dataset {spec.dataset!r} split {spec.split!r} has no rows; check --split and the data")
    return shards


def _check_columns(spec: DataSpec, available: list[str]) -> None:
    missing = [c for c in spec.columns if c not in available]
    if missing:
        flag = ("--reward-column" if missing == [spec.reward_column] else "--conversation-column"
                if spec.conversation_column else "--completion-column/--prompt-column" if spec.completion_column
                else "--text-column")
        raise RayattrError(f"dataset {spec.dataset!r} has no column {missing}; it has {available}. Pass {flag} NAME")


def _clip(shard: Shard, start: int, stop: int) -> Shard | None:
    lo, hi = max(shard.first_id, start), min(shard.first_id + shard.num_rows, stop)
    if lo >= hi:
        return None
    return Shard(lo, hi - lo, shard.path, shard.row_group, shard.offset + lo - shard.first_id)


def balance_shards(shards: list[Shard], parts: int, min_rows: int = 16) -> list[Shard]:
    """Cut shards smaller when there are fewer than ``parts`` of them.

    A shard is one task and one Ray Data block, which no two actors share: a
    dataset of a few shards would keep one actor busy while the others idle,
    and report progress once per shard. Only small datasets are cut (large
    ones already have many shards), so re-decoding a row group's earlier rows
    to reach a piece stays cheap.
    """
    if len(shards) >= parts:
        return shards
    rows = max(min_rows, -(-sum(s.num_rows for s in shards) // parts))
    return [
        dataclasses.replace(shard, first_id=shard.first_id + lo, num_rows=min(rows, shard.num_rows - lo), offset=shard.offset + lo)
        for shard in shards for lo in range(0, shard.num_rows, rows)
    ]


def read_shard(spec: DataSpec, shard: Shard, batch_rows: int = SHARD_ROWS,
               columns: list[str] | None = None) -> Iterator[pa.Table]:
    """Stream a shard's rows (``columns``, by default those the spec reads, plus ``id``) in batches.

    A shard inside a large parquet row group is reached by decoding the group's
    earlier rows; with ``batch_rows == SHARD_ROWS`` that is whole-batch skips.
    """
    split_name = parse_split(spec.split)[0]
    columns = columns or spec.columns
    if shard.path:
        fs, _ = _filesystem(spec.dataset)
        reader = pq.ParquetFile(shard.path, filesystem=fs)
        seen = 0  # rows of the row group already passed
        for batch in reader.iter_batches(batch_size=batch_rows, row_groups=[shard.row_group], columns=columns):
            lo, hi = max(shard.offset - seen, 0), min(shard.offset + shard.num_rows - seen, batch.num_rows)
            if lo < hi:
                first = shard.first_id + seen + lo - shard.offset
                yield _with_ids(pa.Table.from_batches([batch.slice(lo, hi - lo)]), first)
            seen += batch.num_rows
            if seen >= shard.offset + shard.num_rows:
                return
    else:
        table = _hf_dataset(spec.dataset, spec.subset, split_name).with_format("arrow")
        for lo in range(shard.first_id, shard.first_id + shard.num_rows, batch_rows):
            hi = min(lo + batch_rows, shard.first_id + shard.num_rows)
            yield _with_ids(table[lo:hi].select(columns), lo)


def _with_ids(table: pa.Table, first_id: int) -> pa.Table:
    return table.append_column("id", pa.array(np.arange(first_id, first_id + table.num_rows, dtype=np.int64)))


def tokenize(table: pa.Table, spec: DataSpec, tokenizer, max_length: int,
             baselines: dict[str, float] | None = None) -> pa.Table:
    """Tokenize rows into ``id, input_ids, label_start, num_tokens`` (+ ``label_mask``, ``loss_weight``).

    Plain documents are targets from their second token on; prompt/completion
    rows are targets on the completion only; conversations on their assistant
    tokens (``label_mask``). With a reward column, ``loss_weight`` is each row's
    advantage over ``baselines`` (``reward_baselines``); a NaN reward, when
    skipped, leaves its row no target, so it is counted with the skipped ones.
    Documents longer than ``max_length`` are an error unless ``spec.truncation`` is set.
    """
    ids = table.column("id").to_numpy()
    masks = None
    if spec.conversation_column:
        column = table.column(spec.conversation_column).to_pylist()
        conversations = [messages_of(value, int(i), spec.conversation_column) for value, i in zip(column, ids)]
        sequences, masks = tokenize_conversations(tokenizer, conversations)
        label_start = [1] * len(sequences)
    elif spec.completion_column:
        prompts = _texts(table, spec.prompt_column or spec.text_column)
        completions = _texts(table, spec.completion_column)
        prompt_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
        completion_ids = tokenizer(completions, add_special_tokens=False)["input_ids"]
        sequences = [p + c for p, c in zip(prompt_ids, completion_ids)]
        label_start = [max(len(p), 1) for p in prompt_ids]
    else:
        sequences = tokenizer(_texts(table, spec.text_column), add_special_tokens=True)["input_ids"]
        label_start = [1] * len(sequences)
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    too_long = np.flatnonzero(lengths > max_length)
    if too_long.size and not spec.truncation:
        worst = too_long[np.argmax(lengths[too_long])]
        raise RayattrError(
            f"{too_long.size} document(s) are longer than --max-length {max_length} (e.g. id {ids[worst]} has "
            f"{lengths[worst]} tokens); pass --truncation to cut them or raise --max-length"
        )
    sequences = [s[:max_length] for s in sequences]
    columns = {
        "id": pa.array(ids, pa.int64()),
        "input_ids": pa.array(sequences, pa.list_(pa.int32())),
        "label_start": pa.array(label_start, pa.int32()),
        "num_tokens": pa.array([len(s) for s in sequences], pa.int32()),
    }
    if spec.reward_column:
        weights = advantages(table, spec, baselines)
        label_start = np.where(np.isnan(weights), lengths, label_start)  # a skipped NaN reward: no target
        columns["label_start"] = pa.array(label_start, pa.int32())
        columns["loss_weight"] = pa.array(np.nan_to_num(weights), pa.float32())
    if masks is not None:
        columns["label_mask"] = pa.array([m[:max_length] for m in masks], pa.list_(pa.bool_()))
    return pa.table(columns)


RewardSums = dict[str, tuple[float, int]]  # prompt group -> (sum of its finite rewards, their count)


def shard_reward_sums(spec: DataSpec, shard: Shard) -> RewardSums:
    """One shard's reward sums per prompt group (NaN rewards left out), from the group and reward columns only."""
    sums: dict[str, tuple[float, int]] = {}
    for table in read_shard(spec, shard, columns=[*spec.document_columns, spec.reward_column]):
        for key, reward in zip(group_keys(table, spec), rewards_of(table, spec)):
            if not np.isnan(reward):
                total, count = sums.get(key, (0.0, 0))
                sums[key] = (total + float(reward), count + 1)
    return sums


def reward_baselines(spec: DataSpec, shard_sums: Callable[[list[Shard]], Iterable[RewardSums]] | None = None,
                     ) -> dict[str, float] | None:
    """Mean reward per prompt group over the whole split, or None without a reward column.

    ``shard_sums`` maps ``shard_reward_sums`` over the shards (the Ray layer runs it
    as tasks; by default it runs here); only one number per distinct prompt
    reaches the caller, never the rows.
    """
    if not spec.reward_column:
        return None
    shards = plan_shards(spec)
    parts = shard_sums(shards) if shard_sums else (shard_reward_sums(spec, shard) for shard in shards)
    merged: dict[str, tuple[float, int]] = {}
    for part in parts:
        for key, (total, count) in part.items():
            seen_total, seen_count = merged.get(key, (0.0, 0))
            merged[key] = (seen_total + total, seen_count + count)
    return {key: total / count for key, (total, count) in merged.items()}


def _texts(table: pa.Table, column: str) -> list[str]:
    return ["" if text is None else str(text) for text in table.column(column).to_pylist()]


def token_budget_batches(lengths: np.ndarray, token_batch_size: int) -> list[np.ndarray]:
    """Group documents so that ``batch size x longest length <= token_batch_size``.

    Sorting by length first keeps padding small; a document longer than the
    budget gets a batch of its own.
    """
    order = np.argsort(-lengths, kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    while start < len(order):
        longest = max(int(lengths[order[start]]), 1)
        size = max(token_batch_size // longest, 1)
        batches.append(order[start : start + size])
        start += size
    return batches


def read_rows(data: DataSpec, ids: np.ndarray, columns: list[str] | None = None) -> pa.Table:
    """The rows of dataset ``ids`` (``id`` plus ``columns``, default the spec's), in the order asked.

    Only the shards holding some of the ids are read, each from its first to
    its last wanted row, so showing the training text of a few search hits
    does not scan the dataset.
    """
    ids = np.asarray(ids, dtype=np.int64)
    wanted = np.unique(ids)
    pieces = []
    for shard in plan_shards(data):
        inside = wanted[(wanted >= shard.first_id) & (wanted < shard.first_id + shard.num_rows)]
        if inside.size:
            narrowed = _clip(shard, int(inside[0]), int(inside[-1]) + 1)
            for table in read_shard(data, narrowed, columns=columns):
                pieces.append(table.filter(pa.array(np.isin(table.column("id").to_numpy(), inside))))
    found = pa.concat_tables(pieces).sort_by("id") if pieces else pa.table({"id": pa.array([], pa.int64())})
    found_ids = found.column("id").to_numpy()
    missing = np.setdiff1d(wanted, found_ids)
    if missing.size:
        raise RayattrError(
            f"dataset {data.dataset!r} split {data.split!r} has no row id(s) {missing[:5].tolist()}; "
            "the dataset changed since the index was built: point to the data it was built from"
        )
    return found.take(np.searchsorted(found_ids, ids))


def row_texts(table: pa.Table, spec: DataSpec) -> list[str]:
    """Each row's document as the model reads it (prompt and completion joined), for display."""
    if spec.conversation_column:
        return conversation_texts(table, spec.conversation_column)
    return ["".join(parts) for parts in zip(*(_texts(table, column) for column in spec.document_columns))]


def sample_split(split: str, sample_size: int | None) -> str:
    """``train`` + N -> ``train[:N]`` (the first N rows); a sliced split keeps its start; None keeps all."""
    if sample_size is None:
        return split
    name, start, stop = parse_split(split)
    stop = start + sample_size if stop is None else min(stop, start + sample_size)
    return f"{name}[{start}:{stop}]"
