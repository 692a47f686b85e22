"""Assertions, helpers and fixtures that tests in more than one layer (unit, ray, e2e) share.

A fixture here is registered only in the test modules that import it (``from helpers import
search_run``); it keeps the name its tests request (``run``) and its scope, so each importing
module builds its own instance.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from rayattr.api import collect_in_process
from rayattr.cli import app
from rayattr.config import DataSpec, GradSpec, ModelSpec, RunSpec
from rayattr.data import TokenizedDocs
from rayattr.grads.engine import GradientEngine, GradientRows
from rayattr.ray.progress import BuildProgress
from rayattr.search import Index
from rayattr.space import TableMeta
from rayattr.store import GradientTable, ScoreTable

ROOT = Path(__file__).parents[1]  # the repository

# For the Rays the tests start. Ray keeps idle worker processes only while it runs fewer than one per
# CPU (two or one here) and counts the actors of a pass (replicas, Ray Data's and Ray Train's own) among
# them, so each later pass started its tasks and actors in fresh processes that imported torch and
# transformers again, seconds each. Up to 16 processes, passes reuse idle ones, as on a bigger machine.
RAY_TEST_ENV = {"RAY_num_workers_soft_limit": "16"}


def assert_rows_close(actual: np.ndarray, expected: np.ndarray, tol: float = 1e-5) -> None:
    """Gradient rows equal up to float32 summation order: error relative to each row's largest entry.

    Other batch compositions reorder float32 sums, which moves small entries of a
    row by ~1e-7 of the row's scale; an elementwise rtol would flag those.
    """
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = np.maximum(np.abs(expected).max(axis=1, keepdims=True), 1e-30)
    worst = float((np.abs(actual.astype(np.float64) - expected) / scale).max())
    assert worst <= tol, f"rows differ by {worst:.3g} of their scale (> {tol})"


def read_scores(run_path: str) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, scores[n, Q])`` of a run's score table, sorted by id."""
    table = ScoreTable.open(run_path).table.to_arrow().sort_by("id")
    return table.column("id").to_numpy(), np.stack(table.column("scores").to_numpy(zero_copy_only=False))


def engine_rows(model, spec: GradSpec, docs, padding_side: str = "right") -> tuple[GradientRows, GradientEngine, TableMeta]:
    """Rows of ``docs``, the (closed) engine that made them, and its table metadata."""
    engine = GradientEngine(model, spec, model.config.pad_token_id, padding_side=padding_side)
    try:
        return engine.rows(docs), engine, engine.table_meta({"name": "fixture"}, DataSpec("d"))
    finally:
        engine.close()


def build_rows(model, spec: GradSpec, tokens: list[list[int]], ids: np.ndarray, first_id: int = 0,
               normalizer=None) -> np.ndarray:
    """The rows `rayattr build`'s engine gives documents ``ids`` (in that order; ``tokens[id - first_id]``)."""
    engine = GradientEngine(model.eval(), spec, model.config.eos_token_id, normalizer=normalizer)
    docs = TokenizedDocs(ids, [np.array(tokens[i - first_id]) for i in ids], np.ones(len(ids), np.int64))
    try:
        return engine.rows(docs).grads
    finally:
        engine.close()


class KillOneWorker:
    """A progress callback that SIGKILLs one worker process (its command line names
    ``process``) once ``after`` documents are done."""

    def __init__(self, process: str, after: int) -> None:
        self.process, self.after = process, after
        self.killed: int | None = None
        self.docs_at_kill = 0

    def __call__(self, progress: BuildProgress) -> None:
        if self.killed is None and progress.docs >= self.after:
            # Only this test process's own Ray workers: other test processes may run Ray beside it.
            workers = [p for p in psutil.Process().children(recursive=True)
                       if any(self.process in part for part in _cmdline(p))]
            assert workers, f"no {self.process} process found"
            self.killed, self.docs_at_kill = workers[0].pid, progress.docs
            os.kill(self.killed, signal.SIGKILL)


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:  # exited meanwhile
        return []


def make_meta(dtype: str = "float32", dim: int = 12, per_token: bool = False, **overrides) -> TableMeta:
    fields = dict(
        model={"name": "tiny", "revision": "", "config": "c0ffee", "weights": "beef"},
        modules=[
            {"name": "a", "out_features": 2, "in_features": 3, "p_out": 2, "p_in": 3, "offset": 0, "width": 6},
            {"name": "b", "out_features": 3, "in_features": 2, "p_out": 3, "p_in": 2, "offset": 6, "width": 6},
        ],
        projection={"type": "rademacher", "dim": 0, "seed": 0, "fingerprint": GradSpec(projection_dim=0).projection_fingerprint()},
        dtype=dtype,
        dim=dim,
        per_token=per_token,
        data={"dataset": "train.parquet", "split": "train"},
    )
    fields.update(overrides)
    return TableMeta(**fields)


def one_line(output: str) -> str:
    """CLI output with its line wrapping undone."""
    return " ".join(output.split())


def cli_build(run: str, model: str, dataset: str, *extra: str):
    """``rayattr build`` at projection 4 through Typer's CliRunner."""
    return CliRunner().invoke(app, ["build", run, "--model", model, "--dataset", dataset, "--projection-dim", "4", *extra])


def rel_norm(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frobenius-norm error of ``a`` relative to ``b``, in float64."""
    return float(torch.linalg.norm(a.double() - b.double()) / torch.linalg.norm(b.double()))


def fixture_engine(offline_fixture, fixture_tokenizer, **grads) -> GradientEngine:
    """A gradient engine on a fresh copy of the fixture GPT-NeoX."""
    model = AutoModelForCausalLM.from_pretrained(offline_fixture.neox).eval()
    return GradientEngine(model, GradSpec(**grads), fixture_tokenizer.pad_token_id)


# ----------------------------------------------------------------------- fixtures (import them by name)


@pytest.fixture(params=["path", "uri"], name="root")
def storage_root(request, tmp_path) -> str:
    """An output root as a local path and as a ``file://`` URI."""
    return str(tmp_path) if request.param == "path" else f"file://{tmp_path}"


@pytest.fixture(scope="module", name="docs")
def stats_docs(offline_fixture, fixture_tokenizer) -> TokenizedDocs:
    """The first 48 training documents, tokenized."""
    texts = pq.read_table(offline_fixture.train, columns=["text"]).column("text").to_pylist()[:48]
    tokens = [np.array(t) for t in fixture_tokenizer(texts)["input_ids"]]
    return TokenizedDocs(np.arange(len(texts)), tokens, np.ones(len(texts), np.int64))


@pytest.fixture(scope="module", name="spec")
def search_spec(offline_fixture) -> RunSpec:
    return RunSpec(ModelSpec(str(offline_fixture.neox)), DataSpec(str(offline_fixture.train), split="train[:40]"),
                   GradSpec(projection_dim=4))


@pytest.fixture(scope="module", name="run")
def search_run(tmp_path_factory, spec) -> str:
    """A small gradient index written from the in-process engine (needs ``search_spec`` imported too)."""
    uri = str(tmp_path_factory.mktemp("search") / "run")
    for meta, rows in collect_in_process(spec):
        GradientTable.create(uri, meta).append(rows.to_arrow())
    return uri


@pytest.fixture(scope="module", name="stored")
def search_stored(run) -> tuple[np.ndarray, np.ndarray]:
    return Index.open(run).table.read_matrix()
