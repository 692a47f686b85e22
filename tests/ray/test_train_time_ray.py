"""Train-time rows from a Ray Train worker group, and scores read from a train-time table."""

from __future__ import annotations

import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from helpers import read_scores

from rayattr.api import collect_in_process
from rayattr.commands import TrainConfig
from rayattr.config import DataSpec, GradSpec, ModelSpec, RayattrError, RunSpec
from rayattr.ray.entry import score
from rayattr.ray.score import ScoreSettings
from rayattr.ray.traintime import train
from rayattr.store import GradientTable

DOCS, WORKERS, BATCH = 16, 2, 4


@pytest.fixture(scope="module")
def trained(ray_session, offline_fixture, tmp_path_factory):
    root = tmp_path_factory.mktemp("train-ray")
    spec = RunSpec(ModelSpec(str(offline_fixture.neox)), DataSpec(str(offline_fixture.train), split=f"train[:{DOCS}]"),
                   GradSpec(projection_dim=8))
    counts = train(TrainConfig(str(root / "run"), spec, workers=WORKERS, batch_size=BATCH, learning_rate=1e-3))
    query = RunSpec(spec.model, DataSpec(str(offline_fixture.queries), split="train[:3]", prompt_column="prompt",
                                         completion_column="completion"), spec.grads)
    for meta, rows in collect_in_process(query):  # the queries' rows at the checkpoint training started from
        GradientTable.create(str(root / "query"), meta).append(rows.to_arrow())
    return root, spec, counts


def read(run: str, table: str = "gradients") -> pa.Table:
    return lancedb.connect(run).open_table(table).to_arrow().sort_by([("step", "ascending"), ("id", "ascending")])


def test_each_worker_writes_its_examples_rows_at_the_initial_weights(trained):
    root, spec, counts = trained
    rows, order = read(str(root / "run")), read(str(root / "run"), "order")
    assert counts == {"rows": DOCS, "examples_seen": DOCS}
    assert sorted(order.column("id").to_pylist()) == list(range(DOCS))  # every example once in the epoch
    assert rows.select(["step", "id"]).equals(order.select(["step", "id"]))
    steps = DOCS // (WORKERS * BATCH)
    assert sorted(set(rows.column("step").to_pylist())) == list(range(steps))
    first = rows.filter(pc.equal(rows.column("step"), 0))
    assert first.num_rows == WORKERS * BATCH  # both workers' batches of the first step
    (_, built), = collect_in_process(spec)  # what `rayattr build` writes at the initial weights
    expected = built.grads[first.column("id").to_numpy()]
    assert built.ids.tolist() == list(range(DOCS))
    got = np.stack(first.column("grad").to_numpy(zero_copy_only=False))
    assert np.linalg.norm(got - expected) <= 1e-5 * np.linalg.norm(expected)


def test_scores_of_one_step_and_of_all_steps_weighted_by_learning_rate(trained):
    root = trained[0]
    rows = read(str(root / "run"))
    queries = GradientTable.open(str(root / "query")).read_matrix()[1].astype(np.float64)
    grads = np.stack(rows.column("grad").to_numpy(zero_copy_only=False)).astype(np.float64)
    step, ids, lr = (rows.column(c).to_numpy() for c in ("step", "id", "lr"))
    score(str(root / "s-step1"), str(root / "query"), ScoreSettings(), index_path=str(root / "run"), step="1")
    got_ids, got = read_scores(str(root / "s-step1"))
    at = step == 1
    np.testing.assert_array_equal(got_ids, ids[at])  # rows sorted by step, then id
    np.testing.assert_allclose(got, grads[at] @ queries.T, rtol=1e-5, atol=1e-6 * np.abs(grads[at] @ queries.T).max())
    score(str(root / "s-all"), str(root / "query"), ScoreSettings(), index_path=str(root / "run"), step="all")
    got_ids, got = read_scores(str(root / "s-all"))
    summed = np.zeros((DOCS, grads.shape[1]))
    np.add.at(summed, ids, lr[:, None] * grads)
    np.testing.assert_array_equal(got_ids, np.arange(DOCS))
    expected = summed @ queries.T
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())


def test_a_train_time_index_needs_a_step_and_a_build_index_refuses_one(trained):
    root = trained[0]
    with pytest.raises(RayattrError, match="--step S or --step all"):
        score(str(root / "s-none"), str(root / "query"), ScoreSettings(), index_path=str(root / "run"))
    with pytest.raises(RayattrError, match="written by a build"):
        score(str(root / "s-build"), str(root / "query"), ScoreSettings(), index_path=str(root / "query"), step="0")
