"""`rayattr build` / `rayattr fixture` and the other commands through Typer's CliRunner (and one
child process): outputs and one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import cli_build as _build
from typer.testing import CliRunner

from rayattr.api import open_index
from rayattr.cli import app
from rayattr.config import VERBOSE_ENV, verbose

runner = CliRunner()


def test_build_writes_the_table(ray_session, tmp_path, offline_fixture):
    run = str(tmp_path / "run")
    result = _build(run, str(offline_fixture.neox), str(offline_fixture.train), "--split", "train[100:164]", "--dtype", "float16")
    assert result.exit_code == 0, result.output
    index = open_index(run)
    ids, vectors = index.read_matrix()
    np.testing.assert_array_equal(ids, np.arange(100, 164))
    assert vectors.dtype == np.float16 and vectors.shape[1] == index.meta.dim == 4 * 4 * len(index.meta.modules)
    assert np.isfinite(vectors).all() and np.abs(vectors).sum(1).min() > 0
    assert "rows written" in result.output and "64" in result.output


def test_default_output_is_rayattrs_own(tmp_path, offline_fixture):
    """Without --verbose a command prints no Ray log line and no transformers bar (a child
    process: this session's Ray is already started)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", VERBOSE_ENV)}
    done = subprocess.run([sys.executable, "-m", "rayattr", "build", str(tmp_path / "run"), "--model", str(offline_fixture.neox),
                           "--dataset", str(offline_fixture.train), "--split", "train[:4]", "--projection-dim", "4"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "rows written" in done.stdout
    output = done.stdout + done.stderr
    # Ray's and Ray Data's log lines, Python warnings (FutureWarning, UserWarning...), deprecation
    # notices, transformers' weight-loading bars and worker-prefixed output.
    for noise in (" INFO ", " WARNING ", "Warning", "deprecat", "Loading weights", "(Replica pid=", "(pid="):
        assert noise not in output, output[-2000:]


def test_verbose_flag_reaches_every_library(tmp_path, monkeypatch):
    monkeypatch.setenv(VERBOSE_ENV, "0")  # restored when the test ends
    assert not verbose()
    result = runner.invoke(app, ["--verbose", "fixture", str(tmp_path / "fx")])
    assert result.exit_code == 0, result.output
    assert verbose()  # the environment Ray workers and transformers' loaders read


def test_fixture_command_reports_paths(tmp_path):
    result = runner.invoke(app, ["fixture", str(tmp_path / "fx"), "--variant", "hard"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "fx").exists() and "queries" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--text-column", "body"], "has no column ['body']"),
        (["--prompt-column", "question", "--completion-column", "text"], "has no column ['question']"),
        (["--split", "train[5:5]"], "has no rows"),
        (["--max-length", "8"], "longer than --max-length 8"),
        (["--modules", "nothing*"], "no Linear/Conv1D module matches"),
    ],
)
def test_bad_input_exits_with_a_named_problem(ray_session, tmp_path, offline_fixture, args, message):
    run = str(tmp_path / "run")
    result = _build(run, str(offline_fixture.neox), str(offline_fixture.train), "--split", "train[:32]", *args)
    assert result.exit_code == 1
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_missing_model_exits_non_zero(ray_session, tmp_path, offline_fixture):
    result = _build(str(tmp_path / "run"), str(tmp_path / "no-such-model"), str(offline_fixture.train))
    assert result.exit_code == 1
    assert "cannot load model" in result.output and "no-such-model" in result.output


def test_empty_dataset_exits_non_zero(ray_session, tmp_path, offline_fixture):
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), empty)
    result = _build(str(tmp_path / "run"), str(offline_fixture.neox), str(empty))
    assert result.exit_code == 1
    assert "has no rows" in result.output


def test_normalizer_command_then_build_with_it(ray_session, tmp_path, offline_fixture):
    from rayattr.fixtures import train_fixture_model
    from rayattr.grads.normalizer import Normalizer

    trained = train_fixture_model(offline_fixture)
    out = tmp_path / "norm"
    result = runner.invoke(app, ["normalizer", str(out), "--model", str(trained), "--optimizer-state", str(trained / "optimizer.pt")])
    assert result.exit_code == 0, result.output
    made = Normalizer.load(out)
    assert made.kind == "adafactor" and len(made.moments) == 9
    run = str(tmp_path / "run")
    result = _build(run, str(trained), str(offline_fixture.train), "--split", "train[:16]", "--normalizer", str(out))
    assert result.exit_code == 0, result.output
    assert open_index(run).meta.normalizer == made.fingerprint
    bad = runner.invoke(app, ["normalizer", str(tmp_path / "x"), "--model", str(offline_fixture.gpt2),
                              "--optimizer-state", str(trained / "optimizer.pt")])
    assert bad.exit_code == 1 and "does not match the model" in bad.output


def test_hessian_and_mix_commands(ray_session, tmp_path, offline_fixture):
    import torch

    from rayattr.hessian.factors import load_stats

    common = ["--model", str(offline_fixture.neox), "--projection-dim", "4"]
    index = runner.invoke(app, ["hessian", str(tmp_path / "index"), "--dataset", str(offline_fixture.train),
                                "--sample-size", "40", *common])
    assert index.exit_code == 0, index.output
    assert "40 examples" in " ".join(index.output.split())
    query = runner.invoke(app, ["hessian", str(tmp_path / "query"), "--dataset", str(offline_fixture.queries),
                                "--prompt-column", "prompt", "--completion-column", "completion", *common])
    assert query.exit_code == 0, query.output
    mixed = runner.invoke(app, ["mix", "--query", str(tmp_path / "query" / "stats"), "--index", str(tmp_path / "index" / "stats"),
                                "--out", str(tmp_path / "mixed"), "--target-downweight-components", "10"])
    assert mixed.exit_code == 0, mixed.output
    tensors, manifest = load_stats(tmp_path / "mixed")
    q, _ = load_stats(tmp_path / "query" / "stats")
    i, _ = load_stats(tmp_path / "index" / "stats")
    lam = manifest["mixed"]["lambda"]
    assert 0 <= lam <= 1 and manifest["mixed"]["k"] == 9
    for name, t in tensors.items():
        torch.testing.assert_close(t["second_moment"], lam * q[name]["second_moment"] + (1 - lam) * i[name]["second_moment"])
    # Statistics of another projection cannot be mixed in.
    other = runner.invoke(app, ["hessian", str(tmp_path / "other"), "--dataset", str(offline_fixture.train),
                                "--sample-size", "8", "--model", str(offline_fixture.neox), "--projection-dim", "2"])
    assert other.exit_code == 0, other.output
    bad = runner.invoke(app, ["mix", "--query", str(tmp_path / "other" / "stats"), "--index", str(tmp_path / "index" / "stats"),
                              "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 1 and "disagree on modules, projection" in bad.output
    typo = runner.invoke(app, ["hessian", str(tmp_path / "t"), "--dataset", str(offline_fixture.train), "--method", "kfca", *common])
    assert typo.exit_code != 0 and "kfca" in typo.output


def test_reduce_and_score_commands(ray_session, tmp_path, offline_fixture):
    from rayattr.ray.score import read_topk

    common = ["--model", str(offline_fixture.neox), "--projection-dim", "4"]
    assert _build(str(tmp_path / "index"), str(offline_fixture.neox), str(offline_fixture.train), "--split", "train[:40]").exit_code == 0
    reduced = runner.invoke(app, ["reduce", str(tmp_path / "query"), "--dataset", str(offline_fixture.queries), "--split",
                                  "train[:3]", "--prompt-column", "prompt", "--completion-column", "completion",
                                  "--aggregation", "none", "--unit-normalize", *common])
    assert reduced.exit_code == 0, reduced.output
    scored = runner.invoke(app, ["score", str(tmp_path / "scores"), "--query-path", str(tmp_path / "query"),
                                 "--index-path", str(tmp_path / "index"), "--unit-normalize", "--top-k", "4"])
    assert scored.exit_code == 0, scored.output
    assert "top training ids" in scored.output
    top, query_ids = read_topk(str(tmp_path / "scores"))
    np.testing.assert_array_equal(query_ids, [0, 1, 2])
    assert top.ids.shape == (3, 4) and set(top.ids.ravel()) <= set(range(40))
    inner = runner.invoke(app, ["score", str(tmp_path / "bad"), "--query-path", str(tmp_path / "query"),
                                "--index-path", str(tmp_path / "index")])
    assert inner.exit_code == 1 and "unit-normalized but scoring is by inner product" in " ".join(inner.output.split())
    neither = runner.invoke(app, ["score", str(tmp_path / "bad"), "--query-path", str(tmp_path / "query")])
    assert neither.exit_code == 1 and "--index-path" in neither.output


def test_save_config_then_run_it(ray_session, tmp_path, offline_fixture):
    from rayattr.runconfig import BuildConfig, load_config

    run, config = str(tmp_path / "run"), tmp_path / "build.yaml"
    saved = _build(run, str(offline_fixture.neox), str(offline_fixture.train), "--split", "train[:12]",
                   "--save-config", str(config))
    assert saved.exit_code == 0, saved.output
    assert "jobs/build.py" in " ".join(saved.output.split()) and not (tmp_path / "run").exists()
    command, loaded = load_config(config)
    assert command == "build" and isinstance(loaded, BuildConfig) and loaded.spec.grads.projection_dim == 4
    ran = runner.invoke(app, ["run", str(config)])
    assert ran.exit_code == 0, ran.output
    assert open_index(run).count() == 12
    wrong = runner.invoke(app, ["run", str(tmp_path / "missing.yaml")])
    assert wrong.exit_code == 1 and "cannot read run config" in wrong.output
