"""Bad input fails with one line naming the problem and the fix, and damages nothing: the cases
that are refused before any Ray starts (the others are in ``tests/ray/test_bad_inputs_ray.py`` and
``tests/e2e/test_bad_inputs_e2e.py``).
"""

from __future__ import annotations

import os

import torch
from helpers import one_line as _one_line
from typer.testing import CliRunner

from rayattr.cli import app

runner = CliRunner()


def test_optimizer_state_that_runs_code_is_refused(tmp_path, offline_fixture):
    witness = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {witness}",))

    torch.save({"state": {0: Payload()}, "param_groups": [{"params": [0]}]}, tmp_path / "optimizer.pt")
    result = runner.invoke(app, ["normalizer", str(tmp_path / "out"), "--model", str(offline_fixture.neox),
                                 "--optimizer-state", str(tmp_path / "optimizer.pt")])
    assert result.exit_code == 1 and "is not a plain optimizer state" in _one_line(result.output)
    assert not witness.exists() and not (tmp_path / "out").exists()
