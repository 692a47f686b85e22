"""``python -m rayattr`` is the ``rayattr`` command."""

from rayattr.cli import app

app()
