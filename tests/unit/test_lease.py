"""The run-path lease: one writer at a time, released on error, a dead or silent holder taken over
(a build refused while another process holds it: ``tests/ray/test_lease_ray.py``)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from rayattr import lease
from rayattr.commands import BuildConfig, ReportConfig, ValidateConfig
from rayattr.config import DataSpec, ModelSpec, RayattrError, RunSpec
from rayattr.lease import Lease, lease_uri, read_holder
from rayattr.runconfig import written_path


def test_a_second_writer_is_refused_until_the_first_releases(tmp_path):
    run = str(tmp_path / "run")
    with Lease(run) as first:
        holder = read_holder(run)
        assert (holder.host, holder.pid) == (socket.gethostname(), os.getpid())
        with pytest.raises(RayattrError) as refused:
            Lease(run).__enter__()
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(first.holder.started))
        assert str(refused.value) == (
            f"{run} is being written by {socket.gethostname()}:{os.getpid()} since {since}; wait for it, or if that "
            f"process is gone remove {lease_uri(run)} (a lease without a heartbeat for 300 s is taken over)")
    assert read_holder(run) is None  # released
    assert not (tmp_path / "run").exists()  # it wrote nothing else: taking the lease leaves no run path behind
    (tmp_path / "run" / "table").mkdir(parents=True)
    (tmp_path / "run" / "table" / "rows").write_text("")
    with Lease(run):
        pass
    assert (tmp_path / "run" / "table" / "rows").exists() and read_holder(run) is None  # a run path's files are kept


def test_the_lease_is_released_when_the_command_fails(tmp_path):
    run = str(tmp_path / "run")
    with pytest.raises(ValueError), Lease(run):
        raise ValueError("the command failed")
    assert read_holder(run) is None


def test_a_holder_that_died_or_stopped_its_heartbeat_is_taken_over(tmp_path):
    run = str(tmp_path / "run")
    now = time.time()
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: its pid no longer exists
    dead = child.pid
    for host, pid, heartbeat in [(socket.gethostname(), dead, now),  # died on this host
                                 ("other-node", os.getpid(), now - lease.STALE_SECONDS - 1)]:  # silent elsewhere
        (tmp_path / "run" / "_rayattr").mkdir(parents=True, exist_ok=True)
        record = {"host": host, "pid": pid, "started": now - 3600, "heartbeat": heartbeat, "token": "old"}
        (tmp_path / "run" / "_rayattr" / "writer.lease").write_text(json.dumps(record))
        with Lease(run) as taken:
            assert read_holder(run) == taken.holder
    (tmp_path / "run" / "_rayattr" / "writer.lease").write_text(json.dumps(record | {"heartbeat": time.time()}))
    with pytest.raises(RayattrError, match="is being written by other-node"):  # alive elsewhere: refused
        Lease(run).__enter__()


def test_the_heartbeat_renews_the_record(tmp_path, monkeypatch):
    monkeypatch.setattr(lease, "HEARTBEAT_SECONDS", 0.05)
    run = str(tmp_path / "run")
    with Lease(run) as held:
        first = read_holder(run).heartbeat
        time.sleep(0.5)
        assert read_holder(run).heartbeat > first and read_holder(run).token == held.holder.token


def test_writers_take_the_lease_and_readers_do_not(tmp_path):
    spec = RunSpec(ModelSpec("m"), DataSpec("d"))
    assert written_path(BuildConfig(str(tmp_path / "run"), spec)) == str(tmp_path / "run")
    assert written_path(ReportConfig(str(tmp_path / "run"), out=str(tmp_path / "report"))) is None
    assert written_path(ValidateConfig(str(tmp_path / "run"), str(tmp_path / "bank"))) is None


def test_an_unreachable_store_fails_neither_heartbeat_nor_release_and_the_record_left_is_stale(tmp_path, monkeypatch):
    """An outage (the command fails on it with its own line) must not add a thread's traceback, nor keep this
    process from writing the run path again once the store is back."""
    monkeypatch.setattr(lease, "HEARTBEAT_SECONDS", 0.05)
    run = str(tmp_path / "run")
    failures = []

    def unreachable(*args) -> None:
        failures.append(args)
        raise RayattrError("cannot reach the object store")

    first = Lease(run).__enter__()
    with monkeypatch.context() as outage:
        outage.setattr(lease.storage, "write_bytes", unreachable)
        outage.setattr(lease.storage, "remove", unreachable)
        time.sleep(0.3)
        assert first._heartbeat.is_alive()  # beats failed (failures) but the thread lives on
        first.__exit__(None, None, None)
    assert failures and read_holder(run).token == first.holder.token  # the release missed the record
    with Lease(run) as second:  # ... which is stale: its lease in this process has ended
        assert read_holder(run) == second.holder
