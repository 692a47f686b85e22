"""Commands that attribute: query vectors, scoring, TrackStar end to end and saved-config runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from rayattr.cli.application import app
from rayattr.cli.options import (AggregationKind, BaseModelOpt, CompletionColumnOpt, DtypeOpt, VectorDtype, LossFn, LossFnOpt, NumHeadsOpt,
                                 SplitAttentionOpt, ConversationColumnOpt, DatasetOpt, ExcludeOpt,
                                 HessianPathOpt, IncludeBiasOpt, PromptColumnOpt, RewardColumnOpt, SkipNanRewardsOpt,
                                 KeepGradientsOpt, LossReduction, LossReductionOpt, MaxLengthOpt, ModelOpt, ModulesOpt,
                                 PerTokenScoresOpt, Precision, PrecisionOpt, ProjectionDimOpt, QueryBatchOpt, RowOrthonormalOpt,
                                 RayAddressOpt, RunPathArg, SaveConfigOpt, ScoreKind, SeedOpt, SplitOpt, TextColumnOpt,
                                 TokenBatchOpt, TopKOpt, TrackstarNormalizer, TruncationOpt, UnitNormalizeOpt,
                                 WorkersOpt, ZeroStageOpt, run_spec, saved, streams_dataset, user_errors)
from rayattr.cli.render import console, print_progress, print_topk, progress_bar
from rayattr.config import TRACKSTAR_GRADS, DataSpec, RayattrError, check_zero_stage
from rayattr.hessian.factors import TARGET_DOWNWEIGHT_COMPONENTS


@app.command("reduce")
@user_errors
@streams_dataset()
def reduce_command(
    run_path: RunPathArg,
    model: ModelOpt,
    dataset: DatasetOpt,
    aggregation: Annotated[AggregationKind, typer.Option(help="mean or sum to one vector; none keeps every query")] = AggregationKind.mean,
    unit_normalize: UnitNormalizeOpt = False,
    hessian_path: HessianPathOpt = None,
    workers: WorkersOpt = 1,
    ray_address: RayAddressOpt = None,
    options: dict | None = None,
) -> None:
    """Query vectors: collect, precondition (H^-1, or H^-1/2 with --unit-normalize), normalize, aggregate."""
    from rayattr.ray.score import reduce

    spec = run_spec(model, dataset, **options)
    with progress_bar("reduce") as show:
        result = reduce(run_path, spec, aggregation=aggregation.value, unit_normalize=unit_normalize,
                        hessian=hessian_path, workers=workers, ray_address=ray_address, on_progress=show)
    print_progress(f"reduce {run_path} ({aggregation.value})", result)


@app.command("score")
@user_errors
@streams_dataset()
def score_command(
    run_path: RunPathArg,
    query_path: Annotated[Optional[str], typer.Option(help="Run path of `rayattr reduce` (its gradients table are the queries)")] = None,
    self_influence: Annotated[bool, typer.Option("--self", help="Each document's self-influence g^T H^-1 g (with --hessian-path; |g|^2 without) instead of queries")] = False,
    model: Annotated[Optional[str], typer.Option(help="Score on the fly: local model directory or hub name")] = None,
    dataset: Annotated[Optional[str], typer.Option(help="Score on the fly: the training dataset")] = None,
    index_path: Annotated[Optional[str], typer.Option(help="Score a `rayattr build` table instead of recomputing")] = None,
    unit_normalize: UnitNormalizeOpt = False,
    hessian_path: HessianPathOpt = None,
    score: Annotated[ScoreKind, typer.Option(help="A score per query, their mean, or the nearest query's (max)")] = ScoreKind.individual,
    top_k: TopKOpt = 50,
    query_batch_size: QueryBatchOpt = 1024,
    per_token: PerTokenScoresOpt = False,
    keep_gradients: KeepGradientsOpt = False,
    workers: WorkersOpt = 1,
    zero_stage: ZeroStageOpt = 0,
    ray_address: RayAddressOpt = None,
    save_config: SaveConfigOpt = None,
    options: dict | None = None,
) -> None:
    """Score a training set against query vectors into `scores` and `topk` tables; reruns resume."""
    from rayattr.ray.entry import score as run_score
    from rayattr.ray.score import ScoreSettings
    from rayattr.runconfig import ScoreConfig

    if index_path is None and (model is None or dataset is None):
        raise RayattrError("pass --model and --dataset to score on the fly, or --index-path to score a built table")
    spec = run_spec(model, dataset, **options) if index_path is None else None
    settings = ScoreSettings(score.value, unit_normalize, hessian_path, per_token, top_k, query_batch_size, keep_gradients,
                             self_influence)
    check_zero_stage(zero_stage)
    if saved(save_config, ScoreConfig(run_path, query_path, settings, spec, index_path, workers, zero_stage)):
        return
    with progress_bar("score") as show:
        result = run_score(run_path, query_path, settings, spec=spec, index_path=index_path, workers=workers,
                           ray_address=ray_address, on_progress=show, zero_stage=zero_stage)
    print_progress(f"score {run_path}", result.progress)
    print_topk(result.topk, result.query_ids)


@app.command("trackstar")
@user_errors
def trackstar_command(
    run_path: RunPathArg,
    model: ModelOpt,
    dataset: Annotated[str, typer.Option(help="Training dataset to attribute to")],
    query_dataset: Annotated[str, typer.Option(help="Dataset of queries (the outputs to explain)")],
    split: SplitOpt = "train",
    query_split: Annotated[str, typer.Option(help="Split of the query dataset")] = "train",
    text_column: TextColumnOpt = "text",
    prompt_column: PromptColumnOpt = None,
    completion_column: CompletionColumnOpt = None,
    conversation_column: ConversationColumnOpt = None,
    reward_column: RewardColumnOpt = None,
    skip_nan_rewards: SkipNanRewardsOpt = False,
    query_text_column: Annotated[str, typer.Option(help="Text column of the query dataset")] = "text",
    query_prompt_column: Annotated[Optional[str], typer.Option(help="Prompt column of the query dataset")] = None,
    query_completion_column: Annotated[Optional[str], typer.Option(help="Completion column of the query dataset")] = None,
    query_conversation_column: Annotated[Optional[str], typer.Option(help="Conversation column of the query dataset")] = None,
    max_length: MaxLengthOpt = None,
    truncation: TruncationOpt = False,
    projection_dim: ProjectionDimOpt = TRACKSTAR_GRADS.projection_dim,
    row_orthonormal: RowOrthonormalOpt = TRACKSTAR_GRADS.row_orthonormal,
    dtype: DtypeOpt = VectorDtype(TRACKSTAR_GRADS.dtype),
    seed: SeedOpt = 0,
    include_bias: IncludeBiasOpt = False,
    loss_reduction: LossReductionOpt = LossReduction.sum,
    loss_fn: LossFnOpt = LossFn.ce,
    modules: ModulesOpt = None,
    exclude_modules: ExcludeOpt = None,
    split_attention: SplitAttentionOpt = None,
    num_heads: NumHeadsOpt = None,
    token_batch_size: TokenBatchOpt = 2048,
    precision: PrecisionOpt = Precision.fp32,
    base_model: BaseModelOpt = None,
    optimizer_state: Annotated[Optional[str], typer.Option(help="optimizer.pt for the normalizer (without it, --normalizer adafactor|adam fits one from data)")] = None,
    normalizer: Annotated[TrackstarNormalizer, typer.Option(
        help="Normalizer kind; auto: adafactor from --optimizer-state when given, else none")] = TrackstarNormalizer.auto,
    stats_sample_size: Annotated[Optional[int], typer.Option(help="First N training rows for the index statistics")] = 10_000,
    target_downweight_components: Annotated[int, typer.Option(help="Eigen-rank at which query and index spectra cross")] = TARGET_DOWNWEIGHT_COMPONENTS,
    mix: Annotated[bool, typer.Option(help="Mix query and index second moments (--no-mix: index only)")] = True,
    top_k: TopKOpt = 50,
    query_batch_size: QueryBatchOpt = 1024,
    per_token: PerTokenScoresOpt = False,
    keep_gradients: KeepGradientsOpt = False,
    workers: WorkersOpt = 1,
    resume: Annotated[bool, typer.Option(help="Continue a run in RUN_PATH, skipping completed steps")] = False,
    ray_address: RayAddressOpt = None,
) -> None:
    """TrackStar end to end: normalizer, mixed second moments, H^-1/2 cosine scoring, top-k."""
    from rayattr.trackstar import TrackstarSpec

    base = run_spec(model, dataset, split, text_column=text_column, prompt_column=prompt_column,
                     completion_column=completion_column, conversation_column=conversation_column,
                     reward_column=reward_column, skip_nan_rewards=skip_nan_rewards,
                     max_length=max_length, truncation=truncation, precision=precision, projection_dim=projection_dim,
                     row_orthonormal=row_orthonormal, dtype=dtype, seed=seed,
                     include_bias=include_bias, loss_reduction=loss_reduction, loss_fn=loss_fn, modules=modules,
                     exclude_modules=exclude_modules, split_attention=split_attention, num_heads=num_heads,
                     token_batch_size=token_batch_size, base_model=base_model)
    query = DataSpec(query_dataset, split=query_split, text_column=query_text_column, prompt_column=query_prompt_column,
                     completion_column=query_completion_column, conversation_column=query_conversation_column,
                     max_length=max_length, truncation=truncation)
    spec = TrackstarSpec(run_path, base.model, base.data, query, base.grads, normalizer.value, optimizer_state,
                         stats_sample_size, target_downweight_components, mix, top_k, query_batch_size, per_token,
                         keep_gradients, workers)
    _run_trackstar(spec, resume, ray_address)


@app.command("run")
@user_errors
def run_command(
    config: Annotated[Path, typer.Argument(help="A YAML run config (RUN_PATH/trackstar.yaml, or from --save-config)")],
    resume: Annotated[bool, typer.Option(help="Continue the run in its RUN_PATH, skipping completed steps")] = False,
    ray_address: RayAddressOpt = None,
) -> None:
    """Run a saved configuration: RUN_PATH/trackstar.yaml, or one written with `--save-config`."""
    from rayattr.runconfig import load_config, run_config

    command, loaded = load_config(config)
    if command == "trackstar":
        _run_trackstar(loaded, resume, ray_address)
    else:
        run_config(command, loaded, resume=resume, ray_address=ray_address, log=console.print)
        Console().print(f"{command} finished: {loaded.run_path}")


def _run_trackstar(spec, resume: bool, ray_address: str | None) -> None:
    from rayattr.ray.score import read_topk
    from rayattr.trackstar import trackstar

    with console.status("trackstar"):
        trackstar(spec, resume=resume, ray_address=ray_address,
                  on_step=lambda step: console.print(escape(step.describe()), highlight=False))
    top, query_ids = read_topk(spec.run_path)
    print_topk(top, query_ids)
    Console().print(f"results in {spec.run_path}: tables scores, topk (config {spec.run_path}/trackstar.yaml)")
