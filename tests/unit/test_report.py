"""The HTML report's parts that need no Ray: streamed opponents and histograms against numpy, the checks
of its inputs (an object-store RUN_PATH without --out, a config of another run), and escaping.
The whole report, rendered by Chromium, is tested in tests/e2e/test_report_browser.py."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from rayattr.cli import app
from rayattr.commands import TRACKSTAR_CONFIG, ReportConfig, TrackstarSpec
from rayattr.config import DataSpec, ModelSpec, RayattrError
from rayattr.configfile import save_config
from rayattr.report import rankings
from rayattr.report.html import NEGATIVE, POSITIVE, document, heatmap, score_colour
from rayattr.report.rankings import HISTOGRAM_BINS, rank_queries
from rayattr.report.run import load_run
from rayattr.store import META_KEY, SCORES, TOPK, ScoreMeta, ScoreTable, connect
from rayattr.topk import TopK


def scored_run(path: str, scores: np.ndarray, top_k: int) -> ScoreTable:
    """A run path holding ``scores [rows, queries]`` and their topk table, as scoring writes them."""
    rows, width = scores.shape
    meta = ScoreMeta(width=width, per_token=False, query_ids=list(range(10, 10 + width)), settings={"index": "x"})
    table = ScoreTable.create(path, meta, SCORES)
    table.append(pa.table({"id": pa.array(np.arange(rows), pa.int64()),
                           "num_tokens": pa.array(np.ones(rows), pa.int32()),
                           "scores": pa.FixedSizeListArray.from_arrays(pa.array(scores.reshape(-1)), width)}))
    top = TopK.of_block(top_k, np.arange(rows), scores).to_arrow(np.asarray(meta.query_ids))
    connect(path).create_table(TOPK, top.replace_schema_metadata({META_KEY: meta.to_json()}))
    return table


def test_opponents_and_histograms_streamed_equal_numpy(tmp_path, monkeypatch):
    scores = np.random.default_rng(0).normal(size=(300, 5)).astype(np.float32)
    table = scored_run(str(tmp_path), scores, top_k=8)
    monkeypatch.setattr(rankings, "BATCH_VALUES", 5 * 32)  # 32 rows a batch: ten batches
    ranked = rank_queries(table, k=6, queries=3)
    assert [r.query_id for r in ranked] == [10, 11, 12]
    for r in ranked:
        column = scores[:, r.column]
        np.testing.assert_array_equal(r.top_ids, np.argsort(-column, kind="stable")[:6])
        np.testing.assert_array_equal(r.bottom_ids, np.argsort(column, kind="stable")[:6])
        np.testing.assert_array_equal(r.bottom_scores, np.sort(column)[:6])
        assert r.edges[0] == pytest.approx(column.min()) and r.edges[-1] == pytest.approx(column.max())
        np.testing.assert_array_equal(r.counts, np.histogram(column, bins=r.edges)[0])
        assert r.counts.shape == (HISTOGRAM_BINS,) and r.counts.sum() == len(column)
    with pytest.raises(RayattrError, match="keeps 8 rows per query; pass --k 8 or less"):
        rank_queries(table, k=9, queries=None)


def test_an_object_store_run_path_needs_out(tmp_path):
    assert ReportConfig("runs/x").out.endswith("runs/x/report")
    assert ReportConfig("s3://bucket/run", out=str(tmp_path)).out == str(tmp_path)  # read remotely, written here
    refused = CliRunner().invoke(app, ["report", "s3://bucket/run"])
    assert refused.exit_code == 1 and len(refused.output.strip().splitlines()) == 1
    assert refused.output.startswith("error: s3://bucket/run is not a local directory")
    assert refused.output.rstrip().endswith("pass --out DIR, a local directory for its pages")


def test_report_reads_texts_only_from_the_config_of_the_scored_run(tmp_path, offline_fixture):
    path = str(tmp_path)
    meta = ScoreMeta(width=1, per_token=False, query_ids=[0], settings={"index": "another dataset"})
    with pytest.raises(RayattrError, match="holds no trackstar.yaml.*pass --run-config CONFIG.yaml"):
        load_run(path, meta, None)
    spec = TrackstarSpec(path, ModelSpec(str(offline_fixture.neox)), DataSpec(str(offline_fixture.train)),
                         DataSpec(str(offline_fixture.queries)))
    save_config(tmp_path / TRACKSTAR_CONFIG, spec)
    with pytest.raises(RayattrError, match="describes another run than the scores"):
        load_run(path, meta, None)


def test_texts_are_escaped_and_scores_coloured_on_a_diverging_scale():
    assert "<script>" not in document("<script>alert(1)</script>", "</div>")
    cells = heatmap(["<b>", " ok", "."], np.array([0.5, -0.25], np.float32), scale=0.5)
    assert "&lt;b&gt;" in cells and "<b>" not in cells
    assert cells.count("data-score") == 2 and 'title="token 2: not scored"' in cells
    assert score_colour(0.5, 0.5) == f"rgb{POSITIVE}" and score_colour(-2.0, 0.5) == f"rgb{NEGATIVE}"  # clipped
    assert score_colour(0.0, 0.5) == score_colour(0.1, 0.0) == "rgb(255, 255, 255)"  # zero, or no scale: white
