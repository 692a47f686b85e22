"""Bad input through the CLI fails with one line naming the problem and the fix, and damages
nothing: a model that is not a causal LM, an unreachable Ray address, a corrupt table."""

from __future__ import annotations

import os
import subprocess
import sys

from helpers import one_line as _one_line
from transformers import T5Config
from typer.testing import CliRunner

from rayattr.cli import app
from rayattr.verify import verify

runner = CliRunner()


def test_model_that_is_not_a_causal_lm(ray_session, tmp_path, offline_fixture):
    T5Config(d_model=16, num_layers=1, num_heads=2, d_ff=32, vocab_size=64).save_pretrained(tmp_path / "t5")
    result = runner.invoke(app, ["build", str(tmp_path / "run"), "--model", str(tmp_path / "t5"),
                                 "--dataset", str(offline_fixture.train)])
    assert result.exit_code == 1 and "is not a causal LM (t5" in _one_line(result.output)
    assert not (tmp_path / "run").exists()


def test_unreachable_ray_address(tmp_path, offline_fixture):
    # A child process: this session's Ray is already connected.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "-m", "rayattr", "build", str(tmp_path / "run"), "--model", str(offline_fixture.neox),
         "--dataset", str(offline_fixture.train), "--ray-address", "127.0.0.1:9"],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert "cannot reach a Ray cluster at '127.0.0.1:9'" in _one_line(done.stderr)
    assert not (tmp_path / "run").exists()


def test_corrupt_table_is_named(ray_session, tmp_path, offline_fixture):
    run = tmp_path / "run"
    args = ["build", str(run), "--model", str(offline_fixture.neox), "--dataset", str(offline_fixture.train),
            "--split", "train[:16]", "--projection-dim", "4"]
    assert runner.invoke(app, args).exit_code == 0
    for data_file in (run / "gradients.lance" / "data").glob("*.lance"):
        data_file.unlink()
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and "is corrupt or partly written" in _one_line(result.output)
    assert any("corrupt or partly written" in p for p in verify(str(run)).problems)
