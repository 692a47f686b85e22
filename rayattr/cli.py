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


@app.command()
@_user_errors
def normalizer(
    out: Annotated[Path, typer.Argument(help="Directory to write the normalizer into")],
    model: Annotated[str, typer.Option(help="Local model directory or hub name the state belongs to")],
    optimizer_state: Annotated[Path, typer.Option(help="optimizer.pt of an HF Trainer checkpoint (AdamW or Adafactor)")],
    kind: Annotated[NormalizerKind, typer.Option(help="adafactor (row/col moments) or adam (elementwise)")] = NormalizerKind.adafactor,
) -> None:
    """Turn an optimizer state into a normalizer that `build --normalizer` applies to every gradient."""
    from rayattr.grads.normalizer import from_optimizer_state
    from rayattr.model import load_model

    made = from_optimizer_state(optimizer_state, load_model(ModelSpec(model=model, device="cpu")), kind=kind.value)
    made.save(out)
    table = Table("module", "moments", title=f"{made.kind} normalizer {out} (fingerprint {made.fingerprint})")
    for name, moments in made.moments.items():
        table.add_row(name, ", ".join(f"{k}{list(v.shape)}" for k, v in moments.items()))
    Console().print(table)


@app.command()
@_user_errors
def build(
    run_path: Annotated[str, typer.Argument(help="LanceDB database (directory or URI) to write the `gradients` table into")],
    model: Annotated[str, typer.Option(help="Local model directory or hub name")],
    dataset: Annotated[str, typer.Option(help="parquet file/dir, save_to_disk dir, .json/.jsonl/.csv, or hub name")],
    split: Annotated[str, typer.Option(help="Split, optionally sliced: train[:1000]")] = "train",
    subset: Annotated[Optional[str], typer.Option(help="Hub dataset configuration")] = None,
    text_column: Annotated[str, typer.Option(help="Column of plain documents")] = "text",
    prompt_column: Annotated[Optional[str], typer.Option(help="Prompt column (with --completion-column)")] = None,
    completion_column: Annotated[Optional[str], typer.Option(help="Completion column: loss on the completion only")] = None,
    max_length: Annotated[Optional[int], typer.Option(help="Longest document in tokens (default: the model's)")] = None,
    truncation: Annotated[bool, typer.Option(help="Cut documents longer than --max-length instead of failing")] = False,
    projection_dim: Annotated[int, typer.Option(help="Per-side projection p (p*p per module); 0 keeps full gradients")] = 16,
    projection_type: Annotated[ProjectionKind, typer.Option(help="Distribution of projection entries")] = ProjectionKind.rademacher,
    seed: Annotated[int, typer.Option(help="Projection seed")] = 0,
    modules: Annotated[Optional[list[str]], typer.Option(help="Glob of module names to include (repeatable)")] = None,
    exclude_modules: Annotated[Optional[list[str]], typer.Option(help="Glob of module names to exclude (repeatable)")] = None,
    token_batch_size: Annotated[int, typer.Option(help="Padded tokens per forward/backward batch")] = 2048,
    workers: Annotated[int, typer.Option(help="GradientWorker actors (one GPU each when there are GPUs)")] = 1,
    precision: Annotated[Precision, typer.Option(help="Model weights dtype")] = Precision.fp32,
    dtype: Annotated[VectorDtype, typer.Option(help="Stored vector dtype")] = VectorDtype.float32,
    per_token: Annotated[bool, typer.Option(help="One row per token instead of per document")] = False,
    normalizer: Annotated[Optional[str], typer.Option(help="Normalizer directory from `rayattr normalizer`")] = None,
    ray_address: Annotated[Optional[str], typer.Option(help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")] = None,
) -> None:
    """Collect per-example (projected) gradients of a dataset into a LanceDB table; reruns resume."""
    from rayattr.ray.pipeline import build as run_build

    spec = RunSpec(
        model=ModelSpec(model=model, precision=precision.value),
        data=DataSpec(
            dataset=dataset, split=split, subset=subset, text_column=text_column, prompt_column=prompt_column,
            completion_column=completion_column, max_length=max_length, truncation=truncation,
        ),
        grads=GradSpec(
            projection_dim=projection_dim, projection_type=projection_type.value, seed=seed,
            modules=tuple(modules or ("*",)), exclude_modules=tuple(exclude_modules or ()),
            per_token=per_token, token_batch_size=token_batch_size, dtype=dtype.value, normalizer=normalizer,
        ),
    )
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
