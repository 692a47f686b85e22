"""The registry of statistics methods: one place maps a name to its passes, finisher and inversion."""

from __future__ import annotations

import pytest
import torch

from rayattr.config import DataSpec, GradSpec, ModelSpec, RayattrError, RunSpec
from rayattr.hessian.factors import inverse_multiplier, kfac_grid
from rayattr.hessian.methods import HessianMethod, check_method


def _spec(**grads) -> RunSpec:
    return RunSpec(ModelSpec("m"), DataSpec("d"), GradSpec(**grads))


def test_every_method_is_registered_once_with_its_first_pass():
    registry = HessianMethod.registry
    assert {name: method.first_pass for name, method in registry.items()} == {
        "second-moment": "second-moment", "kfac": "kfac", "ekfac": "kfac", "normalizer": "normalizer"}
    assert [name for name, method in registry.items() if method.preconditions] == ["second-moment", "kfac", "ekfac"]


def test_unknown_method_and_per_module_statistics_of_a_sketch_are_refused():
    with pytest.raises(RayattrError, match="unknown --method 'eva'; choose one of second-moment, kfac, ekfac, normalizer"):
        check_method("eva", _spec())
    with pytest.raises(RayattrError, match="kfac statistics are per module, but a affd sketch"):
        check_method("kfac", _spec(projection_type="affd", projection_dim=64))
    check_method("normalizer", _spec(projection_type="affd", projection_dim=64))  # not per module: allowed


def test_factored_operators_invert_their_own_grid():
    torch.manual_seed(0)
    q_out, q_in = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))[0], torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))[0]
    tensors = {"q_out": q_out, "q_in": q_in, "s_values": torch.rand(3, dtype=torch.float64),
               "a_values": torch.rand(4, dtype=torch.float64), "lambda": torch.rand(3, 4, dtype=torch.float64)}
    for name, grid in (("kfac", kfac_grid(tensors["s_values"], tensors["a_values"])), ("ekfac", tensors["lambda"])):
        got_out, got_in, multiplier = HessianMethod.get(name).operator(tensors, "damped_inverse", 0.1, -1.0)
        assert got_out is q_out and got_in is q_in
        torch.testing.assert_close(multiplier, inverse_multiplier(grid.flatten(), "damped_inverse", 0.1, -1.0).view(3, 4))
