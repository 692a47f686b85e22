"""Outputs by URI: the same files through a local path and a ``file://`` URI (pyarrow's filesystem layer,
the one s3:// and gs:// go through)."""

from __future__ import annotations

import pytest
import torch

from rayattr import storage
from rayattr.config import DataSpec, GradSpec, ModelSpec, RunSpec
from rayattr.grads.normalizer import Normalizer
from rayattr.hessian.factors import load_stats
from rayattr.hessian.precondition import Preconditioner
from rayattr.ray.entry import fit
from rayattr.configfile import save_config
from rayattr.runconfig import BuildConfig, load_config


@pytest.fixture(params=["path", "uri"])
def root(request, tmp_path) -> str:
    return str(tmp_path) if request.param == "path" else f"file://{tmp_path}"


def test_write_read_list_remove(root):
    target = storage.join(root, "a", "b.json")
    assert not storage.exists(target) and storage.list_files(storage.join(root, "a")) == []
    storage.write_bytes(target, b"{}")
    storage.write_bytes(target, b'{"x": 1}')  # replaced whole
    assert storage.read_bytes(target) == b'{"x": 1}' and storage.list_files(storage.join(root, "a"), ".json") == ["b.json"]
    storage.remove(target)
    assert not storage.exists(target)


def test_normalizer_and_config_round_trip(root, offline_fixture):
    normalizer = Normalizer("adafactor", {"m": {"row": torch.rand(3), "col": torch.rand(2)}}, "test")
    normalizer.save(storage.join(root, "normalizer"))
    assert Normalizer.load(storage.join(root, "normalizer")).fingerprint == normalizer.fingerprint
    config = BuildConfig(root, RunSpec(ModelSpec(str(offline_fixture.neox)), DataSpec(str(offline_fixture.train))))
    assert load_config(save_config(storage.join(root, "build.yaml"), config)) == ("build", config)


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
