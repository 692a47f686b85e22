"""Outputs by URI: the same files through a local path and a ``file://`` URI (pyarrow's filesystem layer,
the one s3:// and gs:// go through)."""

from __future__ import annotations

import pytest
import torch
from helpers import storage_root  # noqa: F401 - the fixture root

from rayattr import storage
from rayattr.config import DataSpec, ModelSpec, RayattrError, RunSpec
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


# What the clients said when the tests' endpoint went away (tests/e2e/test_s3_e2e.py), trimmed.
LANCE_DOWN = ("lance error: LanceError(IO): single PUT of run/gradients.lance/data/01.lance failed after 2.3s: Generic S3 "
              "error: Error performing PUT http://127.0.0.1:32915/bucket/run/gradients.lance/data/01.lance in 404ms, "
              "after 3 retries, max_retries: 3, retry_timeout: 180s  - HTTP error: error sending request")
PYARROW_DOWN = ("When getting information for key 'run/x.json' in bucket 'bucket': AWS Error NETWORK_CONNECTION during "
                "HeadObject operation: curlCode: 7, Could not connect to server; Details: Failed to connect to "
                "127.0.0.1:5999 after 0 ms: Could not connect to server")


def test_an_unreachable_store_is_one_line_naming_it_and_the_way_on():
    with pytest.raises(RayattrError) as lance:
        with storage.reachable("s3://bucket/run"):
            try:
                raise RuntimeError(LANCE_DOWN)
            except RuntimeError as exc:  # as a Ray worker's error reaches the driver: another error caused by it
                raise ValueError("ray::Replica.run() failed") from exc
    message = str(lance.value)
    assert message.startswith("cannot reach the object store of s3://bucket/run (http://127.0.0.1:32915: error sending "
                              "request); check the endpoint and credentials") and "rerun to resume" in message
    assert "\n" not in message
    with pytest.raises(RayattrError, match=r"store of s3://bucket/run \(127.0.0.1:5999: NETWORK_CONNECTION\)"):
        with storage.reachable("s3://bucket/run"):  # a client error rayattr had already worded (wrongly) for a disk
            raise RayattrError(f"cannot write s3://bucket/run/x.json ({PYARROW_DOWN}); free space or fix permissions")
    for other in (RuntimeError("connection refused by the tokenizer server"), OSError("AWS Error NO_SUCH_BUCKET")):
        with pytest.raises(type(other)):  # not a client failing to reach a store: as it was
            with storage.reachable("s3://bucket/run"):
                raise other
