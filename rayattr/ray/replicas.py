"""A pool of model-replica actors that every pass of one driver reuses.

Starting an actor costs seconds before it does any work: a new process
imports torch, transformers, Ray Data and LanceDB, then loads the model.
Ray Data's actor pools start new actors for every dataset, so a TrackStar
run or a test session would pay that once per pass. Here the actors stay
up for the life of the driver (or until another pass needs their CPUs or
GPUs) and serve any pass: each call carries a ``Job`` (a worker class and
its arguments) and a replica builds that worker the first time it sees the
job, so only the model load is repeated, never the imports.

Batches are slices of the token stream's blocks, sent by reference: the
driver only handles object refs and the small summary each call returns.
A killed replica is restarted by Ray and its calls retried (``run``), so a
build loses no row; what it had already committed is repaired by the
pass's final de-duplication.
"""

from __future__ import annotations

import gc
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import ray
import torch

from rayattr.config import RayattrError

TOKENIZE_CPUS = 0.5
IN_FLIGHT_PER_REPLICA = 2  # keeps a replica busy without letting the first one up take the whole queue


@dataclass(frozen=True)
class WorkerResources:
    """What one replica asks of Ray, and how many torch threads it runs."""

    num_cpus: float
    num_gpus: float
    threads: int

    @classmethod
    def plan(cls, workers: int) -> WorkerResources:
        """One GPU per replica when the cluster has GPUs; otherwise share the CPUs,
        leaving room on every node for one tokenize task so the stream never starves
        (free CPU fragmented across nodes would not fit a task)."""
        resources = ray.cluster_resources()
        cpus = resources.get("CPU", 1.0)
        if resources.get("GPU", 0) >= 1:
            return cls(num_cpus=1.0, num_gpus=1.0, threads=max(1, int(cpus // workers) - 1))
        nodes = sum(1 for node in ray.nodes() if node["Alive"] and node["Resources"].get("CPU", 0) > 0)
        share = min(1.0, (cpus - TOKENIZE_CPUS * max(nodes, 1)) / workers)
        if share <= 0:
            raise RayattrError(f"the Ray cluster has {cpus} CPUs: too few for {workers} worker(s); lower --workers")
        return cls(num_cpus=share, num_gpus=0.0, threads=max(1, int(cpus // workers)))


@dataclass(frozen=True)
class Job:
    """The worker a pass runs on every replica: ``factory(**kwargs)``, called on each batch.

    ``key`` is new for every job, so a replica never serves a pass with the
    worker of another."""

    factory: Callable[..., Any]
    kwargs: dict[str, Any]
    key: str = field(default_factory=lambda: uuid.uuid4().hex)


@ray.remote
class Replica:
    """One long-lived process holding the worker of the job it last served."""

    def __init__(self) -> None:
        self.key: str | None = None
        self.worker: Any = None

    def _worker(self, job: Job) -> Any:
        if job.key != self.key:
            self.worker = self.key = None  # the previous job's model goes before the next one loads
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.worker, self.key = job.factory(**job.kwargs), job.key
        return self.worker

    def warm(self, job: Job) -> None:
        """Build the job's worker (load its model) ahead of its first batch, while the
        stream starts. A worker that fails to build is left unbuilt: the first batch's
        call builds it again and raises, where the pass reads its results."""
        try:
            self._worker(job)
        except Exception:  # raised again by that first call
            pass

    def run(self, job: Job, block: pa.Table, start: int, stop: int) -> pa.Table:
        """The job's worker on rows ``[start, stop)`` of a block (retried on a restarted replica)."""
        return self._worker(job)(block.slice(start, stop - start))

    @ray.method(max_task_retries=0)
    def run_once(self, job: Job, block: pa.Table, start: int, stop: int) -> Any:
        """``run`` for workers that keep state across batches (partial sums): a restarted replica
        has lost that state, so the call fails instead of being retried."""
        return self.run(job, block, start, stop)

    @ray.method(max_task_retries=0)
    def call(self, job: Job, method: str, *args: Any) -> Any:
        """Any method of the job's worker; never retried (it may start or end a stateful pass)."""
        return getattr(self._worker(job), method)(*args)


class ReplicaPool:
    """The replicas one pass runs on, and the resources it planned for each (its torch threads)."""

    def __init__(self, actors: list, resources: WorkerResources) -> None:
        self.actors, self.resources = actors, resources

    @property
    def size(self) -> int:
        return len(self.actors)

    def map(self, job: Job, dataset: ray.data.Dataset, batch_size: int, retried: bool = True) -> Iterator[Any]:
        """The job's worker over ``dataset`` in batches of at most ``batch_size`` rows, results as they
        finish (completion order). A batch never spans two blocks. ``retried=False``: a batch whose
        replica dies fails the pass (``run_once``)."""
        job_ref = ray.put(job)
        for actor in self.actors:  # each loads its model while the stream's first blocks are made
            actor.warm.remote(job_ref)
        pending: dict[ray.ObjectRef, int] = {}
        load = [0] * self.size
        for bundle in dataset.iter_internal_ref_bundles():
            for entry, piece in zip(bundle.blocks, bundle.slices):
                start, stop = (piece.start_offset, piece.end_offset) if piece else (0, entry.metadata.num_rows)
                for first in range(start, stop, batch_size):
                    while len(pending) >= IN_FLIGHT_PER_REPLICA * self.size:
                        yield _finished(pending, load)
                    least = min(range(self.size), key=load.__getitem__)
                    actor = self.actors[least]
                    method = actor.run if retried else actor.run_once
                    call = method.remote(job_ref, entry.ref, first, min(first + batch_size, stop))
                    pending[call], load[least] = least, load[least] + 1
        while pending:
            yield _finished(pending, load)

    def call_each(self, job: Job, method: str, args: list[tuple] | None = None) -> list[ray.ObjectRef]:
        """``method`` of the job's worker on every replica, the i-th with ``args[i]`` (default: none)."""
        job_ref = ray.put(job)
        return [actor.call.remote(job_ref, method, *(args[i] if args else ()))
                for i, actor in enumerate(self.actors)]


def _finished(pending: dict[ray.ObjectRef, int], load: list[int]) -> Any:
    """The result of the next call to finish."""
    (done,), _ = ray.wait(list(pending), num_returns=1)
    load[pending.pop(done)] -= 1
    return ray.get(done)


def _driver_id() -> str:
    return ray.get_runtime_context().get_worker_id()


@dataclass
class _Warm:
    """The driver's replica actors: ``resources`` each, on the Ray its driver ``driver`` started or joined."""

    resources: WorkerResources
    driver: str
    actors: list

    @classmethod
    def start(cls, resources: WorkerResources, size: int) -> _Warm:
        # Model replicas on different nodes share no memory or GPU; a dead replica is
        # restarted and its calls retried, however often a preemptible node goes away.
        return cls(resources, _driver_id(), [
            Replica.options(num_cpus=resources.num_cpus, num_gpus=resources.num_gpus, scheduling_strategy="SPREAD",
                            max_restarts=-1, max_task_retries=-1).remote() for _ in range(size)])

    def serves(self, resources: WorkerResources, size: int) -> bool:
        """Whether ``size`` of these actors can run a pass planned with ``resources``: as many or fewer
        than there are (a smaller pass leaves the rest idle), the same GPUs each, on this Ray."""
        return size <= len(self.actors) and resources.num_gpus == self.resources.num_gpus and self.driver == _driver_id()


_warm: _Warm | None = None


def replicas(workers: int) -> ReplicaPool:
    """``workers`` of the driver's warm replicas; new ones in their place when they are too few."""
    global _warm
    resources = WorkerResources.plan(workers)
    if _warm is None or not _warm.serves(resources, workers):
        release_replicas()
        _warm = _Warm.start(resources, workers)
    return ReplicaPool(_warm.actors[:workers], resources)


def release_replicas() -> None:
    """Stop the warm replicas (if any), freeing their CPUs and GPUs for actors of another kind."""
    global _warm
    if _warm is not None and ray.is_initialized() and _warm.driver == _driver_id():
        for actor in _warm.actors:
            ray.kill(actor, no_restart=True)
    _warm = None
