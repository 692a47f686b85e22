"""The parts of a token stream that Ray's own processes unpickle, kept apart from the model code.

A worker group's stream passes through Ray Train's dataset manager and Ray Data's split
coordinator, which only hand blocks on, yet unpickle the stream's plan (``read_and_tokenize``)
and its split (``WholeSplit``). Defined beside the model code (``rayattr.ray.pipeline``,
``rayattr.ray.zero``), they made each of those processes import torch, transformers and LanceDB
first: seconds before a group's first batch, and some 300 MB each. This module imports none of
them; the tasks that tokenize load the tokenizer when they first do.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import ray
from ray.train import DataConfig

from rayattr.config import DataSpec
from rayattr.data import Shard, read_shard, tokenize
from rayattr.tokenizer import load_tokenizer


def read_and_tokenize(shards: pa.Table, data: DataSpec, tokenizer_name: str, revision: str | None, max_length: int,
                      baselines: dict[str, float] | None = None) -> Iterator[pa.Table]:
    """Ray Data UDF: read each shard (skipping ids already written) and tokenize it."""
    tokenizer = load_tokenizer(tokenizer_name, revision)
    for item in shards.to_pylist():
        done = set(item.pop("done_ids") or ())
        for table in read_shard(data, Shard(**item)):
            if done:
                keep = np.fromiter((i not in done for i in table.column("id").to_numpy()), bool, table.num_rows)
                table = table.filter(pa.array(keep))
            if table.num_rows:
                yield tokenize(table, data, tokenizer, max_length, baselines)


class WholeSplit(DataConfig):
    """Split the stream between the workers without dropping rows.

    Ray Train's default split evens the shards out by dropping the remainder;
    every document must be seen here, and the lock-step already absorbs
    uneven shards.
    """

    def configure(self, datasets: dict, world_size: int, worker_handles: list | None,
                  worker_node_ids: list | None, **kwargs) -> list[dict]:
        shards: list[dict] = [{} for _ in range(world_size)]
        for name, dataset in datasets.items():
            dataset = ray.data.Dataset.copy(dataset)
            dataset.context.execution_options = self._resolve_execution_options(name)
            for rank, split in enumerate(dataset.streaming_split(world_size, equal=False, locality_hints=worker_node_ids)):
                shards[rank][name] = split
        return shards
