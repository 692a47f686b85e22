"""Cluster scale: a job submitted to a local head (`ray job submit`) builds over two nodes.

It runs on the two-node cluster that cluster/local.sh starts, from child processes, so it never
touches the session's embedded Ray.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import re
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import ROOT, assert_rows_close

from rayattr.api import collect_in_process, open_index
from rayattr.commands import BuildConfig
from rayattr.config import DataSpec, GradSpec, ModelSpec, RunSpec
from rayattr.configfile import save_config

VENV_BIN = str(Path(sys.executable).parent)
GCS_PORT, DASHBOARD_PORT = 6395, 8295  # local_cluster's

@pytest.fixture(scope="module")
def local_cluster():
    """cluster/local.sh's cluster (a head and one more node, one CPU each) for the tests here: the
    environment of a process that reaches it. Stopped once they are done."""
    state = tempfile.mkdtemp(prefix="rayattr-", dir="/tmp")  # Ray's socket paths must stay short
    env = os.environ | {"PATH": f"{VENV_BIN}:{os.environ['PATH']}", "RAYATTR_LOCAL_DIR": state,
                        "RAYATTR_LOCAL_PORT": str(GCS_PORT), "RAYATTR_LOCAL_DASHBOARD_PORT": str(DASHBOARD_PORT)}
    env.pop("RAY_ADDRESS", None)
    local = str(ROOT / "cluster" / "local.sh")
    started = subprocess.run([local, "start"], env=env, capture_output=True, text=True, timeout=300)
    try:
        assert started.returncode == 0, started.stderr
        assert f"RAY_ADDRESS=http://127.0.0.1:{DASHBOARD_PORT}" in started.stdout
        yield env | {"RAY_AUTH_MODE": "token"}
    finally:
        subprocess.run([local, "stop"], env=env, timeout=120)
        shutil.rmtree(state, ignore_errors=True)


@pytest.mark.cluster
def test_a_job_submitted_to_the_head_builds_over_both_nodes_and_equals_one_process(tmp_path, offline_fixture,
                                                                                   local_cluster):
    """`ray job submit ... jobs/build.py CONFIG` (the route of every job: runconfig.run) on a two-node cluster."""
    run, train = str(tmp_path / "run"), tmp_path / "train.parquet"
    # Sixteen row groups are sixteen shards, enough work that the second actor to load its
    # model still finds some left (the first one starts on the queue as soon as it is ready).
    pq.write_table(pq.read_table(offline_fixture.train).slice(0, 400), train, row_group_size=25)
    spec = RunSpec(ModelSpec(str(offline_fixture.neox)), DataSpec(str(train)), GradSpec(projection_dim=4))
    config = save_config(tmp_path / "build.yaml", BuildConfig(run, spec, workers=2))
    submitted = subprocess.run(
        ["ray", "job", "submit", "--working-dir", str(ROOT), "--", "python", "jobs/build.py", str(config)],
        env=local_cluster | {"RAY_ADDRESS": f"http://127.0.0.1:{DASHBOARD_PORT}"}, capture_output=True, text=True,
        timeout=600,
    )
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    assert "build: finished" in submitted.stdout
    assert re.search(r"build: 400/400 documents, .* tokens/s, rows from 2 nodes", submitted.stdout), submitted.stdout[-3000:]
    chunks = [rows for _, rows in collect_in_process(spec)]
    ids, vectors = open_index(run).read_matrix()
    np.testing.assert_array_equal(ids, np.concatenate([rows.ids for rows in chunks]))
    assert_rows_close(vectors, np.concatenate([rows.grads for rows in chunks]))
