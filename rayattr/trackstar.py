"""TrackStar end to end, as resumable steps under one run path.

normalizer -> second moments of an index sample and of the query set -> mix
-> query gradients with ``H^-1/2``, unit-normalized -> on-the-fly cosine
scoring of the training set -> top-k. Each step writes its output under
``RUN_PATH`` and a marker in ``RUN_PATH/steps``; a resumed run skips every
step whose marker is there. The whole configuration is saved as
``RUN_PATH/trackstar.yaml`` (the format of rayattr.configfile), which
``rayattr run`` and ``jobs/trackstar.py`` replay.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rayattr import storage
from rayattr.commands import STEPS_DIR, TRACKSTAR_CONFIG, NormalizerConfig, TrackstarSpec
from rayattr.config import RayattrError, RunSpec
from rayattr.configfile import save_config
from rayattr.data import sample_split
from rayattr.hessian.methods import SecondMoment
from rayattr.hessian.mixing import mix_stats
from rayattr.ray.entry import fit, make_normalizer, score
from rayattr.ray.combine import eigh_all
from rayattr.ray.pipeline import ensure_ray
from rayattr.ray.score import reduce
from rayattr.score import ScoreSettings


@dataclass
class StepReport:
    name: str
    skipped: bool
    seconds: float
    detail: dict[str, Any]

    def describe(self) -> str:
        return f"{self.name}: {'skipped (done)' if self.skipped else f'done in {self.seconds:.1f} s'} {self.detail}"


class Steps:
    """Markers of completed steps: a step runs unless its marker says it is done."""

    def __init__(self, spec: TrackstarSpec, resume: bool, on_step: Callable[[StepReport], None] | None) -> None:
        self.root = storage.join(spec.run_path, STEPS_DIR)
        self.fingerprint = spec.fingerprint
        self.on_step = on_step
        self.reports: list[StepReport] = []
        done = storage.list_files(self.root, ".json")
        if done and not resume:
            raise RayattrError(f"{spec.run_path} already holds a trackstar run; pass --resume to continue it, or a new RUN_PATH")
        for marker in done:
            if self._record(marker).get("fingerprint") != self.fingerprint:
                raise RayattrError(
                    f"{spec.run_path} was made with other settings (see {storage.join(spec.run_path, TRACKSTAR_CONFIG)}); "
                    "resume it with those settings, or use a new RUN_PATH"
                )

    def _record(self, marker: str) -> dict[str, Any]:
        return json.loads(storage.read_bytes(storage.join(self.root, marker)))

    def run(self, name: str, work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run ``work`` unless ``name`` is done; returns its recorded detail either way."""
        marker = f"{name}.json"
        if storage.exists(storage.join(self.root, marker)):
            record = self._record(marker)
            self._report(StepReport(name, True, record["seconds"], record["detail"]))
            return record["detail"]
        start = time.perf_counter()
        detail = work()
        seconds = time.perf_counter() - start
        record = {"fingerprint": self.fingerprint, "seconds": seconds, "detail": detail}
        storage.write_bytes(storage.join(self.root, marker), json.dumps(record).encode())
        self._report(StepReport(name, False, seconds, detail))
        return detail

    def _report(self, report: StepReport) -> None:
        self.reports.append(report)
        if self.on_step:
            self.on_step(report)


def trackstar(spec: TrackstarSpec, *, resume: bool = False, ray_address: str | None = None,
              on_step: Callable[[StepReport], None] | None = None) -> list[StepReport]:
    """Run (or resume) the TrackStar pipeline under ``spec.run_path``: normalizer, index and
    query second moments, their mix, the preconditioned queries, scoring, top-k."""
    root = spec.run_path
    steps = Steps(spec, resume, on_step)
    save_config(storage.join(spec.run_path, TRACKSTAR_CONFIG), spec)
    sample = dataclasses.replace(spec.train, split=sample_split(spec.train.split, spec.stats_sample_size))
    common = {"workers": spec.workers, "ray_address": ray_address}
    grads = spec.grads
    if spec.normalizer != "none":
        out = storage.join(root, "normalizer")
        # moments of full gradients; the fit stores no rows, so no row dtype applies
        full = dataclasses.replace(grads, projection_dim=0, dtype="float32")
        normalizer = NormalizerConfig(out, spec.model, None if spec.optimizer_state else sample, full,
                                      spec.optimizer_state, spec.normalizer, spec.workers)
        steps.run("normalizer", lambda: {"source": make_normalizer(normalizer, ray_address).source})
        grads = dataclasses.replace(grads, normalizer=out)
    index_stats, query_stats = storage.join(root, "index_stats"), storage.join(root, "query_stats")
    steps.run("index_stats", lambda: _summary(fit(index_stats, RunSpec(spec.model, sample, grads), SecondMoment.name,
                                                  **common)))
    hessian = index_stats
    # The query set is small: its rows stay float32 whatever the training rows are stored in (same space).
    query_grads = dataclasses.replace(grads, dtype="float32")
    if spec.mix:
        steps.run("query_stats", lambda: _summary(fit(query_stats, RunSpec(spec.model, spec.query, query_grads),
                                                      SecondMoment.name, **common)))
        hessian = storage.join(root, "mixed")

        def mix_on_ray() -> dict[str, Any]:
            ensure_ray(ray_address)  # a resumed run may reach this step first
            lam, k = mix_stats(query_stats, index_stats, hessian, spec.target_downweight_components, eigh_all)
            return {"lambda": lam, "k": k}

        steps.run("mixed", mix_on_ray)
    query_path = storage.join(root, "query")
    steps.run("query", lambda: _progress(reduce(query_path, RunSpec(spec.model, spec.query, query_grads), aggregation="none",
                                                unit_normalize=True, hessian=hessian, **common)))
    settings = ScoreSettings(unit_normalize=True, hessian=hessian, per_token=spec.per_token, top_k=spec.top_k,
                             query_batch_size=spec.query_batch_size, keep_gradients=spec.keep_gradients)
    steps.run("score", lambda: _progress(score(spec.run_path, query_path, settings,
                                               spec=RunSpec(spec.model, spec.train, grads), **common).progress))
    return steps.reports


def _summary(fitted) -> dict[str, Any]:
    return {"examples": fitted.examples, "tokens": fitted.tokens}


def _progress(progress) -> dict[str, Any]:
    return {"docs": progress.docs, "written": progress.written, "tokens": progress.tokens,
            "tokens_per_second": round(progress.tokens_per_second, 1)}
