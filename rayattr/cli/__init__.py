"""The ``rayattr`` command line: parses flags, calls the API, prints progress and tables.

``application`` holds the Typer app, ``options`` and ``render`` the shared flags and output;
``inputs``, ``scoring`` and ``tables`` define the commands and register them on import, in
the order ``rayattr --help`` lists them (fixture .. mix, reduce .. run, build .. query, then
``counterfactual``'s retrain, magic, validate, then ``report``).
"""

from __future__ import annotations

from rayattr.cli import inputs, scoring, tables  # registration order: keep this order
from rayattr.cli import counterfactual  # its commands come after those
from rayattr.cli import report  # and the report last
from rayattr.cli.application import app

__all__ = ["app", "counterfactual", "inputs", "report", "scoring", "tables"]
