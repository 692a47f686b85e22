"""`rayattr trackstar` end to end on the fine-tuned fixture: it finds the supporting documents, and resumes.

Measured on the easy fixture (2,200 documents, fine-tuned tiny GPT-NeoX,
projection 16, Adafactor normalizer from the fine-tune's AdamW state, mixed
second moments): recall@10 0.21 and MRR 0.34 over all 150 queries, against
0.0045 for a random ranking; the default projection (45 per side, 4-bit rows) does better
(benchmarks/README.md, trackstar_storage.py). This test scores the whole corpus for the first
40 queries and asks for 20x the random recall.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from rayattr.api import collect_in_process, open_index
from rayattr.cli import app
from rayattr.config import RayattrError, RunSpec
from rayattr.fixtures import fact_tracing_quality, train_fixture_model
from rayattr.ray.score import read_topk
from rayattr.runconfig import load_config
from rayattr.trackstar import TrackstarSpec, trackstar

runner = CliRunner()
STEPS = ["normalizer", "index_stats", "query_stats", "mixed", "query", "score"]


@pytest.fixture(scope="module")
def run(offline_fixture, ray_session, tmp_path_factory):
    model = train_fixture_model(offline_fixture)
    path = str(tmp_path_factory.mktemp("trackstar") / "run")
    result = runner.invoke(app, [
        "trackstar", path, "--model", str(model), "--dataset", str(offline_fixture.train),
        "--query-dataset", str(offline_fixture.queries), "--query-split", "train[:40]",
        "--query-prompt-column", "prompt", "--query-completion-column", "completion",
        "--optimizer-state", str(model / "optimizer.pt"), "--stats-sample-size", "1000", "--top-k", "20",
        "--keep-gradients", "--workers", "2",
        "--projection-dim", "16",  # the default int4 rows at a 256-wide moment per module, not 2,025: 94 -> 23 s
    ])
    assert result.exit_code == 0, result.output
    return path


def test_trackstar_finds_supporting_documents(run, offline_fixture):
    top, query_ids = read_topk(run)
    np.testing.assert_array_equal(query_ids, np.arange(40))
    assert top.ids.shape == (40, 20) and (np.diff(top.scores, axis=1) <= 0).all()
    quality = fact_tracing_quality(offline_fixture, query_ids, top.ids)
    assert quality["recall@10"] >= 20 * quality["random_recall@10"], quality
    assert quality["mrr"] >= 0.1, quality


def test_rerun_with_resume_recomputes_nothing(run):
    steps_dir = Path(run) / "steps"
    before = {path.name: path.stat().st_mtime_ns for path in steps_dir.glob("*.json")}
    assert sorted(before) == sorted(f"{step}.json" for step in STEPS)
    assert json.loads((steps_dir / "mixed.json").read_text())["detail"]["lambda"] > 0
    reports = trackstar(load_config(Path(run) / "trackstar.yaml")[1], resume=True)
    assert [r.name for r in reports] == STEPS and all(r.skipped for r in reports)
    assert {path.name: path.stat().st_mtime_ns for path in steps_dir.glob("*.json")} == before
    replay = runner.invoke(app, ["run", str(Path(run) / "trackstar.yaml"), "--resume"])
    assert replay.exit_code == 0, replay.output
    assert replay.output.count("skipped (done)") == len(STEPS)


def test_rerun_without_resume_or_with_other_settings_is_refused(run):
    config = Path(run) / "trackstar.yaml"
    again = runner.invoke(app, ["run", str(config)])
    assert again.exit_code == 1 and "pass --resume" in again.output
    spec = load_config(config)[1]
    other = TrackstarSpec(**{**spec.__dict__, "top_k": 7})
    with pytest.raises(RayattrError, match="made with other settings"):
        trackstar(other, resume=True)


def test_kept_gradients_equal_a_build_with_the_runs_normalizer(run, offline_fixture):
    spec = load_config(Path(run) / "trackstar.yaml")[1]
    index = open_index(run)
    assert index.count() == 2200 and index.meta.normalizer is not None
    grads = dataclasses.replace(spec.grads, normalizer=str(Path(run) / "normalizer"))
    (meta, rows), = collect_in_process(RunSpec(spec.model, dataclasses.replace(spec.train, split="train[:5]"), grads))
    ids, vectors = index.read_matrix()
    np.testing.assert_array_equal(ids[:5], rows.ids)
    assert index.meta.dtype == spec.grads.dtype == "int4"  # TrackStar's default rows
    # Other batches reorder float32 sums by ~1e-7: each block's step moves by as much, and where
    # a number sits on a code boundary it moves by one step; nearly every code is the same.
    step = np.repeat(rows.stored["grad_step"].flatten().to_numpy().reshape(5, -1), index.codec.widths, axis=1)
    moved = np.abs(vectors[:5] - rows.grads) / step
    assert moved.max() <= 1 + 1e-4 and (moved > 1e-4).mean() < 1e-3


def test_normalizer_fitted_from_data_at_the_default_row_dtype(offline_fixture, ray_session, tmp_path):
    """Without an optimizer state, --normalizer adafactor fits one from full gradients, whatever the rows are stored in."""
    model = train_fixture_model(offline_fixture)
    path = str(tmp_path / "run")
    result = runner.invoke(app, [
        "trackstar", path, "--model", str(model), "--dataset", str(offline_fixture.train), "--split", "train[:12]",
        "--query-dataset", str(offline_fixture.queries), "--query-split", "train[:3]", "--query-prompt-column", "prompt",
        "--query-completion-column", "completion", "--normalizer", "adafactor", "--projection-dim", "8",
    ])
    assert result.exit_code == 0, result.output
    spec = load_config(Path(path) / "trackstar.yaml")[1]
    assert spec.grads.dtype == "int4" and (Path(path) / "steps" / "normalizer.json").exists()
    assert len(read_topk(path)[1]) == 3


def test_analysis_example_reads_the_run_without_rayattr(run, offline_fixture):
    script = Path(__file__).parents[2] / "examples" / "analysis.py"
    assert not re.search(r"^\s*(from|import) rayattr", script.read_text(), re.MULTILINE)
    done = subprocess.run([sys.executable, str(script), "--run", run, "--train", str(offline_fixture.train), "--example", "5"],
                          capture_output=True, text=True, check=True)
    assert "top proponents" in done.stdout and "distractor" in done.stdout and "bio" in done.stdout
    assert "nearest training neighbours of document 5" in done.stdout
