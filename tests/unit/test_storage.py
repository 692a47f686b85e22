"""Outputs by URI: the same files through a local path and a ``file://`` URI (pyarrow's filesystem layer,
the one s3:// and gs:// go through)."""

from __future__ import annotations

import torch
from helpers import storage_root  # noqa: F401 - the fixture root

from rayattr import storage
from rayattr.config import DataSpec, ModelSpec, RunSpec
from rayattr.configfile import save_config
from rayattr.grads.normalizer import Normalizer
from rayattr.runconfig import BuildConfig, load_config


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
