"""ZeRO mode (Ray Train + DeepSpeed ZeRO-3, two gloo workers on CPU) equals replica mode, and a group
that loses a worker restarts and skips what was committed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import KillOneWorker, read_scores

from rayattr.api import collect_in_process, open_index
from rayattr.config import DataSpec, GradSpec, ModelSpec, RayattrError, RunSpec
from rayattr.data import TokenizedDocs, plan_shards, read_shard, tokenize
from rayattr.grads.engine import engine_for
from rayattr.hessian.factors import load_stats
from rayattr.hessian.methods import StatsPass
from rayattr.hessian.stats import KFAC_PASS
from rayattr.model import max_positions, tokenizer_source
from rayattr.ray.checkpoint import PartialWriter, pass_directory
from rayattr.ray.entry import build, fit, score
from rayattr.ray.score import ScoreSettings, reduce
from rayattr.ray.zero import ZeroBuildProgress
from rayattr.tokenizer import load_tokenizer
from rayattr.topk import TopK

WORKERS = 2


@pytest.fixture(scope="module")
def three_shards(tmp_path_factory, offline_fixture) -> str:
    """The first 24 training documents in row groups of 8: three shards, so both workers get documents."""
    path = tmp_path_factory.mktemp("data") / "train.parquet"
    pq.write_table(pq.read_table(offline_fixture.train).slice(0, 24), path, row_group_size=8)
    return str(path.parent)


def _spec(offline_fixture, dataset: str, split: str = "train") -> RunSpec:
    return RunSpec(ModelSpec(str(offline_fixture.neox)), DataSpec(dataset, split=split),
                   GradSpec(projection_dim=4, token_batch_size=256))


def _one_shard(offline_fixture) -> RunSpec:
    """The first 24 training documents in one shard: one worker of a group gets every document, the other only idle passes."""
    return _spec(offline_fixture, str(offline_fixture.train), split="train[:24]")


@pytest.fixture(scope="module")
def on_replicas(ray_session, tmp_path_factory, offline_fixture) -> Path:
    """What the ZeRO runs are compared with, made on the session's warm replicas before the first
    ZeRO group stops them (starting them again costs seconds): ``kfac``, the statistics of the first
    24 documents, and ``query``, three queries' unit-normalized rows."""
    root, spec = tmp_path_factory.mktemp("replicas"), _one_shard(offline_fixture)
    fit(str(root / "kfac"), spec, "kfac", workers=1)
    queries = DataSpec(str(offline_fixture.queries), split="train[:3]", prompt_column="prompt", completion_column="completion")
    reduce(str(root / "query"), RunSpec(spec.model, queries, spec.grads), aggregation="none", unit_normalize=True)
    return root


def _checkpoint_of_an_interrupted_fit(out: Path, spec: RunSpec, documents: int) -> None:
    """What a K-FAC fit of ``spec`` killed after its first ``documents`` leaves in ``out``: their sums and ids in
    the pass's checkpoint directory, computed in this process and saved by the writer the fit's workers use."""
    engine, _ = engine_for(spec)
    try:
        tokenizer = load_tokenizer(tokenizer_source(spec.model), spec.model.revision)
        table = next(read_shard(spec.data, plan_shards(spec.data)[0], batch_rows=documents))
        docs = TokenizedDocs.from_arrow(tokenize(table, spec.data, tokenizer, max_positions(engine.model)))
        stats = StatsPass(engine, KFAC_PASS)
        stats(docs)
        writer = PartialWriter(pass_directory(str(out), spec, KFAC_PASS, None), every_seconds=0.0)
        writer.covered(docs.ids)
        writer.maybe_save(lambda: stats.close(), force=True)
    finally:
        engine.close()


def test_an_interrupted_zero_kfac_fit_resumes_from_its_checkpoint_and_equals_replica_kfac(tmp_path, offline_fixture,
                                                                                          on_replicas):
    """One shard: one worker of the group gets every document, the other only idle passes. The group skips the
    documents an interrupted fit's checkpoint covers, and the statistics (the checkpoint's sums and the workers'
    own checkpoints, reduced) equal the replicas'. (Killing a fit mid-pass: tests/ray/test_faults.py.)"""
    out, spec = tmp_path / "stats", _one_shard(offline_fixture)
    _checkpoint_of_an_interrupted_fit(out, spec, documents=10)
    resumed = fit(str(out), spec, "kfac", workers=WORKERS, zero_stage=3)
    assert resumed.resumed_examples == 10  # the checkpointed documents were skipped, not recomputed
    assert not (out / "_partial").exists()  # removed once the statistics are saved
    (got, manifest), (want, clean) = load_stats(out), load_stats(on_replicas / "kfac")
    assert manifest["fingerprint"] == clean["fingerprint"]
    assert manifest["tokens"] == clean["tokens"] == resumed.tokens > 0 and manifest["examples"] == clean["examples"]
    for name, tensors in want.items():
        for key in ("A", "S"):
            scale = tensors[key].abs().max()
            assert float((got[name][key] - tensors[key]).abs().max() / scale) <= 1e-6
        assert torch.allclose(got[name]["a_values"], tensors["a_values"], rtol=1e-5, atol=1e-8 * tensors["a_values"].max())


def test_zero_on_the_fly_scoring_survives_a_killed_worker_and_equals_brute_force(tmp_path, offline_fixture, three_shards,
                                                                                on_replicas):
    spec = _spec(offline_fixture, three_shards)
    query = str(on_replicas / "query")
    settings = ScoreSettings(unit_normalize=True, top_k=5)
    # Steps of 2+2 documents; the kill lands after the second step, in the middle of the 24.
    kill = KillOneWorker("RayTrainWorker", after=4)
    zero = score(str(tmp_path / "zero"), query, settings, spec=spec, workers=WORKERS, docs_per_write=2, zero_stage=3,
                 on_progress=kill)
    assert kill.killed is not None and kill.docs_at_kill < 24
    # Cosine of in-process rows (which replica builds equal) with the unit query rows.
    train = np.concatenate([rows.grads for _, rows in collect_in_process(spec)]).astype(np.float64)
    _, unit_queries = open_index(query).read_matrix()
    expected = (train / np.linalg.norm(train, axis=1, keepdims=True)) @ unit_queries.T
    zero_ids, zero_scores = read_scores(str(tmp_path / "zero"))
    np.testing.assert_array_equal(zero_ids, np.arange(24))  # every id exactly once
    assert np.abs(zero_scores - expected).max() <= 1e-5 * np.abs(expected).max()
    np.testing.assert_array_equal(zero.topk.ids, TopK.of_block(5, zero_ids, expected).ids)
    # The restarted group skipped what the lost attempt had committed: nothing was scored twice.
    assert zero.progress.duplicates_removed == 0


@pytest.fixture(scope="module")
def zero_run(ray_session, tmp_path_factory, offline_fixture, three_shards) -> tuple[RunSpec, str, ZeroBuildProgress]:
    spec = _spec(offline_fixture, three_shards)
    run = str(tmp_path_factory.mktemp("zero") / "run")
    return spec, run, build(run, spec, workers=WORKERS, docs_per_write=4, zero_stage=3)


def test_zero_build_writes_the_replica_rows(zero_run):
    spec, run, progress = zero_run
    chunks = list(collect_in_process(spec))
    ids = np.concatenate([rows.ids for _, rows in chunks])
    order = np.argsort(ids)
    reference = np.concatenate([rows.grads for _, rows in chunks])[order]
    table = open_index(run)
    got_ids, got = table.read_matrix()
    np.testing.assert_array_equal(got_ids, ids[order])
    assert np.abs(got - reference).max() <= 1e-5 * np.abs(reference).max()
    assert table.meta == chunks[0][0]  # same metadata (model digest included): tables are interchangeable
    assert progress.written == progress.total_docs == 24 and progress.duplicates_removed == 0


def test_each_worker_holds_only_its_partition_and_steps_in_lockstep(zero_run):
    reports = zero_run[2].workers
    assert [r.rank for r in reports] == list(range(WORKERS))
    for report in reports:
        assert 0 < report.partition_numel < report.model_numel
    assert sum(r.partition_numel for r in reports) >= reports[0].model_numel  # together they hold it all
    assert len({r.passes + r.idle_passes for r in reports}) == 1  # the same number of collectives
    assert all(r.passes > 0 for r in reports)  # both had documents


def test_zero_stage_other_than_3_is_refused_before_any_work(tmp_path, offline_fixture):
    spec = _spec(offline_fixture, str(offline_fixture.train))
    with pytest.raises(RayattrError, match="--zero-stage 2 is not supported"):
        build(str(tmp_path / "run"), spec, workers=2, zero_stage=2)
    assert not (tmp_path / "run").exists()
    with pytest.raises(RayattrError, match="--index-path"):
        score(str(tmp_path / "run"), str(tmp_path / "query"), ScoreSettings(), index_path=str(tmp_path / "index"),
              zero_stage=3)
