"""Commands that make what a run reads: the fixture, normalizers, curvature statistics and their mix."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from rayattr import storage
from rayattr.cli.application import app
from rayattr.cli.options import (MODEL, STREAMING, Group, RayAddressOpt, RunPathArg, SaveConfigOpt, run_spec, saved,
                                 user_errors, with_options)
from rayattr.cli.render import console
from rayattr.commands import HessianConfig, NormalizerConfig, TrackstarSpec
from rayattr.config import DataSpec, GradSpec
from rayattr.doctor import MIN_COSINE, diagnose
from rayattr.hessian.factors import STATS_SUBDIR

HESSIAN = Group(HessianConfig)
NORMALIZER = Group(NormalizerConfig)
OPTIONAL_DATA = Group(DataSpec, optional=True)  # fit from a dataset, or take an optimizer state
NORMALIZER_GRADS = Group(GradSpec, include=("modules", "exclude_modules", "token_batch_size", "include_bias",
                                           "loss_reduction", "loss_fn", "labels", "split_attention", "num_heads"))
DOCTOR_DATA = Group(DataSpec, include=("dataset", "split", "text_column", "prompt_column", "completion_column",
                                       "conversation_column"), optional=True)


@app.command()
@user_errors
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
    for name in ("tokenizer", "neox", "gpt2", "train", "queries", "ground_truth", "conversations"):
        table.add_row(name, str(getattr(made, name)))
    if train:
        table.add_row("neox-trained", str(train_fixture_model(made, seed=seed)))
    Console().print(table)


@app.command()
@user_errors
@with_options(MODEL, OPTIONAL_DATA, NORMALIZER_GRADS, NORMALIZER)
def normalizer(out: Annotated[str, typer.Argument(help="Directory to write the normalizer into")],
               ray_address: RayAddressOpt = None, options: dict | None = None) -> None:
    """Make a normalizer for `build --normalizer`: from an optimizer state, or fitted as mean squared gradients."""
    from rayattr.api import run

    grads = NORMALIZER_GRADS.build(options, projection_dim=0)  # full gradients
    config = NORMALIZER.build(options, out=out, model=MODEL.build(options), data=OPTIONAL_DATA.build(options),
                              grads=grads)
    with console.status("making normalizer"):
        made = run(config, ray_address=ray_address)
    table = Table("module", "moments", title=f"{made.kind} normalizer {out} (fingerprint {made.fingerprint})")
    for name, moments in made.moments.items():
        table.add_row(name, ", ".join(f"{k}{list(v.shape)}" for k, v in moments.items()))
    Console().print(table)


@app.command()
@user_errors
@with_options(*STREAMING, HESSIAN)
def hessian(
    run_path: RunPathArg,
    sample_size: Annotated[Optional[int], typer.Option(help="Use the first N rows of the split")] = None,
    ray_address: RayAddressOpt = None,
    save_config: SaveConfigOpt = None,
    options: dict | None = None,
) -> None:
    """Fit curvature statistics (second moment, K-FAC, EK-FAC) into RUN_PATH/stats."""
    from rayattr.api import run
    from rayattr.data import sample_split

    options["split"] = sample_split(options["split"], sample_size)
    config = HESSIAN.build(options, run_path=run_path, spec=run_spec(options))
    if saved(save_config, config):
        return
    out = storage.join(run_path, STATS_SUBDIR)
    with console.status(f"fitting {config.method}"):
        summary = run(config, ray_address=ray_address)
    table = Table("module", "gradient shape", "top eigenvalue", "condition number", title=(
        f"{config.method} -> {out}: {summary.examples:,} examples, {summary.tokens:,} tokens, {summary.seconds:.1f} s"))
    for name, row in summary.modules.items():
        table.add_row(name, row["shape"], f"{row['top_eigenvalue']:.4g}", f"{row['condition']:.3g}")
    Console().print(table)


@app.command()
@user_errors
@with_options(Group(TrackstarSpec, include=("target_downweight_components",)))
def mix(
    query: Annotated[str, typer.Option(help="Statistics directory of the query set (second-moment)")],
    index: Annotated[str, typer.Option(help="Statistics directory of the index set (second-moment)")],
    out: Annotated[str, typer.Option(help="Directory for the mixed statistics")],
    options: dict | None = None,
) -> None:
    """TrackStar mixing: H = lam * H_query + (1 - lam) * H_index, lam from the pooled spectra."""
    from rayattr.hessian.mixing import mix_stats

    lam, k = mix_stats(query, index, out, options["target_downweight_components"])
    Console().print(f"mixed -> {out}: lambda = {lam:.4f} (pooled eigen-rank k = {k})")


@app.command()
@user_errors
@with_options(MODEL, DOCTOR_DATA)
def doctor(
    docs: Annotated[int, typer.Option(help="Sample documents")] = 8,
    trials: Annotated[int, typer.Option(help="Shuffled batchings per check")] = 3,
    min_cosine: Annotated[float, typer.Option(help="Worst row cosine, batched against alone, that passes")] = MIN_COSINE,
    options: dict | None = None,
) -> None:
    """Check that per-example gradients do not depend on batching or padding; name the cheapest flags that pass."""
    model, data = MODEL.build(options), DOCTOR_DATA.build(options)
    with console.status("comparing batched and one-at-a-time gradients"):
        verdicts, duplicated = diagnose(model, data, docs=docs, trials=trials, min_cosine=min_cosine)
    table = Table("settings", "worst cosine, equal lengths", "worst cosine, mixed lengths", "finite", "passes",
                  title=f"batch invariance of per-example gradients ({docs} documents x {trials} trials, pass >= {min_cosine})")
    for verdict in verdicts:
        table.add_row(verdict.attempt.flags, f"{verdict.equal_lengths:.7f}", f"{verdict.mixed_lengths:.7f}",
                      "yes" if verdict.finite else "NO", "yes" if verdict.passed else "no")
    Console().print(table)
    healthy = verdicts[0].passed and not any(duplicated.values())
    for token, count in duplicated.items():
        if count:
            console.print(f"{count} sample document(s) {'start' if token == 'bos' else 'end'} with a duplicated "
                          f"{token.upper()} token: the text already holds it and the tokenizer adds another; strip it "
                          "from the data or use a tokenizer that does not add it")
    if verdicts[0].passed:
        console.print("the given settings pass")
    elif verdicts[-1].passed:
        console.print(f"pass {verdicts[-1].attempt.flags} to build, hessian, reduce, score and trackstar")
    else:
        console.print("no setting passes: rows depend on batching even in full fp32 with the math kernel; "
                      "use --token-batch-size 2 (one document per batch)")
    raise typer.Exit(0 if healthy else 1)
