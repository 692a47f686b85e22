"""Every command's configuration: each user-settable field once, with its default and its help text.

A command's config is a frozen dataclass; its YAML form (``rayattr.configfile``)
is what ``--save-config`` writes and ``rayattr run`` / ``jobs/`` replay, and the
command line makes its options from the same fields (``rayattr.cli.options``
reads each field's ``setting`` metadata). The specs they nest (``ModelSpec``,
``DataSpec``, ``GradSpec``) and the scoring settings live beside the code that
validates them (``rayattr.config``, ``rayattr.score``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from rayattr import storage
from rayattr.config import (
    TRACKSTAR_GRADS, DataSpec, GradSpec, ModelSpec, RayattrError, RunSpec, check_zero_stage, setting, shared, stable_hash,
    from_dict, to_dict,
)
from rayattr.configfile import COMMANDS, config_command
from rayattr.grads.normalizer import NormalizerKind
from rayattr.hessian.factors import TARGET_DOWNWEIGHT_COMPONENTS
from rayattr.hessian.methods import HessianMethod, SecondMoment
from rayattr.lds.metric import BOOTSTRAP_SAMPLES
from rayattr.lds.recipe import Recipe
from rayattr.score import QueryPreprocess, ScoreSettings
from rayattr.store import SCORES

NormalizerChoice = Literal["auto", "adafactor", "adam", "none"]
TRACKSTAR_CONFIG = "trackstar.yaml"  # a trackstar run's config, in its run path
STEPS_DIR = "steps"  # a trackstar run's step markers, under its run path


@config_command("normalizer")
@dataclass(frozen=True)
class NormalizerConfig:
    """`rayattr normalizer`: Adam/Adafactor moments for `build --normalizer` in ``out``, from an optimizer state
    or fitted as mean squared full gradients of ``data`` (``grads`` says which modules and how the loss is taken)."""

    out: str
    model: ModelSpec
    data: DataSpec | None = None
    grads: GradSpec = field(default_factory=lambda: GradSpec(projection_dim=0))
    optimizer_state: str | None = shared("optimizer_state")
    kind: NormalizerKind = setting("adafactor", "adafactor (row/col moments) or adam (elementwise)")
    workers: int = shared("workers")

    def __post_init__(self) -> None:
        if (self.optimizer_state is None) == (self.data is None):
            raise RayattrError("pass exactly one of --optimizer-state PATH or --dataset D")
        if self.grads.projection_dim:
            raise RayattrError("a normalizer is fitted on full gradients: --projection-dim 0")


@dataclass(frozen=True)
class PassConfig:
    """A pass of ``spec.data`` through model replicas, or through a ZeRO-3 group, into ``run_path``."""

    run_path: str
    spec: RunSpec
    workers: int = shared("workers")
    zero_stage: int = shared("zero_stage")

    def __post_init__(self) -> None:
        check_zero_stage(self.zero_stage)


@config_command("build")
@dataclass(frozen=True)
class BuildConfig(PassConfig):
    """`rayattr build`: the gradient table of ``spec.data`` in ``run_path``."""


@config_command("train")
@dataclass(frozen=True)
class TrainConfig(PassConfig):
    """`jobs/train.py`: fine-tune ``spec.model`` on ``spec.data`` in a Ray Train worker group (DDP), every worker
    writing its examples' rows (``spec.grads``) at each optimizer step into ``run_path``."""

    learning_rate: float = setting(1e-4, "AdamW learning rate (constant)")
    epochs: int = setting(1, "Passes over the training set")
    batch_size: int = setting(8, "Examples per optimizer step on each worker")
    every_n_steps: int = setting(1, "Rows every N optimizer steps (table order records every step)")
    track_order: bool = setting(True, "Record the (step, id) of every example trained on in table order")
    normalize: NormalizerKind | None = setting(None, "adam or adafactor: divide each step's rows by the optimizer's "
                                                     "moments as the step starts")
    seed: int = setting(0, "Seed of the data order and of the model's dropout")

    def __post_init__(self) -> None:
        if self.zero_stage:
            raise RayattrError("train-time collection trains a replica per worker (DDP): drop --zero-stage")


@config_command("hessian")
@dataclass(frozen=True)
class HessianConfig(PassConfig):
    """`rayattr hessian`: statistics of ``spec.data`` in ``run_path``/stats."""

    method: str = setting(SecondMoment.name, "second-moment (any projection), kfac or ekfac", choices=tuple(
        name for name, method in HessianMethod.registry.items() if method.preconditions))


@config_command("reduce")
@dataclass(frozen=True)
class ReduceConfig:
    """`rayattr reduce`: the query vectors of ``spec.data`` in ``run_path``, preprocessed by ``preprocess``."""

    run_path: str
    spec: RunSpec
    preprocess: QueryPreprocess = dataclasses.field(default_factory=QueryPreprocess)
    workers: int = shared("workers")


@config_command("score")
@dataclass(frozen=True)
class ScoreConfig(PassConfig):
    """`rayattr score`: ``spec`` scores on the fly, ``index_path`` scores a built table."""

    spec: RunSpec | None = None  # None: score the table at ``index_path``
    query_path: str | None = setting(None, "Run path of `rayattr reduce` (its gradients table are the queries)")
    settings: ScoreSettings = dataclasses.field(default_factory=ScoreSettings)
    index_path: str | None = setting(None, "Score a `rayattr build` table instead of recomputing")
    step: str | None = setting(None, "A train-time --index-path holds a row per example and step: score step S's rows, "
                                     "or `all`: each example's rows summed over steps weighted by their learning rate")


@config_command("trackstar")
@dataclass(frozen=True)
class TrackstarSpec:
    """Everything a TrackStar run needs; its YAML form is what ``rayattr run`` reads."""

    run_path: str
    model: ModelSpec
    train: DataSpec
    query: DataSpec
    grads: GradSpec = field(default_factory=lambda: TRACKSTAR_GRADS)
    # auto: Adafactor from optimizer_state when given, else none (Bergson's convention; without
    # an optimizer state, none beat an Adafactor fitted from data: benchmarks/trackstar_sweep.py)
    normalizer: NormalizerChoice = setting("auto", "Normalizer kind; auto: adafactor from --optimizer-state when "
                                                   "given, else none")
    optimizer_state: str | None = shared("optimizer_state")
    stats_sample_size: int | None = setting(10_000, "First N training rows for the index statistics")
    target_downweight_components: int = setting(TARGET_DOWNWEIGHT_COMPONENTS, "Eigen-rank at which query and index "
                                                                              "spectra cross")
    mix: bool = setting(True, "Mix query and index second moments (--no-mix: index only)")
    top_k: int = shared("top_k")
    query_batch_size: int = shared("query_batch_size")
    per_token: bool = shared("per_token_scores")
    keep_gradients: bool = shared("keep_gradients")
    workers: int = shared("workers")

    def __post_init__(self) -> None:
        if self.normalizer not in get_args(NormalizerChoice):
            raise RayattrError(f"unknown normalizer {self.normalizer!r}; choose auto, adafactor, adam or none")
        if self.normalizer == "auto":
            object.__setattr__(self, "normalizer", "adafactor" if self.optimizer_state else "none")
        if self.optimizer_state and self.normalizer == "none":
            raise RayattrError("--optimizer-state makes a normalizer: choose --normalizer adafactor or adam with it")
        if self.grads.normalizer:
            raise RayattrError("trackstar makes its own normalizer; use --optimizer-state or --normalizer, not a directory")

    @property
    def fingerprint(self) -> str:
        """What decides the results (not the worker count)."""
        return stable_hash(to_dict(dataclasses.replace(self, workers=1)))


@dataclass(frozen=True)
class CounterfactualRun:
    """Fine-tunes of ``model`` with ``recipe`` on ``train`` (a subset of it, or weighted), judged by ``query``'s losses."""

    model: ModelSpec
    train: DataSpec
    query: DataSpec
    recipe: Recipe = field(default_factory=Recipe)
    cpus_per_task: float = shared("cpus_per_task")

    @property
    def fingerprint(self) -> str:
        """What decides a run's result (not where or how parallel it runs)."""
        return stable_hash({name: to_dict(getattr(self, name)) for name in ("model", "train", "query", "recipe")})


@config_command("retrain")
@dataclass(frozen=True, kw_only=True)
class RetrainConfig(CounterfactualRun):
    """`rayattr retrain`: the bank in ``bank_path`` of ``runs`` fine-tunes, each on a random ``fraction`` of
    ``train`` (the same batch stream with the other documents weighted 0), and each ``query``'s loss after it."""

    bank_path: str
    runs: int = setting(32, "Retrained subsets in the bank")
    fraction: float = setting(0.5, "Fraction of the training set in each subset")
    subset_seed: int = setting(0, "Seed of the subsets (the recipe's --seed orders the data)")

    def __post_init__(self) -> None:
        if self.runs < 3:
            raise RayattrError(f"--runs {self.runs}: an LDS needs at least 3 retrained subsets (32-100 is usual)")


@config_command("magic")
@dataclass(frozen=True, kw_only=True)
class MagicConfig(CounterfactualRun):
    """`rayattr magic`: exact metagradients of each ``query``'s loss after training in every ``train`` document's
    weight (MAGIC), replaying the recipe; scores (minus the metagradient) into ``run_path``."""

    run_path: str
    checkpoint_every: int = setting(16, "Keep the training state every N steps and recompute the steps between "
                                        "(memory: about N states)")
    query_batch: int = setting(8, "Queries that share one reverse pass through the training run")
    top_k: int = shared("top_k")
    workers: int = shared("workers")

    def __post_init__(self) -> None:
        if self.checkpoint_every < 1 or self.query_batch < 1 or self.workers < 1:
            raise RayattrError("--checkpoint-every, --query-batch and --workers must be >= 1")


@config_command("validate")
@dataclass(frozen=True)
class ValidateConfig:
    """`rayattr validate`: the LDS of a scores table on a retrain bank, and recall@k/MRR against a ground truth."""

    scores_path: str
    bank: str = setting(help="Retrain bank path (`rayattr retrain`)")
    table: str = setting(SCORES, "Scores table of SCORES_PATH: scores, or token_scores")
    ground_truth: str | None = setting(None, "JSON {query id: [training ids]}: also recall@k and MRR")
    bootstrap: int = setting(BOOTSTRAP_SAMPLES, "Bootstrap draws of the LDS interval (queries resampled)")
    out: str | None = setting(None, "Also write the result as JSON here")


@config_command("report")
@dataclass(frozen=True)
class ReportConfig:
    """`rayattr report`: a static HTML report of the scored run in ``run_path``, written to ``out``."""

    run_path: str
    out: str | None = setting(None, "Directory of the report (default: RUN_PATH/report; needed when RUN_PATH is "
                                    "not a local directory)")
    k: int = setting(10, "Proponents and opponents shown per query")
    queries: int | None = setting(None, "Report the first N queries (default: all)")
    run_config: str | None = setting(None, f"The run's YAML config (its --save-config file) when RUN_PATH holds no "
                                           f"{TRACKSTAR_CONFIG}: it names the model and the training and query data")

    def __post_init__(self) -> None:
        if self.k < 1 or (self.queries is not None and self.queries < 1):
            raise RayattrError(f"--k and --queries must be >= 1, got {self.k} and {self.queries}")
        if self.out is None:
            if not storage.is_local(self.run_path):
                raise RayattrError(f"{self.run_path} is not a local directory, so the report has no default place: "
                                   "pass --out DIR, a local directory for its pages")
            object.__setattr__(self, "out", storage.join(self.run_path, "report"))


def load_config(path: str | Path, expected: str | None = None) -> tuple[str, Any]:
    """``(command, config)`` from a YAML file; ``expected`` names the only command accepted."""
    try:
        payload = yaml.safe_load(storage.read_bytes(str(path)))
    except (OSError, yaml.YAMLError) as exc:
        raise RayattrError(f"cannot read run config {path}: {exc}") from exc
    if not isinstance(payload, dict) or len(payload) != 1 or next(iter(payload)) not in COMMANDS:
        raise RayattrError(f"{path} is not a rayattr run config: expected one top-level key of {sorted(COMMANDS)}")
    command, body = next(iter(payload.items()))
    if expected is not None and command != expected:
        raise RayattrError(f"{path} configures `{command}`, not `{expected}`; run it with jobs/{command}.py")
    return command, from_dict(COMMANDS[command], body)
