"""Commands that make what a run reads: the fixture, normalizers, curvature statistics and their mix."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from rayattr import storage
from rayattr.cli.application import app
from rayattr.cli.options import (BaseModelOpt, CompletionColumnOpt, ConversationColumnOpt, DatasetOpt, ForceMathSdpOpt,
                                 Method, ModelOpt, NormalizerKind, Precision, PrecisionOpt, PromptColumnOpt, RayAddressOpt,
                                 RunPathArg, SaveConfigOpt, SplitOpt, Tf32Opt, TextColumnOpt, WorkersOpt, ZeroStageOpt,
                                 run_spec, saved, streams_dataset, user_errors)
from rayattr.cli.render import console
from rayattr.config import ModelSpec, RayattrError, check_zero_stage
from rayattr.doctor import MIN_COSINE, diagnose
from rayattr.hessian.factors import STATS_SUBDIR, TARGET_DOWNWEIGHT_COMPONENTS


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
        spec = run_spec(model, dataset, **options, projection_dim=0)
        with console.status("fitting normalizer"):
            fit(str(out), spec, "normalizer", workers=workers, ray_address=ray_address, normalizer_kind=kind.value)
        made = Normalizer.load(out)
    table = Table("module", "moments", title=f"{made.kind} normalizer {out} (fingerprint {made.fingerprint})")
    for name, moments in made.moments.items():
        table.add_row(name, ", ".join(f"{k}{list(v.shape)}" for k, v in moments.items()))
    Console().print(table)


@app.command()
@user_errors
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
    spec = run_spec(model, dataset, **options)
    check_zero_stage(zero_stage)
    if saved(save_config, HessianConfig(run_path, spec, method.value, workers, zero_stage)):
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
@user_errors
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


@app.command()
@user_errors
def doctor(
    model: ModelOpt,
    dataset: Annotated[Optional[str], typer.Option(help="Sample documents from this dataset (default: built-in probe texts)")] = None,
    split: SplitOpt = "train",
    text_column: TextColumnOpt = "text",
    prompt_column: PromptColumnOpt = None,
    completion_column: CompletionColumnOpt = None,
    conversation_column: ConversationColumnOpt = None,
    precision: PrecisionOpt = Precision.fp32,
    force_math_sdp: ForceMathSdpOpt = False,
    use_tf32_matmuls: Tf32Opt = False,
    base_model: BaseModelOpt = None,
    docs: Annotated[int, typer.Option(help="Sample documents")] = 8,
    trials: Annotated[int, typer.Option(help="Shuffled batchings per check")] = 3,
    min_cosine: Annotated[float, typer.Option(help="Worst row cosine, batched against alone, that passes")] = MIN_COSINE,
) -> None:
    """Check that per-example gradients do not depend on batching or padding; name the cheapest flags that pass."""
    spec = run_spec(model, dataset or "probe texts", split, text_column=text_column, prompt_column=prompt_column,
                    completion_column=completion_column, conversation_column=conversation_column, precision=precision,
                    base_model=base_model, force_math_sdp=force_math_sdp, use_tf32_matmuls=use_tf32_matmuls)
    with console.status("comparing batched and one-at-a-time gradients"):
        verdicts, duplicated = diagnose(spec.model, spec.data if dataset else None, docs=docs, trials=trials,
                                        min_cosine=min_cosine)
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
