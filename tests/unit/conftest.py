"""Unit layer: tests that never start Ray (math, projections, codecs, stores, configs, data, fixtures).

A unit test must not start Ray, directly or through a fixture: not the session's Ray, no executor of
``rayattr.ray`` (``build``, ``fit``, ``score``, ``reduce``), ``rayattr.trackstar.trackstar`` or
``rayattr.api``'s Ray functions, and no CLI command that runs one. Such a test belongs in ``tests/ray``
or ``tests/e2e``. The guard below fails a unit test after which Ray is running when it was not
before the test's setup; the root conftest runs the unit tests first, so Ray is not running then.
"""

from __future__ import annotations

import sys

import pytest

RAY_BEFORE = pytest.StashKey[bool]()


def ray_running() -> bool:
    ray = sys.modules.get("ray")  # not imported: not running
    return ray is not None and ray.is_initialized()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Note whether Ray runs before any of the test's fixtures (module-scoped ones too) are set up."""
    item.stash[RAY_BEFORE] = ray_running()


@pytest.fixture(autouse=True)
def ray_not_started(request: pytest.FixtureRequest):
    """Fail the unit test if Ray was started by it or its fixtures."""
    yield
    if ray_running() and not request.node.stash.get(RAY_BEFORE, True):
        import ray

        ray.shutdown()  # the next unit tests start from a Ray-free process again
        pytest.fail(f"{request.node.nodeid} started Ray: a unit test must not (move it to tests/ray or tests/e2e)",
                    pytrace=False)
