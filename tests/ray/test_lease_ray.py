"""A build on a run path that another process is writing is refused before it writes anything,
and runs once that writer is gone (its lease, left behind by a kill, is taken over)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from rayattr.api import open_index, run
from rayattr.commands import BuildConfig
from rayattr.config import DataSpec, GradSpec, ModelSpec, RayattrError, RunSpec
from rayattr.lease import read_holder

HOLD = "import sys, time; from rayattr.lease import Lease; Lease(sys.argv[1]).__enter__(); print('held', flush=True); time.sleep(600)"


def test_a_build_is_refused_while_another_process_writes_the_run_path(ray_session, tmp_path, offline_fixture):
    train = tmp_path / "train.parquet"
    pq.write_table(pq.read_table(offline_fixture.train).slice(0, 8), train)
    config = BuildConfig(str(tmp_path / "run"), RunSpec(ModelSpec(str(offline_fixture.neox)), DataSpec(str(train)),
                                                       GradSpec(projection_dim=2)))
    holder = subprocess.Popen([sys.executable, "-c", HOLD, config.run_path], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(RayattrError, match=f"^{config.run_path} is being written by {socket.gethostname()}:"
                                               f"{holder.pid} since .*; wait for it, or if that process is gone remove"):
            run(config)
        # Nothing written: the holder's lease is all the run path holds.
        assert os.listdir(config.run_path) == ["_rayattr"] and os.listdir(tmp_path / "run" / "_rayattr") == ["writer.lease"]
    finally:
        holder.send_signal(signal.SIGKILL)  # gone without releasing its lease
        holder.wait()
    assert read_holder(config.run_path).pid == holder.pid
    progress = run(config)
    assert progress.written == 8 and open_index(config.run_path).count() == 8
    assert read_holder(config.run_path) is None  # released at the end
