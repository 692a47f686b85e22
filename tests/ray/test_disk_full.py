"""A disk that fills up under a build's appends costs no row: the build fails with one line naming
the problem and the fix, leaves only whole committed rows, and a rerun resumes to a clean table.

The fault is a full disk as Lance meets it: the table's ``add`` raises ENOSPC before it commits.
The worker class is swapped in the driver (``pipeline.Job``) and shipped by value, so the replica
actors, which import rayattr themselves, run it.
"""

from __future__ import annotations

import errno
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray.cloudpickle
from helpers import assert_rows_close

from rayattr.api import collect_in_process, open_index
from rayattr.config import DataSpec, GradSpec, ModelSpec, RayattrError, RunSpec
from rayattr.ray import pipeline
from rayattr.ray.entry import build
from rayattr.ray.replicas import Job
from rayattr.store import Completion

DOCS = 24
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the replicas cannot import test modules


class DiskFillsUp(pipeline.GradientWorker):
    """A GradientWorker whose first append lands and whose later ones find the disk full."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        add, self.adds = self.table.table.add, 0

        def add_until_full(rows, *args, **options):
            self.adds += 1
            if self.adds > 1:
                raise OSError(errno.ENOSPC, "No space left on device")
            return add(rows, *args, **options)

        self.table.table.add = add_until_full


@pytest.fixture(scope="module")
def spec(offline_fixture, tmp_path_factory) -> RunSpec:
    train = tmp_path_factory.mktemp("disk") / "train.parquet"
    pq.write_table(pq.read_table(offline_fixture.train).slice(0, DOCS), train)
    # Token batches of 64 make several appends, so the disk fills up half-way.
    return RunSpec(ModelSpec(str(offline_fixture.neox)), DataSpec(str(train)), GradSpec(projection_dim=2, token_batch_size=64))


def test_a_full_disk_fails_the_build_in_one_line_and_a_rerun_resumes(ray_session, tmp_path, spec, monkeypatch):
    reference = np.concatenate([rows.grads for _, rows in collect_in_process(spec)])
    run = str(tmp_path / "run")
    monkeypatch.setattr(pipeline, "Job", lambda factory, kwargs: Job(DiskFillsUp, kwargs))
    with pytest.raises(RayattrError) as failed:
        build(run, spec, docs_per_write=8)
    assert str(failed.value) == (f"no space left on the device of {run} while appending to table 'gradients'; free space "
                                 "there, then rerun the same command: it resumes from the committed rows")
    ids, vectors = open_index(run).read_matrix()
    assert 0 < ids.size < DOCS and np.unique(ids).size == ids.size  # the first append's rows, each once
    assert_rows_close(vectors, reference[ids])  # whole rows only
    assert Completion.load(run, "gradients") is None  # partial
    monkeypatch.undo()  # space freed
    progress = build(run, spec, docs_per_write=8)
    assert progress.total_docs == DOCS - ids.size  # resumed: only the rows the full disk refused
    ids, vectors = open_index(run).read_matrix()
    np.testing.assert_array_equal(ids, np.arange(DOCS))  # every id exactly once
    assert_rows_close(vectors, reference)
    assert Completion.load(run, "gradients").rows == DOCS
