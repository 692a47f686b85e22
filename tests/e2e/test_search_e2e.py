"""Searching through the CLI: `rayattr index --ann` recall against exact search, and `rayattr query`."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from helpers import search_run, search_spec  # noqa: F401 - the fixtures run and spec
from typer.testing import CliRunner

from rayattr.cli import app
from rayattr.config import RayattrError
from rayattr.search import Index, build_ann_index
from rayattr.space import TableMeta
from rayattr.store import GradientTable

runner = CliRunner()


def _random_table(uri: str, rows: int, dim: int) -> np.ndarray:
    """A gradient table of random rows (ids 0..rows-1) with a one-module layout."""
    side = int(np.sqrt(dim))
    meta = TableMeta(
        model={"name": "random", "revision": "", "config": "c", "weights": "w"},
        modules=[{"name": "m", "out_features": side, "in_features": side, "p_out": side, "p_in": side,
                  "offset": 0, "width": dim}],
        projection={"type": "rademacher", "dim": 0, "seed": 0, "fingerprint": "f"}, dtype="float32", dim=dim,
    )
    vectors = np.random.default_rng(1).standard_normal((rows, dim)).astype(np.float32)
    GradientTable.create(uri, meta).append(pa.table({
        "id": pa.array(np.arange(rows), pa.int64()), "num_tokens": pa.array(np.full(rows, 2), pa.int32()),
        "loss": pa.array(np.zeros(rows), pa.float32()),
        "grad": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim),
    }))
    return vectors


def test_ann_recall_against_exact_search(tmp_path):
    uri = str(tmp_path / "random")
    vectors = _random_table(uri, 3000, 64)
    index = Index.open(uri)
    queries = np.random.default_rng(2).standard_normal((20, 64)).astype(np.float32)
    with pytest.raises(RayattrError, match=f"rayattr index {uri} --ann"):
        index.search(queries, ann=True)
    result = runner.invoke(app, ["index", uri, "--ann", "--metric", "dot"])
    assert result.exit_code == 0, result.output
    assert "IVF partitions" in result.output and "dot" in result.output
    for metric, unit_normalize in [("dot", False), ("cosine", True)]:
        if metric == "cosine":
            built = build_ann_index(uri, "cosine")
            assert (built.num_partitions, built.num_sub_vectors) == (11, 16)
        exact = index.search(queries, k=10, unit_normalize=unit_normalize)
        approx = index.search(queries, k=10, unit_normalize=unit_normalize, ann=True)
        recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx.ids, exact.ids)])
        assert recall >= 0.9, f"{metric} recall@10 {recall}"
        # Scores are true inner products / cosines of the rows returned.
        x = vectors / np.linalg.norm(vectors, axis=1, keepdims=True) if unit_normalize else vectors
        q = queries / np.linalg.norm(queries, axis=1, keepdims=True) if unit_normalize else queries
        expected = np.einsum("qd,qkd->qk", q, x[approx.ids])
        np.testing.assert_allclose(approx.scores, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(RayattrError, match="built for metric 'cosine'"):
        index.search(queries, ann=True)


def test_query_command_prints_ranked_training_text(run, offline_fixture):
    result = runner.invoke(app, ["query", run, "--text", "Alna Ferlund was born in Talburgh.", "-k", "3", "--unit-norm"])
    assert result.exit_code == 0, result.output
    assert "rank" in result.output and "training text" in result.output and "Alna" in result.output
    result = runner.invoke(app, ["query", run, "--query-dataset", str(offline_fixture.queries), "--split", "train[:2]",
                                 "--prompt-column", "prompt", "--completion-column", "completion", "-k", "2"])
    assert result.exit_code == 0, result.output
    assert result.output.count("rank") == 2 and "Nelo Ravovik graduated" in result.output
    result = runner.invoke(app, ["query", run, "-k", "3"])
    assert result.exit_code == 1 and "--text" in result.output and "--query-dataset" in result.output
