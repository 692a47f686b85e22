"""PEFT adapters and the KL loss: rows equal one backward per document through the adapter.

Brute force: the PEFT model with its adapter weights trainable, one document
at a time, the stated loss (cross-entropy on the label tokens, or
``sum_t KL(p_adapted || p_base)`` with the base from ``disable_adapter``), and
the weight gradients of the chosen modules read from ``.grad``.
"""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from rayattr.api import collect_in_process
from rayattr.config import DataSpec, GradSpec, ModelSpec, RayattrError, RunSpec
from rayattr.fixtures.adapter import train_fixture_adapter
from rayattr.grads.collector import select_modules
from rayattr.model import load_model, tokenizer_source

DOCS = "train[:6]"


@pytest.fixture(scope="module")
def adapter(offline_fixture):
    return train_fixture_adapter(offline_fixture)


def _rows(offline_fixture, model: ModelSpec, **grads) -> dict[int, tuple[float, np.ndarray]]:
    spec = RunSpec(model, DataSpec(str(offline_fixture.train), split=DOCS), GradSpec(projection_dim=0, **grads))
    return {int(i): (float(loss), grad) for _, rows in collect_in_process(spec)
            for i, loss, grad in zip(rows.ids, rows.loss, rows.grads)}


def _texts(offline_fixture) -> list[str]:
    return pq.read_table(offline_fixture.train, columns=["text"]).column("text").to_pylist()[:6]


def _reference(model, tokens: list[int], names: list[str], kl: bool) -> tuple[float, np.ndarray]:
    modules = dict(model.named_modules())
    for name in names:
        modules[name].weight.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    ids = torch.tensor(tokens).unsqueeze(0)
    logits = model(input_ids=ids).logits[0, :-1]
    if kl:
        with torch.no_grad(), model.disable_adapter():
            reference = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
        log_p = torch.log_softmax(logits, -1)
        loss = (log_p.exp() * (log_p - reference)).sum()
    else:
        loss = F.cross_entropy(logits, ids[0, 1:], reduction="sum")
    loss.backward()
    return loss.item(), np.concatenate([modules[name].weight.grad.flatten().numpy() for name in names])


@pytest.mark.parametrize("loss_fn", ["ce", "kl"])
def test_adapter_rows_equal_one_backward_per_document(offline_fixture, fixture_tokenizer, adapter, loss_fn) -> None:
    model = load_model(ModelSpec(str(adapter)))
    lora = list(select_modules(model, ("*",), ()))
    assert len(lora) == 8 and all(".lora_A." in n or ".lora_B." in n for n in lora)  # 2 layers x 2 targets x A, B
    got = _rows(offline_fixture, ModelSpec(str(adapter)), loss_fn=loss_fn)
    for doc, text in enumerate(_texts(offline_fixture)):
        want_loss, want = _reference(model, fixture_tokenizer(text)["input_ids"], lora, kl=loss_fn == "kl")
        loss, grad = got[doc]
        assert loss == pytest.approx(want_loss, rel=1e-4, abs=1e-6)
        assert np.abs(want).max() > 0  # a trained adapter: B != 0, so lora_A has a gradient too
        np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_modules_choose_base_layers_of_an_adapter_model(offline_fixture, fixture_tokenizer, adapter) -> None:
    name = "base_model.model.gpt_neox.layers.1.mlp.dense_4h_to_h.base_layer"
    got = _rows(offline_fixture, ModelSpec(str(adapter)), modules=(f"*{name.split('model.model.')[1]}",))
    model = load_model(ModelSpec(str(adapter)))
    _, want = _reference(model, fixture_tokenizer(_texts(offline_fixture)[0])["input_ids"], [name], kl=False)
    np.testing.assert_allclose(got[0][1], want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_adapter_tokenizer_falls_back_to_the_base(offline_fixture, adapter, tmp_path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(adapter / name, bare / name)
    assert tokenizer_source(ModelSpec(str(adapter))) == str(adapter)
    assert tokenizer_source(ModelSpec(str(bare))) == str(offline_fixture.neox)
    assert tokenizer_source(ModelSpec(str(bare), base_model="elsewhere")) == "elsewhere"


def test_adapter_bad_inputs_are_one_line_errors(offline_fixture, adapter) -> None:
    with pytest.raises(RayattrError, match=r"does not fit base model .*gpt2.*pass the model it was trained on with --base-model"):
        load_model(ModelSpec(str(adapter), base_model=str(offline_fixture.gpt2)))
    with pytest.raises(RayattrError, match="--loss-fn kl compares the model with its PEFT adapters disabled"):
        _rows(offline_fixture, ModelSpec(str(offline_fixture.neox)), loss_fn="kl")
    with pytest.raises(RayattrError, match="--base-model is for PEFT adapters"):
        load_model(ModelSpec(str(offline_fixture.neox), base_model=str(offline_fixture.neox)))
    with pytest.raises(RayattrError, match="--loss-fn must be ce or kl"):
        GradSpec(loss_fn="mse")
