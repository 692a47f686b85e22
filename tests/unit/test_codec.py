"""Row storage codecs: int4 codes against a hand-computed quantizer, packing, tables that store them (no Ray)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pytest

from helpers import make_meta
from rayattr.codec import INT4_STEP, RowCodec, pack_nibbles, quantize_int4, unpack_nibbles
from rayattr.config import GradSpec, RayattrError
from rayattr.data import TokenizedDocs
from rayattr.grads.engine import GradientEngine
from rayattr.search import build_ann_index
from rayattr.store import Completion, GradientTable
from rayattr.verify import verify


def test_nibbles_round_trip_every_code_at_odd_and_even_widths() -> None:
    for dim in (15, 16):
        codes = np.resize(np.arange(-8, 8, dtype=np.int8), (3, dim))
        packed = pack_nibbles(codes)
        assert packed.dtype == np.uint8 and packed.shape == (3, (dim + 1) // 2)
        np.testing.assert_array_equal(unpack_nibbles(packed, dim), codes)
    # low nibble first, two's complement: codes (1, -1) -> 0x01 | 0xF0
    assert pack_nibbles(np.array([[1, -1]], np.int8))[0, 0] == 0xF1


def test_int4_codes_equal_the_midrise_quantizer_written_out() -> None:
    rng = np.random.default_rng(0)
    widths = (6, 10)
    values = rng.standard_normal((4, 16)).astype(np.float32) * np.array([1.0] * 6 + [30.0] * 10, np.float32)
    values[3, :6] = 0.0  # an all-zero block stores zeros
    codes, steps = quantize_int4(values, widths)
    for row in range(4):
        for block, (start, width) in enumerate(((0, 6), (6, 10))):
            x = values[row, start : start + width].astype(np.float64)
            step = np.sqrt(np.mean(x**2)) * INT4_STEP
            assert steps[row, block] == pytest.approx(step, rel=1e-6)
            if step:
                want = np.clip(np.floor(x / step), -8, 7)
                np.testing.assert_array_equal(codes[row, start : start + width], want)
    decoded, _ = RowCodec("int4", 16, widths).encode(values)
    np.testing.assert_array_equal(decoded[3, :6], 0.0)
    inside = np.abs(codes) < 7  # not clipped: within half a step of the value
    step_per_number = np.repeat(steps, widths, axis=1)
    assert (np.abs(decoded - values)[inside] <= 0.5 * step_per_number[inside] * (1 + 1e-6)).all()


def test_int4_error_on_gaussian_rows_is_maxs_optimum() -> None:
    """Max (1960): the 16-level uniform quantizer at step 0.3352 sigma has mean squared error 0.01154 sigma^2."""
    values = np.random.default_rng(1).standard_normal((64, 4096)).astype(np.float32) * 3.0
    decoded, columns = RowCodec("int4", 4096, (4096,)).encode(values)
    relative_mse = np.mean((decoded - values) ** 2) / np.mean(values**2)
    assert 0.0110 < relative_mse < 0.0121
    assert columns["grad"].type == pa.list_(pa.uint8(), 2048) and columns["grad_step"].type == pa.list_(pa.float32(), 1)


def test_int4_table_round_trip_and_verify(tmp_path) -> None:
    uri = str(tmp_path / "run")
    meta = make_meta("int4")  # two modules of width 6: two steps per row
    codec = RowCodec.of(meta)
    assert codec.widths == (6, 6) and codec.bytes_per_row == 6 + 2 * 4
    values = np.random.default_rng(2).standard_normal((5, 12)).astype(np.float32)
    decoded, columns = codec.encode(values)
    table = GradientTable.create(uri, meta)
    table.append(pa.table({"id": pa.array(np.arange(5), pa.int64()), "num_tokens": pa.array([3] * 5, pa.int32()),
                           "loss": pa.array([1.0] * 5, pa.float32()), **columns}))
    ids, vectors = GradientTable.open(uri).read_matrix(batch_size=2)
    np.testing.assert_array_equal(ids, np.arange(5))
    np.testing.assert_array_equal(vectors, decoded)
    Completion.of_shards("gradients", [(0, 5)], [], []).save(uri)
    assert verify(uri).problems == []  # widths and dtypes as the metadata says
    with pytest.raises(RayattrError, match="stores int4 codes.*--dtype float16"):
        build_ann_index(uri)


def test_engine_int4_rows_are_its_float_rows_quantized(load_fixture_model) -> None:
    model = load_fixture_model("neox")
    docs = TokenizedDocs(np.array([0, 1, 2]), [np.arange(5, 12), np.arange(20, 24), np.arange(40, 49)], np.ones(3, np.int64))
    spec = GradSpec(projection_dim=4, modules=("*dense*",), dtype="int4")
    rows = {}
    for dtype in ("float32", "int4"):
        engine = GradientEngine(model, dataclasses.replace(spec, dtype=dtype), pad_token_id=0)
        try:
            rows[dtype], codec = engine.rows(docs), engine.codec
        finally:
            engine.close()
    assert codec.widths == (16,) * (len(codec.widths)) and len(codec.widths) >= 2  # one step per module
    np.testing.assert_array_equal(rows["int4"].grads, codec.encode(rows["float32"].grads)[0])
    assert rows["int4"].to_arrow().schema.field("grad").type == pa.list_(pa.uint8(), codec.dim // 2)


def test_int4_needs_a_projection() -> None:
    with pytest.raises(RayattrError, match="--dtype int4 quantizes projected rows"):
        GradSpec(projection_dim=0, dtype="int4")
    with pytest.raises(RayattrError, match="--dtype must be one of"):
        GradSpec(dtype="int8")
