"""Searching an index: exact top-k equals brute force, ANN recall, query gradients, tracing, CLI."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from rayattr.api import collect_in_process
from rayattr.cli import app
from rayattr.config import DataSpec, GradSpec, ModelSpec, RayattrError, RunSpec
from rayattr.data import read_rows, row_texts
from rayattr.hessian.precondition import Preconditioner
from rayattr.ray.entry import fit
from rayattr.search import Attributor, Index, build_ann_index, query_gradients
from rayattr.space import TableMeta
from rayattr.store import GradientTable

runner = CliRunner()
TOL = 1e-5


@pytest.fixture(scope="module")
def spec(offline_fixture) -> RunSpec:
    return RunSpec(ModelSpec(str(offline_fixture.neox)), DataSpec(str(offline_fixture.train), split="train[:40]"),
                   GradSpec(projection_dim=4))


@pytest.fixture(scope="module")
def run(tmp_path_factory, spec) -> str:
    """A small gradient index written from the in-process engine."""
    uri = str(tmp_path_factory.mktemp("search") / "run")
    for meta, rows in collect_in_process(spec):
        GradientTable.create(uri, meta).append(rows.to_arrow())
    return uri


@pytest.fixture(scope="module")
def stored(run) -> tuple[np.ndarray, np.ndarray]:
    return Index.open(run).table.read_matrix()


@pytest.fixture(scope="module")
def stats(ray_session, tmp_path_factory, spec) -> str:
    out = str(tmp_path_factory.mktemp("stats") / "stats")
    fit(out, spec, "second-moment", workers=1)
    return out


def _brute_force(vectors: np.ndarray, queries: np.ndarray, unit_normalize: bool, hessian: str | None) -> np.ndarray:
    """Reference ``[Q, N]`` scores in float64: H^-1 on the query, or H^-1/2 on both sides before unit norms."""
    x, q = torch.from_numpy(vectors).double(), torch.from_numpy(queries).double()
    if hessian:
        pre = Preconditioner.load(hessian, power=-0.5 if unit_normalize else -1.0)
        q, x = pre.apply(q), (pre.apply(x) if unit_normalize else x)
    if unit_normalize:
        q, x = F.normalize(q, dim=1), F.normalize(x, dim=1)
    return (q @ x.T).numpy()


@pytest.mark.parametrize(("unit_normalize", "with_hessian"), [(False, False), (True, False), (False, True), (True, True)])
def test_exact_search_equals_brute_force(request, run, stored, unit_normalize, with_hessian):
    hessian = request.getfixturevalue("stats") if with_hessian else None
    ids, vectors = stored
    queries = np.random.default_rng(0).standard_normal((3, vectors.shape[1])).astype(np.float32)
    queries[0] = vectors[5]
    found = Index.open(run).search(queries, k=6, unit_normalize=unit_normalize, hessian=hessian, batch_size=7)
    reference = _brute_force(vectors, queries, unit_normalize, hessian)
    best = -np.sort(-reference, axis=1)[:, :6]
    tolerance = {"rtol": 1e-4, "atol": 1e-6 * np.abs(best).max()}
    # The k best scores, each the true score of the id returned (near-ties may swap ids of equal score).
    np.testing.assert_allclose(found.scores, best, **tolerance)
    np.testing.assert_allclose(np.take_along_axis(reference, np.searchsorted(ids, found.ids), 1), best, **tolerance)
    assert found.ids.dtype == np.int64 and found.scores.dtype == np.float32
    if unit_normalize and not with_hessian:
        assert found.ids[0, 0] == ids[5] and found.scores[0, 0] == pytest.approx(1.0, abs=1e-5)


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


def test_query_gradients_equal_stored_rows(run, stored):
    ids, vectors = stored
    index = Index.open(run)
    wanted = np.array([7, 2, 7, 30])
    data = DataSpec(**index.meta.data)
    rows = read_rows(data, wanted)
    np.testing.assert_array_equal(rows.column("id").to_numpy(), wanted)
    texts = row_texts(rows, data)
    got = query_gradients(index.meta, texts)
    expected = vectors[np.searchsorted(ids, wanted)]
    assert got.shape == expected.shape and got.dtype == np.float32
    assert np.abs(got - expected).max() <= TOL * np.abs(expected).max()


def _summed_loss(model, tokenizer, texts: list[str]) -> torch.Tensor:
    """Causal-LM loss summed over a right-padded batch of documents."""
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    token_loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["input_ids"][:, 1:], reduction="none")
    return (token_loss * batch["attention_mask"][:, 1:]).sum()


def test_attributor_traces_a_loss_and_restores_the_model(run, stored, load_fixture_model, fixture_tokenizer):
    ids, vectors = stored
    index = Index.open(run)
    data = DataSpec(**index.meta.data)
    texts = row_texts(read_rows(data, [3, 11]), data)
    model = load_fixture_model("neox", trainable=True)
    model.gpt_neox.embed_in.weight.requires_grad_(False)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    attributor = Attributor(index, k=3, unit_normalize=True)
    with attributor.trace(model) as traced:
        _summed_loss(model, fixture_tokenizer, texts[:1]).backward()
    expected = vectors[np.searchsorted(ids, 3)]
    assert np.abs(traced.gradient - expected).max() <= TOL * np.abs(expected).max()
    assert traced.ids[0] == 3 and traced.scores[0] == pytest.approx(1.0, abs=1e-5) and len(traced.ids) == 3
    # A padded batch of two documents: the gradient of the summed loss is the sum of their rows.
    with attributor.trace(model) as traced:
        _summed_loss(model, fixture_tokenizer, texts).backward()
    expected = vectors[np.searchsorted(ids, [3, 11])].sum(0)
    assert np.abs(traced.gradient - expected).max() <= TOL * np.abs(expected).max()
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(p.grad is None and torch.equal(p, weights[name]) for name, p in model.named_parameters())
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())


def test_user_errors_name_the_problem(run, stored, offline_fixture, load_fixture_model):
    index = Index.open(run)
    dim = index.meta.dim
    with pytest.raises(RayattrError, match=f"queries have {dim + 1} dimensions but index .* has {dim}"):
        index.search(np.zeros(dim + 1))
    with pytest.raises(RayattrError, match="ANN search cannot apply H\\^-1/2"):
        index.search(stored[1][:1], ann=True, unit_normalize=True, hessian="stats")
    with pytest.raises(RayattrError, match="needs at least 256"):
        build_ann_index(run)
    with pytest.raises(RayattrError, match="no loss token"):
        query_gradients(index.meta, ["Some text.", ""])
    with pytest.raises(RayattrError, match="differs from the index's model 'neox'"):
        query_gradients(index.meta, ["Some text."], model=str(offline_fixture.gpt2))
    with pytest.raises(RayattrError, match="differs from the index's model 'neox' \\(weights"):
        model = load_fixture_model("neox")
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(1.01)
        with Attributor(index).trace(model):
            pass


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
