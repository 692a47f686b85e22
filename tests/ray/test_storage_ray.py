"""Statistics fitted on the session's Ray into a local path and a ``file://`` URI."""

from __future__ import annotations

import torch
from helpers import storage_root  # noqa: F401 - the fixture root

from rayattr import storage
from rayattr.config import DataSpec, GradSpec, ModelSpec, RunSpec
from rayattr.hessian.factors import load_stats
from rayattr.hessian.precondition import Preconditioner
from rayattr.ray.entry import fit


def test_statistics_fitted_into_a_uri(ray_session, root, offline_fixture):
    spec = RunSpec(ModelSpec(str(offline_fixture.neox)), DataSpec(str(offline_fixture.train), split="train[:12]"),
                   GradSpec(projection_dim=2))
    out = storage.join(root, "stats")
    fit(out, spec, "second-moment")
    tensors, manifest = load_stats(out)
    assert manifest["examples"] == 12 and len(tensors) == len(manifest["modules"])
    rows = torch.randn(3, sum(m["width"] for m in manifest["modules"]), dtype=torch.float64)
    half = Preconditioner.load(out, power=-0.5)
    torch.testing.assert_close(half.apply(half.apply(rows)), Preconditioner.load(out).apply(rows))
