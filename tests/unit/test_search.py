"""Searching an index written in process: query gradients equal stored rows, tracing a loss, and
user errors (exact search with statistics is in ``tests/ray``, ANN and the CLI in ``tests/e2e``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import search_run, search_spec, search_stored  # noqa: F401 - the fixtures run, spec and stored

from rayattr.config import DataSpec, RayattrError
from rayattr.data import read_rows, row_texts
from rayattr.search import Attributor, Index, build_ann_index, query_gradients

TOL = 1e-5


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
