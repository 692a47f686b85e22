"""What the examples share: running a rayattr command as a user types it, echoed first."""

from __future__ import annotations

import shlex
import subprocess
import sys

from rich.console import Console


def rayattr(console: Console, *argv: str) -> None:
    """``rayattr ARGV...`` in a child process (this interpreter's rayattr), printed before it runs."""
    console.print(f"[bold]$ rayattr {shlex.join(argv)}", highlight=False, soft_wrap=True)
    subprocess.run([sys.executable, "-m", "rayattr", *argv], check=True)
