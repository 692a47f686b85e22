"""Run paths on an object store: every command on ``s3://bucket/...`` of a local moto server, with no local state,
and an outage of the endpoint in the middle of a build (one line, then a rerun that resumes)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray
from typer.testing import CliRunner

from rayattr import storage
from rayattr.cli import app
from rayattr.hessian.factors import load_stats
from rayattr.ray.replicas import release_replicas
from rayattr.ray.score import read_topk
from rayattr.store import GRADIENTS, GradientTable, committed_ids

runner = CliRunner()
RUN, QUERY, SCORES, TRACKSTAR = "s3://bucket/run", "s3://bucket/query", "s3://bucket/scores", "s3://bucket/trackstar"


def invoke(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def workdir(s3, ray_session, offline_fixture, tmp_path_factory) -> Path:
    """An empty working directory in which build, hessian, reduce, score and trackstar ran on the store."""
    cwd = tmp_path_factory.mktemp("s3-cwd")
    model = ["--model", str(offline_fixture.neox), "--projection-dim", "4"]
    train = ["--dataset", str(offline_fixture.train), "--split", "train[:16]"]
    queries = ["--prompt-column", "prompt", "--completion-column", "completion"]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        invoke("build", RUN, *train, *model)
        invoke("hessian", RUN, *train, *model)
        invoke("reduce", QUERY, "--dataset", str(offline_fixture.queries), "--split", "train[:3]", *queries,
               "--aggregation", "none", "--unit-normalize", "--hessian-path", f"{RUN}/stats", *model)
        invoke("score", SCORES, "--query-path", QUERY, "--index-path", RUN, "--unit-normalize",
               "--hessian-path", f"{RUN}/stats", "--top-k", "4")
        invoke("trackstar", TRACKSTAR, *train, "--query-dataset", str(offline_fixture.queries), "--query-split",
               "train[:4]", "--query-prompt-column", "prompt", "--query-completion-column", "completion",
               "--normalizer", "none", "--stats-sample-size", "16", "--top-k", "5", *model)
    return cwd


def test_every_command_writes_to_the_store_and_nothing_locally(workdir):
    assert list(workdir.iterdir()) == []
    ids, vectors = GradientTable.open(RUN).read_matrix()
    np.testing.assert_array_equal(ids, np.arange(16))
    assert np.isfinite(vectors).all() and vectors.shape[1] > 0
    _, manifest = load_stats(f"{RUN}/stats")
    assert manifest["examples"] == 16
    for path, queries, k in ((SCORES, 3, 4), (TRACKSTAR, 4, 5)):
        top, query_ids = read_topk(path)
        np.testing.assert_array_equal(query_ids, np.arange(queries))
        assert top.ids.shape == (queries, k) and set(top.ids.ravel()) <= set(range(16))
    assert storage.list_files(f"{TRACKSTAR}/steps", ".json") == sorted(
        f"{step}.json" for step in ("index_stats", "query_stats", "mixed", "query", "score"))


def test_verify_and_report_read_a_run_on_the_store(workdir, tmp_path):
    for path in (RUN, TRACKSTAR):
        assert f"{path}: no problems" in " ".join(invoke("verify", path).split())
    out = tmp_path / "report"
    invoke("report", TRACKSTAR, "--out", str(out), "--k", "5")
    index = (out / "index.html").read_text()
    assert TRACKSTAR in index and len(list((out / "queries").glob("*.html"))) == 4
    assert list(workdir.iterdir()) == []


def test_an_endpoint_outage_mid_build_fails_in_one_line_and_a_rerun_resumes(s3, ray_session, offline_fixture, tmp_path):
    """The build runs in a child process, as on the command line (joining this session's Ray: starting another
    costs seconds), and the test cuts the endpoint once the table holds rows; the rerun, with the endpoint back,
    writes the rest and every id once (the child's lease, which the outage kept it from releasing, is stale)."""
    run = "s3://bucket/outage"
    args = ["build", run, "--model", str(offline_fixture.neox), "--dataset", str(offline_fixture.train),
            "--split", "train[:300]", "--projection-dim", "4", "--token-batch-size", "128"]
    release_replicas()  # the child's replicas need the CPUs this session's warm ones hold
    child = subprocess.Popen([sys.executable, "-m", "rayattr", *args, "--ray-address", ray.get_runtime_context().gcs_address],
                             cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        versions = f"{run}/{GRADIENTS}.lance/_versions"  # a manifest per commit: the empty table's, then appends
        while len(storage.list_files(versions, ".manifest")) < 2:
            assert child.poll() is None, child.communicate()
            assert time.monotonic() < deadline, "the build committed no rows within 120 s"
            time.sleep(0.05)
        s3.cut()
        started = time.monotonic()
        stdout, stderr = child.communicate(timeout=120)
        failed_in = time.monotonic() - started
    finally:
        s3.restore()
        child.kill()
    assert child.returncode == 1, stdout + stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot reach the object store of {run} ("), stdout + stderr
    assert "check the endpoint and credentials" in lines[0] and "rerun to resume" in lines[0]
    assert failed_in < 30, failed_in
    written = committed_ids(run, GRADIENTS)
    assert 0 < written.size < 300
    invoke("build", *args[1:])
    table = GradientTable.open(run)
    np.testing.assert_array_equal(committed_ids(run, GRADIENTS), np.arange(300))
    assert table.count() == 300  # every id exactly once
    assert f"{run}: no problems" in " ".join(invoke("verify", run).split())
