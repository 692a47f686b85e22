"""Commands that attribute: query vectors, scoring, TrackStar end to end and saved-config runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from rayattr.cli.application import app
from rayattr.cli.options import (DATA, GRADS, MODEL, STREAMING, Group, RayAddressOpt, RunPathArg, SaveConfigOpt,
                                 run_spec, run_with_progress, saved, user_errors, with_options)
from rayattr.cli.render import console, print_progress, print_topk
from rayattr.commands import ReduceConfig, ScoreConfig, TrackstarSpec
from rayattr.config import TRACKSTAR_GRADS, DataSpec, GradSpec, ModelSpec, RayattrError, RunSpec
from rayattr.score import QueryPreprocess, ScoreSettings

REDUCE = Group(ReduceConfig)
PREPROCESS = Group(QueryPreprocess)
SCORE = Group(ScoreConfig)
SETTINGS = Group(ScoreSettings)
ON_THE_FLY = (Group(ModelSpec, optional=True), Group(DataSpec, optional=True), GRADS)  # or a built table
TRACKSTAR = Group(TrackstarSpec)
TRACKSTAR_GRADS_GROUP = Group(GradSpec, exclude=("per_token", "normalizer"), defaults=TRACKSTAR_GRADS)
QUERY = Group(DataSpec, prefix="query_", include=("dataset", "split", "text_column", "prompt_column", "completion_column",
                                                  "conversation_column"))


@app.command("reduce")
@user_errors
@with_options(*STREAMING, PREPROCESS, REDUCE)
def reduce_command(run_path: RunPathArg, ray_address: RayAddressOpt = None, save_config: SaveConfigOpt = None,
                   options: dict | None = None) -> None:
    """Query vectors: collect, precondition (H^-1, or H^-1/2 with --unit-normalize), normalize, aggregate."""
    config = REDUCE.build(options, run_path=run_path, spec=run_spec(options), preprocess=PREPROCESS.build(options))
    result = run_with_progress(config, "reduce", save_config, ray_address)
    if result is not None:
        print_progress(f"reduce {run_path} ({config.preprocess.aggregation})", result)


@app.command("score")
@user_errors
@with_options(*ON_THE_FLY, SETTINGS, SCORE)
def score_command(run_path: RunPathArg, ray_address: RayAddressOpt = None, save_config: SaveConfigOpt = None,
                  options: dict | None = None) -> None:
    """Score a training set against query vectors into `scores` and `topk` tables; reruns resume."""
    model, data = (group.build(options) for group in ON_THE_FLY[:2])
    if options["index_path"] is None and (model is None or data is None):
        raise RayattrError("pass --model and --dataset to score on the fly, or --index-path to score a built table")
    spec = RunSpec(model, data, GRADS.build(options)) if options["index_path"] is None else None
    config = SCORE.build(options, run_path=run_path, settings=SETTINGS.build(options), spec=spec)
    result = run_with_progress(config, "score", save_config, ray_address)
    if result is not None:
        print_progress(f"score {run_path}", result.progress)
        print_topk(result.topk, result.query_ids)


@app.command("trackstar")
@user_errors
@with_options(MODEL, DATA, QUERY, TRACKSTAR_GRADS_GROUP, TRACKSTAR)
def trackstar_command(
    run_path: RunPathArg,
    resume: Annotated[bool, typer.Option(help="Continue a run in RUN_PATH, skipping completed steps")] = False,
    ray_address: RayAddressOpt = None,
    save_config: SaveConfigOpt = None,
    options: dict | None = None,
) -> None:
    """TrackStar end to end: normalizer, mixed second moments, H^-1/2 cosine scoring, top-k."""
    train = DATA.build(options)
    query = QUERY.build(options, max_length=train.max_length, truncation=train.truncation)
    spec = TRACKSTAR.build(options, run_path=run_path, model=MODEL.build(options), train=train, query=query,
                           grads=TRACKSTAR_GRADS_GROUP.build(options))
    if not saved(save_config, spec):
        _run_trackstar(spec, resume, ray_address)


@app.command("run")
@user_errors
def run_command(
    config: Annotated[Path, typer.Argument(help="A YAML run config (RUN_PATH/trackstar.yaml, or from --save-config)")],
    resume: Annotated[bool, typer.Option(help="Continue the run in its RUN_PATH, skipping completed steps")] = False,
    ray_address: RayAddressOpt = None,
) -> None:
    """Run a saved configuration: RUN_PATH/trackstar.yaml, or one written with `--save-config`."""
    from rayattr.api import load_config, run
    from rayattr.runconfig import progress_logger

    command, loaded = load_config(config)
    if command == "trackstar":
        _run_trackstar(loaded, resume, ray_address)
    else:
        run(loaded, resume=resume, ray_address=ray_address, on_progress=progress_logger(command, console.print),
            on_step=lambda step: console.print(escape(step.describe()), highlight=False))
        where = next(getattr(loaded, name) for name in ("run_path", "bank_path", "scores_path", "out") if hasattr(loaded, name))
        Console().print(f"{command} finished: {where}", soft_wrap=True)


def _run_trackstar(spec: TrackstarSpec, resume: bool, ray_address: str | None) -> None:
    from rayattr.api import read_topk, run

    with console.status("trackstar"):
        run(spec, resume=resume, ray_address=ray_address,
            on_step=lambda step: console.print(escape(step.describe()), highlight=False))
    top, query_ids = read_topk(spec.run_path)
    print_topk(top, query_ids)
    Console().print(f"results in {spec.run_path}: tables scores, topk (config {spec.run_path}/trackstar.yaml)")
