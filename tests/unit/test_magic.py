"""The fine-tune recipe and its exact metagradients (MAGIC) on a tiny float64 GPT-NeoX.

The model uses SDPA attention, which the recipe runs through its math kernel: that kernel keeps
float64 throughout (GPT-NeoX's eager attention takes its softmax in float32, which would limit a
finite-difference check to ~1e-6) and has the double backward that metagradients need.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from rayattr.config import RayattrError, RayattrWarning
from rayattr.data import TokenizedDocs
from rayattr.lds.magic import metagradients
from rayattr.lds.recipe import (Recipe, batch_order, document_losses, init_state, query_losses, step_loss, train,
                                trainable_parameters, update)

SGD = Recipe("sgd", learning_rate=0.3, momentum=0.9, weight_decay=0.1, epochs=2, batch_size=4)
ADAM = Recipe("adam", learning_rate=0.05, weight_decay=0.1, epochs=2, batch_size=4)  # 6 documents: 4 steps


def tiny_model(attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float64) -> GPTNeoXForCausalLM:
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=16, max_position_embeddings=32, attn_implementation=attn_implementation)
    return GPTNeoXForCausalLM(config).to(dtype).eval()


def random_docs(count: int, first_id: int, seed: int) -> TokenizedDocs:
    rng = np.random.default_rng(seed)
    tokens = [rng.integers(0, 32, rng.integers(5, 10)) for _ in range(count)]
    return TokenizedDocs(np.arange(first_id, first_id + count), tokens, rng.integers(0, 4, count))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The model's ops are tiny: more threads only add overhead (8x on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> GPTNeoXForCausalLM:
    return tiny_model()


@pytest.fixture(scope="module")
def docs() -> TokenizedDocs:
    return random_docs(6, 0, seed=0)


@pytest.fixture(scope="module")
def queries() -> TokenizedDocs:
    return random_docs(2, 100, seed=1)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


def finite_differences(model, docs, queries, recipe: Recipe, step: float) -> torch.Tensor:
    """``[Q, N]`` central differences of the trained queries' losses in each document's weight (at 1)."""
    columns = []
    for i in range(len(docs)):
        losses = []
        for sign in (1, -1):
            weights = torch.ones(len(docs), dtype=torch.float64)
            weights[i] += sign * step
            losses.append(query_losses(model, train(model, docs, weights, recipe), queries))
        columns.append((losses[0] - losses[1]) / (2 * step))
    return torch.stack(columns, 1)


@pytest.mark.parametrize("recipe, step", [(SGD, 1e-4), (ADAM, 1e-5)], ids=["sgd", "adam"])
def test_metagradients_equal_finite_differences(model, docs, queries, recipe, step):
    """Exact through 4 steps (2 epochs, so each document has two contributions), with recomputation between
    checkpoints; independent of the checkpoint spacing and of how the queries are batched."""
    assert len(batch_order(len(docs), recipe)) == 4
    grads = metagradients(model, docs, queries, recipe, checkpoint_every=3)
    assert grads.shape == (2, 6) and grads.dtype == torch.float64
    fd = finite_differences(model, docs, queries, recipe, step)
    assert relative_error(grads, fd) <= 1e-4
    calls = []
    each_step = metagradients(model, docs, queries, recipe, checkpoint_every=1, query_batch=1,
                              on_step=lambda done, total: calls.append((done, total)))
    assert calls == [(done, 12) for done in range(1, 13)]  # 4 forward steps, then 4 backward per query
    assert (each_step - grads).abs().max() <= 1e-10
    assert (metagradients(model, docs, queries, recipe, checkpoint_every=100) - grads).abs().max() <= 1e-10


def test_metagradients_loop_over_queries_when_vmap_fails(model, docs, queries, monkeypatch):
    """The fallback for models whose backward vmap cannot batch gives the same metagradients."""
    expected = metagradients(model, docs, queries, SGD, checkpoint_every=3)

    def failing_vmap(*args, **kwargs):
        raise RuntimeError("no batching rule")

    monkeypatch.setattr(torch.func, "vmap", failing_vmap)
    with pytest.warns(RayattrWarning, match="looping over the queries"):
        looped = metagradients(model, docs, queries, SGD, checkpoint_every=3)
    assert (looped - expected).abs().max() <= 1e-12


def test_metagradients_with_eager_attention_and_float32(docs, queries):
    """Eager attention and float32 models work too, close to the float64 SDPA metagradients."""
    expected = metagradients(tiny_model(), docs, queries, SGD, checkpoint_every=3)
    assert relative_error(metagradients(tiny_model("eager"), docs, queries, SGD, checkpoint_every=3), expected) <= 1e-5
    single = metagradients(tiny_model(dtype=torch.float32), docs, queries, SGD, checkpoint_every=3)
    assert single.dtype == torch.float32
    assert relative_error(single.double(), expected) <= 1e-4


def test_train_is_deterministic_and_leaves_the_model_alone(model, docs):
    before = {k: p.clone() for k, p in model.named_parameters()}
    first = train(model, docs, None, ADAM)
    again = train(model, docs, torch.ones(len(docs)), ADAM)
    assert first.keys() == before.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert all(torch.equal(p, before[k]) for k, p in model.named_parameters())
    assert all(not torch.equal(first[k], before[k]) for k in first)  # every parameter trained


def test_a_weight_zero_document_changes_nothing(model, docs):
    """A subset retrain ignores its dropped documents' content entirely; a weight does matter."""
    weights = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    altered = dataclasses.replace(docs, tokens=list(docs.tokens))
    altered.tokens[2] = (docs.tokens[2] + 7) % 32
    for recipe in (SGD, ADAM):
        subset = train(model, docs, weights, recipe)
        assert all(torch.equal(subset[k], p) for k, p in train(model, altered, weights, recipe).items())
        full = train(model, docs, None, recipe)
        assert max(float((subset[k] - full[k]).abs().max()) for k in full) > 1e-4


def test_sgd_without_data_only_decays(model, docs):
    """All weights 0: the steps still run, and plain SGD's parameters only shrink by (1 - lr * wd) each step."""
    recipe = Recipe("sgd", learning_rate=0.5, weight_decay=0.2, epochs=2, batch_size=4)
    params = train(model, docs, torch.zeros(len(docs)), recipe)
    start = trainable_parameters(model)
    assert all(torch.allclose(params[k], start[k] * 0.9**4, rtol=1e-14, atol=0) for k in start)


def test_batch_order_covers_each_document_once_per_epoch():
    recipe = Recipe(epochs=3, batch_size=4, seed=5)
    order = batch_order(10, recipe)
    assert [len(batch) for batch in order] == [4, 4, 2] * 3
    epochs = [np.concatenate(order[3 * e : 3 * e + 3]) for e in range(3)]
    assert all(np.array_equal(np.sort(epoch), np.arange(10)) for epoch in epochs)
    assert not np.array_equal(epochs[0], epochs[1])  # a fresh permutation each epoch
    assert all(np.array_equal(a, b) for a, b in zip(order, batch_order(10, recipe)))
    other_seed = batch_order(10, dataclasses.replace(recipe, seed=6))
    assert not np.array_equal(np.concatenate(other_seed), np.concatenate(order))


def test_document_losses_are_each_documents_own(model, docs):
    """Batched (padded) losses equal each document's loss alone, computed from the model's logits directly."""
    params = trainable_parameters(model)
    batched = query_losses(model, params, docs)
    for i, tokens in enumerate(docs.tokens):
        ids = torch.from_numpy(tokens)
        with torch.no_grad():
            logits = model(input_ids=ids[None]).logits[0, :-1]
        start = max(int(docs.label_start[i]), 1) - 1
        alone = torch.nn.functional.cross_entropy(logits[start:], ids[1:][start:])
        assert abs(float(batched[i] - alone)) <= 1e-12 * float(alone)
    with torch.no_grad():
        assert torch.allclose(document_losses(model, params, docs.take(np.array([4, 1]))), batched[[4, 1]],
                              rtol=1e-12, atol=0)


def test_step_loss_is_linear_in_the_weights(model, docs):
    """Divided by the nominal batch size, not the weights' sum: a short or partly dropped batch is not rescaled."""
    params, batch = trainable_parameters(model), docs.take(np.array([0, 3]))
    with torch.no_grad():
        losses = document_losses(model, params, batch)
        both = step_loss(model, params, batch, torch.tensor([1.0, 1.0], dtype=torch.float64), SGD)
        first = step_loss(model, params, batch, torch.tensor([1.0, 0.0], dtype=torch.float64), SGD)
        doubled = step_loss(model, params, batch, torch.tensor([0.0, 2.0], dtype=torch.float64), SGD)
    assert abs(float(both - losses.sum() / 4)) <= 1e-15
    assert abs(float(first - losses[0] / 4)) <= 1e-15
    assert abs(float(doubled - losses[1] / 2)) <= 1e-15


def test_refuses_documents_the_recipe_cannot_weigh(model, docs):
    params = trainable_parameters(model)
    with pytest.raises(RayattrError, match="label masks and loss weights"):
        query_losses(model, params, dataclasses.replace(docs, loss_weights=np.ones(len(docs), np.float32)))
    no_labels = dataclasses.replace(docs, label_start=docs.label_start.copy())
    no_labels.label_start[3] = len(docs.tokens[3])
    with pytest.raises(RayattrError, match=r"documents \[3\] have no label token"):
        train(model, no_labels, None, SGD)
    with pytest.raises(RayattrError, match="training mode"):
        train(tiny_model().train(), docs, None, SGD)
    with pytest.raises(RayattrError, match="weights of shape"):
        train(model, docs, torch.ones(3), SGD)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_update_equals_torch_optimizers(optimizer):
    """The functional steps equal torch's SGD (heavy ball) and AdamW on the same gradients."""
    generator = torch.Generator().manual_seed(0)
    def random(*shape: int) -> torch.Tensor:
        return torch.randn(shape, dtype=torch.float64, generator=generator)

    start = {"a": random(3, 4), "b": random(5)}
    grads = [{k: random(*p.shape) for k, p in start.items()} for _ in range(3)]
    if optimizer == "sgd":
        recipe = Recipe("sgd", learning_rate=0.1, momentum=0.8)  # torch's SGD decay is not decoupled
        reference = lambda tensors: torch.optim.SGD(tensors, lr=0.1, momentum=0.8)  # noqa: E731
    else:
        recipe = Recipe("adam", learning_rate=0.1, weight_decay=0.3, beta1=0.8, beta2=0.9, eps=1e-6)
        reference = lambda tensors: torch.optim.AdamW(tensors, lr=0.1, betas=(0.8, 0.9), eps=1e-6,  # noqa: E731
                                                      weight_decay=0.3)
    tensors = [p.clone().requires_grad_() for p in start.values()]
    torch_optimizer = reference(tensors)
    params, state = start, init_state(start, recipe)
    for step_index, grad in enumerate(grads):
        params, state = update(params, state, grad, step_index, recipe)
        for tensor, g in zip(tensors, grad.values()):
            tensor.grad = g.clone()
        torch_optimizer.step()
    for tensor, name in zip(tensors, start):
        assert torch.allclose(params[name], tensor.detach(), rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("change, message", [
    ({"optimizer": "adamw"}, "unknown optimizer 'adamw'"),
    ({"learning_rate": 0.0}, "learning_rate 0.0 must be a positive number"),
    ({"weight_decay": -1.0}, "weight_decay -1.0 must be >= 0"),
    ({"momentum": 1.0}, r"momentum 1.0 must be in \[0, 1\)"),
    ({"beta2": -0.1}, r"beta2 -0.1 must be in \[0, 1\)"),
    ({"eps": 0.0}, "eps 0.0 must be > 0"),
    ({"epochs": 0}, "epochs 0 must be >= 1"),
    ({"batch_size": 0}, "batch_size 0 must be >= 1"),
])
def test_recipe_refuses_bad_settings(change, message):
    with pytest.raises(RayattrError, match=message):
        Recipe(**change)


def test_metagradients_refuse_bad_settings(model, docs, queries):
    with pytest.raises(RayattrError, match="checkpoint_every 0 and query_batch 8 must both be >= 1"):
        metagradients(model, docs, queries, SGD, checkpoint_every=0)
