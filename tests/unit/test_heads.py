"""Attention heads as gradient blocks: exact rearrangements of the module's gradient at
projection 0, their own seeded projections, per-head K-FAC factors, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from rayattr.config import DataSpec, GradSpec, RayattrError
from rayattr.data import TokenizedDocs, tokenize
from rayattr.grads.engine import GradientEngine
from rayattr.hessian.stats import TokenAccumulator

QKV, DENSE = "gpt_neox.layers.1.attention.query_key_value", "gpt_neox.layers.1.attention.dense"
HEADS = 4  # the fixture GPT-NeoX's


@pytest.fixture(scope="module")
def docs(offline_fixture, fixture_tokenizer) -> TokenizedDocs:
    texts = ["Alna was born in Talburgh.", "Sana Morodane graduated from Kirridge College.", "Hello there"]
    table = pa.table({"text": texts, "id": pa.array(np.arange(3), pa.int64())})
    return TokenizedDocs.from_arrow(tokenize(table, DataSpec("d"), fixture_tokenizer, 64))


def _engine(load_fixture_model, **grads) -> GradientEngine:
    model = load_fixture_model("neox")
    return GradientEngine(model, GradSpec(modules=(QKV, DENSE), **grads), pad_token_id=model.config.pad_token_id)


def test_head_blocks_at_projection_0_are_the_module_gradient_rearranged(load_fixture_model, docs) -> None:
    whole = _engine(load_fixture_model, projection_dim=0)
    split = _engine(load_fixture_model, projection_dim=0, split_attention=("*attention.*",))
    assert [l.name for l in split.layouts] == [f"{m}.head_{h}" for m in (QKV, DENSE) for h in range(HEADS)]
    assert {(l.out_features, l.in_features) for l in split.layouts[:HEADS]} == {(192 // HEADS, 64)}  # output axis
    assert {(l.out_features, l.in_features) for l in split.layouts[HEADS:]} == {(64, 64 // HEADS)}  # input axis
    rows, blocks = whole.rows(docs).grads, split.rows(docs).grads
    qkv = rows[:, : 192 * 64].reshape(-1, 192, 64)
    dense = rows[:, 192 * 64 :].reshape(-1, 64, 64)
    want = np.concatenate([qkv.reshape(-1, HEADS, 48, 64).reshape(-1, HEADS * 48 * 64),
                           dense.reshape(-1, 64, HEADS, 16).transpose(0, 2, 1, 3).reshape(-1, 64 * 64)], axis=1)
    np.testing.assert_array_equal(blocks, want)
    meta = split.table_meta({"name": "m"}, DataSpec("d"))
    assert json.loads(json.dumps(meta.modules)) == meta.modules  # stored tables compare equal to live engines
    assert meta.modules[HEADS]["head"] == [DENSE, "in", 0] and "head" not in whole.table_meta({}, DataSpec("d")).modules[0]
    whole.close(), split.close()


def test_each_head_block_has_its_own_seeded_projection(load_fixture_model, docs) -> None:
    engine = _engine(load_fixture_model, projection_dim=4, split_attention=(QKV,))
    assert engine.dim == (HEADS + 1) * 16
    lefts = [engine.collector.projections[f"{QKV}.head_{h}"].left for h in range(HEADS)]
    assert all(l.shape == (4, 48) for l in lefts) and not torch.equal(lefts[0], lefts[1])
    assert np.isfinite(engine.rows(docs).grads).all()
    engine.close()


def test_kfac_factors_of_head_blocks_are_blocks_of_the_module_factors(load_fixture_model, docs) -> None:
    def factors(engine: GradientEngine) -> dict:
        tap = engine.collector.tap = TokenAccumulator(engine.layouts)
        engine.observe(docs)
        engine.close()
        return tap.sums

    whole = factors(_engine(load_fixture_model, projection_dim=0))
    split = factors(_engine(load_fixture_model, projection_dim=0, split_attention=("*attention.*",)))
    for h in range(HEADS):
        out_block, in_block = split[f"{QKV}.head_{h}"], split[f"{DENSE}.head_{h}"]
        rows, cols = slice(48 * h, 48 * (h + 1)), slice(16 * h, 16 * (h + 1))
        torch.testing.assert_close(out_block["A"], whole[QKV]["A"])
        torch.testing.assert_close(out_block["S"], whole[QKV]["S"][rows, rows])
        torch.testing.assert_close(in_block["A"], whole[DENSE]["A"][cols, cols])
        torch.testing.assert_close(in_block["S"], whole[DENSE]["S"])


def test_split_attention_bad_inputs(load_fixture_model) -> None:
    with pytest.raises(RayattrError, match=r"has 192 outputs, which 5 heads do not divide; .*--num-heads"):
        _engine(load_fixture_model, projection_dim=0, split_attention=(QKV,), num_heads=5)
    with pytest.raises(RayattrError, match="matches none of the chosen modules"):
        _engine(load_fixture_model, projection_dim=0, split_attention=("*mlp*",))
    with pytest.raises(RayattrError, match="--split-attention and --include-bias together"):
        GradSpec(split_attention=(QKV,), include_bias=True)
    with pytest.raises(RayattrError, match="--num-heads must be >= 1"):
        GradSpec(num_heads=0)
