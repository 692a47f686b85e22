"""A worker process killed in the middle of a build or an on-the-fly score costs no row.

Ray Data restarts a dead pool actor and retries its batches; a batch the dead
actor had already committed is committed again and removed by the final
de-duplication pass, so the table equals a clean run's.
"""

from __future__ import annotations

import os
import signal

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
from helpers import assert_rows_close, read_scores

from rayattr.api import collect_in_process, open_index
from rayattr.config import DataSpec, GradSpec, ModelSpec, RunSpec
from rayattr.ray.pipeline import BuildProgress, build
from rayattr.ray.score import ScoreSettings, reduce, score
from rayattr.store import Completion

DOCS = 200


@pytest.fixture(scope="module")
def spec(offline_fixture, tmp_path_factory) -> RunSpec:
    # Eight row groups are eight shards, so both actors have work; small token
    # batches make enough steps that the kill lands in the middle.
    train = tmp_path_factory.mktemp("faults") / "train.parquet"
    pq.write_table(pq.read_table(offline_fixture.train).slice(0, DOCS), train, row_group_size=25)
    return RunSpec(ModelSpec(str(offline_fixture.neox)), DataSpec(str(train)), GradSpec(projection_dim=4, token_batch_size=64))


class KillOneWorker:
    """A progress callback that SIGKILLs one pool actor process once ``after`` documents are done."""

    def __init__(self, actor_class: str, after: int) -> None:
        self.actor_class, self.after = actor_class, after
        self.killed: int | None = None
        self.docs_at_kill = 0

    def __call__(self, progress: BuildProgress) -> None:
        if self.killed is None and progress.docs >= self.after:
            workers = [p for p in psutil.process_iter(["pid", "cmdline"])
                       if any(f"MapBatches({self.actor_class})" in part for part in p.info["cmdline"] or ())]
            assert workers, f"no {self.actor_class} process found"
            self.killed, self.docs_at_kill = workers[0].pid, progress.docs
            os.kill(self.killed, signal.SIGKILL)


def test_killed_gradient_worker_costs_no_row(ray_session, tmp_path, spec):
    kill = KillOneWorker("GradientWorker", after=64)
    run = str(tmp_path / "run")
    progress = build(run, spec, workers=2, docs_per_write=8, on_progress=kill)
    assert kill.killed is not None and kill.docs_at_kill < DOCS  # the kill landed before the end
    chunks = [rows for _, rows in collect_in_process(spec)]
    ids, vectors = open_index(run).read_matrix()
    np.testing.assert_array_equal(ids, np.arange(DOCS))  # every id exactly once
    assert_rows_close(vectors, np.concatenate([rows.grads for rows in chunks]))
    assert Completion.load(run, "gradients").rows == DOCS and progress.written >= DOCS


def test_killed_scoring_worker_costs_no_score(ray_session, tmp_path, spec, offline_fixture):
    queries = RunSpec(spec.model, DataSpec(str(offline_fixture.queries), split="train[:4]", prompt_column="prompt",
                                           completion_column="completion"), spec.grads)
    reduce(str(tmp_path / "query"), queries, aggregation="none")
    settings = ScoreSettings(top_k=5)
    score(str(tmp_path / "clean"), str(tmp_path / "query"), settings, spec=spec, workers=1, docs_per_write=64)
    kill = KillOneWorker("ScoringWorker", after=64)
    score(str(tmp_path / "killed"), str(tmp_path / "query"), settings, spec=spec, workers=2, docs_per_write=8,
          on_progress=kill)
    assert kill.killed is not None and kill.docs_at_kill < DOCS
    (ids, scores), (clean_ids, clean) = read_scores(str(tmp_path / "killed")), read_scores(str(tmp_path / "clean"))
    np.testing.assert_array_equal(ids, np.arange(DOCS))
    np.testing.assert_array_equal(ids, clean_ids)
    assert np.abs(scores - clean).max() <= 1e-5 * np.abs(clean).max()
