"""The one Typer app of the ``rayattr`` command line; the command modules register on it."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from rayattr.config import VERBOSE_ENV, one_line_warnings

app = typer.Typer(help="Gradient-based training-data attribution on Ray.", no_args_is_help=True, add_completion=False)


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Also show Ray's logs, the workers' output and "
                                          "transformers' warnings and progress bars.")] = False,
) -> None:
    """Gradient-based training-data attribution on Ray."""
    one_line_warnings()
    if verbose:
        os.environ[VERBOSE_ENV] = "1"  # read where each library starts; Ray workers inherit it
