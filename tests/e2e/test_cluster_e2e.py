"""Cluster scale: two-node builds and `ray job submit` to a local head.

Both run on one two-node cluster that cluster/local.sh starts for this module (starting one
costs seconds), from child processes, so they never touch the session's embedded Ray.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import ROOT, assert_rows_close

from rayattr.api import collect_in_process, open_index, read_topk
from rayattr.config import DataSpec, GradSpec, ModelSpec, RunSpec
from rayattr.configfile import save_config
from rayattr.trackstar import TrackstarSpec

VENV_BIN = str(Path(sys.executable).parent)
GCS_PORT, DASHBOARD_PORT = 6395, 8295  # local_cluster's

TWO_NODES = textwrap.dedent("""
    import json, sys
    import ray
    from rayattr.config import DataSpec, GradSpec, ModelSpec, RunSpec
    from rayattr.ray.entry import build

    model, train, run, address = sys.argv[1:5]
    ray.init(address=address)
    spec = RunSpec(ModelSpec(model), DataSpec(train), GradSpec(projection_dim=4))
    progress = build(run, spec, workers=2, docs_per_write=8)
    print(json.dumps({"nodes": sorted(progress.nodes), "cluster": len(ray.nodes()), "written": progress.written}))
    ray.shutdown()
""")


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
def test_build_spreads_over_two_nodes_and_equals_one_process(tmp_path, offline_fixture, local_cluster):
    run, train = str(tmp_path / "run"), tmp_path / "train.parquet"
    # Sixteen row groups are sixteen shards, enough work that the second actor to load its
    # model still finds some left (the first one starts on the queue as soon as it is ready).
    pq.write_table(pq.read_table(offline_fixture.train).slice(0, 400), train, row_group_size=25)
    done = subprocess.run([sys.executable, "-c", TWO_NODES, str(offline_fixture.neox), str(train), run, f"127.0.0.1:{GCS_PORT}"],
                          env=local_cluster, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["cluster"] == 2 and report["written"] == 400
    assert len(report["nodes"]) == 2, report  # both nodes' actors wrote rows
    spec = RunSpec(ModelSpec(str(offline_fixture.neox)), DataSpec(str(train)), GradSpec(projection_dim=4))
    chunks = [rows for _, rows in collect_in_process(spec)]
    ids, vectors = open_index(run).read_matrix()
    np.testing.assert_array_equal(ids, np.concatenate([rows.ids for rows in chunks]))
    assert_rows_close(vectors, np.concatenate([rows.grads for rows in chunks]))


@pytest.mark.cluster
def test_ray_job_submit_to_a_local_head_runs_trackstar(tmp_path, offline_fixture, local_cluster):
    spec = TrackstarSpec(
        str(tmp_path / "run"), ModelSpec(str(offline_fixture.neox)), DataSpec(str(offline_fixture.train), split="train[:16]"),
        DataSpec(str(offline_fixture.queries), split="train[:4]", prompt_column="prompt", completion_column="completion"),
        GradSpec(projection_dim=4), normalizer="none", mix=False, top_k=5, workers=1,  # the job route, not the method
    )
    config = save_config(tmp_path / "trackstar.yaml", spec)
    submitted = subprocess.run(
        ["ray", "job", "submit", "--working-dir", str(ROOT), "--", "python", "jobs/trackstar.py", str(config)],
        env=local_cluster | {"RAY_ADDRESS": f"http://127.0.0.1:{DASHBOARD_PORT}"}, capture_output=True, text=True,
        timeout=600,
    )
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    assert "trackstar: finished" in submitted.stdout
    top, query_ids = read_topk(spec.run_path)
    np.testing.assert_array_equal(query_ids, np.arange(4))
    assert top.ids.shape == (4, 5) and set(top.ids.ravel()) <= set(range(16))
