"""Sources, shards, tokenization and batching: every source yields the same rows and ids."""

from __future__ import annotations

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rayattr.config import DataSpec, RayattrError
from rayattr.data import (
    SHARD_ROWS, balance_shards, parse_split, plan_shards, read_shard, token_budget_batches, tokenize,
)

TEXTS = [f"document number {i} " + "word " * (i % 7) for i in range(2500)]


def _rows(spec: DataSpec, parts: int = 1) -> tuple[list[int], list[str]]:
    ids, texts = [], []
    for shard in balance_shards(plan_shards(spec), parts):
        assert shard.num_rows <= SHARD_ROWS
        for table in read_shard(spec, shard, batch_rows=300):
            ids += table.column("id").to_pylist()
            texts += table.column(spec.text_column).to_pylist()
    return ids, texts


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("sources")
    table = pa.table({"text": TEXTS, "other": list(range(len(TEXTS)))})
    parquet_dir = root / "parquet"
    parquet_dir.mkdir()
    # Two files with uneven row groups, so shards cross file and group boundaries.
    pq.write_table(table.slice(0, 1700), parquet_dir / "part-0.parquet", row_group_size=1300)
    pq.write_table(table.slice(1700), parquet_dir / "part-1.parquet", row_group_size=500)
    datasets.Dataset(table).save_to_disk(str(root / "disk"))
    datasets.DatasetDict({"train": datasets.Dataset(table)}).save_to_disk(str(root / "disk_dict"))
    datasets.Dataset(table).to_json(str(root / "data.jsonl"))
    return {"parquet": str(parquet_dir), "disk": str(root / "disk"), "disk_dict": str(root / "disk_dict"),
            "jsonl": str(root / "data.jsonl")}


@pytest.mark.parametrize("kind", ["parquet", "disk", "disk_dict", "jsonl"])
@pytest.mark.parametrize(("split", "lo", "hi"), [("train", 0, 2500), ("train[1250:2100]", 1250, 2100), ("train[:7]", 0, 7)])
def test_every_source_yields_the_same_rows_with_ids(sources, kind, split, lo, hi):
    ids, texts = _rows(DataSpec(sources[kind], split=split))
    assert ids == list(range(lo, hi))
    assert texts == TEXTS[lo:hi]


@pytest.mark.parametrize("kind", ["parquet", "disk"])
@pytest.mark.parametrize(("split", "lo", "hi"), [("train", 0, 2500), ("train[1250:2100]", 1250, 2100), ("train[:7]", 0, 7)])
def test_balanced_shards_yield_the_same_rows(sources, kind, split, lo, hi):
    """Shards cut for more workers (also inside a row group, at an offset) read the same rows."""
    spec = DataSpec(sources[kind], split=split)
    shards = balance_shards(plan_shards(spec), 24)
    assert len(shards) >= min(24, (hi - lo) // 16) and max(s.num_rows for s in shards) <= max(16, -(-(hi - lo) // 24))
    assert _rows(spec, parts=24) == (list(range(lo, hi)), TEXTS[lo:hi])


def test_enough_shards_are_left_alone(sources):
    shards = plan_shards(DataSpec(sources["parquet"]))
    assert balance_shards(shards, len(shards)) == shards


def test_parse_split():
    assert parse_split("train") == ("train", 0, None)
    assert parse_split("validation[10:20]") == ("validation", 10, 20)
    assert parse_split("train[:5]") == ("train", 0, 5)
    with pytest.raises(RayattrError, match="negative"):
        parse_split("train[-5:]")
    with pytest.raises(RayattrError, match="cannot parse"):
        parse_split("train[1:2:3]")


def test_missing_dataset_and_column_are_named(sources, tmp_path):
    with pytest.raises(RayattrError, match=r"no column \['body'\].*--text-column"):
        plan_shards(DataSpec(sources["parquet"], text_column="body"))
    with pytest.raises(RayattrError, match="completion-column"):
        plan_shards(DataSpec(sources["parquet"], prompt_column="text", completion_column="answer"))
    with pytest.raises(RayattrError, match="cannot load dataset"):
        plan_shards(DataSpec(str(tmp_path / "nowhere")))


def test_tokenize_masks_prompt_and_refuses_overlong(fixture_tokenizer):
    table = pa.table({"id": [3, 9], "prompt": ["Ana was born in", ""], "completion": [" Lisbon.", " Oslo."]})
    spec = DataSpec("unused", prompt_column="prompt", completion_column="completion")
    out = tokenize(table, spec, fixture_tokenizer, max_length=64)
    prompt_len = len(fixture_tokenizer("Ana was born in")["input_ids"])
    completion = fixture_tokenizer(" Lisbon.", add_special_tokens=False)["input_ids"]
    assert out.column("id").to_pylist() == [3, 9]
    assert out.column("input_ids")[0].as_py()[prompt_len:] == completion
    assert out.column("label_start").to_pylist()[0] == prompt_len
    assert out.column("label_start").to_pylist()[1] == 1  # an empty prompt still never targets token 0
    long = pa.table({"id": [0, 1], "text": ["short", "a b c d e f g h i j k l m n o p"]})
    with pytest.raises(RayattrError, match=r"longer than --max-length 4 \(e.g. id 1 has \d+ tokens\).*--truncation"):
        tokenize(long, DataSpec("unused"), fixture_tokenizer, max_length=4)
    cut = tokenize(long, DataSpec("unused", truncation=True), fixture_tokenizer, max_length=4)
    assert cut.column("num_tokens").to_pylist()[1] == 4


def test_token_budget_batches_respect_budget_and_cover_every_doc():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 300, size=500)
    batches = token_budget_batches(lengths, 1024)
    covered = np.sort(np.concatenate(batches))
    np.testing.assert_array_equal(covered, np.arange(500))
    for batch in batches:
        assert len(batch) * lengths[batch].max() <= 1024
    # A document longer than the budget travels alone.
    assert [len(b) for b in token_budget_batches(np.array([5000, 3, 3]), 1024)] == [1, 2]
