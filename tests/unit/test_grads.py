"""Per-example gradients from GradientEngine against brute-force autograd references.

The reference for a document is one forward/backward of a fresh, trainable copy
of the model at batch size 1 with no padding, reading ``module.weight.grad``
(transposed for HF ``Conv1D``, whose weight is ``[in, out]`` while the engine
stores ``[out, in]``). The loss is the causal-LM cross-entropy summed over the
target tokens at positions ``>= label_start``.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from rayattr.config import GradSpec, RayattrError
from rayattr.data import TokenizedDocs
from rayattr.grads.engine import GradientEngine, GradientRows

TOL = 1e-5
BIG_BATCH = 8192  # token budget large enough for every document set below to fit one batch

NEOX_LAYERS = [
    f"gpt_neox.layers.{i}.{m}"
    for i in range(2)
    for m in ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
]
GPT2_LAYERS = [f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


# ----------------------------------------------------------------------------- helpers


def spec_for(kind: str, **overrides) -> GradSpec:
    """Full (unprojected) gradients of every module the reference can check.

    GPT-2 ties ``lm_head.weight`` to the input embedding ``wte.weight``: the
    brute-force ``.grad`` of that shared tensor sums the head's gradient and the
    embedding lookup's gradient, while the engine captures the head's use only.
    So ``lm_head`` is excluded for GPT-2 here (and checked separately against an
    untied reference in ``test_gpt2_tied_head_matches_untied_reference``).
    """
    kwargs = {"projection_dim": 0, "token_batch_size": BIG_BATCH}
    if kind == "gpt2":
        kwargs["exclude_modules"] = ("lm_head",)
    kwargs.update(overrides)
    return GradSpec(**kwargs)


def split_row(row: np.ndarray, layouts) -> dict[str, np.ndarray]:
    return {lay.name: row[lay.offset : lay.offset + lay.width].reshape(lay.p_out, lay.p_in) for lay in layouts}


def rel_err(actual: np.ndarray, reference: np.ndarray) -> float:
    reference = np.asarray(reference, dtype=np.float64)
    scale = np.abs(reference).max()
    assert scale > 0, "reference is all zeros: the comparison would be meaningless"
    return float(np.abs(np.asarray(actual, dtype=np.float64) - reference).max() / scale)


def assert_rows_close(actual: np.ndarray, reference: np.ndarray, layouts, what: str) -> None:
    got, want = split_row(actual, layouts), split_row(reference, layouts)
    errors = {name: rel_err(got[name], want[name]) for name in want}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOL, f"{what}: module {worst} rel err {errors[worst]:.3e} (all: {errors})"


def spy_batches(engine: GradientEngine) -> list[tuple[int, int]]:
    """Record the ``[B, T]`` shape of every batch the collector sees."""
    shapes: list[tuple[int, int]] = []
    original = engine.collector.collect

    def collect(batch):
        shapes.append(tuple(batch.input_ids.shape))
        return original(batch)

    engine.collector.collect = collect
    return shapes


def reference(
    model: torch.nn.Module, tokens: np.ndarray, label_start: int, names: list[str] | None = None,
    mean: bool = False, bias: bool = False,
):
    """Brute-force ``(summed loss, {module: grad [out, in]})`` of one document, batch size 1.

    ``names=None`` reads every Linear/Conv1D weight gradient. ``mean`` averages
    the loss over the target tokens; ``bias`` appends each biased module's
    ``bias.grad`` as a last column, ``[out, in + 1]``.
    """
    model.zero_grad(set_to_none=True)
    ids = torch.as_tensor(tokens, dtype=torch.long).unsqueeze(0)
    logits = model(input_ids=ids).logits[0]
    token_loss = F.cross_entropy(logits[:-1], ids[0, 1:], reduction="none")
    # token_loss[j] predicts the token at position j + 1; only positions >= label_start count.
    targets = token_loss[max(label_start, 1) - 1 :]
    loss = targets.mean() if mean else targets.sum()
    loss.backward()
    modules = dict(model.named_modules())
    if names is None:
        names = [n for n, m in modules.items() if isinstance(m, (torch.nn.Linear, Conv1D))]
    grads = {}
    for name in names:
        module = modules[name]
        grad = module.weight.grad
        grad = grad.T if isinstance(module, Conv1D) else grad
        if bias and module.bias is not None:
            grad = torch.cat([grad, module.bias.grad[:, None]], dim=1)
        grads[name] = grad.detach().numpy().copy()
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ref_models(load_fixture_model):
    return {kind: load_fixture_model(kind, trainable=True) for kind in ("neox", "gpt2")}


@pytest.fixture
def make_engine(load_fixture_model):
    """``make_engine(kind, spec, padding_side)``: an engine on a fresh frozen model, closed afterwards."""
    engines: list[GradientEngine] = []

    def make(kind: str, spec: GradSpec, padding_side: str = "right", model=None) -> GradientEngine:
        model = load_fixture_model(kind) if model is None else model
        engine = GradientEngine(model, spec, pad_token_id=model.config.pad_token_id, padding_side=padding_side)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


@pytest.fixture(scope="module")
def train_texts(offline_fixture) -> list[str]:
    return pq.read_table(offline_fixture.train, columns=["text"]).column("text").to_pylist()[:40]


@pytest.fixture(scope="module")
def queries(offline_fixture) -> list[dict]:
    return pq.read_table(offline_fixture.queries, columns=["prompt", "completion"]).to_pylist()[:20]


def _encode(tokenizer, text: str, special: bool = True) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


@pytest.fixture(scope="module")
def doc_sets(fixture_tokenizer, train_texts, queries) -> dict[str, TokenizedDocs]:
    tok = fixture_tokenizer
    # Plain documents (loss on every token from the second on), mixed lengths,
    # including 2- and 5-token ones; ids deliberately unsorted.
    plain = [_encode(tok, t) for t in train_texts[:6]]
    plain += [_encode(tok, train_texts[6])[:2], _encode(tok, train_texts[7])[:5]]
    text = TokenizedDocs(
        ids=np.array([41, 7, 19, 3, 88, 12, 5, 60], dtype=np.int64),
        tokens=[np.array(t, dtype=np.int64) for t in plain],
        label_start=np.ones(len(plain), dtype=np.int64),
    )
    # Prompt/completion documents (loss on the completion only), mixed with one plain document.
    seqs, starts = [], []
    for q in queries[:5]:
        prompt, completion = _encode(tok, q["prompt"]), _encode(tok, q["completion"], special=False)
        seqs.append(prompt + completion)
        starts.append(len(prompt))
    seqs.append(_encode(tok, train_texts[8]))
    starts.append(1)
    prompt_completion = TokenizedDocs(
        ids=np.array([9, 2, 14, 30, 1, 25], dtype=np.int64),
        tokens=[np.array(s, dtype=np.int64) for s in seqs],
        label_start=np.array(starts, dtype=np.int64),
    )
    assert len({len(t) for t in text.tokens}) >= 6
    assert all(s > 1 for s in prompt_completion.label_start[:5])
    assert len({len(t) for t in prompt_completion.tokens}) >= 3
    return {"text": text, "prompt_completion": prompt_completion}


_REFERENCE_CACHE: dict = {}


@pytest.fixture
def references(ref_models, doc_sets):
    """``references(kind, doc_set)`` -> per-doc ``[(loss, {module: grad})]``, computed once per key."""

    def get(kind: str, doc_set: str):
        key = (kind, doc_set)
        if key not in _REFERENCE_CACHE:
            docs = doc_sets[doc_set]
            _REFERENCE_CACHE[key] = [
                reference(ref_models[kind], docs.tokens[i], int(docs.label_start[i])) for i in range(len(docs))
            ]
        return _REFERENCE_CACHE[key]

    return get


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("doc_set", ["text", "prompt_completion"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("kind", ["neox", "gpt2"])
def test_per_example_grads_match_brute_force(kind, padding_side, doc_set, make_engine, doc_sets, references):
    docs = doc_sets[doc_set]
    engine = make_engine(kind, spec_for(kind), padding_side)
    names = [lay.name for lay in engine.layouts]
    expected_names = NEOX_LAYERS + ["lm_head"] if kind == "neox" else GPT2_LAYERS
    assert names == expected_names
    shapes = spy_batches(engine)

    rows = engine.rows(docs)

    # All documents went through ONE padded batch, so padding really was exercised.
    lengths = [len(t) for t in docs.tokens]
    assert shapes == [(len(docs), max(lengths))]
    assert rows.grads.dtype == np.float32
    assert rows.grads.shape == (len(docs), engine.dim)
    assert engine.dim == sum(o * i for o, i in (engine.collector.model.get_submodule(n).weight.shape for n in names))
    np.testing.assert_array_equal(rows.ids, docs.ids)  # input order, not length order
    np.testing.assert_array_equal(rows.num_tokens, lengths)
    assert rows.token_pos is None and len(rows.skipped) == 0

    refs = references(kind, doc_set)
    for i, (_, ref_grads) in enumerate(refs):
        got = split_row(rows.grads[i], engine.layouts)
        for name in names:
            want = ref_grads[name]
            assert got[name].shape == want.shape
            err = rel_err(got[name], want)
            assert err <= TOL, f"doc {docs.ids[i]} (len {lengths[i]}) module {name}: rel err {err:.3e}"


@pytest.mark.parametrize("doc_set", ["text", "prompt_completion"])
@pytest.mark.parametrize("kind", ["neox", "gpt2"])
def test_loss_column_is_summed_cross_entropy(kind, doc_set, make_engine, doc_sets, references):
    docs = doc_sets[doc_set]
    engine = make_engine(kind, spec_for(kind, modules=("*.0.*",)), "left")
    rows = engine.rows(docs)
    want = np.array([loss for loss, _ in references(kind, doc_set)])
    assert rows.loss.dtype == np.float32
    np.testing.assert_allclose(rows.loss, want, rtol=TOL, atol=0)
    # Summed, not averaged: the longest document's loss is far above a per-token mean.
    assert rows.loss.max() > 3 * np.log(engine.model.config.vocab_size)


@pytest.mark.parametrize("kind", ["neox", "gpt2"])
def test_bias_columns_and_mean_loss_match_brute_force(kind, make_engine, ref_models, doc_sets):
    """``include_bias`` and ``loss_reduction="mean"`` (kronfluence's bias, a per-document mean)
    against autograd's ``[W.grad | b.grad]`` of the mean loss."""
    docs = doc_sets["prompt_completion"]
    engine = make_engine(kind, spec_for(kind, include_bias=True, loss_reduction="mean"), "left")
    rows = engine.rows(docs)
    biased = [lay for lay in engine.layouts if engine.collector.model.get_submodule(lay.name).bias is not None]
    assert biased and all(lay.bias for lay in biased)
    for i in range(len(docs)):
        loss, want = reference(ref_models[kind], docs.tokens[i], int(docs.label_start[i]), mean=True, bias=True)
        assert rows.loss[i] == pytest.approx(loss, rel=TOL)
        got = split_row(rows.grads[i], engine.layouts)
        for lay in engine.layouts:
            assert got[lay.name].shape == want[lay.name].shape
            err = rel_err(got[lay.name], want[lay.name])
            assert err <= TOL, f"doc {docs.ids[i]} module {lay.name}: rel err {err:.3e}"


def test_gpt2_tied_head_matches_untied_reference(make_engine, load_fixture_model, doc_sets):
    """The engine's GPT-2 ``lm_head`` gradient is the head's use of the tied matrix only."""
    full = doc_sets["prompt_completion"]
    pick = [0, 2, 5]
    docs = TokenizedDocs(full.ids[pick], [full.tokens[i] for i in pick], full.label_start[pick])
    engine = make_engine("gpt2", GradSpec(projection_dim=0, modules=("lm_head",), token_batch_size=BIG_BATCH))
    rows = engine.rows(docs)
    tied = load_fixture_model("gpt2", trainable=True)
    untied = load_fixture_model("gpt2", trainable=True)
    assert tied.lm_head.weight is tied.transformer.wte.weight
    untied.lm_head.weight = torch.nn.Parameter(untied.lm_head.weight.detach().clone())
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    for i in range(len(docs)):
        got = split_row(rows.grads[i], engine.layouts)["lm_head"]
        _, head = reference(untied, docs.tokens[i], int(docs.label_start[i]), ["lm_head"])
        assert rel_err(got, head["lm_head"]) <= TOL
        # The tied .grad also holds the embedding lookup's gradient: that is why it cannot be the reference.
        _, shared = reference(tied, docs.tokens[i], int(docs.label_start[i]), ["lm_head"])
        assert rel_err(got, shared["lm_head"]) > 1e-2


# ----------------------------------------------------------------------------- batching


@pytest.mark.parametrize("kind", ["neox", "gpt2"])
def test_rows_invariant_to_batch_composition(kind, make_engine, load_fixture_model, fixture_tokenizer, train_texts):
    tok = fixture_tokenizer
    encoded = [np.array(_encode(tok, t), dtype=np.int64) for t in train_texts]
    by_len = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    target = by_len[len(by_len) // 2]  # a medium-length document, padded in mixed batches
    others = [i for i in by_len if i != target]
    longer = [i for i in others if len(encoded[i]) > len(encoded[target])]
    shorter = [i for i in others if len(encoded[i]) < len(encoded[target])]
    assert longer and shorter

    def docs_of(order: list[int]) -> TokenizedDocs:
        return TokenizedDocs(
            ids=np.array(order, dtype=np.int64),
            tokens=[encoded[i] for i in order],
            label_start=np.ones(len(order), dtype=np.int64),
        )

    configs = [
        ([target], BIG_BATCH, "right"),  # alone: no padding at all
        ([longer[-1], target, shorter[0]], BIG_BATCH, "right"),
        ([shorter[1], longer[0], shorter[2], target, longer[1]], BIG_BATCH, "left"),
        (shorter[3:5] + [target] + longer[2:4], 2 * len(encoded[target]) + 1, "left"),
    ]
    rows_of, widths = [], []
    model = load_fixture_model(kind)
    for order, budget, side in configs:
        engine = make_engine(kind, spec_for(kind, token_batch_size=budget), side, model=model)
        shapes = spy_batches(engine)
        rows = engine.rows(docs_of(order))
        (where,) = np.flatnonzero(rows.ids == target)
        rows_of.append(rows.grads[where])
        widths.append(shapes)
        engine.close()
    # The target document really shared padded batches with other documents.
    assert widths[0] == [(1, len(encoded[target]))]
    assert widths[1] == [(3, len(encoded[longer[-1]]))]
    assert len(widths[3]) > 1
    for k, row in enumerate(rows_of[1:], start=1):
        assert_rows_close(row, rows_of[0], engine.layouts, f"config {k}")


# ----------------------------------------------------------------------------- per-token


@pytest.mark.parametrize("kind", ["neox", "gpt2"])
def test_per_token_rows_sum_to_document_rows(kind, make_engine, load_fixture_model, doc_sets):
    full = doc_sets["prompt_completion"]
    pick = [0, 3, 5]  # two prompt/completion documents and one plain document
    docs = TokenizedDocs(full.ids[pick], [full.tokens[i] for i in pick], full.label_start[pick])
    lengths = np.array([len(t) for t in docs.tokens])
    # lm_head included for both models: per-token head rows are checked analytically below.
    spec = GradSpec(projection_dim=0, token_batch_size=BIG_BATCH)
    model = load_fixture_model(kind)
    doc_engine = make_engine(kind, spec, "left", model=model)
    doc_rows = doc_engine.rows(docs)
    doc_engine.close()
    tok_engine = make_engine(kind, GradSpec(projection_dim=0, token_batch_size=BIG_BATCH, per_token=True), "right")
    tok_rows = tok_engine.rows(docs)
    layouts = tok_engine.layouts
    assert [lay.name for lay in layouts][-1] == "lm_head"

    np.testing.assert_array_equal(tok_rows.ids, np.repeat(docs.ids, lengths - 1))
    np.testing.assert_array_equal(tok_rows.token_pos, np.concatenate([np.arange(n - 1) for n in lengths]))
    assert tok_rows.token_pos.dtype == np.int32
    np.testing.assert_array_equal(tok_rows.num_tokens, np.repeat(lengths, lengths - 1))
    np.testing.assert_allclose(tok_rows.loss, np.repeat(doc_rows.loss, lengths - 1), rtol=TOL)
    assert tok_rows.grads.shape == (int((lengths - 1).sum()), tok_engine.dim)

    bounds = np.concatenate([[0], np.cumsum(lengths - 1)])
    for d in range(len(docs)):
        summed = tok_rows.grads[bounds[d] : bounds[d + 1]].astype(np.float64).sum(0)
        assert_rows_close(summed, doc_rows.grads[d], layouts, f"doc {docs.ids[d]}")

    # Independent check of individual token rows for the output head: the row of
    # position t is (softmax(logits_t) - onehot(x_{t+1})) h_t^T when x_{t+1} is a
    # target, else zero (h_t is the head's input).
    ref = load_fixture_model(kind)
    captured = {}
    handle = ref.lm_head.register_forward_hook(lambda m, inp, out: captured.__setitem__("h", inp[0][0].detach()))
    try:
        for d in range(len(docs)):
            ids = torch.as_tensor(docs.tokens[d]).unsqueeze(0)
            with torch.no_grad():
                logits = ref(input_ids=ids).logits[0].double()
            g = torch.softmax(logits[:-1], -1) - F.one_hot(ids[0, 1:], logits.shape[-1]).double()
            is_target = torch.arange(1, len(docs.tokens[d])) >= docs.label_start[d]
            g = g * is_target.unsqueeze(1)
            want = torch.einsum("to,ti->toi", g, captured["h"][:-1].double()).numpy()
            got = np.stack([split_row(r, layouts)["lm_head"] for r in tok_rows.grads[bounds[d] : bounds[d + 1]]])
            assert rel_err(got, want) <= TOL
            # Prompt positions carry exactly zero head gradient.
            assert not got[~is_target.numpy()].any()
            assert got[is_target.numpy()].any(axis=(1, 2)).all()
    finally:
        handle.remove()


# ----------------------------------------------------------------------------- module selection


@pytest.mark.parametrize(
    ("kind", "include", "exclude", "expected"),
    [
        ("neox", ("*",), (), NEOX_LAYERS + ["lm_head"]),
        ("neox", ("*",), ("*lm_head", "*embed_out"), NEOX_LAYERS),
        ("neox", ("*.mlp.*",), (), [n for n in NEOX_LAYERS if ".mlp." in n]),
        (
            "neox",
            ("gpt_neox.layers.1.*",),
            ("*.dense",),
            [f"gpt_neox.layers.1.{m}" for m in ("attention.query_key_value", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")],
        ),
        ("gpt2", ("*.c_attn", "lm_head"), (), ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn", "lm_head"]),
        ("gpt2", ("transformer.*",), ("*.h.0.*", "*c_proj"), ["transformer.h.1.attn.c_attn", "transformer.h.1.mlp.c_fc"]),
    ],
)
def test_module_selection_globs(kind, include, exclude, expected, make_engine, doc_sets):
    engine = make_engine(kind, GradSpec(projection_dim=0, modules=include, exclude_modules=exclude))
    assert [lay.name for lay in engine.layouts] == expected
    offset = 0
    for lay in engine.layouts:
        out_features, in_features = lay.out_features, lay.in_features
        module = engine.model.get_submodule(lay.name)
        weight_shape = tuple(module.weight.shape)
        assert weight_shape == ((in_features, out_features) if isinstance(module, Conv1D) else (out_features, in_features))
        assert (lay.p_out, lay.p_in, lay.offset) == (out_features, in_features, offset)
        offset += out_features * in_features
    assert engine.dim == offset
    rows = engine.rows(doc_sets["text"])
    assert rows.grads.shape == (len(doc_sets["text"]), offset)
    assert np.isfinite(rows.grads).all()


@pytest.mark.parametrize(
    ("include", "exclude"),
    [(("*nonexistent*",), ()), (("*",), ("*",)), (("*.mlp.*",), ("*dense*",))],
)
def test_module_selection_matching_nothing_raises(include, exclude, load_fixture_model):
    model = load_fixture_model("neox")
    spec = GradSpec(projection_dim=0, modules=include, exclude_modules=exclude)
    with pytest.raises(RayattrError) as info:
        GradientEngine(model, spec, pad_token_id=0)
    message = str(info.value)
    assert "--modules" in message and "--exclude-modules" in message
    assert repr(include[0]) in message
    # Nothing was hooked: the model still runs without the collector's hooks.
    assert not any(m._forward_hooks for m in model.modules())


# ----------------------------------------------------------------------------- skipping


@pytest.mark.parametrize("per_token", [False, True])
def test_documents_without_targets_are_skipped(per_token, make_engine):
    docs = TokenizedDocs(
        ids=np.array([10, 11, 12, 13, 14], dtype=np.int64),
        tokens=[
            np.array([], dtype=np.int64),  # empty
            np.array([5], dtype=np.int64),  # one token: nothing to predict
            np.array([5, 6, 7], dtype=np.int64),
            np.array([1, 2, 3], dtype=np.int64),  # prompt covers the whole document
            np.array([8, 9], dtype=np.int64),  # shortest document with a target
        ],
        label_start=np.array([1, 1, 1, 3, 1], dtype=np.int64),
    )
    engine = make_engine("neox", GradSpec(projection_dim=4, per_token=per_token, token_batch_size=BIG_BATCH))
    rows = engine.rows(docs)
    assert sorted(rows.skipped.tolist()) == [10, 11, 13]
    expected_ids = [12, 12, 14] if per_token else [12, 14]
    np.testing.assert_array_equal(rows.ids, expected_ids)
    assert rows.grads.shape == (len(expected_ids), engine.dim)
    assert np.abs(rows.grads).max(axis=1).min() > 0
    assert rows.to_arrow().num_rows == len(expected_ids)

    # All documents skipped: an empty, well-typed result that still converts to Arrow.
    only_skipped = TokenizedDocs(docs.ids[[0, 1, 3]], [docs.tokens[i] for i in (0, 1, 3)], docs.label_start[[0, 1, 3]])
    empty = engine.rows(only_skipped)
    assert isinstance(empty, GradientRows)
    assert empty.grads.shape == (0, engine.dim)
    assert sorted(empty.skipped.tolist()) == [10, 11, 13]
    assert (empty.token_pos is not None) == per_token
    table = empty.to_arrow()
    assert table.num_rows == 0 and table.schema.field("grad").type.list_size == engine.dim
