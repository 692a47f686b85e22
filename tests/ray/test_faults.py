"""A worker process killed in the middle of a build or an on-the-fly score costs no row,
and a statistics fit killed halfway resumes from its checkpoints.

Ray Data restarts a dead pool actor and retries its batches; a batch the dead
actor had already committed is committed again and removed by the final
de-duplication pass, so the table equals a clean run's. (A ZeRO group that
loses a worker is tested in ``test_zero``.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
from helpers import KillOneWorker, assert_rows_close, read_scores

from rayattr.api import collect_in_process, open_index
from rayattr.config import DataSpec, GradSpec, ModelSpec, RunSpec
from rayattr.hessian.factors import load_stats
from rayattr.ray.entry import build, fit, score
from rayattr.ray.replicas import release_replicas
from rayattr.ray.score import ScoreSettings, reduce
from rayattr.store import Completion

DOCS = 96


@pytest.fixture(scope="module")
def spec(offline_fixture, tmp_path_factory) -> RunSpec:
    # Eight row groups are eight shards, so both actors have work; small token
    # batches make enough steps that the kill lands in the middle.
    train = tmp_path_factory.mktemp("faults") / "train.parquet"
    pq.write_table(pq.read_table(offline_fixture.train).slice(0, DOCS), train, row_group_size=DOCS // 8)
    return RunSpec(ModelSpec(str(offline_fixture.neox)), DataSpec(str(train)), GradSpec(projection_dim=4, token_batch_size=64))


@pytest.fixture(scope="module")
def reference(spec) -> np.ndarray:
    return np.concatenate([rows.grads for _, rows in collect_in_process(spec)])


def _assert_clean_table(run: str, reference: np.ndarray) -> None:
    ids, vectors = open_index(run).read_matrix()
    np.testing.assert_array_equal(ids, np.arange(DOCS))  # every id exactly once
    assert_rows_close(vectors, reference)
    assert Completion.load(run, "gradients").rows == DOCS


def test_killed_gradient_worker_costs_no_row(ray_session, tmp_path, spec, reference):
    kill = KillOneWorker("ray::Replica", after=DOCS // 3)
    run = str(tmp_path / "run")
    build(run, spec, workers=2, docs_per_write=8, on_progress=kill)
    assert kill.killed is not None and kill.docs_at_kill < DOCS  # the kill landed before the end
    _assert_clean_table(run, reference)


def test_killed_scoring_worker_costs_no_score(ray_session, tmp_path, spec, reference, offline_fixture):
    queries = RunSpec(spec.model, DataSpec(str(offline_fixture.queries), split="train[:4]", prompt_column="prompt",
                                           completion_column="completion"), spec.grads)
    reduce(str(tmp_path / "query"), queries, aggregation="none")
    kill = KillOneWorker("ray::Replica", after=DOCS // 3)
    score(str(tmp_path / "killed"), str(tmp_path / "query"), ScoreSettings(top_k=5), spec=spec, workers=2,
          docs_per_write=8, on_progress=kill)
    assert kill.killed is not None and kill.docs_at_kill < DOCS
    ids, scores = read_scores(str(tmp_path / "killed"))
    np.testing.assert_array_equal(ids, np.arange(DOCS))  # every id exactly once
    _, query_rows = open_index(str(tmp_path / "query")).read_matrix()
    expected = reference.astype(np.float64) @ query_rows.T.astype(np.float64)  # a clean run's inner products
    assert np.abs(scores - expected).max() <= 1e-5 * np.abs(expected).max()


def test_killed_fit_resumes_from_its_checkpoints(ray_session, tmp_path, spec):
    out = tmp_path / "stats"
    script = textwrap.dedent(f"""
        from rayattr.config import DataSpec, GradSpec, ModelSpec, RunSpec
        from rayattr.ray.entry import fit
        spec = RunSpec(ModelSpec({spec.model.model!r}), DataSpec({spec.data.dataset!r}),
                       GradSpec(projection_dim=4, token_batch_size=64))
        fit({str(out)!r}, spec, "ekfac", checkpoint_seconds=0.0)  # a checkpoint after every step
    """)
    # The child joins this session's Ray (starting a second one costs seconds); its replica needs
    # the CPUs this session's warm replicas hold.
    release_replicas()
    env = os.environ | {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    child = subprocess.Popen([sys.executable, "-c", script], env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and child.poll() is None and not list(out.glob("_partial/*/*.safetensors")):
            time.sleep(0.2)
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    assert list(out.glob("_partial/*/*.safetensors")) and not (out / "manifest.json").exists()
    resumed = fit(str(out), spec, "ekfac")
    assert resumed.resumed_examples > 0  # restored, not recomputed
    assert not (out / "_partial").exists()  # removed once the statistics are saved
    fit(str(tmp_path / "clean"), spec, "ekfac")
    (got, manifest), (want, clean_manifest) = load_stats(out), load_stats(tmp_path / "clean")
    assert manifest["tokens"] == clean_manifest["tokens"] and manifest["examples"] == clean_manifest["examples"]
    for name, tensors in want.items():  # float32 rows in other batches: equal to float32 rounding
        for key in ("A", "S", "lambda"):
            scale = tensors[key].abs().max()
            assert float((got[name][key] - tensors[key]).abs().max() / scale) <= 1e-6
