"""The ``rayattr`` command line: parses flags, calls the API, prints progress and tables."""

from __future__ import annotations

import contextlib
import functools
import inspect
import typing
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from rayattr import config, storage
from rayattr.config import DataSpec, GradSpec, ModelSpec, RayattrError, RunSpec, check_zero_stage
from rayattr.hessian.factors import STATS_SUBDIR, TARGET_DOWNWEIGHT_COMPONENTS
from rayattr.score import AGGREGATIONS, SCORE_MODES

app = typer.Typer(help="Gradient-based training-data attribution on Ray.", no_args_is_help=True, add_completion=False)
console = Console(stderr=True)


def _choices(name: str, values: tuple[str, ...]) -> type[Enum]:
    """A CLI choice type over ``values`` (members named like the values, ``-`` as ``_``)."""
    return Enum(name, {value.replace("-", "_"): value for value in values}, type=str)


# Choice types, from the same tuples the library validates against.
Precision = _choices("Precision", typing.get_args(config.Precision))
ProjectionKind = _choices("ProjectionKind", typing.get_args(config.ProjectionType))
VectorDtype = _choices("VectorDtype", typing.get_args(config.VectorDtype))
NormalizerKind = _choices("NormalizerKind", ("adafactor", "adam"))
TrackstarNormalizer = _choices("TrackstarNormalizer", ("auto", "adafactor", "adam", "none"))
Method = _choices("Method", ("second-moment", "kfac", "ekfac"))
AggregationKind = _choices("AggregationKind", AGGREGATIONS)
ScoreKind = _choices("ScoreKind", SCORE_MODES)
AnnMetric = _choices("AnnMetric", ("cosine", "dot"))


def _user_errors(command: Callable) -> Callable:
    """Print a RayattrError as one line and exit 1 instead of a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except RayattrError as exc:
            console.print(f"[bold red]error:[/] {escape(str(exc))}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


@app.command()
@_user_errors
def fixture(
    path: Annotated[Path, typer.Argument(help="Cache directory for the generated fixture")],
    seed: Annotated[int, typer.Option(help="Seed of everything generated")] = 0,
    variant: Annotated[str, typer.Option(help="easy | hard corpus")] = "easy",
    train: Annotated[bool, typer.Option("--train/--no-train", help="Also fine-tune the tiny GPT-NeoX")] = False,
) -> None:
    """Generate the offline fixture: tokenizer, tiny GPT-NeoX/GPT-2, synthetic fact corpus with ground truth."""
    from rayattr.fixtures import make_fixture, train_fixture_model

    made = make_fixture(path, seed=seed, variant=variant)
    table = Table("item", "path", title=f"fixture {made.root}")
    for name in ("tokenizer", "neox", "gpt2", "train", "queries", "ground_truth"):
        table.add_row(name, str(getattr(made, name)))
    if train:
        table.add_row("neox-trained", str(train_fixture_model(made, seed=seed)))
    Console().print(table)


# Options shared by every command that streams a dataset through the model.
RunPathArg = Annotated[str, typer.Argument(help="Run directory / LanceDB database (local path or URI)")]
ModelOpt = Annotated[str, typer.Option(help="Local model directory or hub name")]
DatasetOpt = Annotated[str, typer.Option(help="parquet file/dir, save_to_disk dir, .json/.jsonl/.csv, or hub name")]
SplitOpt = Annotated[str, typer.Option(help="Split, optionally sliced: train[:1000]")]
SubsetOpt = Annotated[Optional[str], typer.Option(help="Hub dataset configuration")]
TextColumnOpt = Annotated[str, typer.Option(help="Column of plain documents")]
PromptColumnOpt = Annotated[Optional[str], typer.Option(help="Prompt column (with --completion-column)")]
CompletionColumnOpt = Annotated[Optional[str], typer.Option(help="Completion column: loss on the completion only")]
MaxLengthOpt = Annotated[Optional[int], typer.Option(help="Longest document in tokens (default: the model's)")]
TruncationOpt = Annotated[bool, typer.Option(help="Cut documents longer than --max-length instead of failing")]
ProjectionDimOpt = Annotated[int, typer.Option(
    help="Kronecker types: per-side p (p*p per module); sketch types: total dimension D of each row; 0 keeps full gradients")]
ProjectionTypeOpt = Annotated[ProjectionKind, typer.Option(
    help="rademacher/normal (= kronecker-*): per-module L G R^T; afjl, affd, qk, fjl, dense: one sketch of the concatenated gradient")]
RankTotalOpt = Annotated[Optional[int], typer.Option(
    help="Kronecker: per-module budget p_out*p_in, split by module shape (replaces p x p)")]
RankMinOpt = Annotated[int, typer.Option(help="Smallest p_out and p_in --proj-rank-total gives a module")]
RowOrthonormalOpt = Annotated[bool, typer.Option(help="Kronecker factors with orthogonal rows (QR of the random draw)")]
SeedOpt = Annotated[int, typer.Option(help="Projection seed")]
IncludeBiasOpt = Annotated[bool, typer.Option(
    help="Also attribute through biases: a biased module's gradient is [G | g_b] (kronfluence's convention)")]
LossReduction = _choices("LossReduction", typing.get_args(config.LossReduction))
LossReductionOpt = Annotated[LossReduction, typer.Option(
    help="Each document's loss: sum over its label tokens (Bergson's and kronfluence's convention), or mean")]
ModulesOpt = Annotated[Optional[list[str]], typer.Option(help="Glob of module names to include (repeatable)")]
ExcludeOpt = Annotated[Optional[list[str]], typer.Option(help="Glob of module names to exclude (repeatable)")]
TokenBatchOpt = Annotated[int, typer.Option(help="Padded tokens per forward/backward batch")]
WorkersOpt = Annotated[int, typer.Option(help="Worker actors, each with a model replica (one GPU each when there are GPUs)")]
ZeroStageOpt = Annotated[int, typer.Option(
    help="3: partition the model over the --workers with DeepSpeed ZeRO-3 (models too large for one device); 0: a replica each")]
PrecisionOpt = Annotated[Precision, typer.Option(help="Model weights dtype")]
NormalizerOpt = Annotated[Optional[str], typer.Option(help="Normalizer directory from `rayattr normalizer`")]
RayAddressOpt = Annotated[Optional[str], typer.Option(help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")]
SaveConfigOpt = Annotated[Optional[Path], typer.Option(
    help="Write this command's YAML config (for `rayattr run` / `ray job submit ... jobs/`) and exit")]


def _run_spec(
    model: str, dataset: str, split: str = "train", subset: str | None = None, text_column: str = "text",
    prompt_column: str | None = None, completion_column: str | None = None, max_length: int | None = None,
    truncation: bool = False, precision: Precision = Precision.fp32, **grads,
) -> RunSpec:
    """The RunSpec every streaming command builds from its shared options."""
    grads["modules"] = tuple(grads.get("modules") or ("*",))
    grads["exclude_modules"] = tuple(grads.get("exclude_modules") or ())
    for key, value in list(grads.items()):
        if isinstance(value, Enum):
            grads[key] = value.value
    return RunSpec(
        model=ModelSpec(model=model, precision=precision.value),
        data=DataSpec(
            dataset=dataset, split=split, subset=subset, text_column=text_column, prompt_column=prompt_column,
            completion_column=completion_column, max_length=max_length, truncation=truncation,
        ),
        grads=GradSpec(**grads),
    )


def _stream_options(
    split: SplitOpt = "train",
    subset: SubsetOpt = None,
    text_column: TextColumnOpt = "text",
    prompt_column: PromptColumnOpt = None,
    completion_column: CompletionColumnOpt = None,
    max_length: MaxLengthOpt = None,
    truncation: TruncationOpt = False,
    projection_dim: ProjectionDimOpt = 16,
    projection_type: ProjectionTypeOpt = ProjectionKind.rademacher,
    proj_rank_total: RankTotalOpt = None,
    proj_rank_min: RankMinOpt = 1,
    row_orthonormal: RowOrthonormalOpt = False,
    seed: SeedOpt = 0,
    include_bias: IncludeBiasOpt = False,
    loss_reduction: LossReductionOpt = LossReduction.sum,
    modules: ModulesOpt = None,
    exclude_modules: ExcludeOpt = None,
    token_batch_size: TokenBatchOpt = 2048,
    precision: PrecisionOpt = Precision.fp32,
    normalizer: NormalizerOpt = None,
) -> None:
    """The options of every command that streams a dataset through the model (a template: never called)."""


def streams_dataset(*without: str) -> Callable[[Callable], Callable]:
    """Append the shared data and gradient options (minus ``without``) to a command's CLI.

    The command receives them as one ``options`` dict. Typer reads a
    command's signature, so the wrapper advertises the command's own
    parameters followed by those of ``_stream_options``.
    """

    def decorate(command: Callable) -> Callable:
        shared = [p for name, p in inspect.signature(_stream_options, eval_str=True).parameters.items() if name not in without]
        own = [p for name, p in inspect.signature(command, eval_str=True).parameters.items() if name != "options"]

        @functools.wraps(command)
        def wrapper(**kwargs):
            options = {p.name: kwargs.pop(p.name) for p in shared}
            return command(**kwargs, options=options)

        wrapper.__signature__ = inspect.Signature(own + shared)
        wrapper.__annotations__ = {p.name: p.annotation for p in own + shared}
        return wrapper

    return decorate


@app.command()
@_user_errors
@streams_dataset("projection_dim", "projection_type", "proj_rank_total", "proj_rank_min", "row_orthonormal", "seed",
                 "normalizer")
def normalizer(
    out: Annotated[Path, typer.Argument(help="Directory to write the normalizer into")],
    model: ModelOpt,
    optimizer_state: Annotated[Optional[Path], typer.Option(help="optimizer.pt of an HF Trainer checkpoint (AdamW or Adafactor)")] = None,
    dataset: Annotated[Optional[str], typer.Option(help="Fit the moments from this dataset instead of an optimizer state")] = None,
    kind: Annotated[NormalizerKind, typer.Option(help="adafactor (row/col moments) or adam (elementwise)")] = NormalizerKind.adafactor,
    workers: WorkersOpt = 1,
    ray_address: RayAddressOpt = None,
    options: dict | None = None,
) -> None:
    """Make a normalizer for `build --normalizer`: from an optimizer state, or fitted as mean squared gradients."""
    from rayattr.grads.normalizer import Normalizer, from_optimizer_state
    from rayattr.model import load_model
    from rayattr.ray.entry import fit

    if (optimizer_state is None) == (dataset is None):
        raise RayattrError("pass exactly one of --optimizer-state PATH or --dataset D")
    if optimizer_state is not None:
        made = from_optimizer_state(optimizer_state, load_model(ModelSpec(model=model, device="cpu")), kind=kind.value,
                                    include_bias=options["include_bias"])
        made.save(out)
    else:
        spec = _run_spec(model, dataset, **options, projection_dim=0)
        with console.status("fitting normalizer"):
            fit(str(out), spec, "normalizer", workers=workers, ray_address=ray_address, normalizer_kind=kind.value)
        made = Normalizer.load(out)
    table = Table("module", "moments", title=f"{made.kind} normalizer {out} (fingerprint {made.fingerprint})")
    for name, moments in made.moments.items():
        table.add_row(name, ", ".join(f"{k}{list(v.shape)}" for k, v in moments.items()))
    Console().print(table)


@app.command()
@_user_errors
@streams_dataset()
def hessian(
    run_path: RunPathArg,
    model: ModelOpt,
    dataset: DatasetOpt,
    method: Annotated[Method, typer.Option(help="second-moment (any projection), kfac or ekfac (--projection-dim 0)")] = Method.second_moment,
    sample_size: Annotated[Optional[int], typer.Option(help="Use the first N rows of the split")] = None,
    workers: WorkersOpt = 1,
    zero_stage: ZeroStageOpt = 0,
    ray_address: RayAddressOpt = None,
    save_config: SaveConfigOpt = None,
    options: dict | None = None,
) -> None:
    """Fit curvature statistics (second moment, K-FAC, EK-FAC) into RUN_PATH/stats."""
    from rayattr.data import sample_split
    from rayattr.ray.entry import fit
    from rayattr.runconfig import HessianConfig

    options["split"] = sample_split(options["split"], sample_size)
    spec = _run_spec(model, dataset, **options)
    check_zero_stage(zero_stage)
    if _saved(save_config, HessianConfig(run_path, spec, method.value, workers, zero_stage)):
        return
    out = storage.join(run_path, STATS_SUBDIR)
    with console.status(f"fitting {method.value}"):
        summary = fit(out, spec, method.value, workers=workers, ray_address=ray_address, zero_stage=zero_stage)
    table = Table("module", "gradient shape", "top eigenvalue", "condition number", title=(
        f"{method.value} -> {out}: {summary.examples:,} examples, {summary.tokens:,} tokens, {summary.seconds:.1f} s"))
    for name, row in summary.modules.items():
        table.add_row(name, row["shape"], f"{row['top_eigenvalue']:.4g}", f"{row['condition']:.3g}")
    Console().print(table)


@app.command()
@_user_errors
def mix(
    query: Annotated[str, typer.Option(help="Statistics directory of the query set (second-moment)")],
    index: Annotated[str, typer.Option(help="Statistics directory of the index set (second-moment)")],
    out: Annotated[str, typer.Option(help="Directory for the mixed statistics")],
    target_downweight_components: Annotated[int, typer.Option(help="Eigen-rank at which the two spectra cross")] = TARGET_DOWNWEIGHT_COMPONENTS,
) -> None:
    """TrackStar mixing: H = lam * H_query + (1 - lam) * H_index, lam from the pooled spectra."""
    from rayattr.hessian.mixing import mix_stats

    lam, k = mix_stats(query, index, out, target_downweight_components)
    Console().print(f"mixed -> {out}: lambda = {lam:.4f} (pooled eigen-rank k = {k})")


UnitNormalizeOpt = Annotated[bool, typer.Option(help="Cosine: unit-normalize query and index rows (after H^-1/2)")]
HessianPathOpt = Annotated[Optional[str], typer.Option(help="Statistics directory (`rayattr hessian`/`mix`) to precondition with")]
TopKOpt = Annotated[int, typer.Option(help="Training rows kept per query in the topk table")]
QueryBatchOpt = Annotated[int, typer.Option(help="Queries multiplied at once (bounds the score block in memory)")]
PerTokenScoresOpt = Annotated[bool, typer.Option(help="Also write a score per training token (token_scores table)")]
KeepGradientsOpt = Annotated[bool, typer.Option(help="Also store the training gradients computed on the fly (gradients table)")]


@app.command("reduce")
@_user_errors
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

    spec = _run_spec(model, dataset, **options)
    with _progress_bar("reduce") as show:
        result = reduce(run_path, spec, aggregation=aggregation.value, unit_normalize=unit_normalize,
                        hessian=hessian_path, workers=workers, ray_address=ray_address, on_progress=show)
    _print_progress(f"reduce {run_path} ({aggregation.value})", result)


@app.command("score")
@_user_errors
@streams_dataset()
def score_command(
    run_path: RunPathArg,
    query_path: Annotated[str, typer.Option(help="Run path of `rayattr reduce` (its gradients table are the queries)")],
    model: Annotated[Optional[str], typer.Option(help="Score on the fly: local model directory or hub name")] = None,
    dataset: Annotated[Optional[str], typer.Option(help="Score on the fly: the training dataset")] = None,
    index_path: Annotated[Optional[str], typer.Option(help="Score a `rayattr build` table instead of recomputing")] = None,
    unit_normalize: UnitNormalizeOpt = False,
    hessian_path: HessianPathOpt = None,
    score: Annotated[ScoreKind, typer.Option(help="A score per query, their mean, or the nearest query's")] = ScoreKind.individual,
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
    spec = _run_spec(model, dataset, **options) if index_path is None else None
    settings = ScoreSettings(score.value, unit_normalize, hessian_path, per_token, top_k, query_batch_size, keep_gradients)
    check_zero_stage(zero_stage)
    if _saved(save_config, ScoreConfig(run_path, query_path, settings, spec, index_path, workers, zero_stage)):
        return
    with _progress_bar("score") as show:
        result = run_score(run_path, query_path, settings, spec=spec, index_path=index_path, workers=workers,
                           ray_address=ray_address, on_progress=show, zero_stage=zero_stage)
    _print_progress(f"score {run_path}", result.progress)
    _print_topk(result.topk, result.query_ids)


def _print_topk(top, query_ids, queries: int = 5, ranks: int = 5) -> None:
    table = Table("query", *[f"#{r}" for r in range(1, ranks + 1)], title="top training ids (score)")
    for qid, ids, scores in list(zip(query_ids, top.ids, top.scores))[:queries]:
        table.add_row(str(qid), *[f"{i} ({s:.3f})" for i, s in zip(ids[:ranks], scores[:ranks])])
    Console().print(table)


@app.command("trackstar")
@_user_errors
def trackstar_command(
    run_path: RunPathArg,
    model: ModelOpt,
    dataset: Annotated[str, typer.Option(help="Training dataset to attribute to")],
    query_dataset: Annotated[str, typer.Option(help="Dataset of queries (the outputs to explain)")],
    split: SplitOpt = "train",
    query_split: Annotated[str, typer.Option(help="Split of the query dataset")] = "train",
    text_column: TextColumnOpt = "text",
    query_text_column: Annotated[str, typer.Option(help="Text column of the query dataset")] = "text",
    query_prompt_column: Annotated[Optional[str], typer.Option(help="Prompt column of the query dataset")] = None,
    query_completion_column: Annotated[Optional[str], typer.Option(help="Completion column of the query dataset")] = None,
    max_length: MaxLengthOpt = None,
    truncation: TruncationOpt = False,
    projection_dim: ProjectionDimOpt = 16,
    seed: SeedOpt = 0,
    include_bias: IncludeBiasOpt = False,
    loss_reduction: LossReductionOpt = LossReduction.sum,
    modules: ModulesOpt = None,
    exclude_modules: ExcludeOpt = None,
    token_batch_size: TokenBatchOpt = 2048,
    precision: PrecisionOpt = Precision.fp32,
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

    base = _run_spec(model, dataset, split, text_column=text_column, max_length=max_length, truncation=truncation,
                     precision=precision, projection_dim=projection_dim, seed=seed, include_bias=include_bias,
                     loss_reduction=loss_reduction, modules=modules, exclude_modules=exclude_modules,
                     token_batch_size=token_batch_size)
    query = DataSpec(query_dataset, split=query_split, text_column=query_text_column, prompt_column=query_prompt_column,
                     completion_column=query_completion_column, max_length=max_length, truncation=truncation)
    spec = TrackstarSpec(run_path, base.model, base.data, query, base.grads, normalizer.value, optimizer_state,
                         stats_sample_size, target_downweight_components, mix, top_k, query_batch_size, per_token,
                         keep_gradients, workers)
    _run_trackstar(spec, resume, ray_address)


@app.command("run")
@_user_errors
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
    _print_topk(top, query_ids)
    Console().print(f"results in {spec.run_path}: tables scores, topk (config {spec.run_path}/trackstar.yaml)")


def _saved(path: Path | None, config) -> bool:
    """With ``--save-config PATH``: write the command's YAML config instead of running it."""
    if path is None:
        return False
    from rayattr.configfile import command_of, save_config

    Console().print(f"wrote {save_config(path, config)}; run it with `rayattr run {path}` or "
                    f"`ray job submit --working-dir . -- python jobs/{command_of(config)}.py {path}`")
    return True


@contextlib.contextmanager
def _progress_bar(label: str) -> Iterator[Callable]:
    """A transient rich bar over documents; yields the ``on_progress`` callback the API takes."""
    with Progress(
        TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(), console=console, transient=True,
    ) as bar:
        task = bar.add_task(label, total=None, rate="")

        def show(progress) -> None:
            bar.update(task, total=progress.total_docs, completed=progress.docs,
                       rate=f"{progress.tokens_per_second:,.0f} tok/s")

        yield show


def _print_progress(title: str, result) -> None:
    """The summary table of a streaming pass (build, reduce, score)."""
    summary = Table("", "value", title=title)
    first = "-" if result.first_row_seconds is None else f"{result.first_row_seconds:.1f} s"
    for key, value in [
        ("documents processed", f"{result.docs:,}"), ("rows written", f"{result.written:,}"),
        ("skipped (no loss token)", f"{result.skipped:,}"),
        ("excluded (NaN/Inf loss or gradient)", f"{len(result.non_finite_ids):,}"), ("tokens", f"{result.tokens:,}"),
        ("wall time", f"{result.seconds:.1f} s"), ("tokens/s (end to end)", f"{result.tokens_per_second:,.0f}"),
        ("first row written after", first),
    ]:
        summary.add_row(key, value)
    Console().print(summary)


@app.command()
@_user_errors
@streams_dataset()
def build(
    run_path: RunPathArg,
    model: ModelOpt,
    dataset: DatasetOpt,
    workers: WorkersOpt = 1,
    zero_stage: ZeroStageOpt = 0,
    dtype: Annotated[VectorDtype, typer.Option(help="Stored vector dtype")] = VectorDtype.float32,
    per_token: Annotated[bool, typer.Option(help="One row per token instead of per document")] = False,
    ray_address: RayAddressOpt = None,
    save_config: SaveConfigOpt = None,
    options: dict | None = None,
) -> None:
    """Collect per-example (projected) gradients of a dataset into a LanceDB table; reruns resume."""
    from rayattr.ray.entry import build as run_build
    from rayattr.runconfig import BuildConfig

    spec = _run_spec(model, dataset, **options, dtype=dtype, per_token=per_token)
    check_zero_stage(zero_stage)
    if _saved(save_config, BuildConfig(run_path, spec, workers, zero_stage)):
        return
    with _progress_bar("build") as show:
        result = run_build(run_path, spec, workers=workers, ray_address=ray_address, on_progress=show,
                           zero_stage=zero_stage)
    _print_progress(f"build {run_path}", result)


@app.command("verify")
@_user_errors
def verify_command(run_path: RunPathArg) -> None:
    """Check a run: every id once, vector widths and dtypes, no NaN/Inf, finished tables, statistics checksums
    and fingerprints. Exits 1 with the list of problems."""
    from rayattr.verify import verify

    report = verify(run_path)
    checked = Table("checked", title=f"verify {run_path}")
    for item in report.checked:
        checked.add_row(escape(item))
    Console().print(checked)
    if not report.ok:
        for problem in report.problems:
            console.print(f"[bold red]problem:[/] {escape(problem)}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    Console().print(f"{run_path}: no problems")


@app.command("index")
@_user_errors
def index_command(
    run_path: RunPathArg,
    ann: Annotated[bool, typer.Option(help="Build an IVF-PQ index on the gradients for `rayattr query --ann`")] = False,
    metric: Annotated[AnnMetric, typer.Option(help="cosine (for --unit-norm queries) or dot (inner product)")] = AnnMetric.cosine,
    num_partitions: Annotated[int | None, typer.Option(help="IVF partitions (default sqrt(rows), at most rows/256)")] = None,
    num_sub_vectors: Annotated[int | None, typer.Option(help="PQ sub-vectors; must divide the dimension (default dim/8, at least 16)")] = None,
) -> None:
    """Show what a gradient table offers for search; --ann builds an approximate-search index on it."""
    from rayattr.search import Index, ann_metric, build_ann_index

    rows = []
    if ann:
        with console.status("building IVF-PQ index"):
            built = build_ann_index(run_path, metric.value, num_partitions, num_sub_vectors)
        rows = [("IVF partitions", f"{built.num_partitions:,}"), ("PQ sub-vectors", f"{built.num_sub_vectors:,}")]
    index = Index.open(run_path)
    summary = Table("", "value", title=f"index {run_path}")
    for key, value in [
        ("rows", f"{index.table.count():,}"), ("dimensions", f"{index.meta.dim:,}"), ("model", index.meta.model["name"]),
        ("ANN index metric", ann_metric(index.table) or "none (exact search only)"), *rows,
    ]:
        summary.add_row(key, value)
    Console().print(summary)


def _cut(text: str, width: int = 120) -> str:
    """A text shortened to ``width`` characters for a table cell."""
    return text if len(text) <= width else text[: width - 1] + "…"


@app.command("query")
@_user_errors
def query_command(
    run_path: RunPathArg,
    text: Annotated[list[str] | None, typer.Option(help="Query text, loss on every token (repeatable)")] = None,
    query_dataset: Annotated[str | None, typer.Option(help="Dataset of queries (same forms as --dataset)")] = None,
    split: SplitOpt = "train",
    subset: SubsetOpt = None,
    text_column: TextColumnOpt = "text",
    prompt_column: PromptColumnOpt = None,
    completion_column: CompletionColumnOpt = None,
    k: Annotated[int, typer.Option("-k", "--k", help="Training rows to show per query")] = 10,
    unit_norm: Annotated[bool, typer.Option("--unit-norm", "--unit-normalize", help="Rank by cosine instead of inner product")] = False,
    hessian: Annotated[str | None, typer.Option("--hessian", "--hessian-path", help="Statistics directory: H^-1 on the query (H^-1/2 both sides with --unit-norm)")] = None,
    ann: Annotated[bool, typer.Option(help="Approximate search with the index from `rayattr index --ann`")] = False,
    nprobes: Annotated[int, typer.Option(help="IVF partitions searched (--ann)")] = 20,
    refine_factor: Annotated[int, typer.Option(help="Candidates re-ranked exactly, as a multiple of k (--ann)")] = 20,
    model: Annotated[str | None, typer.Option(help="Load the index's model from here instead of its recorded path")] = None,
) -> None:
    """Rank the training documents of an index for query texts by gradient similarity."""
    from rayattr.config import from_dict
    from rayattr.data import read_rows, row_texts
    from rayattr.search import Index, dataset_gradients, query_gradients

    if bool(text) == bool(query_dataset):
        raise RayattrError("pass query text with --text \"...\" (repeatable) or a query dataset with --query-dataset D, not both")
    index = Index.open(run_path)
    with console.status("computing query gradients"):
        if text:
            labels, queries = text, query_gradients(index.meta, text, model)
        else:
            data = DataSpec(dataset=query_dataset, split=split, subset=subset, text_column=text_column,
                            prompt_column=prompt_column, completion_column=completion_column,
                            max_length=index.meta.data.get("max_length"), truncation=index.meta.data.get("truncation", False))
            ids, queries = dataset_gradients(index.meta, data, model)
            labels = row_texts(read_rows(data, ids), data)
    with console.status("searching"):
        found = index.search(queries, k, unit_normalize=unit_norm, hessian=hessian, ann=ann, nprobes=nprobes,
                             refine_factor=refine_factor)
    train = from_dict(DataSpec, index.meta.data)
    hits = read_rows(train, found.ids[found.ids >= 0])
    texts = dict(zip(hits.column("id").to_pylist(), row_texts(hits, train)))
    for label, ids, scores in zip(labels, found.ids, found.scores):
        table = Table("rank", "score", "id", "training text", title=f"query: {escape(_cut(label))}", title_justify="left")
        for rank, (row_id, score) in enumerate(zip(ids.tolist(), scores.tolist()), start=1):
            if row_id >= 0:
                table.add_row(str(rank), f"{score:.4g}", str(row_id), escape(_cut(texts[row_id])))
        Console().print(table)
