"""The ``rayattr`` command line: parses flags, calls the API, prints progress and tables."""

from __future__ import annotations

import functools
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from rayattr.config import DataSpec, GradSpec, ModelSpec, RayattrError, RunSpec

app = typer.Typer(help="Gradient-based training-data attribution on Ray.", no_args_is_help=True, add_completion=False)
console = Console(stderr=True)


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class ProjectionKind(str, Enum):
    rademacher = "rademacher"
    normal = "normal"


class VectorDtype(str, Enum):
    float16 = "float16"
    float32 = "float32"


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


class NormalizerKind(str, Enum):
    adafactor = "adafactor"
    adam = "adam"


class Method(str, Enum):
    second_moment = "second-moment"
    kfac = "kfac"
    ekfac = "ekfac"


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
ProjectionDimOpt = Annotated[int, typer.Option(help="Per-side projection p (p*p per module); 0 keeps full gradients")]
ProjectionTypeOpt = Annotated[ProjectionKind, typer.Option(help="Distribution of projection entries")]
SeedOpt = Annotated[int, typer.Option(help="Projection seed")]
ModulesOpt = Annotated[Optional[list[str]], typer.Option(help="Glob of module names to include (repeatable)")]
ExcludeOpt = Annotated[Optional[list[str]], typer.Option(help="Glob of module names to exclude (repeatable)")]
TokenBatchOpt = Annotated[int, typer.Option(help="Padded tokens per forward/backward batch")]
WorkersOpt = Annotated[int, typer.Option(help="Worker actors, each with a model replica (one GPU each when there are GPUs)")]
PrecisionOpt = Annotated[Precision, typer.Option(help="Model weights dtype")]
NormalizerOpt = Annotated[Optional[str], typer.Option(help="Normalizer directory from `rayattr normalizer`")]
RayAddressOpt = Annotated[Optional[str], typer.Option(help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")]


def _run_spec(
    model: str, dataset: str, split: str, subset: str | None, text_column: str, prompt_column: str | None,
    completion_column: str | None, max_length: int | None, truncation: bool, precision: Precision, **grads,
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


@app.command()
@_user_errors
def normalizer(
    out: Annotated[Path, typer.Argument(help="Directory to write the normalizer into")],
    model: ModelOpt,
    optimizer_state: Annotated[Optional[Path], typer.Option(help="optimizer.pt of an HF Trainer checkpoint (AdamW or Adafactor)")] = None,
    dataset: Annotated[Optional[str], typer.Option(help="Fit the moments from this dataset instead of an optimizer state")] = None,
    kind: Annotated[NormalizerKind, typer.Option(help="adafactor (row/col moments) or adam (elementwise)")] = NormalizerKind.adafactor,
    split: SplitOpt = "train",
    subset: SubsetOpt = None,
    text_column: TextColumnOpt = "text",
    prompt_column: PromptColumnOpt = None,
    completion_column: CompletionColumnOpt = None,
    max_length: MaxLengthOpt = None,
    truncation: TruncationOpt = False,
    modules: ModulesOpt = None,
    exclude_modules: ExcludeOpt = None,
    token_batch_size: TokenBatchOpt = 2048,
    precision: PrecisionOpt = Precision.fp32,
    workers: WorkersOpt = 1,
    ray_address: RayAddressOpt = None,
) -> None:
    """Make a normalizer for `build --normalizer`: from an optimizer state, or fitted as mean squared gradients."""
    from rayattr.grads.normalizer import Normalizer, from_optimizer_state
    from rayattr.model import load_model
    from rayattr.ray.fit import fit

    if (optimizer_state is None) == (dataset is None):
        raise RayattrError("pass exactly one of --optimizer-state PATH or --dataset D")
    if optimizer_state is not None:
        made = from_optimizer_state(optimizer_state, load_model(ModelSpec(model=model, device="cpu")), kind=kind.value)
        made.save(out)
    else:
        spec = _run_spec(model, dataset, split, subset, text_column, prompt_column, completion_column, max_length,
                         truncation, precision, projection_dim=0, modules=modules, exclude_modules=exclude_modules,
                         token_batch_size=token_batch_size)
        with console.status("fitting normalizer"):
            fit(str(out), spec, "normalizer", workers=workers, ray_address=ray_address, normalizer_kind=kind.value)
        made = Normalizer.load(out)
    table = Table("module", "moments", title=f"{made.kind} normalizer {out} (fingerprint {made.fingerprint})")
    for name, moments in made.moments.items():
        table.add_row(name, ", ".join(f"{k}{list(v.shape)}" for k, v in moments.items()))
    Console().print(table)


@app.command()
@_user_errors
def hessian(
    run_path: RunPathArg,
    model: ModelOpt,
    dataset: DatasetOpt,
    method: Annotated[Method, typer.Option(help="second-moment (any projection), kfac or ekfac (--projection-dim 0)")] = Method.second_moment,
    sample_size: Annotated[Optional[int], typer.Option(help="Use the first N rows of the split")] = None,
    split: SplitOpt = "train",
    subset: SubsetOpt = None,
    text_column: TextColumnOpt = "text",
    prompt_column: PromptColumnOpt = None,
    completion_column: CompletionColumnOpt = None,
    max_length: MaxLengthOpt = None,
    truncation: TruncationOpt = False,
    projection_dim: ProjectionDimOpt = 16,
    projection_type: ProjectionTypeOpt = ProjectionKind.rademacher,
    seed: SeedOpt = 0,
    modules: ModulesOpt = None,
    exclude_modules: ExcludeOpt = None,
    token_batch_size: TokenBatchOpt = 2048,
    precision: PrecisionOpt = Precision.fp32,
    normalizer: NormalizerOpt = None,
    workers: WorkersOpt = 1,
    ray_address: RayAddressOpt = None,
) -> None:
    """Fit curvature statistics (second moment, K-FAC, EK-FAC) into RUN_PATH/stats."""
    from rayattr.ray.fit import fit

    if sample_size is not None:
        split = sample_split(split, sample_size)
    spec = _run_spec(model, dataset, split, subset, text_column, prompt_column, completion_column, max_length,
                     truncation, precision, projection_dim=projection_dim, projection_type=projection_type, seed=seed,
                     modules=modules, exclude_modules=exclude_modules, token_batch_size=token_batch_size,
                     normalizer=normalizer)
    out = str(Path(run_path) / "stats")
    with console.status(f"fitting {method.value}"):
        summary = fit(out, spec, method.value, workers=workers, ray_address=ray_address)
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
    target_downweight_components: Annotated[int, typer.Option(help="Eigen-rank at which the two spectra cross")] = 1000,
) -> None:
    """TrackStar mixing: H = lam * H_query + (1 - lam) * H_index, lam from the pooled spectra."""
    from rayattr.hessian.mixing import mix_stats

    lam, k = mix_stats(query, index, out, target_downweight_components)
    Console().print(f"mixed -> {out}: lambda = {lam:.4f} (pooled eigen-rank k = {k})")


def sample_split(split: str, sample_size: int) -> str:
    """``train`` + N -> ``train[:N]``; an already sliced split keeps its start."""
    from rayattr.data import parse_split

    name, start, stop = parse_split(split)
    stop = start + sample_size if stop is None else min(stop, start + sample_size)
    return f"{name}[{start}:{stop}]"


@app.command()
@_user_errors
def build(
    run_path: RunPathArg,
    model: ModelOpt,
    dataset: DatasetOpt,
    split: SplitOpt = "train",
    subset: SubsetOpt = None,
    text_column: TextColumnOpt = "text",
    prompt_column: PromptColumnOpt = None,
    completion_column: CompletionColumnOpt = None,
    max_length: MaxLengthOpt = None,
    truncation: TruncationOpt = False,
    projection_dim: ProjectionDimOpt = 16,
    projection_type: ProjectionTypeOpt = ProjectionKind.rademacher,
    seed: SeedOpt = 0,
    modules: ModulesOpt = None,
    exclude_modules: ExcludeOpt = None,
    token_batch_size: TokenBatchOpt = 2048,
    workers: WorkersOpt = 1,
    precision: PrecisionOpt = Precision.fp32,
    dtype: Annotated[VectorDtype, typer.Option(help="Stored vector dtype")] = VectorDtype.float32,
    per_token: Annotated[bool, typer.Option(help="One row per token instead of per document")] = False,
    normalizer: NormalizerOpt = None,
    ray_address: RayAddressOpt = None,
) -> None:
    """Collect per-example (projected) gradients of a dataset into a LanceDB table; reruns resume."""
    from rayattr.ray.pipeline import build as run_build

    spec = _run_spec(model, dataset, split, subset, text_column, prompt_column, completion_column, max_length,
                     truncation, precision, projection_dim=projection_dim, projection_type=projection_type, seed=seed,
                     modules=modules, exclude_modules=exclude_modules, token_batch_size=token_batch_size,
                     dtype=dtype, per_token=per_token, normalizer=normalizer)
    with Progress(
        TextColumn("[bold]build"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(), console=console, transient=True,
    ) as bar:
        task = bar.add_task("build", total=None, rate="")

        def show(progress) -> None:
            bar.update(task, total=progress.total_docs, completed=progress.docs,
                       rate=f"{progress.tokens_per_second:,.0f} tok/s")

        result = run_build(run_path, spec, workers=workers, ray_address=ray_address, on_progress=show)
    summary = Table("", "value", title=f"build {run_path}")
    first = "-" if result.first_row_seconds is None else f"{result.first_row_seconds:.1f} s"
    for key, value in [
        ("documents processed", f"{result.docs:,}"), ("rows written", f"{result.written:,}"),
        ("skipped (no loss token)", f"{result.skipped:,}"), ("tokens", f"{result.tokens:,}"),
        ("wall time", f"{result.seconds:.1f} s"), ("tokens/s (end to end)", f"{result.tokens_per_second:,.0f}"),
        ("first row written after", first),
    ]:
        summary.add_row(key, value)
    Console().print(summary)
