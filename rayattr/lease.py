"""The run-path lease: one writing command per run path at a time.

Two commands appending to one run path would race on its tables, completion records and
checkpoints, so every writing command (``runconfig.run``) holds a lease while it runs: a small
record ``RUN_PATH/_rayattr/writer.lease`` naming its host, pid, start and a heartbeat it renews.
A second writer is refused while the record is fresh. A record is stale, and taken over, when
its pid is dead on this host or its heartbeat is older than ``STALE_SECONDS`` (a holder on
another node that went away). Readers (verify, report, search) take no lease.

The record goes through ``storage``, so it works on object stores; pyarrow's filesystems offer
no create-if-absent there, so a taker writes its record, waits a moment and reads it back, and
yields to whoever wrote last. That closes the race but for writers starting within the same instant.
A store that cannot be reached does not fail the holder's heartbeat or release: a record left
behind by this process is stale once its lease has ended, one left by another process once that
process is gone or its heartbeat is old.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace
from types import TracebackType

from rayattr import storage
from rayattr.config import RayattrError
from rayattr.store import RECORDS_DIR

LEASE_FILE = "writer.lease"  # not .json: the .json files beside it are completion records
HEARTBEAT_SECONDS = 30.0  # how often a holder renews its record
STALE_SECONDS = 300.0  # a heartbeat older than this: the holder is gone
SETTLE_SECONDS = 0.2  # between writing a record and reading it back (a concurrent taker's write lands)


@dataclass(frozen=True)
class Holder:
    """Who holds a run path's lease, and since when (seconds since the epoch)."""

    host: str
    pid: int
    started: float
    heartbeat: float
    token: str  # tells this holder's record from another's written by the same process

    def stale(self, now: float) -> bool:
        """Whether the holder is gone: its pid dead on this host, its lease in this process ended
        (a release the store missed), or no heartbeat for ``STALE_SECONDS``."""
        here = self.host == socket.gethostname()
        ended_here = here and self.pid == os.getpid() and self.token not in _HELD
        return (here and not _alive(self.pid)) or ended_here or now - self.heartbeat > STALE_SECONDS


_HELD: set[str] = set()  # tokens of the leases this process holds now


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (signal 0 probes without signalling)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def lease_uri(run_path: str) -> str:
    return storage.join(run_path, RECORDS_DIR, LEASE_FILE)


def read_holder(run_path: str) -> Holder | None:
    """The run path's lease record, or None when nobody holds it."""
    uri = lease_uri(run_path)
    if not storage.exists(uri):
        return None
    return Holder(**json.loads(storage.read_bytes(uri)))


class Lease:
    """Holds ``run_path``'s lease as a context manager, renewing it until the block ends (also on error)."""

    def __init__(self, run_path: str) -> None:
        self.run_path, self.uri = run_path, lease_uri(run_path)
        now = time.time()
        self.holder = Holder(socket.gethostname(), os.getpid(), now, now, uuid.uuid4().hex)
        self._new_run_path = False  # whether taking the lease created the run path
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._renew, name="rayattr-lease", daemon=True)

    def __enter__(self) -> Lease:
        self._refuse_if_held()
        self._new_run_path = not storage.exists(self.run_path)
        self._write()
        time.sleep(SETTLE_SECONDS)
        self._refuse_if_held()  # another taker wrote after this one: it has the lease
        _HELD.add(self.holder.token)
        self._heartbeat.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self._stop.set()
        self._heartbeat.join()
        _HELD.discard(self.holder.token)
        try:
            current = read_holder(self.run_path)
            if current is not None and current.token == self.holder.token:
                storage.remove(self.uri)
            if self._new_run_path:  # a command refused before it wrote anything leaves no run path behind
                storage.remove_empty_tree(self.run_path)
        except (RayattrError, OSError):
            pass  # the store is unreachable (the command's own error says so): the record left is stale

    def _refuse_if_held(self) -> None:
        current = read_holder(self.run_path)
        if current is None or current.token == self.holder.token or current.stale(time.time()):
            return
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(current.started))
        raise RayattrError(
            f"{self.run_path} is being written by {current.host}:{current.pid} since {since}; wait for it, or if that "
            f"process is gone remove {self.uri} (a lease without a heartbeat for {STALE_SECONDS:.0f} s is taken over)"
        )

    def _write(self) -> None:
        storage.write_bytes(self.uri, json.dumps(asdict(self.holder)).encode())

    def _renew(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            self.holder = replace(self.holder, heartbeat=time.time())
            try:
                self._write()
            except (RayattrError, OSError):
                pass  # a store outage: the command itself fails on it, or the next beat lands
