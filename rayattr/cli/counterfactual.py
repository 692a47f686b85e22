"""Commands of counterfactual truth: a retrain bank, MAGIC scores, and the LDS of any scores on a bank."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from rayattr.cli.application import app
from rayattr.cli.options import DATA, MODEL, Group, RayAddressOpt, RunPathArg, SaveConfigOpt, saved, user_errors, with_options
from rayattr.cli.render import console, print_topk
from rayattr.cli.scoring import QUERY
from rayattr.commands import MagicConfig, RetrainConfig, ValidateConfig
from rayattr.lds.recipe import Recipe

RECIPE = Group(Recipe)
RETRAIN = Group(RetrainConfig)
MAGIC = Group(MagicConfig)
VALIDATE = Group(ValidateConfig)


def _runs(options: dict) -> dict:
    """The model, training set, queries and recipe every counterfactual command takes."""
    train = DATA.build(options)
    return {"model": MODEL.build(options), "train": train, "recipe": RECIPE.build(options),
            "query": QUERY.build(options, max_length=train.max_length, truncation=train.truncation)}


@app.command("retrain")
@user_errors
@with_options(MODEL, DATA, QUERY, RECIPE, RETRAIN)
def retrain_command(bank_path: Annotated[str, typer.Argument(help="Where the bank is kept (a LanceDB path)")],
                    ray_address: RayAddressOpt = None, save_config: SaveConfigOpt = None,
                    options: dict | None = None) -> None:
    """Fine-tune the model on random subsets of the training set, one Ray task each, recording every query's
    loss after training; reruns add the runs the bank lacks."""
    from rayattr.api import run

    config = RETRAIN.build(options, bank_path=bank_path, **_runs(options))
    if saved(save_config, config):
        return
    bank = run(config, ray_address=ray_address,
               on_step=lambda done: console.print(escape(done.describe()), highlight=False))
    Console().print(f"bank {bank_path}: {len(bank.finished())} runs of {len(bank.meta.query_ids)} query losses",
                    soft_wrap=True)


@app.command("magic")
@user_errors
@with_options(MODEL, DATA, QUERY, RECIPE, MAGIC)
def magic_command(run_path: RunPathArg, ray_address: RayAddressOpt = None, save_config: SaveConfigOpt = None,
                  options: dict | None = None) -> None:
    """MAGIC: exact metagradients of each query's loss through the whole fine-tune, in every training document's
    weight; writes `scores` and `topk` (score: minus the metagradient, so higher helps)."""
    from rayattr.api import run

    config = MAGIC.build(options, run_path=run_path, **_runs(options))
    if saved(save_config, config):
        return
    with console.status("magic: replaying the training run"):
        top, query_ids = run(config, ray_address=ray_address)
    print_topk(top, query_ids)
    Console().print(f"results in {run_path}: tables scores, topk", soft_wrap=True)


@app.command("validate")
@user_errors
@with_options(VALIDATE)
def validate_command(
    scores_path: Annotated[str, typer.Argument(help="Run path holding a scores table (score, trackstar, magic)")],
    save_config: SaveConfigOpt = None, options: dict | None = None,
) -> None:
    """The linear datamodeling score (LDS) of a run's scores on a retrain bank, with a bootstrap interval;
    recall@k and MRR too with --ground-truth."""
    from rayattr.api import run

    config = VALIDATE.build(options, scores_path=scores_path)
    if saved(save_config, config):
        return
    result = run(config)
    summary = Table("", "value", title=f"validate {scores_path} on {config.bank}")
    lds = result.lds
    summary.add_row("LDS (mean Spearman over queries)", f"{lds.lds:.3f}  [{lds.low:.3f}, {lds.high:.3f}] 95%")
    summary.add_row("queries / retrained subsets", f"{lds.queries} / {lds.subsets}")
    for key, value in result.ranking.items():
        summary.add_row(key, f"{value:.3f}" if key != "queries" else f"{value:.0f}")
    Console().print(summary)
