"""The Ray build equals the in-process engine, resumes, and never duplicates rows."""

from __future__ import annotations

import dataclasses

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pyarrow as pa
import pytest
import ray

from rayattr.api import build_index, collect_in_process, open_index
from rayattr.config import DataSpec, GradSpec, ModelSpec, RunSpec
from rayattr.fixtures.adapter import train_fixture_adapter
from rayattr.data import TokenizedDocs, plan_shards, read_shard, tokenize
from rayattr.tokenizer import load_tokenizer
from rayattr.ray.entry import fit
from rayattr.ray.pipeline import APPEND_TOKENS, Appends, GradientWorker
from rayattr.ray.progress import _count_peaks
from rayattr.ray.replicas import release_replicas
from rayattr.store import GradientTable


def _spec(fixture, split: str = "train", **grads) -> RunSpec:
    return RunSpec(ModelSpec(str(fixture.neox)), DataSpec(str(fixture.train), split=split), GradSpec(**grads))


def _reference(spec: RunSpec) -> tuple[np.ndarray, np.ndarray]:
    chunks = [rows for _, rows in collect_in_process(spec)]
    ids = np.concatenate([c.ids for c in chunks])
    grads = np.concatenate([c.grads for c in chunks])
    order = np.argsort(ids)
    return ids[order], grads[order]


def _assert_same_rows(run_path: str, reference: tuple[np.ndarray, np.ndarray]) -> None:
    ids, vectors = open_index(run_path).read_matrix()
    ref_ids, ref_vectors = reference
    np.testing.assert_array_equal(ids, ref_ids)
    scale = np.abs(ref_vectors).max()
    assert np.abs(vectors - ref_vectors).max() <= 1e-5 * scale


CORPUS_SPLIT = "train[:600]"  # a quarter of the fixture: many blocks and batches, a fraction of the time


@pytest.fixture(scope="module")
def full_spec(offline_fixture) -> RunSpec:
    return _spec(offline_fixture, split=CORPUS_SPLIT, projection_dim=8)


@pytest.fixture(scope="module")
def full_reference(full_spec) -> tuple[np.ndarray, np.ndarray]:
    return _reference(full_spec)


@pytest.mark.parametrize("workers", [1, 2])
def test_ray_build_equals_in_process(ray_session, tmp_path, full_spec, full_reference, workers):
    run = str(tmp_path / "run")
    progress = build_index(run, full_spec, workers=workers, docs_per_write=128)
    assert progress.written == len(full_reference[0]) == progress.docs - progress.skipped
    assert progress.first_row_seconds is not None and 0 < progress.first_row_seconds <= progress.seconds
    assert 1 <= len(progress.worker_peak_rss_mb) <= workers and min(progress.worker_peak_rss_mb.values()) > 0
    _assert_same_rows(run, full_reference)
    # A second run on the same table finds nothing to do and adds no row.
    again = build_index(run, full_spec, workers=workers)
    assert again.docs == 0
    assert open_index(run).count() == len(full_reference[0])


def test_consecutive_passes_run_on_the_same_warm_replicas(ray_session, tmp_path, offline_fixture):
    """A second build and a fit of the same driver start no actor: the replica processes of the
    first pass serve them (each builds the new pass's worker), and their rows are still right."""
    spec = _spec(offline_fixture, split="train[:12]", projection_dim=4)
    first = build_index(str(tmp_path / "a"), spec)
    fit(str(tmp_path / "stats"), spec, "second-moment")
    other = _spec(offline_fixture, split="train[12:24]", projection_dim=4)
    second = build_index(str(tmp_path / "b"), other)
    assert set(first.worker_peak_rss_mb) == set(second.worker_peak_rss_mb) and len(first.worker_peak_rss_mb) == 1
    _assert_same_rows(str(tmp_path / "b"), _reference(other))


def test_worker_peaks_keep_each_workers_highest_report():
    peaks: dict[str, float] = {}
    _count_peaks(pa.table({"worker_id": ["a", "b", "a"], "peak_rss_mb": [1.0, 5.0, 3.0]}), peaks)
    _count_peaks(pa.table({"worker_id": ["a"], "peak_rss_mb": [2.0]}), peaks)
    assert peaks == {"a": 3.0, "b": 5.0}


def test_resume_from_partial_table_writes_each_id_once(ray_session, tmp_path, full_spec, full_reference):
    run = str(tmp_path / "run")
    # Commit a scattered subset of rows as a killed run would have, then resume.
    first_chunk_meta, first_rows = next(collect_in_process(full_spec, docs_per_step=300))
    table = GradientTable.create(run, first_chunk_meta)
    table.append(first_rows.to_arrow().take(np.arange(0, first_rows.ids.size, 3)))
    progress = build_index(run, full_spec, workers=1)
    assert progress.docs == progress.total_docs == len(full_reference[0]) - len(range(0, first_rows.ids.size, 3))
    _assert_same_rows(run, full_reference)


def test_killed_build_resumes_to_a_complete_table(ray_session, tmp_path, offline_fixture, full_spec, full_reference):
    run = str(tmp_path / "run")
    script = textwrap.dedent(f"""
        from rayattr.api import build_index
        from rayattr.config import DataSpec, GradSpec, ModelSpec, RunSpec
        spec = RunSpec(ModelSpec({str(offline_fixture.neox)!r}), DataSpec({str(offline_fixture.train)!r}, split={CORPUS_SPLIT!r}),
                       GradSpec(projection_dim=8, token_batch_size=32))  # slow enough to be caught halfway
        build_index({run!r}, spec, workers=1, docs_per_write=16)
    """)
    # The child joins this session's Ray (starting a second one costs seconds); its replica needs
    # the CPUs this session's warm replicas hold.
    release_replicas()
    env = os.environ | {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    child = subprocess.Popen([sys.executable, "-c", script], env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    total = len(full_reference[0])
    written = 0
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.2)
            try:
                written = open_index(run).count()
            except Exception:  # the table does not exist yet
                continue
            if written >= 64:
                break
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    assert 0 < written < total, f"the child wrote {written} of {total} rows before the kill"
    # The killed job's Ray actor may finish the append it was in; wait until its table stops changing.
    settled = open_index(run).count()
    for _ in range(20):
        time.sleep(0.5)
        now = open_index(run).count()
        if now == settled:
            break
        settled = now
    progress = build_index(run, full_spec, workers=1)
    assert 0 < progress.docs < total  # it resumed rather than starting over
    _assert_same_rows(run, full_reference)


@pytest.mark.parametrize("source", ["prompt-completion", "chat-reward-adapter-kl"])
def test_structured_build_matches_in_process(ray_session, tmp_path, offline_fixture, source):
    """Prompt/completion masks; and in one build, conversations weighted by advantages whose
    group means Ray tasks computed, through a PEFT adapter with the KL loss: the in-process
    rows (conversations of uneven lengths are batched differently by the Ray writes, which
    moves float32 sums in their last digits)."""
    if source == "prompt-completion":
        model, loss_fn = ModelSpec(str(offline_fixture.neox)), "ce"
        data = DataSpec(str(offline_fixture.queries), prompt_column="prompt", completion_column="completion")
    else:
        model, loss_fn = ModelSpec(str(train_fixture_adapter(offline_fixture))), "kl"
        data = DataSpec(str(offline_fixture.conversations), conversation_column="messages", reward_column="reward")
    dtype = "float16" if source == "prompt-completion" else "float32"
    spec = RunSpec(model, data, GradSpec(projection_dim=4, dtype=dtype, loss_fn=loss_fn))
    run = str(tmp_path / "run")
    build_index(run, spec, workers=1)
    ids, vectors = open_index(run).read_matrix()
    ref_ids, ref_vectors = _reference(spec)
    np.testing.assert_array_equal(ids, ref_ids)
    if dtype == "float16":
        np.testing.assert_array_equal(vectors, ref_vectors)
    else:
        np.testing.assert_allclose(vectors, ref_vectors, rtol=1e-4, atol=1e-5 * np.abs(ref_vectors).max())
    assert open_index(run).meta.data == dataclasses.asdict(data)


def test_appends_are_bounded_by_tokens_and_the_first_is_one_token_batch():
    """A worker's first append lands after one token batch; later ones gather up to APPEND_TOKENS."""
    appends = Appends(token_batch_size=512)
    lengths = np.full(600, 300)
    first = appends.slices(lengths)
    assert first[0] == slice(0, 1) and first[-1].stop == 600
    appends.appended = True
    later = appends.slices(lengths)
    assert [lengths[p].sum() <= APPEND_TOKENS for p in later] == [True] * len(later)
    assert len(later) == -(-600 * 300 // (APPEND_TOKENS // 300 * 300)) and later[-1].stop == 600
    assert appends.slices(np.array([APPEND_TOKENS * 2, 5])) == [slice(0, 1), slice(1, 2)]


def test_passes_count_what_a_write_runs(offline_fixture, tmp_path):
    """ZeRO-3 workers agree on each step's pass count before they step (every pass gathers
    parameters collectively), so ``passes`` must count what the appends in parts really run."""
    spec = RunSpec(ModelSpec(str(offline_fixture.neox)), DataSpec(str(offline_fixture.train), split="train[:40]"),
                   GradSpec(projection_dim=4, token_batch_size=256))
    tokenizer = load_tokenizer(spec.model.model)
    batch = pa.concat_tables([tokenize(table, spec.data, tokenizer, 10**6)
                              for shard in plan_shards(spec.data) for table in read_shard(spec.data, shard)])
    worker = GradientWorker(spec, str(tmp_path / "run"), threads=1)
    collect, ran = worker.engine.collector.collect, []
    worker.engine.collector.collect = lambda *args, **kwargs: ran.append(1) or collect(*args, **kwargs)
    whole_plan = worker.engine.passes(TokenizedDocs.from_arrow(batch))
    counted = []
    for _ in range(2):  # the first write (its first part is one token batch), then a later one
        counted.append(worker.passes(batch))
        before = len(ran)
        worker(batch)
        assert len(ran) - before == counted[-1]
    # The first write's parts pack differently from the whole batch: one more pass here.
    assert counted == [whole_plan + 1, whole_plan], (counted, whole_plan)
