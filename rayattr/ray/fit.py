"""Statistics passes on Ray: StatsWorker actors accumulate, Ray tasks reduce and decompose.

The token stream is split between the actors with ``streaming_split``; each
actor keeps one model replica and float64 partial sums, and returns only those
sums. EK-FAC runs a second pass over the same actors with the K-FAC eigenbases
broadcast through the object store.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import ray
import torch

from rayattr.config import RayattrError, RunSpec, stable_hash
from rayattr.data import Shard, TokenizedDocs
from rayattr.grads.engine import GradientEngine, engine_for
from rayattr.grads.normalizer import Normalizer, NormalizerKind
from rayattr.hessian.factors import save_stats
from rayattr.hessian.stats import METHODS, RowAccumulator, Sums, TokenAccumulator
from rayattr.ray.checkpoint import PartialWriter, load_partials, pass_directory, remove_partials
from rayattr.ray.pipeline import WorkerResources, prepare, resume_plan, token_stream
from rayattr.ray.progress import peak_rss_mb
from rayattr.ray.reduce import eigh_all, tree_reduce
from rayattr.space import TableMeta, space_of

DOCS_PER_STEP = 256
CHECKPOINT_SECONDS = 60.0  # how often a worker saves its partial sums


class StatsPass:
    """One statistics pass on one engine: K-FAC taps per-token factors, the other
    methods add finished rows. Replica actors and ZeRO workers both feed it."""

    def __init__(self, engine: GradientEngine, method: str, eigenbases: Sums | None = None) -> None:
        self.engine = engine
        self.method = method
        if method == "kfac":
            self.accumulator = engine.collector.tap = TokenAccumulator(engine.layouts)
        else:
            self.accumulator = RowAccumulator(method, engine.layouts, eigenbases)

    def __call__(self, docs: TokenizedDocs) -> None:
        if self.method == "kfac":
            self.engine.observe(docs)
        else:
            self.accumulator.update(torch.from_numpy(self.engine.rows(docs).grads))

    def close(self) -> Sums:
        """Detach from the engine and return the partial sums."""
        self.engine.collector.tap = None
        return self.accumulator.sums


@ray.remote
class StatsWorker:
    """A model replica that turns a stream of tokenized docs into partial sums."""

    def __init__(self, spec: RunSpec, threads: int) -> None:
        torch.set_num_threads(threads)
        self.engine, self.meta = engine_for(spec)
        self.busy_seconds = 0.0

    def consume(self, stream, method: str, eigenbases: Sums | None, checkpoints: PartialWriter) -> Sums:
        """Partial sums over this actor's split, checkpointed as they grow."""
        stats = StatsPass(self.engine, method, eigenbases)
        try:
            for batch in stream.iter_batches(batch_size=DOCS_PER_STEP, batch_format="pyarrow"):
                docs = TokenizedDocs.from_arrow(batch)
                started = time.perf_counter()
                stats(docs)
                checkpoints.covered(docs.ids)
                checkpoints.maybe_save(stats.accumulator.sums)
                self.busy_seconds += time.perf_counter() - started
            checkpoints.maybe_save(stats.accumulator.sums, force=True)
        finally:
            sums = stats.close()
        return sums

    def table_meta(self) -> TableMeta:
        return self.meta

    def report(self) -> tuple[float, float]:
        """``(seconds spent computing, peak RSS in MB)`` of this actor, for the fit summary."""
        return self.busy_seconds, peak_rss_mb()


@dataclass
class FitSummary:
    method: str
    examples: int
    tokens: int
    seconds: float
    modules: dict[str, dict] = field(default_factory=dict)  # per module: shape, top eigenvalue, condition
    worker_compute_seconds: float = 0.0  # the busiest actor's time in forward/backward/accumulation
    worker_peak_rss_mb: float = 0.0
    resumed_examples: int = 0  # documents whose sums were restored from an interrupted run's checkpoints


@dataclass
class _Passes:
    """Replica passes of one fit: streaming splits over the actors, checkpointed under ``out_dir``."""

    spec: RunSpec
    shards: list[Shard]
    actors: list
    out_dir: str
    checkpoint_seconds: float
    resumed: int = 0  # documents whose sums came from checkpoints of an interrupted run

    def __call__(self, method: str, eigenbases: Sums | None = None) -> tuple[Sums, TableMeta]:
        """One pass: the documents no checkpoint covers, split between the actors; old and
        new partial sums reduced in a tree."""
        directory = pass_directory(self.out_dir, self.spec, method, eigenbases)
        restored = load_partials(directory)
        self.resumed += sum(len(p.ids) for p in restored)
        items = resume_plan(self.shards, (p.ids for p in restored))
        partials = [ray.put(p.sums) for p in restored]
        if items:
            splits = token_stream(self.spec, items).streaming_split(len(self.actors), equal=False)
            bases = ray.put(eigenbases) if eigenbases is not None else None
            partials += [actor.consume.remote(split, method, bases, PartialWriter(directory, self.checkpoint_seconds))
                         for actor, split in zip(self.actors, splits)]
        meta = same_meta(ray.get([actor.table_meta.remote() for actor in self.actors]))
        return ray.get(tree_reduce(partials)), meta


def same_meta(metas: list[TableMeta]) -> TableMeta:
    """The one table description all workers agree on."""
    if any(m != metas[0] for m in metas):
        raise RayattrError("workers loaded different models or settings; make every node load the same checkpoint")
    return metas[0]


def replica_fit(out_dir: str, spec: RunSpec, method: str, *, workers: int = 1, ray_address: str | None = None,
                normalizer_kind: NormalizerKind = "adafactor",
                checkpoint_seconds: float = CHECKPOINT_SECONDS) -> FitSummary:
    """Fit ``method`` statistics of ``spec.data`` on model replicas and save them under ``out_dir``.

    second-moment: ``H = E[p p^T]`` per module with its eigendecomposition;
    kfac: ``A``, ``S`` and their eigenbases; ekfac: K-FAC plus the corrected
    eigenvalues ``Lambda``; normalizer: an Adam/Adafactor normalizer fitted from data.
    Workers checkpoint their partial sums every ``checkpoint_seconds``; rerunning
    an interrupted fit with the same arguments resumes from them.
    (``rayattr.ray.entry.fit`` also runs ZeRO-3.)
    """
    check_method(method, spec)
    start = time.perf_counter()
    shards = prepare(spec, ray_address, workers)
    resources = WorkerResources.plan(workers)
    actors = [StatsWorker.options(num_cpus=resources.num_cpus, num_gpus=resources.num_gpus, scheduling_strategy="SPREAD")
              .remote(spec, resources.threads) for _ in range(workers)]
    passes = _Passes(spec, shards, actors, out_dir, checkpoint_seconds)
    summary = fit_passes(out_dir, spec, method, passes, normalizer_kind)
    remove_partials(out_dir)
    busy, rss = _report(actors)
    return replace(summary, seconds=time.perf_counter() - start, worker_compute_seconds=busy, worker_peak_rss_mb=rss,
                   resumed_examples=passes.resumed)


def check_method(method: str, spec: RunSpec) -> None:
    """Refuse an unknown method, or per-module statistics of a sketch, before any worker starts."""
    if method not in METHODS:
        raise RayattrError(f"unknown --method {method!r}; choose one of {', '.join(METHODS)}")
    if spec.grads.sketched and method != "normalizer":
        raise RayattrError(
            f"{method} statistics are per module, but a {spec.grads.projection_type} sketch mixes all modules "
            "into one vector; fit them with a Kronecker projection (--projection-type rademacher or normal)"
        )


RunPass = Callable[[str, Sums | None], tuple[Sums, TableMeta]]  # (pass method, eigenbases) -> reduced sums, meta


def fit_passes(out_dir: str, spec: RunSpec, method: str, run_pass: RunPass, normalizer_kind: NormalizerKind) -> FitSummary:
    """Run the passes ``method`` needs through ``run_pass``, finish and save the result.

    Everything after the reduction, shared by replica actors and ZeRO worker
    groups; the caller fills in the timings.
    """
    if method == "normalizer":
        sums, meta = run_pass("normalizer", None)
        normalizer = fitted_normalizer(sums, normalizer_kind, source=f"fitted on {spec.data.dataset} [{spec.data.split}]")
        normalizer.save(out_dir)
        return FitSummary(method, int(next(iter(sums.values()))["count"]), 0, 0.0)
    sums, meta = run_pass("kfac" if method in ("kfac", "ekfac") else "second-moment", None)
    tensors, summary = (_finish_second_moment if method == "second-moment" else _finish_kfac)(sums)
    if method == "ekfac":
        bases = {name: {"q_out": t["q_out"], "q_in": t["q_in"]} for name, t in tensors.items()}
        corrections, _ = run_pass("ekfac", bases)
        for name, sums_m in corrections.items():
            tensors[name]["lambda"] = sums_m["lambda_sum"] / sums_m["count"]
            summary["examples"] = int(sums_m["count"])
    for module in meta.modules:
        summary["modules"][module["name"]]["shape"] = f"{module['p_out']}x{module['p_in']}"
    save_stats(out_dir, tensors, stats_manifest(method, meta, summary))
    return FitSummary(method, summary["examples"], summary["tokens"], 0.0, summary["modules"])


def _report(actors: list) -> tuple[float, float]:
    reports = ray.get([actor.report.remote() for actor in actors])
    return max(busy for busy, _ in reports), max(rss for _, rss in reports)


def stats_manifest(method: str, meta: TableMeta, summary: dict) -> dict:
    """What a statistics directory records: method, counts and the fingerprints it must match."""
    identity = space_of(meta)
    return {"method": method, **identity, "fingerprint": stable_hash(identity | {"method": method}),
            "examples": summary["examples"], "tokens": summary["tokens"], "data": meta.data, "spec_version": 1}


def _finish_second_moment(sums: Sums) -> tuple[dict, dict]:
    matrices = {name: s["xx"] / s["count"] for name, s in sums.items()}
    eigens = eigh_all(matrices)
    tensors = {name: {"second_moment": matrices[name], "eigenvalues": eigens[name].values,
                      "eigenvectors": eigens[name].vectors} for name in sums}
    count = int(next(iter(sums.values()))["count"])
    return tensors, {"examples": count, "tokens": 0, "modules": _spectrum_summary({n: e.values for n, e in eigens.items()})}


def _finish_kfac(sums: Sums) -> tuple[dict, dict]:
    matrices = {}
    for name, s in sums.items():
        matrices[f"{name}|A"] = s["A"] / s["tokens"]
        matrices[f"{name}|S"] = s["S"] / s["tokens"]
    eigens = eigh_all(matrices)
    tensors = {
        name: {"A": matrices[f"{name}|A"], "S": matrices[f"{name}|S"],
               "q_in": eigens[f"{name}|A"].vectors, "a_values": eigens[f"{name}|A"].values,
               "q_out": eigens[f"{name}|S"].vectors, "s_values": eigens[f"{name}|S"].values}
        for name in sums
    }
    tokens = int(next(iter(sums.values()))["tokens"])
    grid = {name: torch.outer(t["s_values"], t["a_values"]).flatten() for name, t in tensors.items()}
    return tensors, {"examples": 0, "tokens": tokens, "modules": _spectrum_summary(grid)}


def _spectrum_summary(values: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    out = {}
    for name, v in values.items():
        top, positive = float(v.max()), v[v > 0]
        out[name] = {"top_eigenvalue": top, "condition": top / float(positive.min()) if positive.numel() else float("inf")}
    return out


def fitted_normalizer(sums: Sums, kind: NormalizerKind, source: str) -> Normalizer:
    """Mean squared per-example gradients (Adam), or their row/column means (Adafactor)."""
    moments = {name: {"v": (s["sq"] / s["count"]).float()} for name, s in sums.items()}
    normalizer = Normalizer("adam", moments, source)
    return normalizer.to_adafactor() if kind == "adafactor" else normalizer

