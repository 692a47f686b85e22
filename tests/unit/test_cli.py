"""CLI behaviour that starts no Ray: rayattr's one-line warnings, and `rayattr build --save-config`
and a refused `--zero-stage` through Typer's CliRunner."""

from __future__ import annotations

import subprocess
import sys

from helpers import cli_build as _build


def test_rayattr_warnings_print_as_one_line():
    script = ("import warnings; from rayattr.config import RayattrWarning, one_line_warnings; one_line_warnings(); "
              "one_line_warnings(); warnings.warn('lambda saturated; pass --x', RayattrWarning); warnings.warn('other')")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    lines = done.stderr.splitlines()
    assert lines == ["warning: lambda saturated; pass --x", "<string>:1: UserWarning: other"]  # others keep their form


def test_zero_stage_flag_is_saved_and_checked(tmp_path, offline_fixture):
    from rayattr.runconfig import load_config

    config = tmp_path / "build.yaml"
    saved = _build(str(tmp_path / "run"), str(offline_fixture.neox), str(offline_fixture.train),
                   "--workers", "2", "--zero-stage", "3", "--save-config", str(config))
    assert saved.exit_code == 0, saved.output
    assert load_config(config)[1].zero_stage == 3  # `rayattr run` and jobs/build.py partition the model too
    refused = _build(str(tmp_path / "run"), str(offline_fixture.neox), str(offline_fixture.train), "--zero-stage", "1")
    assert refused.exit_code == 1 and "--zero-stage 1 is not supported" in " ".join(refused.output.split())
    assert not (tmp_path / "run").exists()
