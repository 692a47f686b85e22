"""LanceDB gradient tables: round trips, metadata, compatibility and float16 storage."""

from __future__ import annotations

import dataclasses
import json

import lance
import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute in the dedup test
import pytest

from helpers import make_meta
from rayattr import __version__
from rayattr.codec import RowCodec
from rayattr.config import DataSpec, GradSpec, ModelSpec, RayattrError
from rayattr.data import TokenizedDocs
from rayattr.grads.engine import GradientEngine, GradientRows
from rayattr.model import model_fingerprint
from rayattr.store import (
    FORMAT_VERSION,
    GRADIENTS,
    META_KEY,
    GradientTable,
    gradient_schema,
    require_compatible,
)

F16_MAX = 65504.0


def make_rows(ids, dim: int, seed: int, dtype=np.float32, token_pos=None) -> GradientRows:
    rng = np.random.default_rng(seed)
    ids = np.asarray(ids, dtype=np.int64)
    grads = (rng.standard_normal((len(ids), dim)) * 10).astype(dtype)
    return GradientRows(
        ids=ids,
        num_tokens=(ids % 7 + 2).astype(np.int32),
        loss=rng.random(len(ids)).astype(np.float32),
        grads=grads,
        token_pos=None if token_pos is None else np.asarray(token_pos, dtype=np.int32),
    )


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("row_dtype", [np.float32, np.float16])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip(tmp_path, dtype, row_dtype):
    uri = str(tmp_path / "run")
    meta = make_meta(dtype)
    table = GradientTable.create(uri, meta)
    assert table.count() == 0
    parts = [make_rows([30, 2, 17], 12, 0, row_dtype), make_rows([5, 41], 12, 1, row_dtype), make_rows([0, 23, 9, 11], 12, 2, row_dtype)]
    for part in parts:
        table.append(part.to_arrow())
    table.append(make_rows([], 12, 3, row_dtype).to_arrow())  # an empty append is a no-op

    reopened = GradientTable.open(uri)
    all_ids = np.concatenate([p.ids for p in parts])
    assert reopened.count() == table.count() == len(all_ids)
    assert sorted(np.concatenate(list(reopened.iter_ids(batch_size=4))).tolist()) == sorted(all_ids.tolist())

    ids, vectors = reopened.read_matrix(batch_size=3)  # several read batches
    order = np.argsort(all_ids)
    np.testing.assert_array_equal(ids, all_ids[order])
    want = np.concatenate([p.grads for p in parts])[order]
    expected_dtype = np.float16 if dtype == "float16" else np.float32
    assert vectors.dtype == expected_dtype and vectors.shape == (len(all_ids), 12)
    np.testing.assert_array_equal(vectors, want.astype(expected_dtype))  # exact after the cast

    # The other columns survive as written.
    stored = reopened.table.to_arrow().sort_by("id")
    np.testing.assert_array_equal(stored.column("num_tokens").to_numpy(), np.concatenate([p.num_tokens for p in parts])[order])
    np.testing.assert_array_equal(stored.column("loss").to_numpy(), np.concatenate([p.loss for p in parts])[order])
    assert stored.schema.field("grad").type == pa.list_(pa.float16() if dtype == "float16" else pa.float32(), 12)


def test_round_trip_per_token_sorted_by_id_then_position(tmp_path):
    uri = str(tmp_path / "run")
    meta = make_meta("float32", dim=4, per_token=True)
    table = GradientTable.create(uri, meta)
    table.append(make_rows([7, 7, 3], 4, 0, token_pos=[1, 0, 2]).to_arrow())
    table.append(make_rows([3, 7, 3], 4, 1, token_pos=[0, 2, 1]).to_arrow())
    ids, vectors = GradientTable.open(uri).read_matrix()
    np.testing.assert_array_equal(ids, [3, 3, 3, 7, 7, 7])
    first, second = make_rows([7, 7, 3], 4, 0).grads, make_rows([3, 7, 3], 4, 1).grads
    expected = np.stack([second[0], second[2], first[2], first[1], first[0], second[1]])
    np.testing.assert_array_equal(vectors, expected)


def test_metadata_round_trip(tmp_path):
    uri = str(tmp_path / "run")
    meta = make_meta("float16", normalizer="adam", preconditioner="kfac", unit_normalized=True)
    GradientTable.create(uri, meta).append(make_rows([1, 2], 12, 0).to_arrow())
    reopened = GradientTable.open(uri)
    assert reopened.meta == meta
    assert (reopened.meta.format_version, reopened.meta.rayattr_version) == (FORMAT_VERSION, __version__)
    # Plain lancedb sees the same JSON description in the schema metadata.
    raw = lancedb.connect(uri).open_table(GRADIENTS).schema.metadata[META_KEY]
    assert json.loads(raw) == dataclasses.asdict(meta)


def test_engine_meta_round_trip(tmp_path, load_fixture_model, offline_fixture):
    model = load_fixture_model("gpt2")
    engine = GradientEngine(model, GradSpec(projection_dim=4, seed=2, modules=("*.c_fc",)), pad_token_id=0)
    try:
        data = DataSpec(dataset=str(offline_fixture.train), split="train[:4]")
        meta = engine.table_meta(model_fingerprint(model, ModelSpec(str(offline_fixture.gpt2))), data)
        docs = TokenizedDocs(np.array([4, 1]), [np.array([5, 6, 7]), np.array([8, 9, 10, 11])], np.array([1, 1]))
        rows = engine.rows(docs)
    finally:
        engine.close()
    assert meta.dim == 2 * 16 and [m["name"] for m in meta.modules] == ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]
    uri = str(tmp_path / "run")
    table = GradientTable.create(uri, meta)
    table.append(rows.to_arrow())
    reopened = GradientTable.open(uri)
    assert reopened.meta == meta
    ids, vectors = reopened.read_matrix()
    np.testing.assert_array_equal(ids, [1, 4])
    np.testing.assert_array_equal(vectors, rows.grads[[1, 0]])


# ----------------------------------------------------------------------------- opening errors


def test_open_table_without_metadata_raises(tmp_path):
    uri = str(tmp_path / "plain")
    lancedb.connect(uri).create_table(GRADIENTS, data=pa.table({"id": pa.array([1, 2], pa.int64()), "x": [0.5, 1.5]}))
    with pytest.raises(RayattrError, match="metadata"):
        GradientTable.open(uri)


def test_open_missing_table_raises(tmp_path):
    with pytest.raises(RayattrError, match="no table 'gradients'"):
        GradientTable.open(str(tmp_path / "empty"))
    uri = str(tmp_path / "other")
    GradientTable.create(uri, make_meta(), name="query")
    with pytest.raises(RayattrError, match="no table 'gradients'"):
        GradientTable.open(uri)
    assert GradientTable.open(uri, name="query").meta == make_meta()


def test_newer_format_version_raises(tmp_path):
    uri = str(tmp_path / "future")
    future = make_meta(format_version=FORMAT_VERSION + 1, rayattr_version="99.0.0")
    lancedb.connect(uri).create_table(GRADIENTS, schema=gradient_schema(future))
    with pytest.raises(RayattrError, match="upgrade") as info:
        GradientTable.open(uri)
    assert "99.0.0" in str(info.value)
    # The current format (and older ones) open fine.
    current = str(tmp_path / "current")
    lancedb.connect(current).create_table(GRADIENTS, schema=gradient_schema(make_meta()))
    assert GradientTable.open(current).meta.format_version == FORMAT_VERSION


# ----------------------------------------------------------------------------- compatibility


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("projection", {"type": "normal", "dim": 0, "seed": 0, "fingerprint": GradSpec(projection_dim=0, projection_type="normal").projection_fingerprint()}),
        ("model", {"name": "tiny", "revision": "", "config": "c0ffee", "weights": "other"}),
        ("modules", make_meta().modules[:1]),
        ("normalizer", "adafactor"),
    ],
)
def test_require_compatible_names_differing_field(field, value):
    index = make_meta()
    query = dataclasses.replace(index, **{field: value})
    with pytest.raises(RayattrError, match=f"disagree on {field}"):
        require_compatible(index, query)
    with pytest.raises(RayattrError, match=field):
        require_compatible(query, index)


def test_require_compatible_passes_for_equal_metas():
    require_compatible(make_meta(), make_meta())
    # Queries and indexes naturally differ in data, storage dtype and granularity.
    require_compatible(
        make_meta(), make_meta(dtype="float16", per_token=True, data={"dataset": "queries.parquet"})
    )


def test_create_existing_table_resumes_or_refuses(tmp_path):
    uri = str(tmp_path / "run")
    meta = make_meta()
    GradientTable.create(uri, meta).append(make_rows([3, 1], 12, 0).to_arrow())
    resumed = GradientTable.create(uri, make_meta())  # same settings: reopened, rows kept
    assert resumed.count() == 2 and resumed.meta == meta
    resumed.append(make_rows([2], 12, 1).to_arrow())
    ids, _ = GradientTable.open(uri).read_matrix()
    np.testing.assert_array_equal(ids, [1, 2, 3])
    for changed in (
        {"projection": {"type": "normal", "dim": 8, "seed": 0, "fingerprint": "x"}},
        {"dtype": "float16"},
        {"data": {"dataset": "other.parquet", "split": "train"}},
        {"per_token": True},
    ):
        (name,) = changed
        with pytest.raises(RayattrError, match=rf"other settings \({name}\)"):
            GradientTable.create(uri, dataclasses.replace(meta, **changed))
    assert GradientTable.open(uri).count() == 3


# ----------------------------------------------------------------------------- float16 storage


def test_float16_storage_clamps_to_its_range():
    grads = np.array([[1e6, -1e6, 1.5, 65504.0], [np.float32(7e4), -7e4, 0.0, -3.25]], dtype=np.float32)
    stored, _ = RowCodec("float16", 4).encode(grads)
    assert stored.dtype == np.float16
    assert np.isfinite(stored).all()
    np.testing.assert_array_equal(stored, np.array([[F16_MAX, -F16_MAX, 1.5, F16_MAX], [F16_MAX, -F16_MAX, 0, -3.25]], np.float16))
    # float32 storage keeps the values untouched.
    np.testing.assert_array_equal(RowCodec("float32", 4).encode(grads)[0], grads)


def test_engine_float16_rows_clamp_large_gradients(tmp_path, load_fixture_model):
    model = load_fixture_model("neox")
    # Huge inputs to the output head make its weight gradient far exceed float16's range.
    model.gpt_neox.final_layer_norm.weight.data.mul_(1e6)
    docs = TokenizedDocs(np.array([0, 1]), [np.arange(3, 15), np.arange(20, 27)], np.array([1, 1]))
    rows = {}
    for dtype in ("float32", "float16"):
        engine = GradientEngine(model, GradSpec(projection_dim=0, modules=("*lm_head",), dtype=dtype), pad_token_id=0)
        try:
            rows[dtype] = engine.rows(docs)
            meta = engine.table_meta({"name": "neox"}, DataSpec(dataset="x.parquet"))
        finally:
            engine.close()
    full = rows["float32"].grads
    assert np.abs(full).max() > 2e5  # the case really overflows float16
    half = rows["float16"].grads
    assert half.dtype == np.float16 and np.isfinite(half).all()
    assert np.abs(half).max() == F16_MAX
    np.testing.assert_array_equal(half, np.clip(full, -F16_MAX, F16_MAX).astype(np.float16))
    # And the table stores the clamped values.
    uri = str(tmp_path / "run")
    table = GradientTable.create(uri, meta)
    table.append(rows["float16"].to_arrow())
    _, vectors = GradientTable.open(uri).read_matrix()
    assert np.isfinite(vectors).all()
    np.testing.assert_array_equal(vectors, half)


@pytest.mark.parametrize("per_token", [False, True])
def test_deduplicate_keeps_exactly_one_copy(tmp_path, per_token):
    if per_token:
        ids, pos, num_tokens = np.repeat([4, 7, 9], 3), np.tile([0, 1, 2], 3), 4
    else:
        ids, pos, num_tokens = np.array([4, 7, 9, 12]), None, 5
    meta = make_meta(per_token=per_token)
    rows = make_rows(ids, meta.dim, seed=3, token_pos=pos)
    rows.num_tokens[:] = num_tokens
    table = GradientTable.create(str(tmp_path / "run"), meta)
    table.append(rows.to_arrow())
    clean = table.read_matrix()
    # A retried block re-commits the rows of id 7; a leftover actor re-commits id 9 twice.
    again = rows.to_arrow()
    table.append(again.filter(pa.compute.equal(again.column("id"), 7)))
    for _ in range(2):
        table.append(again.filter(pa.compute.equal(again.column("id"), 9)))
    per_id = 3 if per_token else 1
    assert table.count() == len(ids) + 3 * per_id
    assert table.deduplicate() == 3 * per_id
    assert table.count() == len(ids)
    for got, want in zip(table.read_matrix(), clean):
        np.testing.assert_array_equal(got, want)
    assert table.deduplicate() == 0
    table.optimize()  # fragments with deleted rows: compaction re-encodes them
    for got, want in zip(table.read_matrix(), clean):
        np.testing.assert_array_equal(got, want)


def test_deduplicate_scans_only_when_the_row_count_exceeds_the_expected_ids(tmp_path, monkeypatch):
    meta = make_meta()
    rows = make_rows(np.array([4, 7, 9, 12]), meta.dim, seed=3)
    table = GradientTable.create(str(tmp_path / "run"), meta)
    table.append(rows.to_arrow())
    clean = table.read_matrix()
    scans = []
    original = GradientTable.row_counts
    monkeypatch.setattr(GradientTable, "row_counts", lambda self: scans.append(1) or original(self))
    assert table.deduplicate(expected_ids=4) == 0 and not scans  # as many rows as ids: no scan
    again = rows.to_arrow()
    table.append(again.filter(pa.compute.equal(again.column("id"), 7)))  # a retried block
    assert table.deduplicate(expected_ids=4) == 1 and len(scans) == 1
    for got, want in zip(table.read_matrix(), clean):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_optimize_compacts_appends_to_one_fragment_with_the_same_rows(tmp_path, dtype):
    meta = make_meta(dtype=dtype)
    table = GradientTable.create(str(tmp_path / "run"), meta)
    for start in range(0, 40, 8):
        table.append(make_rows(np.arange(start, start + 8), meta.dim, seed=start).to_arrow())
    written = table.read_matrix()
    table.optimize()
    assert len(table.table.to_lance().get_fragments()) == 1
    for got, want in zip(GradientTable.open(str(tmp_path / "run")).read_matrix(), written):
        np.testing.assert_array_equal(got, want)
    version = table.table.version
    table.optimize()  # one fragment: nothing to do, no new version
    assert table.table.version == version


def test_a_create_raced_by_another_worker_loses_no_row(tmp_path):
    """Two workers create the table at once: the later create lands as an overwrite of the empty table. The
    first worker's append (based on the version before) goes to the latest version; once a handle has rows
    in the table, an overwrite is an error instead of a silent loss."""
    meta = make_meta()
    first = GradientTable.create(str(tmp_path), meta)
    empty = gradient_schema(meta).empty_table()
    lance.write_dataset(empty, first.lance_uri, mode="overwrite")  # the other worker's create, committed second
    first.append(make_rows([1, 2], 12, seed=0).to_arrow())
    ids, _ = GradientTable.open(str(tmp_path)).read_matrix()
    assert ids.tolist() == [1, 2]
    lance.write_dataset(empty, first.lance_uri, mode="overwrite")
    with pytest.raises(RayattrError, match="overwritten by another writer"):
        first.append(make_rows([3], 12, seed=1).to_arrow())
