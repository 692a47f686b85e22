"""The three distributed passes, each on a pool of model replicas or on a ZeRO-3 worker group.

``build`` writes a gradient table, ``fit`` statistics, ``score`` score
tables. ``zero_stage=0`` gives every worker a replica (``pipeline``,
``fit``, ``score``); ``3`` partitions the model over the workers with
DeepSpeed ZeRO-3 (``zero``), which writes the same tables. This module sits
above both executors, so neither has to know the other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Unpack

from rayattr.commands import NormalizerConfig
from rayattr.config import RayattrError, RunSpec, check_zero_stage
from rayattr.grads.normalizer import Normalizer, NormalizerKind, from_optimizer_state
from rayattr.hessian.methods import NormalizerFit
from rayattr.model import load_model
from rayattr.ray.fit import CHECKPOINT_SECONDS, FitSummary, replica_fit
from rayattr.ray.pipeline import BuildOptions, replica_build
from rayattr.ray.progress import BuildProgress
from rayattr.ray import score as scoring
from rayattr.ray.score import ScoreResult, ScoreSettings
from rayattr.ray.zero import zero_build, zero_fit, zero_score


def build(run_path: str, spec: RunSpec, *, zero_stage: int = 0, **options: Unpack[BuildOptions]) -> BuildProgress:
    """Write the gradient table of ``spec.data`` into ``run_path`` (one worker unless ``workers``); resumes an
    existing one."""
    check_zero_stage(zero_stage)
    options = BuildOptions(workers=1) | options
    return (zero_build if zero_stage else replica_build)(run_path, spec, **options)


def fit(out_dir: str, spec: RunSpec, method: str, *, workers: int = 1, ray_address: str | None = None,
        normalizer_kind: NormalizerKind = "adafactor", zero_stage: int = 0,
        checkpoint_seconds: float = CHECKPOINT_SECONDS) -> FitSummary:
    """Fit ``method`` statistics (second-moment, kfac, ekfac, normalizer) of ``spec.data`` into ``out_dir``;
    an interrupted fit (replicas or ZeRO-3) resumes from its checkpoints."""
    check_zero_stage(zero_stage)
    if zero_stage:
        return zero_fit(out_dir, spec, method, workers=workers, ray_address=ray_address, normalizer_kind=normalizer_kind,
                        checkpoint_seconds=checkpoint_seconds)
    return replica_fit(out_dir, spec, method, workers=workers, ray_address=ray_address, normalizer_kind=normalizer_kind,
                       checkpoint_seconds=checkpoint_seconds)


def score(
    run_path: str, query_path: str | None, settings: ScoreSettings, *, spec: RunSpec | None = None,
    index_path: str | None = None, step: str | None = None, workers: int = 1, ray_address: str | None = None,
    docs_per_write: int = 256, on_progress: Callable[[BuildProgress], None] | None = None, zero_stage: int = 0,
) -> ScoreResult:
    """Score a training set (``spec``: on the fly; ``index_path``: a gradient table) against a query table,
    or each row against itself (``settings.self_influence``)."""
    check_zero_stage(zero_stage)
    if zero_stage and spec is None:
        raise RayattrError("--zero-stage 3 partitions a model, and scoring a built table (--index-path) runs none; drop it")

    def on_group(group_spec: RunSpec, dataset, queries, progress: BuildProgress) -> None:
        zero_score(run_path, group_spec, dataset, queries, settings, workers=workers, docs_per_write=docs_per_write,
                   progress=progress, on_progress=on_progress)

    return scoring.score(run_path, query_path, settings, spec=spec, index_path=index_path, step=step, workers=workers,
                         ray_address=ray_address, docs_per_write=docs_per_write, on_progress=on_progress,
                         group=on_group if zero_stage else None)


def make_normalizer(config: NormalizerConfig, ray_address: str | None = None) -> Normalizer:
    """Write the normalizer ``config`` describes: moments from an optimizer state, or fitted on full gradients."""
    if config.optimizer_state:
        model = load_model(dataclasses.replace(config.model, device="cpu"))
        from_optimizer_state(config.optimizer_state, model, config.kind, config.grads.include_bias).save(config.out)
    else:
        fit(config.out, RunSpec(config.model, config.data, config.grads), NormalizerFit.name, workers=config.workers,
            ray_address=ray_address, normalizer_kind=config.kind)
    return Normalizer.load(config.out)
