"""Sampled labels (the true Fisher): the sampler's distribution, rows that do not depend on
batching, and rows equal to one backward per document at the sampled targets (no Ray)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from rayattr.config import DataSpec, GradSpec, RayattrError
from rayattr.data import TokenizedDocs, tokenize
from rayattr.grads.engine import GradientEngine
from rayattr.grads.objective import sample_labels
from rayattr.hessian.methods import stats_manifest

MODULE = "gpt_neox.layers.1.mlp.dense_4h_to_h"


@pytest.fixture(scope="module")
def docs(fixture_tokenizer) -> TokenizedDocs:
    texts = ["Alna was born in Talburgh.", "Sana Morodane graduated from Kirridge College in June.", "Hello there"]
    table = pa.table({"text": texts, "id": pa.array([11, 42, 7], pa.int64())})
    return TokenizedDocs.from_arrow(tokenize(table, DataSpec("d"), fixture_tokenizer, 64))


def test_sampled_labels_follow_the_model_distribution() -> None:
    logits = torch.tensor([[[0.0] * 5, [2.0, 1.0, 0.0, -1.0, 0.5]]]).repeat(4000, 1, 1)
    positions = torch.arange(2).repeat(4000, 1)
    drawn = sample_labels(logits, positions, torch.arange(4000), seed=0)[:, 1]
    probs = torch.softmax(logits[0, 0], -1).numpy()  # position 1's target is predicted by position 0
    freq = np.bincount(drawn.numpy(), minlength=5) / 4000
    assert np.all(np.abs(freq - probs) <= 5 * np.sqrt(probs * (1 - probs) / 4000))
    again = sample_labels(logits[:3], positions[:3], torch.tensor([2, 0, 1]), seed=0)[:, 1]
    assert again.tolist() == drawn[[2, 0, 1]].tolist()  # a document's draw is its own, whatever its batch
    assert not torch.equal(sample_labels(logits, positions, torch.arange(4000), seed=1)[:, 1], drawn)


def test_sampled_label_rows_do_not_depend_on_batching_and_equal_one_backward(load_fixture_model, docs) -> None:
    spec = GradSpec(projection_dim=0, modules=(MODULE,), labels="sampled")
    model = load_fixture_model("neox")
    rows = {}
    for name, budget, side in (("batched", 4096, "right"), ("alone", 2, "right"), ("left", 4096, "left")):
        engine = GradientEngine(model, GradSpec(**{**spec.__dict__, "token_batch_size": budget}),
                                model.config.pad_token_id, padding_side=side)
        rows[name] = engine.rows(docs).grads
        engine.close()
    np.testing.assert_allclose(rows["batched"], rows["alone"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(rows["left"], rows["alone"], rtol=1e-4, atol=1e-6)
    reference = load_fixture_model("neox", trainable=True)
    module = dict(reference.named_modules())[MODULE]
    for i, tokens in enumerate(docs.tokens):
        reference.zero_grad(set_to_none=True)
        ids = torch.as_tensor(tokens).unsqueeze(0)
        logits = reference(input_ids=ids).logits
        targets = sample_labels(logits, torch.arange(len(tokens)).unsqueeze(0), torch.tensor([docs.ids[i]]), seed=0)
        F.cross_entropy(logits[0, :-1], targets[0, 1:], reduction="sum").backward()
        want = module.weight.grad.flatten().numpy()
        np.testing.assert_allclose(rows["alone"][i], want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
        data_labels = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
        assert not torch.allclose(data_labels, F.cross_entropy(logits[0, :-1], targets[0, 1:], reduction="sum"))


def test_sampled_statistics_are_the_same_space_under_another_fingerprint(load_fixture_model) -> None:
    model = load_fixture_model("neox")
    engine = GradientEngine(model, GradSpec(modules=(MODULE,)), model.config.pad_token_id)
    meta = engine.table_meta({"name": "m"}, DataSpec("d"))
    engine.close()
    empirical = stats_manifest("kfac", meta, {"examples": 1, "tokens": 2})
    true = stats_manifest("kfac", meta, {"examples": 1, "tokens": 2}, labels="sampled")
    assert true["labels"] == "sampled" and "labels" not in empirical
    assert true["fingerprint"] != empirical["fingerprint"] and true["projection"] == empirical["projection"]
    with pytest.raises(RayattrError, match="--labels must be data or sampled"):
        GradSpec(labels="model")
    with pytest.raises(RayattrError, match="--labels sampled draws cross-entropy targets"):
        GradSpec(labels="sampled", loss_fn="kl")
