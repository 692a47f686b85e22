"""`rayattr report`: a static HTML report of a scored run, to read its attributions in a browser, offline."""

from __future__ import annotations

from rich.console import Console

from rayattr.cli.application import app
from rayattr.cli.options import Group, RunPathArg, SaveConfigOpt, saved, user_errors, with_options
from rayattr.cli.render import console
from rayattr.commands import ReportConfig

REPORT = Group(ReportConfig)


@app.command("report")
@user_errors
@with_options(REPORT)
def report_command(run_path: RunPathArg, save_config: SaveConfigOpt = None, options: dict | None = None) -> None:
    """Write a static HTML report of a scored run (trackstar, score, magic): its settings, counts and timings, and per
    query the proponents, opponents and a score histogram, with per-token heatmaps where the run has token scores."""
    from rayattr.api import run

    config = REPORT.build(options, run_path=run_path)
    if saved(save_config, config):
        return
    with console.status("report: ranking the queries and reading their documents"):
        index = run(config)
    Console().print(f"report: {index}", soft_wrap=True)
