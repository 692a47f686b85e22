"""Preconditioning gradient rows with fitted statistics equals dense linear algebra."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rayattr.api import collect_in_process
from rayattr.config import DataSpec, GradSpec, ModelSpec, RayattrError, RunSpec
from rayattr.hessian.factors import load_stats
from rayattr.hessian.precondition import Preconditioner
from rayattr.ray.entry import fit


@pytest.fixture(scope="module")
def spec(offline_fixture) -> RunSpec:
    return RunSpec(ModelSpec(str(offline_fixture.neox)), DataSpec(str(offline_fixture.train), split="train[:40]"),
                   GradSpec(projection_dim=4))


@pytest.fixture(scope="module")
def rows(spec):
    (meta, chunk), = list(collect_in_process(spec))
    return meta, torch.from_numpy(chunk.grads).double()


def _dense_inverse(matrix: torch.Tensor, damping: float = 0.1) -> torch.Tensor:
    mu = torch.linalg.eigvalsh(matrix).clamp(min=0).mean()
    return torch.linalg.inv(matrix + damping * mu * torch.eye(matrix.shape[0], dtype=matrix.dtype))


@pytest.mark.parametrize("method", ["second-moment", "kfac", "ekfac"])
def test_preconditioner_equals_dense_inverse(ray_session, tmp_path, spec, rows, method):
    meta, x = rows
    fit(str(tmp_path / "stats"), spec, method, workers=1)
    tensors, _ = load_stats(tmp_path / "stats")
    inverse = Preconditioner.load(tmp_path / "stats", power=-1.0)
    half = Preconditioner.load(tmp_path / "stats", power=-0.5)
    inverse.check(meta)
    got = inverse.apply(x)
    torch.testing.assert_close(half.apply(half.apply(x)), got, rtol=1e-8, atol=1e-10)
    for module in inverse.modules:
        t = tensors[module["name"]]
        if method == "second-moment":
            matrix = t["second_moment"]
        elif method == "kfac":
            matrix = torch.kron(t["S"], t["A"])  # row-major vec(G): (S kron A) vec(G) = vec(S G A)
        else:
            basis = torch.kron(t["q_out"], t["q_in"])
            matrix = basis @ torch.diag(t["lambda"].flatten()) @ basis.T
        cols = slice(module["offset"], module["offset"] + module["width"])
        expected = x[:, cols] @ _dense_inverse(matrix).T
        assert float((got[:, cols] - expected).abs().max() / expected.abs().max()) <= 1e-8


def test_preconditioner_refuses_other_projection(ray_session, tmp_path, spec, offline_fixture):
    fit(str(tmp_path / "stats"), spec, "second-moment", workers=1)
    other = RunSpec(spec.model, spec.data, GradSpec(projection_dim=4, seed=1))
    (meta, _), = list(collect_in_process(RunSpec(other.model, DataSpec(str(offline_fixture.train), split="train[:2]"), other.grads)))
    with pytest.raises(RayattrError, match="disagree on projection"):
        Preconditioner.load(tmp_path / "stats").check(meta)
    np.testing.assert_equal(meta.projection["seed"], 1)
