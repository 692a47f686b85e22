"""Curvature factors: eigendecomposition, inversion modes, dense vs Kronecker application, mixing, save/load."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from rayattr.config import RayattrError, RayattrWarning
from rayattr.hessian.factors import (
    ABSOLUTE_DAMPING,
    INVERSION_MODES,
    MANIFEST,
    STATS_SUBDIR,
    Eigen,
    apply_dense,
    apply_factored,
    eigh_psd,
    ekfac_lambda,
    inverse_multiplier,
    kfac_grid,
    load_stats,
    mix,
    mixing_lambda,
    module_filename,
    save_stats,
)

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_psd(d: int, rank: int | None = None, seed: int = 0) -> torch.Tensor:
    """X X^T / rank: PSD, rank-deficient when rank < d."""
    x = torch.randn(d, rank or d, generator=gen(seed), dtype=F64)
    return x @ x.T / x.shape[1]


def random_orthogonal(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen(seed), dtype=F64))
    return q


def max_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.to(F64) - expected.to(F64)).abs().max())


# ---------------------------------------------------------------- eigh_psd


def test_eigh_psd_reconstructs_random_psd() -> None:
    for seed, d in [(0, 5), (1, 16), (2, 33)]:
        m = random_psd(d, seed=seed)
        eig = eigh_psd(m)
        assert eig.values.dtype == F64 and eig.vectors.dtype == F64
        assert torch.all(eig.values[1:] >= eig.values[:-1])
        assert max_err(eig.vectors @ torch.diag(eig.values) @ eig.vectors.T, m) <= 1e-10
        assert max_err(eig.vectors.T @ eig.vectors, torch.eye(d, dtype=F64)) <= 1e-12


def test_eigh_psd_accepts_float32_and_symmetrises() -> None:
    m = random_psd(6, seed=3)
    skew = torch.triu(torch.ones(6, 6, dtype=F64), 1) * 1e-3
    eig = eigh_psd((m + skew - skew.T).float())  # antisymmetric part must vanish
    assert eig.values.dtype == F64
    assert max_err(eig.vectors @ torch.diag(eig.values) @ eig.vectors.T, m.float()) <= 1e-6


def test_eigh_psd_clamps_negative_round_off_of_rank_deficient_matrix() -> None:
    d, rank = 10, 3
    m = random_psd(d, rank=rank, seed=4)
    eig = eigh_psd(m)
    assert torch.all(eig.values >= 0)
    assert int((eig.values < 1e-10).sum()) == d - rank
    assert max_err(eig.vectors @ torch.diag(eig.values) @ eig.vectors.T, m) <= 1e-10
    # An explicit tiny negative eigenvalue (what fp accumulation leaves behind) becomes exactly 0.
    q = random_orthogonal(4, seed=5)
    m2 = q @ torch.diag(torch.tensor([-1e-13, 0.0, 1.0, 2.0], dtype=F64)) @ q.T
    assert torch.linalg.eigvalsh(m2)[0] < 0
    values = eigh_psd(m2).values
    assert values[0] == 0.0 and torch.all(values >= 0)
    assert max_err(values[2:], torch.tensor([1.0, 2.0], dtype=F64)) <= 1e-12


@pytest.mark.parametrize(
    "bad, words",
    [
        (torch.zeros(3, 4), "square"),
        (torch.zeros(2, 3, 3), "square"),
        (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), "NaN"),
        (torch.tensor([[float("inf"), 0.0], [0.0, 1.0]]), "NaN/inf"),
    ],
)
def test_eigh_psd_rejects_bad_input(bad: torch.Tensor, words: str) -> None:
    with pytest.raises(RayattrError, match=words):
        eigh_psd(bad)


# ---------------------------------------------------------------- inverse_multiplier


def test_multiplier_formulas_on_known_eigenvalues() -> None:
    values = torch.tensor([0.0, 1.0, 2.0, 5.0], dtype=F64)  # mean 2, c = 0.5 -> c*mu = 1
    expected = {
        "damped_inverse": [1.0, 1 / 2, 1 / 3, 1 / 6],
        "pseudoinverse": [0.0, 0.0, 1 / 2, 1 / 5],  # strict: l == c*mu is cut
        "tikhonov_filtered": [0.0, 1 / 2, 2 / 5, 5 / 26],
    }
    for mode, want in expected.items():
        got = inverse_multiplier(values, mode, damping=0.5)
        assert got.dtype == F64
        assert max_err(got, torch.tensor(want, dtype=F64)) <= 1e-15, mode
    # an explicit mean overrides the values' own mean: c*mu = 0.5 * 4 = 2
    got = inverse_multiplier(values, "tikhonov_filtered", damping=0.5, mean=4.0)
    assert max_err(got, torch.tensor([0.0, 1 / 5, 2 / 8, 5 / 29], dtype=F64)) <= 1e-15


def test_multiplier_default_damping_is_a_tenth_of_the_mean() -> None:
    values = torch.tensor([1.0, 3.0], dtype=F64)  # mu = 2, c*mu = 0.2
    got = inverse_multiplier(values)
    assert max_err(got, torch.tensor([1 / 1.2, 1 / 3.2], dtype=F64)) <= 1e-15


@pytest.mark.parametrize("mode", INVERSION_MODES)
def test_half_power_squared_is_inverse(mode: str) -> None:
    values = eigh_psd(random_psd(12, rank=7, seed=6)).values
    full = inverse_multiplier(values, mode)
    half = inverse_multiplier(values, mode, power=-0.5)
    assert torch.all(full >= 0) and torch.all(torch.isfinite(full))
    assert max_err(half.square(), full) <= 1e-14 * float(full.max())


@pytest.mark.parametrize("mode", INVERSION_MODES)
def test_dense_half_power_twice_equals_inverse(mode: str) -> None:
    h = random_psd(12, rank=8, seed=7)
    eig = eigh_psd(h)
    x = torch.randn(5, 12, generator=gen(8), dtype=F64)
    once = apply_dense(x, eig, inverse_multiplier(eig.values, mode))
    half = inverse_multiplier(eig.values, mode, power=-0.5)
    twice = apply_dense(apply_dense(x, eig, half), eig, half)
    assert float(once.abs().max()) > 0.1
    assert max_err(twice, once) <= 1e-10


def test_damped_inverse_equals_solve() -> None:
    d, c = 9, 0.1
    h = random_psd(d, rank=6, seed=9)
    mu = float(torch.trace(h)) / d
    eig = eigh_psd(h)
    assert abs(float(eig.values.mean()) - mu) <= 1e-12
    expected = torch.linalg.solve(h + c * mu * torch.eye(d, dtype=F64), h)
    got = apply_dense(h, eig, inverse_multiplier(eig.values, "damped_inverse", damping=c))
    assert max_err(got, expected) <= 1e-10
    x = torch.randn(4, d, generator=gen(10), dtype=F64)
    expected_x = torch.linalg.solve(h + c * mu * torch.eye(d, dtype=F64), x.T).T
    assert max_err(apply_dense(x, eig, inverse_multiplier(eig.values)), expected_x) <= 1e-10


def test_apply_dense_keeps_input_dtype() -> None:
    eig = eigh_psd(random_psd(6, seed=11))
    x = torch.randn(3, 6, generator=gen(12))
    out = apply_dense(x, eig, inverse_multiplier(eig.values))
    expected = apply_dense(x.double(), eig, inverse_multiplier(eig.values))
    assert out.dtype == torch.float32
    assert max_err(out, expected) <= 1e-5 * float(expected.abs().max())


def test_pseudoinverse_zeroes_small_directions() -> None:
    q = random_orthogonal(6, seed=13)
    lam = torch.tensor([0.0, 1e-3, 0.1, 2.0, 3.0, 4.9], dtype=F64)  # mu = 1.667, c*mu = 0.1667
    h = q @ torch.diag(lam) @ q.T
    eig = eigh_psd(h)
    mult = inverse_multiplier(eig.values, "pseudoinverse")
    assert torch.equal(mult[:3], torch.zeros(3, dtype=F64))
    assert max_err(mult[3:], 1 / lam[3:]) <= 1e-12
    out = apply_dense(q.T, eig, mult)  # rows are the eigenvectors
    assert float(out[:3].abs().max()) <= 1e-12
    assert max_err(out[3:], q.T[3:] / lam[3:, None]) <= 1e-12
    # pinv(H) H projects onto the kept directions
    keep = q[:, 3:]
    assert max_err(apply_dense(h, eig, mult), keep @ keep.T) <= 1e-12


def test_zero_matrix_gives_finite_multipliers() -> None:
    zeros = torch.zeros(4, dtype=F64)
    assert torch.equal(inverse_multiplier(zeros), torch.full((4,), 1 / ABSOLUTE_DAMPING, dtype=F64))
    for mode in ("pseudoinverse", "tikhonov_filtered"):
        for power in (-1.0, -0.5):
            assert torch.equal(inverse_multiplier(zeros, mode, power=power), zeros)
    # damping 0 on a singular matrix stays finite too
    values = torch.tensor([0.0, 2.0], dtype=F64)
    for mode in INVERSION_MODES:
        assert torch.all(torch.isfinite(inverse_multiplier(values, mode, damping=0.0)))


def test_multiplier_rejects_unknown_mode_power_and_negative_damping() -> None:
    values = torch.ones(3, dtype=F64)
    with pytest.raises(RayattrError, match="damped_inverse.*pseudoinverse.*tikhonov_filtered"):
        inverse_multiplier(values, "cholesky")  # type: ignore[arg-type]
    with pytest.raises(RayattrError, match=r"-1\.0, -0\.5"):
        inverse_multiplier(values, power=0.5)
    with pytest.raises(RayattrError, match="damping"):
        inverse_multiplier(values, damping=-0.1)


# ---------------------------------------------------------------- Kronecker factors


def test_factored_equals_dense_kronecker() -> None:
    o, i, n = 3, 4, 5
    s = random_psd(o, seed=14)
    a = random_psd(i, seed=15)
    grads = torch.randn(n, o, i, generator=gen(16), dtype=F64)
    f = torch.kron(s, a)
    # row-major vec: (S kron A) vec(G) == vec(S G A)
    for g in grads:
        assert max_err(f @ g.reshape(-1), (s @ g @ a).reshape(-1)) <= 1e-12

    es, ea, ef = eigh_psd(s), eigh_psd(a), eigh_psd(f)
    grid = kfac_grid(es.values, ea.values)
    assert grid.shape == (o, i)
    assert max_err(grid, torch.outer(es.values, ea.values)) == 0.0
    assert abs(float(grid.mean()) - float(ef.values.mean())) <= 1e-12
    assert max_err(grid.reshape(-1).sort().values, ef.values) <= 1e-12

    flat = grads.reshape(n, -1)
    for mode in INVERSION_MODES:
        for power in (-1.0, -0.5):
            mult = inverse_multiplier(grid.reshape(-1), mode, power=power).view(o, i)
            factored = apply_factored(grads, es.vectors, ea.vectors, mult)
            dense = apply_dense(flat, ef, inverse_multiplier(ef.values, mode, power=power))
            assert factored.shape == grads.shape
            assert max_err(factored.reshape(n, -1), dense) <= 1e-8, (mode, power)
    # sanity: the damped inverse really is (F + c mu I)^-1
    mu = float(grid.mean())
    expected = torch.linalg.solve(f + 0.1 * mu * torch.eye(o * i, dtype=F64), flat.T).T
    mult = inverse_multiplier(grid.reshape(-1)).view(o, i)
    assert max_err(apply_factored(grads, es.vectors, ea.vectors, mult).reshape(n, -1), expected) <= 1e-10


def test_apply_factored_keeps_dtype_and_checks_shapes() -> None:
    grads = torch.randn(2, 3, 4, generator=gen(17))
    q_out, q_in = random_orthogonal(3, 18), random_orthogonal(4, 19)
    out = apply_factored(grads, q_out, q_in, torch.ones(3, 4, dtype=F64))
    assert out.dtype == torch.float32
    assert max_err(out, grads) <= 1e-6  # unit multiplier: rotate and rotate back is the identity
    with pytest.raises(RayattrError, match="multiplier grid"):
        apply_factored(grads, q_out, q_in, torch.ones(4, 3))
    with pytest.raises(RayattrError, match="q_out"):
        apply_factored(grads, q_in, q_out, torch.ones(3, 4))


def kron_basis_matrix(q_out: torch.Tensor, q_in: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """(Q_S kron Q_A) diag(vec Lambda) (Q_S kron Q_A)^T."""
    k = torch.kron(q_out, q_in)
    return k @ torch.diag(lam.reshape(-1)) @ k.T


def test_ekfac_with_exact_eigenvalues_equals_dense_inverse() -> None:
    o, i, n, c = 3, 4, 50, 0.1
    grads = torch.randn(n, o, i, generator=gen(20), dtype=F64)
    flat = grads.reshape(n, -1)
    h = flat.T @ flat / n
    s = torch.einsum("noi,npi->op", grads, grads) / n
    a = torch.einsum("noi,noj->ij", grads, grads) / n
    q_s, q_a = eigh_psd(s).vectors, eigh_psd(a).vectors
    lam = ekfac_lambda(grads, q_s, q_a) / n
    k = torch.kron(q_s, q_a)
    # Lambda is the diagonal of H in the Kronecker eigenbasis, so it keeps H's trace
    assert max_err(lam.reshape(-1), torch.diagonal(k.T @ h @ k)) <= 1e-12
    assert abs(float(lam.sum()) - float(torch.trace(h))) <= 1e-12

    m = kron_basis_matrix(q_s, q_a, lam)
    mu = float(lam.mean())
    assert abs(mu - float(torch.trace(m)) / (o * i)) <= 1e-12
    expected = torch.linalg.solve(m + c * mu * torch.eye(o * i, dtype=F64), flat.T).T
    mult = inverse_multiplier(lam.reshape(-1), damping=c).view(o, i)
    got = apply_factored(grads, q_s, q_a, mult)
    assert max_err(got.reshape(n, -1), expected) <= 1e-8
    half = inverse_multiplier(lam.reshape(-1), damping=c, power=-0.5).view(o, i)
    twice = apply_factored(apply_factored(grads, q_s, q_a, half), q_s, q_a, half)
    assert max_err(twice, got) <= 1e-10


def test_ekfac_matrix_equals_fisher_when_diagonal_in_kronecker_basis() -> None:
    o, i = 3, 4
    q_s, q_a = random_orthogonal(o, 21), random_orthogonal(i, 22)
    scales = torch.rand(o * i, generator=gen(23), dtype=F64) + 0.5
    # example n has a single coordinate in the Kronecker basis, so E[vec D vec D^T] is diagonal
    coords = torch.diag(scales).reshape(o * i, o, i)
    grads = q_s @ coords @ q_a.T
    n = grads.shape[0]
    flat = grads.reshape(n, -1)
    h = flat.T @ flat / n
    lam = ekfac_lambda(grads, q_s, q_a) / n
    assert max_err(lam.reshape(-1), scales.square() / n) <= 1e-12
    assert max_err(kron_basis_matrix(q_s, q_a, lam), h) <= 1e-12


def test_ekfac_lambda_is_a_sum_over_examples() -> None:
    grads = torch.randn(6, 3, 2, generator=gen(24), dtype=F64)
    q_s, q_a = random_orthogonal(3, 25), random_orthogonal(2, 26)
    total = ekfac_lambda(grads, q_s, q_a)
    parts = ekfac_lambda(grads[:2], q_s, q_a) + ekfac_lambda(grads[2:], q_s, q_a)
    assert max_err(total, parts) <= 1e-12
    assert max_err(ekfac_lambda(grads[:1], q_s, q_a), (q_s.T @ grads[0] @ q_a).square()) <= 1e-14


# ---------------------------------------------------------------- TrackStar mixing


def test_mixing_lambda_hand_computation() -> None:
    index = [torch.tensor([1.0, 10.0]), torch.tensor([5.0])]  # pooled, sorted: 10, 5, 1
    query = [torch.tensor([2.0, 4.0, 1.0])]  # 4, 2, 1
    lam, k = mixing_lambda(index, query, target_downweight_components=2)
    assert k == 1 and lam == pytest.approx(5 / 7, abs=1e-15)
    lam, k = mixing_lambda(index, query, target_downweight_components=1)
    assert k == 0 and lam == pytest.approx(10 / 14, abs=1e-15)
    # negative round-off eigenvalues are clamped to 0 before pooling
    lam, k = mixing_lambda([torch.tensor([3.0, -1.0])], [torch.tensor([1.0, -2.0])], 2)
    assert k == 1 and lam == 0.99  # both clamp to 0 at k=1: Bergson's fallback


def test_mixing_lambda_in_unit_interval_for_random_inputs() -> None:
    for seed in range(5):
        g = gen(100 + seed)
        index = [eigh_psd(random_psd(d, seed=seed * 10 + d)).values * float(torch.rand(1, generator=g)) for d in (4, 9)]
        query = [torch.rand(d, generator=g, dtype=F64) * 10 for d in (4, 9)]
        lam, k = mixing_lambda(index, query, target_downweight_components=7)
        assert k == 6 and 0.0 <= lam <= 1.0
        s_i = torch.cat(index).sort(descending=True).values[6]
        s_q = torch.cat(query).sort(descending=True).values[6]
        assert lam == pytest.approx(float(s_i / (s_i + s_q)), abs=1e-15)


def test_mixing_lambda_clamps_target_with_warning() -> None:
    with pytest.warns(RayattrWarning, match="target_downweight_components=1000 exceeds the 3 eigenvalues"):
        lam, k = mixing_lambda([torch.tensor([10.0, 5.0, 1.0])], [torch.tensor([4.0, 2.0, 3.0])], 1000)
    assert k == 2 and lam == pytest.approx(1 / 3, abs=1e-15)
    with pytest.raises(RayattrError, match=">= 1"):
        mixing_lambda([torch.ones(2)], [torch.ones(2)], target_downweight_components=0)
    with pytest.raises(RayattrError, match="empty"):
        mixing_lambda([], [torch.ones(2)])


def test_mixing_lambda_warns_once_when_saturated() -> None:
    """Two query eigenvalues and a target of 3: s_q[2] = 0, so lambda = 1 and the mix is the query moment."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lam, k = mixing_lambda([torch.tensor([10.0, 5.0, 1.0])], [torch.tensor([4.0, 2.0, 0.0])], 3)
    assert (lam, k) == (1.0, 2)
    assert len(caught) == 1 and caught[0].category is RayattrWarning and "saturated at 1.0" in str(caught[0].message)
    assert "2 nonzero eigenvalues" in str(caught[0].message) and "below 2" in str(caught[0].message)


def test_mix_formula_and_identical_statistics() -> None:
    h = random_psd(5, seed=27)
    lam, _ = mixing_lambda([eigh_psd(h).values], [eigh_psd(h).values], target_downweight_components=3)
    assert lam == pytest.approx(0.5, abs=1e-15)
    assert max_err(mix(h, h, lam), h) <= 1e-15
    assert max_err(mix(h, h, 0.3), h) <= 1e-15
    other = random_psd(5, seed=28)
    assert max_err(mix(h, other, 0.25), 0.25 * h + 0.75 * other) == 0.0
    with pytest.raises(RayattrError, match="shapes"):
        mix(h, torch.eye(4, dtype=F64), 0.5)
    with pytest.raises(RayattrError, match=r"\[0, 1\]"):
        mix(h, h, 1.5)


# ---------------------------------------------------------------- save / load

PLAIN = "gpt_neox.layers.0.mlp.dense_h_to_4h"
ODD = "transformer/h.0 attn:c_attn"


def sample_stats() -> dict[str, dict[str, torch.Tensor]]:
    g = gen(29)
    return {
        PLAIN: {
            "second_moment": torch.randn(6, 6, generator=g),
            "eigenvalues": torch.rand(6, generator=g, dtype=F64),
        },
        ODD: {
            "A": torch.randn(4, 4, generator=g, dtype=F64),
            "S": torch.randn(3, 3, generator=g, dtype=F64)[:, :2],  # non-contiguous view
        },
    }


@pytest.fixture
def saved(tmp_path):
    stats = sample_stats()
    save_stats(tmp_path / "stats", stats, {"kind": "kfac", "counts": {PLAIN: 7, ODD: 9}})
    return tmp_path / "stats", stats


def test_save_load_round_trip_is_exact(saved) -> None:
    directory, stats = saved
    loaded, manifest = load_stats(directory)
    assert set(loaded) == set(stats)
    for module, named in stats.items():
        assert set(loaded[module]) == set(named)
        for key, tensor in named.items():
            assert loaded[module][key].dtype == tensor.dtype
            assert torch.equal(loaded[module][key], tensor)
    assert manifest["kind"] == "kfac" and manifest["counts"] == {PLAIN: 7, ODD: 9}
    assert manifest["format_version"] == 1
    assert manifest["files"][PLAIN]["file"] == f"{PLAIN}.safetensors"
    odd_file = manifest["files"][ODD]["file"]
    assert odd_file == module_filename(ODD) and "/" not in odd_file and " " not in odd_file
    assert manifest["files"][ODD]["tensors"] == {"A": [4, 4], "S": [3, 2]}
    assert sorted(p.name for p in directory.iterdir()) == sorted([MANIFEST, f"{PLAIN}.safetensors", odd_file])


def test_save_overwrites_previous_stats(saved) -> None:
    directory, _ = saved
    new = {PLAIN: {"second_moment": torch.eye(2)}}
    save_stats(directory, new, {"kind": "dense"})
    loaded, manifest = load_stats(directory)
    assert list(loaded) == [PLAIN] and torch.equal(loaded[PLAIN]["second_moment"], torch.eye(2))
    assert manifest["kind"] == "dense"


def test_save_rejects_reserved_manifest_keys(tmp_path) -> None:
    with pytest.raises(RayattrError, match="reserved"):
        save_stats(tmp_path, {}, {"files": {}})


def corrupt_delete(directory) -> None:
    (directory / f"{PLAIN}.safetensors").unlink()


def corrupt_flip_byte(directory) -> None:
    path = directory / f"{PLAIN}.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))


def corrupt_shape(directory) -> None:
    path = directory / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["files"][ODD]["tensors"]["A"] = [4, 5]
    path.write_text(json.dumps(manifest))


def corrupt_manifest_missing(directory) -> None:
    (directory / MANIFEST).unlink()


@pytest.mark.parametrize(
    "corrupt, problem",
    [
        (corrupt_delete, f"missing statistics file .*{PLAIN}"),
        (corrupt_flip_byte, f"checksum mismatch .*{PLAIN}"),
        (corrupt_shape, r"shape mismatch .*'A' has shape \[4, 4\], manifest says \[4, 5\]"),
    ],
)
def test_load_detects_corruption(saved, corrupt, problem: str) -> None:
    directory, _ = saved
    corrupt(directory)
    with pytest.raises(RayattrError, match=problem) as info:
        load_stats(directory)
    assert "re-run the fit" in str(info.value)


def test_missing_manifest_names_the_paths_accepted(saved) -> None:
    directory, _ = saved
    corrupt_manifest_missing(directory)
    with pytest.raises(RayattrError, match="no statistics at .*pass the RUN_PATH given to `rayattr hessian`"):
        load_stats(directory)


def test_load_accepts_the_hessian_run_path(saved) -> None:
    """`--hessian-path RUN` means RUN/stats, where `rayattr hessian RUN` wrote them."""
    directory, expected = saved
    assert directory.name == STATS_SUBDIR
    tensors, _ = load_stats(directory.parent)
    assert sorted(tensors) == sorted(expected)
    assert all(torch.equal(tensors[m][k], t) for m, named in expected.items() for k, t in named.items())


def test_eigen_is_frozen() -> None:
    eig = Eigen(values=torch.zeros(1, dtype=F64), vectors=torch.eye(1, dtype=F64))
    with pytest.raises(AttributeError):
        eig.values = torch.ones(1)  # type: ignore[misc]
