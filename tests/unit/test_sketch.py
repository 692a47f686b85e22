"""Fast Walsh-Hadamard transform and structured sketches: against explicit matrices, determinism,
unbiasedness, and the engine's sketched rows against the sketch of exact gradients (no Ray; the Ray
fit's refusal of sketched rows is in ``tests/ray/test_sketch_ray.py``)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from helpers import assert_rows_close, engine_rows
from rayattr.config import DataSpec, GradSpec, RayattrError
from rayattr.data import TokenizedDocs
from rayattr.grads.engine import GradientEngine
from rayattr.grads.hadamard import fwht, next_pow2
from rayattr.grads.sketch import SKETCHES, DenseSketch, Sketch, make_sketch
from rayattr.store import require_compatible

KINDS = tuple(SKETCHES)
N, DIM = 300, 32  # N not a power of two: every sketch pads it to 512


def hadamard(n: int) -> torch.Tensor:
    """The orthonormal Sylvester Hadamard matrix, built explicitly (float64)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h / math.sqrt(n)


def explicit(sketch: Sketch) -> torch.Tensor:
    """The sketch's ``[dim, n]`` matrix, read off by sketching the identity."""
    return sketch(torch.eye(sketch.n)).T.double()


def definition(sketch: Sketch) -> torch.Tensor:
    """The ``[dim, n]`` matrix the sketch's docstring defines, from dense factors and its cached draws."""
    n, big, dim = sketch.n, sketch.padded, sketch.dim
    pad = torch.eye(big, n, dtype=torch.float64)  # zero-padding x to length big
    if sketch.kind == "dense":
        return sketch.matrix.double()
    signs = torch.diag(sketch.signs.double())
    h = hadamard(big)
    first = torch.eye(dim, big, dtype=torch.float64)  # R_D
    if sketch.kind == "fjl":
        return sketch.sparse.to_dense().double() @ h @ signs @ pad
    if sketch.kind == "afjl":
        return math.sqrt(big / dim) * torch.diag(sketch.gaussians.double()) @ first @ h @ signs @ pad
    if sketch.kind == "affd":
        return math.sqrt(big / dim) * first @ h @ torch.diag(sketch.gaussians.double()) @ h @ signs @ pad
    assert sketch.kind == "qk"
    kron = torch.kron(sketch.left.double(), sketch.right.double())  # right already carries 1/sqrt(D)
    return kron @ h @ signs @ pad


# ----------------------------------------------------------------------------- FWHT


@pytest.mark.parametrize("n", [1, 2, 4, 8, 64, 256])
def test_fwht_equals_explicit_hadamard(n):
    x = torch.randn(2, 3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    got = fwht(x)
    assert got.shape == x.shape
    torch.testing.assert_close(got, x @ hadamard(n).T, rtol=0, atol=1e-12)
    # Orthonormal, hence its own inverse (H is symmetric).
    torch.testing.assert_close(fwht(got), x, rtol=0, atol=1e-12)
    torch.testing.assert_close(got.norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=0)


@pytest.mark.parametrize("n", [3, 5, 100])
def test_fwht_zero_pads_other_lengths(n):
    x = torch.randn(4, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    size = next_pow2(n)
    got = fwht(x)
    assert got.shape == (4, size)
    torch.testing.assert_close(got, x @ hadamard(size)[:, :n].T, rtol=0, atol=1e-12)
    assert [next_pow2(k) for k in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 16]


# ----------------------------------------------------------------------------- sketches


@pytest.mark.parametrize("kind", KINDS)
def test_sketch_is_the_linear_map_it_defines(kind):
    sketch = make_sketch(kind, N, DIM, seed=4)
    matrix = explicit(sketch)
    assert matrix.shape == (DIM, N)
    # Equals the product of its documented factors (Hadamard matrices built densely).
    torch.testing.assert_close(matrix, definition(sketch), rtol=0, atol=1e-5 * matrix.abs().max().item())
    # Linear: a batch is sketched by the explicit matrix, and combinations map to combinations.
    x = torch.randn(5, N, generator=torch.Generator().manual_seed(1))
    got = sketch(x).double()
    want = x.double() @ matrix.T
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    combo = sketch(2.0 * x[0] - 3.0 * x[1]).double()
    assert (combo - (2.0 * got[0] - 3.0 * got[1])).abs().max() <= 1e-5 * want.abs().max()
    # Leading dimensions are kept.
    assert sketch(x.view(5, 1, N)).shape == (5, 1, DIM)


@pytest.mark.parametrize("kind", KINDS)
def test_sketch_deterministic_per_seed_and_different_across_seeds(kind):
    x = torch.randn(3, N, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(123)  # the global RNG must not matter
    first = make_sketch(kind, N, DIM, seed=9)(x)
    torch.manual_seed(456)
    assert torch.equal(first, make_sketch(kind, N, DIM, seed=9)(x))
    other = make_sketch(kind, N, DIM, seed=10)(x)
    cos = (first * other).sum() / (first.norm() * other.norm())
    assert abs(cos.item()) < 0.5, cos


def test_sketches_identical_in_another_process(tmp_path):
    out = tmp_path / "sketched.pt"
    script = textwrap.dedent(
        f"""
        import torch
        from rayattr.grads.sketch import SKETCHES, make_sketch
        x = torch.randn(3, {N}, generator=torch.Generator().manual_seed(2))
        torch.save({{k: make_sketch(k, {N}, {DIM}, 77)(x) for k in SKETCHES}}, {str(out)!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120, env={**os.environ, "PYTHONHASHSEED": "7"})
    theirs = torch.load(out)
    x = torch.randn(3, N, generator=torch.Generator().manual_seed(2))
    for kind in KINDS:
        assert torch.equal(make_sketch(kind, N, DIM, 77)(x), theirs[kind]), kind


@pytest.mark.parametrize("kind", KINDS)
def test_sketched_inner_product_is_unbiased(kind):
    n, dim, seeds = 200, 32, 600
    rng = np.random.default_rng(0)
    x = rng.standard_normal(n)
    y = 0.6 * x + rng.standard_normal(n)  # correlated, so <x, y> is far from 0
    pair = torch.tensor(np.stack((x, y)), dtype=torch.float32)
    sketched = torch.stack([make_sketch(kind, n, dim, seed)(pair) for seed in range(seeds)]).double()
    inner = (sketched[:, 0] * sketched[:, 1]).sum(1).numpy()
    sq = sketched[:, 0].square().sum(1).numpy()
    for estimates, target in ((inner, x @ y), (sq, x @ x)):
        mean, se = estimates.mean(), estimates.std(ddof=1) / np.sqrt(seeds)
        assert abs(mean - target) <= 3 * se, (kind, mean, target, se)
        # Power: a wrong scale (a factor 2, or N = 200 vs padded N = 256) moves the mean by >= 28%.
        assert 3 * se < 0.1 * abs(target), (kind, se, target)


def test_dense_refuses_oversize_requests():
    with pytest.raises(RayattrError, match=r"dense 4096 x 1000000 sketch needs 15\.26 GiB.*afjl"):
        DenseSketch(1_000_000, 4096, seed=0)
    with pytest.raises(RayattrError, match="budget 0.00 GiB"):
        DenseSketch(100, 10, seed=0, max_bytes=3999)
    assert DenseSketch(100, 10, seed=0, max_bytes=4000).matrix.shape == (10, 100)


@pytest.mark.parametrize("kind", ["afjl", "affd", "fjl", "qk"])
def test_structured_sketch_refuses_dim_above_padded_input(kind):
    with pytest.raises(RayattrError, match="--projection-dim"):
        make_sketch(kind, 20, 64, seed=0)
    with pytest.raises(RayattrError, match="unknown sketch type"):
        make_sketch("sparse", 20, 8, seed=0)


# ----------------------------------------------------------------------------- engine


@pytest.fixture(scope="module")
def docs(offline_fixture, fixture_tokenizer) -> TokenizedDocs:
    texts = pq.read_table(offline_fixture.train, columns=["text"]).column("text").to_pylist()[:4]
    tokens = [np.array(fixture_tokenizer(t)["input_ids"], dtype=np.int64) for t in texts]
    return TokenizedDocs(np.arange(10, 10 + len(tokens)), tokens, np.ones(len(tokens), np.int64))


@pytest.fixture(scope="module")
def full_rows(load_fixture_model, docs) -> np.ndarray:
    """Exact concatenated per-example gradients (projection 0; test_grads checks these against brute force)."""
    return engine_rows(load_fixture_model("neox"), GradSpec(projection_dim=0, token_batch_size=4096), docs)[0].grads


@pytest.mark.parametrize("kind", KINDS)
def test_engine_rows_equal_sketch_of_exact_gradients(kind, load_fixture_model, docs, full_rows):
    dim = 64
    spec = GradSpec(projection_dim=dim, projection_type=kind, seed=5, token_batch_size=4096)
    rows, engine, meta = engine_rows(load_fixture_model("neox"), spec, docs)
    assert engine.dim == dim and rows.grads.shape == (len(docs), dim)
    sketch = make_sketch(kind, full_rows.shape[1], dim, seed=5)
    assert_rows_close(rows.grads, sketch(torch.from_numpy(full_rows)).double().numpy(), tol=1e-4)
    # The table says which sketch made the rows, and of how long a concatenation.
    assert meta.dim == dim
    assert meta.projection | {"fingerprint": None} == {
        "type": kind, "dim": dim, "seed": 5, "input_dim": full_rows.shape[1], "fingerprint": None,
    }


def test_mismatched_sketch_query_is_refused(load_fixture_model):
    model = load_fixture_model("neox")

    def meta(**grads):
        engine = GradientEngine(model, GradSpec(**grads), model.config.pad_token_id)
        engine.close()
        return engine.table_meta({"name": "fixture"}, DataSpec("d"))

    index = meta(projection_dim=64, projection_type="affd")
    require_compatible(index, meta(projection_dim=64, projection_type="affd"))
    for other in ({"projection_type": "qk"}, {"projection_type": "affd", "seed": 1},
                  {"projection_type": "rademacher", "projection_dim": 8}):
        with pytest.raises(RayattrError, match="projection"):
            require_compatible(index, meta(**({"projection_dim": 64} | other)))
