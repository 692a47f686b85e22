"""Kronecker-factored random projections: exactness, determinism, unbiasedness."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from helpers import engine_rows
from rayattr.config import GradSpec, RayattrError
from rayattr.data import TokenizedDocs
from rayattr.grads.engine import GradientEngine
from rayattr.grads.allocation import allocate_ranks
from rayattr.grads.projection import KroneckerProjection, module_projection, random_matrix, stable_seed

TOL = 1e-5
KINDS = ("rademacher", "normal")


def rel_err(actual, reference) -> float:
    reference = np.asarray(reference, dtype=np.float64)
    scale = np.abs(reference).max()
    assert scale > 0
    return float(np.abs(np.asarray(actual, dtype=np.float64) - reference).max() / scale)


@pytest.fixture(scope="module")
def docs(offline_fixture, fixture_tokenizer) -> TokenizedDocs:
    tok = fixture_tokenizer
    texts = pq.read_table(offline_fixture.train, columns=["text"]).column("text").to_pylist()[:5]
    queries = pq.read_table(offline_fixture.queries, columns=["prompt", "completion"]).to_pylist()[:2]
    tokens = [tok(t)["input_ids"] for t in texts]
    starts = [1] * len(tokens)
    for q in queries:
        prompt = tok(q["prompt"])["input_ids"]
        tokens.append(prompt + tok(q["completion"], add_special_tokens=False)["input_ids"])
        starts.append(len(prompt))
    return TokenizedDocs(
        ids=np.arange(100, 100 + len(tokens), dtype=np.int64),
        tokens=[np.array(t, dtype=np.int64) for t in tokens],
        label_start=np.array(starts, dtype=np.int64),
    )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("model_kind", ["neox", "gpt2"])
def test_projected_rows_equal_projection_of_exact_gradient(model_kind, kind, load_fixture_model, docs):
    p = 8
    model = load_fixture_model(model_kind)
    full, full_engine, _ = engine_rows(model, GradSpec(projection_dim=0, token_batch_size=4096), docs)
    full_layouts = {lay.name: lay for lay in full_engine.layouts}
    spec = GradSpec(projection_dim=p, projection_type=kind, seed=3, token_batch_size=4096)
    projected, engine, _ = engine_rows(model, spec, docs, padding_side="left")
    layouts, projections = engine.layouts, engine.collector.projections

    assert [lay.name for lay in layouts] == list(full_layouts)
    assert engine.dim == p * p * len(layouts)
    assert projected.grads.shape == (len(docs), engine.dim)
    np.testing.assert_array_equal(projected.ids, full.ids)
    np.testing.assert_allclose(projected.loss, full.loss, rtol=1e-6)
    for lay in layouts:
        assert (lay.p_out, lay.p_in, lay.width) == (p, p, p * p)
        proj = projections[lay.name]
        assert proj.left.shape == (p, lay.out_features) and proj.right.shape == (p, lay.in_features)
        # The engine uses exactly the deterministic per-module matrices.
        fresh = module_projection(lay.name, lay.out_features, lay.in_features, p, kind, 3)
        assert torch.equal(proj.left, fresh.left) and torch.equal(proj.right, fresh.right)
        left, right = proj.left.double().numpy(), proj.right.double().numpy()
        flay = full_layouts[lay.name]
        for i in range(len(docs)):
            G = full.grads[i, flay.offset : flay.offset + flay.width].reshape(flay.out_features, flay.in_features)
            want = left @ G.astype(np.float64) @ right.T
            got = projected.grads[i, lay.offset : lay.offset + lay.width].reshape(p, p)
            err = rel_err(got, want)
            assert err <= TOL, f"{lay.name} doc {i}: rel err {err:.3e}"


def test_projection_deterministic_across_processes(tmp_path):
    cases = [
        ("gpt_neox.layers.0.attention.query_key_value", 192, 64, 16, "rademacher", 0),
        ("transformer.h.1.mlp.c_fc", 256, 64, 8, "normal", 7),
        ("lm_head", 2328, 64, 4, "normal", 123456789),
    ]
    out = tmp_path / "projections.pt"
    script = textwrap.dedent(
        f"""
        import torch
        from rayattr.grads.projection import module_projection
        cases = {cases!r}
        torch.manual_seed(999)  # the global RNG state must not matter
        torch.save([tuple(module_projection(*c)) for c in cases], {str(out)!r})
        """
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # a str-hash salt other than this process's
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=120)
    theirs = torch.load(out)
    torch.manual_seed(0)
    for case, (left, right) in zip(cases, theirs):
        mine = module_projection(*case)
        assert isinstance(mine, KroneckerProjection)
        name, out_f, in_f, p, kind, seed = case
        assert mine.left.shape == (p, out_f) and mine.right.shape == (p, in_f)
        assert mine.left.dtype == torch.float32 and mine.right.dtype == torch.float32
        assert torch.equal(mine.left, left) and torch.equal(mine.right, right), case
    # Calling twice in one process gives the same matrices too.
    again = module_projection(*cases[1])
    assert torch.equal(again.left, module_projection(*cases[1]).left)


@pytest.mark.parametrize("kind", KINDS)
def test_projection_differs_by_name_role_and_seed(kind):
    base = module_projection("layer.a", 32, 32, 8, kind, 0)
    # Square module: left and right have the same shape but different seeds (roles).
    assert not torch.equal(base.left, base.right)
    assert stable_seed("layer.a", "left", 0) != stable_seed("layer.a", "right", 0)
    other_name = module_projection("layer.b", 32, 32, 8, kind, 0)
    other_seed = module_projection("layer.a", 32, 32, 8, kind, 1)
    for other in (other_name, other_seed):
        assert not torch.equal(base.left, other.left)
        assert not torch.equal(base.right, other.right)
    # Nearly uncorrelated, not just a few flipped entries.
    for a, b in [(base.left, other_name.left), (base.left, other_seed.left), (base.left, base.right)]:
        cos = (a * b).sum() / (a.norm() * b.norm())
        assert abs(cos.item()) < 0.3
    # The seed is a stable 63-bit integer (sha256 based), not Python's salted hash.
    s = stable_seed("layer.a", "left", 0)
    assert 0 <= s < 2**63
    assert s == int.from_bytes(hashlib.sha256(b"0/layer.a/left").digest()[:8], "little") & (2**63 - 1)


@pytest.mark.parametrize("kind", KINDS)
def test_projection_entries_have_variance_one_over_p(kind):
    p, cols = 16, 4096
    matrix = random_matrix(p, cols, kind, seed=5)
    assert matrix.shape == (p, cols) and matrix.dtype == torch.float32
    values = matrix.double()
    if kind == "rademacher":
        np.testing.assert_array_equal(np.unique(np.abs(values.numpy())), [1 / np.sqrt(p)])
        # Both signs, in about equal numbers.
        assert abs((values > 0).double().mean().item() - 0.5) < 0.02
    else:
        assert len(torch.unique(values)) > cols  # continuous values
    n = values.numel()
    # Mean 0 and variance 1/p within a few standard errors.
    assert abs(values.mean().item()) < 4 * (1 / np.sqrt(p)) / np.sqrt(n)
    var = values.square().mean().item()
    kurt = 1.0 if kind == "rademacher" else 3.0  # E[x^4]/sigma^4
    se = (1 / p) * np.sqrt((kurt - 1) / n) if kind == "normal" else 1e-12
    assert abs(var - 1 / p) <= max(4 * se, 1e-9)
    # The scaling depends on the number of rows p, not on the number of columns.
    wide = random_matrix(p, 8 * cols, kind, seed=5).double()
    assert abs(wide.square().mean().item() - 1 / p) < 0.05 / p


@pytest.mark.parametrize("kind", KINDS)
def test_projected_inner_product_is_unbiased(kind):
    out_f, in_f, p, n_seeds = 24, 20, 4, 400
    rng = np.random.default_rng(0)
    G = rng.standard_normal((out_f, in_f))
    H = 0.6 * G + rng.standard_normal((out_f, in_f))  # correlated, so <G, H> is far from 0
    exact = float((G * H).sum())
    norm = float((G * G).sum())
    lefts, rights = [], []
    for seed in range(n_seeds):
        proj = module_projection("unbiased.module", out_f, in_f, p, kind, seed)
        lefts.append(proj.left.double().numpy())
        rights.append(proj.right.double().numpy())
    L, R = np.stack(lefts), np.stack(rights)
    PG = L @ G @ R.transpose(0, 2, 1)
    PH = L @ H @ R.transpose(0, 2, 1)
    inner = (PG * PH).sum(axis=(1, 2))
    sq = (PG * PG).sum(axis=(1, 2))
    for estimates, target in ((inner, exact), (sq, norm)):
        mean, se = estimates.mean(), estimates.std(ddof=1) / np.sqrt(n_seeds)
        assert abs(mean - target) <= 3 * se, (mean, target, se)
        # The check has power: a wrong scale (e.g. variance 1/O or 1/I instead of
        # 1/p, or a factor sqrt(2)) would move the mean by many standard errors.
        assert 3 * se < 0.2 * abs(target)
    # And the projections are genuinely random: estimates vary from seed to seed.
    assert inner.std() > 0.05 * abs(exact)


def test_invalid_projection_type_raises(load_fixture_model):
    with pytest.raises(RayattrError, match="rademacher"):
        random_matrix(4, 4, "uniform", seed=0)
    with pytest.raises(RayattrError, match="uniform"):
        module_projection("m", 8, 8, 4, "uniform", 0)
    model = load_fixture_model("neox")
    with pytest.raises(RayattrError, match="projection type"):
        GradientEngine(model, GradSpec(projection_dim=4, projection_type="uniform"), pad_token_id=0)
    # No hooks are left behind by the failed construction.
    assert not any(m._forward_hooks for m in model.modules())


# ----------------------------------------------------------------------------- rank allocation, orthonormal rows

SHAPES = {"square": (64, 64), "wide": (64, 256), "tall": (256, 64), "head": (2328, 64), "tiny": (3, 500)}


@pytest.mark.parametrize("total,minimum", [(64, 1), (256, 4), (300, 8), (4096, 16), (1 << 20, 2)])
def test_rank_allocation_respects_budget_minimum_and_shape(total, minimum):
    ranks = allocate_ranks(SHAPES, total, minimum)
    assert list(ranks) == list(SHAPES) and ranks == allocate_ranks(dict(SHAPES), total, minimum)
    for name, (p_out, p_in) in ranks.items():
        out_f, in_f = SHAPES[name]
        assert p_out * p_in <= total, (name, p_out, p_in)
        assert min(minimum, out_f) <= p_out <= out_f and min(minimum, in_f) <= p_in <= in_f, (name, p_out, p_in)
        # The budget is used: neither side could grow by one without breaking a bound.
        assert (p_out + 1) * p_in > total or p_out == out_f
        assert p_out * (p_in + 1) > total or p_in == in_f
    # Sides follow the module's shape: a tall module gets more output rows than a wide one.
    if total <= 4096:
        assert ranks["tall"][0] > ranks["tall"][1] and ranks["wide"][0] < ranks["wide"][1]
        assert ranks["tall"] == ranks["wide"][::-1]


def test_rank_allocation_known_values():
    # tall: sqrt(256) * (256/64)^(1/4) = 22.6 -> p_out 22, p_in 256 // 22 = 11, then p_out 256 // 11 = 23.
    # head: 16 * (2328/64)^(1/4) = 39.3 -> 39, p_in 6, p_out 42. tiny: its 3 rows cap p_out below the minimum.
    assert allocate_ranks(SHAPES, 256, 4) == {
        "square": (16, 16), "wide": (11, 23), "tall": (23, 11), "head": (42, 6), "tiny": (3, 85),
    }
    assert allocate_ranks({"m": (8, 8)}, 1 << 20)["m"] == (8, 8)


def test_rank_options_are_validated():
    with pytest.raises(RayattrError, match="below --proj-rank-min squared"):
        GradSpec(proj_rank_total=15, proj_rank_min=4)
    for bad in ({"projection_type": "affd"}, {"projection_dim": 0}):
        with pytest.raises(RayattrError, match="Kronecker projections"):
            GradSpec(proj_rank_total=64, **bad)
    with pytest.raises(RayattrError, match="Kronecker projections"):
        GradSpec(row_orthonormal=True, projection_type="affd")
    # Without a projection there are no factors to orthonormalise: the same spec as without the option.
    assert GradSpec(row_orthonormal=True, projection_dim=0) == GradSpec(projection_dim=0)


def test_defaults_and_aliases_keep_fingerprints():
    # The fingerprint of a default spec is the one tables built before rank options existed carry.
    legacy = hashlib.sha256(b'{"dim":16,"seed":0,"type":"rademacher"}').hexdigest()[:16]
    assert GradSpec().projection_fingerprint() == legacy
    alias = GradSpec(projection_type="kronecker-rademacher")
    assert alias.projection_type == "rademacher" and alias == GradSpec()
    assert GradSpec(projection_type="kronecker-normal").projection_type == "normal"
    changed = {GradSpec(proj_rank_total=64).projection_fingerprint(), GradSpec(row_orthonormal=True).projection_fingerprint(),
               GradSpec(proj_rank_total=64, proj_rank_min=2).projection_fingerprint(), legacy}
    assert len(changed) == 4


@pytest.mark.parametrize("kind", KINDS)
def test_row_orthonormal_factors(kind):
    rows, cols = 12, 80
    matrix = random_matrix(rows, cols, kind, seed=3, row_orthonormal=True).double()
    torch.testing.assert_close(matrix @ matrix.T, torch.eye(rows, dtype=torch.float64) * cols / rows, rtol=0, atol=1e-5)
    assert torch.equal(matrix.float(), random_matrix(rows, cols, kind, seed=3, row_orthonormal=True))
    # It spans the same rows as the plain draw of that seed (QR of that draw).
    plain = random_matrix(rows, cols, kind, seed=3).double()
    torch.testing.assert_close(plain @ torch.linalg.pinv(matrix) @ matrix, plain, rtol=0, atol=1e-5)
    # More rows than columns: orthonormal columns instead, an exact isometry.
    tall = random_matrix(cols, rows, kind, seed=3, row_orthonormal=True).double()
    assert tall.shape == (cols, rows)
    torch.testing.assert_close(tall.T @ tall, torch.eye(rows, dtype=torch.float64), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_row_orthonormal_inner_product_is_unbiased(kind):
    out_f, in_f, p, n_seeds = 24, 20, 4, 400
    rng = np.random.default_rng(1)
    G = rng.standard_normal((out_f, in_f))
    H = 0.6 * G + rng.standard_normal((out_f, in_f))
    projections = [module_projection("ortho.module", out_f, in_f, p, kind, s, row_orthonormal=True) for s in range(n_seeds)]
    L = np.stack([proj.left.double().numpy() for proj in projections])
    R = np.stack([proj.right.double().numpy() for proj in projections])
    inner = ((L @ G @ R.transpose(0, 2, 1)) * (L @ H @ R.transpose(0, 2, 1))).sum(axis=(1, 2))
    mean, se, exact = inner.mean(), inner.std(ddof=1) / np.sqrt(n_seeds), float((G * H).sum())
    assert abs(mean - exact) <= 3 * se and 3 * se < 0.2 * abs(exact), (mean, exact, se)


@pytest.mark.parametrize("orthonormal", [False, True])
def test_engine_rows_with_rank_allocation_equal_projection_of_exact_gradient(orthonormal, load_fixture_model, docs):
    model = load_fixture_model("neox")
    full, full_engine, _ = engine_rows(model, GradSpec(projection_dim=0, token_batch_size=4096), docs)
    full_layouts = {lay.name: lay for lay in full_engine.layouts}
    spec = GradSpec(proj_rank_total=200, proj_rank_min=4, row_orthonormal=orthonormal, seed=2, token_batch_size=4096)
    rows, engine, meta = engine_rows(model, spec, docs)
    ranks = allocate_ranks({name: (lay.out_features, lay.in_features) for name, lay in full_layouts.items()}, 200, 4)
    assert len(set(ranks.values())) >= 3  # the modules really got different sizes
    assert [(m["name"], m["p_out"], m["p_in"]) for m in meta.modules] == [(n, *r) for n, r in ranks.items()]
    assert meta.projection | {"fingerprint": None} == {
        "type": "rademacher", "dim": 16, "seed": 2, "rank_total": 200, "rank_min": 4, "fingerprint": None,
    } | ({"row_orthonormal": True} if orthonormal else {})
    assert engine.dim == sum(p_out * p_in for p_out, p_in in ranks.values()) == rows.grads.shape[1]
    for lay in engine.layouts:
        proj = module_projection(lay.name, lay.out_features, lay.in_features, ranks[lay.name], "rademacher", 2,
                                 row_orthonormal=orthonormal)
        left, right = proj.left.double().numpy(), proj.right.double().numpy()
        flay = full_layouts[lay.name]
        for i in range(len(docs)):
            G = full.grads[i, flay.offset : flay.offset + flay.width].reshape(flay.out_features, flay.in_features)
            want = left @ G.astype(np.float64) @ right.T
            got = rows.grads[i, lay.offset : lay.offset + lay.width].reshape(lay.p_out, lay.p_in)
            assert rel_err(got, want) <= TOL, lay.name
