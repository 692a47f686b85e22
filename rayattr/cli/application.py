"""The one Typer app of the ``rayattr`` command line; the command modules register on it."""

from __future__ import annotations

import typer

app = typer.Typer(help="Gradient-based training-data attribution on Ray.", no_args_is_help=True, add_completion=False)
