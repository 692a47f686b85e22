"""Shared fixtures for the test suite: the offline fixture, its tokenizer and tiny models, the session's
S3 endpoint (``s3``: moto, for run paths on an object store) and the session's Ray; and the suite's order by layer.

The tests are in three layers: ``unit/`` (never starts Ray), ``ray/`` (runs on the session's Ray)
and ``e2e/`` (the CLI, child processes, clusters, the examples). They run in that order, so Ray is
not running yet while the unit tests run, and ``unit/conftest.py`` can fail one that starts it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch
from objectstore import CREDENTIALS, UNSET, Front, free_port, start_moto
from transformers import AutoModelForCausalLM, AutoTokenizer

from rayattr.fixtures import Fixture, default_cache_dir, make_fixture


@pytest.fixture(scope="session")
def offline_fixture() -> Fixture:
    """The default (easy, seed 0) offline fixture, generated once and cached on disk."""
    return make_fixture(default_cache_dir())


@pytest.fixture(scope="session")
def fixture_tokenizer(offline_fixture: Fixture):
    return AutoTokenizer.from_pretrained(offline_fixture.tokenizer)


@pytest.fixture(scope="session")
def load_fixture_model(offline_fixture: Fixture) -> Callable[..., torch.nn.Module]:
    """``load(kind, trainable=False)`` -> a freshly loaded tiny model ("neox" or "gpt2") in eval mode.

    Each call returns a new instance, so tests that register hooks, freeze or
    edit weights never affect one another.
    """

    def load(kind: str, trainable: bool = False) -> torch.nn.Module:
        torch.manual_seed(0)
        path = {"neox": offline_fixture.neox, "gpt2": offline_fixture.gpt2}[kind]
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        model.requires_grad_(trainable)
        return model

    return load


@pytest.fixture(scope="session")
def s3_front() -> Iterator[Front]:
    """The S3 endpoint of the session (``objectstore.Front``, refusing until ``s3`` puts a server behind it),
    in the environment with test credentials from before the session's Ray starts, so its workers inherit
    them; the tests never reach a real store."""
    front = Front()
    with pytest.MonkeyPatch.context() as env:
        for name in UNSET:
            env.delenv(name, raising=False)
        for name, value in {**CREDENTIALS, "AWS_ENDPOINT_URL": front.url}.items():
            env.setenv(name, value)
        yield front
    front.cut()


@pytest.fixture(scope="session")
def s3(s3_front: Front) -> Iterator[Front]:
    """A moto S3 server behind the session's endpoint, with an empty bucket ``bucket``."""
    pytest.importorskip("moto.server", reason="the object-store tests need moto[server] (pip install -e '.[dev]')")
    port = free_port()
    server = start_moto(port)
    try:
        s3_front.upstream = port
        pafs.S3FileSystem(endpoint_override=s3_front.url, allow_bucket_creation=True).create_dir("bucket")
        yield s3_front
    finally:
        s3_front.upstream = None
        server.terminate()
        server.wait()


@pytest.fixture(scope="session")
def ray_session(s3_front: Front):
    """One embedded local Ray for the whole session (starting Ray costs seconds); a new one,
    never a cluster that another test (or test process) has started on this machine."""
    import ray
    from helpers import RAY_TEST_ENV

    from rayattr.ray.pipeline import ensure_ray

    os.environ.pop("RAY_ADDRESS", None)
    with pytest.MonkeyPatch.context() as env:  # read by the raylet that ensure_ray starts
        for name, value in RAY_TEST_ENV.items():
            env.setenv(name, value)
        ensure_ray("local")
    yield
    ray.shutdown()


LAYERS = ("unit", "ray", "e2e")  # the order they run in


def _layer(item: pytest.Item) -> int:
    """``LAYERS``' index of the directory under tests/ that holds ``item``; a test outside them runs after the unit tests."""
    try:
        top = item.path.relative_to(Path(__file__).parent).parts[0]
    except ValueError:
        return 1
    return LAYERS.index(top) if top in LAYERS else 1


@pytest.hookimpl(trylast=True)  # after pytest's own reordering (parametrized fixtures), which stays within a layer
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Unit tests first, then ray, then e2e; the order within a layer is kept (a stable sort)."""
    items.sort(key=_layer)
