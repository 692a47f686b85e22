"""Statistics fitted through Ray with 1-3 workers equal the in-process ones."""

from __future__ import annotations

import pytest
import torch
from helpers import fixture_engine as _engine
from helpers import rel_norm as _rel
from helpers import stats_docs  # noqa: F401 - the fixture docs

from rayattr.config import DataSpec, GradSpec, ModelSpec, RunSpec
from rayattr.grads.normalizer import Normalizer
from rayattr.hessian.factors import load_stats
from rayattr.hessian.stats import RowAccumulator
from rayattr.ray.entry import fit

SPLIT = "train[:48]"


@pytest.fixture(scope="module")
def spec(offline_fixture):
    def make(projection_dim: int) -> RunSpec:
        return RunSpec(ModelSpec(str(offline_fixture.neox)), DataSpec(str(offline_fixture.train), split=SPLIT),
                       GradSpec(projection_dim=projection_dim, token_batch_size=512))
    return make


def _in_process_second_moment(spec: RunSpec, fixture_tokenizer, docs) -> dict[str, torch.Tensor]:
    from rayattr.grads.engine import engine_for

    engine, _ = engine_for(spec)
    accumulator = RowAccumulator("second-moment", engine.layouts)
    accumulator.update(torch.from_numpy(engine.rows(docs).grads), 0)
    engine.close()
    return {name: s["xx"] / s["count"] for name, s in accumulator.sums.items()}


# Largest pool first: smaller passes then reuse its first replicas instead of starting new ones.
@pytest.mark.parametrize("workers", [3, 2, 1])
def test_ray_second_moment_is_independent_of_workers(ray_session, tmp_path, spec, fixture_tokenizer, docs, workers):
    summary = fit(str(tmp_path / "stats"), spec(4), "second-moment", workers=workers)
    assert summary.examples == len(docs)
    tensors, manifest = load_stats(tmp_path / "stats")
    reference = _in_process_second_moment(spec(4), fixture_tokenizer, docs)
    assert manifest["method"] == "second-moment" and manifest["examples"] == len(docs)
    assert manifest["tokens"] == summary.tokens == sum(len(t) for t in docs.tokens)
    for name, t in tensors.items():
        assert _rel(t["second_moment"], reference[name]) <= 1e-6
        vectors, values = t["eigenvectors"], t["eigenvalues"]
        assert _rel(vectors @ torch.diag(values) @ vectors.T, t["second_moment"]) <= 1e-10


def test_ray_ekfac_is_independent_of_workers(ray_session, tmp_path, spec):
    results = {}
    for workers in (3, 1):  # largest pool first (see above)
        fit(str(tmp_path / f"stats{workers}"), spec(0), "ekfac", workers=workers)
        results[workers] = load_stats(tmp_path / f"stats{workers}")
    (one, manifest), (three, _) = results[1], results[3]
    assert manifest["tokens"] > manifest["examples"] == 48
    for name, t in one.items():
        assert _rel(t["q_in"] @ torch.diag(t["a_values"]) @ t["q_in"].T, t["A"]) <= 1e-10
        assert _rel(t["q_out"] @ torch.diag(t["s_values"]) @ t["q_out"].T, t["S"]) <= 1e-10
        assert t["lambda"].shape == (t["S"].shape[0], t["A"].shape[0]) and (t["lambda"] >= 0).all()
        for key in ("A", "S"):
            assert _rel(three[name][key], t[key]) <= 1e-6
        # Eigenvectors are defined up to sign (and rotation within repeated eigenvalues);
        # Lambda depends on the basis only through those, so compare its sum and sorted values.
        assert _rel(three[name]["lambda"].flatten().sort().values, t["lambda"].flatten().sort().values) <= 1e-5


def test_fitted_normalizer_is_mean_squared_gradient(ray_session, tmp_path, spec, offline_fixture, fixture_tokenizer, docs):
    fit(str(tmp_path / "norm"), spec(0), "normalizer", workers=2, normalizer_kind="adam")
    fitted = Normalizer.load(tmp_path / "norm")
    engine = _engine(offline_fixture, fixture_tokenizer, projection_dim=0)
    rows = torch.from_numpy(engine.rows(docs).grads).double()
    for layout in engine.layouts:
        full = rows[:, layout.offset : layout.offset + layout.width].view(-1, layout.out_features, layout.in_features)
        assert _rel(fitted.moments[layout.name]["v"], (full**2).mean(0)) <= 1e-5
    engine.close()
