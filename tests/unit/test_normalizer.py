"""Adam and Adafactor normalizers equal their explicit formulas on exact gradients."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from rayattr.config import GradSpec, RayattrError
from rayattr.data import TokenizedDocs
from rayattr.fixtures import TRAINED_DIRNAME, make_fixture, train_fixture_model
from rayattr.grads.engine import GradientEngine
from rayattr.grads.normalizer import ADAM_EPS, ADAFACTOR_EPS, Normalizer, from_optimizer_state
from rayattr.grads.projection import module_projection


@pytest.fixture(scope="module")
def trained(offline_fixture, tmp_path_factory):
    """A short fine-tune in a private copy of the fixture: a real AdamW state for a real model."""
    root = tmp_path_factory.mktemp("trained")
    shutil.copytree(offline_fixture.root, root / offline_fixture.root.name, ignore=shutil.ignore_patterns(TRAINED_DIRNAME))
    return train_fixture_model(make_fixture(root), steps=30)


@pytest.fixture(scope="module")
def docs(fixture_tokenizer) -> TokenizedDocs:
    texts = ["Mira Oskel was born in Dremsville.", "Zynia Labs employs Tor.", "A short one", "Trains leave twice a day."]
    tokens = [np.array(t) for t in fixture_tokenizer(texts)["input_ids"]]
    return TokenizedDocs(np.arange(len(texts)), tokens, np.ones(len(texts), np.int64))


def _full_grads(model, docs, pad_id, include_bias: bool = False) -> tuple[dict[str, torch.Tensor], GradientEngine]:
    engine = GradientEngine(model, GradSpec(projection_dim=0, include_bias=include_bias), pad_id)
    rows = torch.from_numpy(engine.rows(docs).grads)
    engine.close()
    return {l.name: rows[:, l.offset : l.offset + l.width].view(-1, l.out_features, l.in_features) for l in engine.layouts}, engine


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _assert_rows_match(engine: GradientEngine, rows: torch.Tensor, explicit: dict[str, torch.Tensor]) -> None:
    """Each module's rows equal its explicit normalized gradient, projected like the engine does."""
    for layout in engine.layouts:
        expected = explicit[layout.name]
        if engine.spec.projection_dim:  # the seeded factors (the engine's own have the normalizer folded in)
            left, right = module_projection(layout.name, layout.out_features, layout.in_features,
                                            (layout.p_out, layout.p_in), engine.spec.projection_type, engine.spec.seed)
            expected = left.double() @ expected @ right.double().T
        got = rows[:, layout.offset : layout.offset + layout.width].double()
        assert _rel(got, expected.flatten(1)) <= 1e-5, layout.name


def _random_adafactor(engine: GradientEngine, seed: int = 0) -> Normalizer:
    g = torch.Generator().manual_seed(seed)
    return Normalizer("adafactor", {
        l.name: {"row": torch.rand(l.out_features, generator=g) + 0.1, "col": torch.rand(l.in_features, generator=g) + 0.1}
        for l in engine.layouts
    })


@pytest.mark.parametrize("projection_dim", [0, 4])
def test_adafactor_factored_path_equals_explicit_formula(load_fixture_model, fixture_tokenizer, docs, projection_dim):
    model = load_fixture_model("neox")
    full, plain = _full_grads(model, docs, fixture_tokenizer.pad_token_id)
    normalizer = _random_adafactor(plain)
    engine = GradientEngine(model, GradSpec(projection_dim=projection_dim), fixture_tokenizer.pad_token_id, normalizer=normalizer)
    explicit = {}
    for layout in engine.layouts:
        m = normalizer.moments[layout.name]
        r, c = m["row"].double() + ADAFACTOR_EPS, m["col"].double() + ADAFACTOR_EPS
        explicit[layout.name] = full[layout.name].double() / torch.sqrt(torch.outer(r, c) / r.mean())
    _assert_rows_match(engine, torch.from_numpy(engine.rows(docs).grads), explicit)
    engine.close()


@pytest.mark.parametrize(("projection_dim", "include_bias"), [(0, False), (4, False), (4, True)])
def test_adam_from_saved_adamw_state_matches_direct_computation(trained, fixture_tokenizer, docs, projection_dim,
                                                                include_bias):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(trained).eval()
    normalizer = from_optimizer_state(trained / "optimizer.pt", model, kind="adam", include_bias=include_bias)
    # Direct: look the state entry up by the saved parameter order.
    state = torch.load(trained / "optimizer.pt", weights_only=True)
    names = json.loads((trained / "optimizer_param_names.json").read_text())
    order = [i for group in state["param_groups"] for i in group["params"]]
    saved = {name: state["state"][i]["exp_avg_sq"] for i, name in zip(order, names)}
    direct_v = {name[: -len(".weight")]: v for name, v in saved.items() if name.endswith(".weight")}
    if include_bias:  # [v_W | v_b], the layout of [G | g_b]
        direct_v = {m: torch.cat([v, saved[f"{m}.bias"][:, None]], 1) if v.dim() == 2 and f"{m}.bias" in saved else v
                    for m, v in direct_v.items()}
        assert any(v.shape[1] == getattr(model.get_submodule(m), "in_features", -2) + 1 for m, v in direct_v.items())
    full, _ = _full_grads(model, docs, fixture_tokenizer.pad_token_id, include_bias)
    spec = GradSpec(projection_dim=projection_dim, include_bias=include_bias)
    engine = GradientEngine(model, spec, fixture_tokenizer.pad_token_id, normalizer=normalizer)
    explicit = {}
    for layout in engine.layouts:
        v = direct_v[layout.name]
        torch.testing.assert_close(normalizer.moments[layout.name]["v"], v, rtol=0, atol=0)
        explicit[layout.name] = full[layout.name].double() / (v.double().sqrt() + ADAM_EPS)
    _assert_rows_match(engine, torch.from_numpy(engine.rows(docs).grads), explicit)
    engine.close()


def test_adam_state_reduces_to_adafactor_means(trained):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(trained)
    adam = from_optimizer_state(trained / "optimizer.pt", model, kind="adam")
    adafactor = from_optimizer_state(trained / "optimizer.pt", model, kind="adafactor")
    assert adafactor.kind == "adafactor" and adafactor.fingerprint != adam.fingerprint
    for name, m in adam.moments.items():
        torch.testing.assert_close(adafactor.moments[name]["row"], m["v"].mean(1))
        torch.testing.assert_close(adafactor.moments[name]["col"], m["v"].mean(0))


def test_optimizer_state_of_another_model_is_refused(trained, load_fixture_model):
    with pytest.raises(RayattrError, match="does not match the model"):
        from_optimizer_state(trained / "optimizer.pt", load_fixture_model("gpt2"))


def test_not_an_optimizer_state_is_refused(tmp_path, load_fixture_model):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "optimizer.pt")
    with pytest.raises(RayattrError, match="not a torch optimizer state_dict"):
        from_optimizer_state(tmp_path / "optimizer.pt", load_fixture_model("neox"))


def test_save_load_round_trip_and_corruption(tmp_path, load_fixture_model, fixture_tokenizer):
    engine = GradientEngine(load_fixture_model("neox"), GradSpec(projection_dim=0), fixture_tokenizer.pad_token_id)
    normalizer = _random_adafactor(engine, seed=3)
    normalizer.save(tmp_path / "norm")
    loaded = Normalizer.load(tmp_path / "norm")
    assert loaded.fingerprint == normalizer.fingerprint and loaded.kind == "adafactor"
    for name, m in normalizer.moments.items():
        torch.testing.assert_close(loaded.moments[name]["row"], m["row"], rtol=0, atol=0)
    manifest = json.loads((tmp_path / "norm" / "normalizer.json").read_text())
    manifest["fingerprint"] = "0" * 16
    (tmp_path / "norm" / "normalizer.json").write_text(json.dumps(manifest))
    with pytest.raises(RayattrError, match="does not match its manifest"):
        Normalizer.load(tmp_path / "norm")
    with pytest.raises(RayattrError, match="not a normalizer directory"):
        Normalizer.load(tmp_path / "elsewhere")


def test_normalizer_for_other_modules_is_refused(load_fixture_model, fixture_tokenizer):
    neox = GradientEngine(load_fixture_model("neox"), GradSpec(projection_dim=0), fixture_tokenizer.pad_token_id)
    normalizer = _random_adafactor(neox)
    neox.close()
    with pytest.raises(RayattrError, match="does not fit module"):
        GradientEngine(load_fixture_model("gpt2"), GradSpec(projection_dim=4), fixture_tokenizer.pad_token_id, normalizer=normalizer)


def test_table_meta_carries_the_normalizer_fingerprint(load_fixture_model, fixture_tokenizer):
    from rayattr.config import DataSpec
    from rayattr.store import require_compatible

    model = load_fixture_model("neox")
    plain = GradientEngine(model, GradSpec(projection_dim=4), fixture_tokenizer.pad_token_id)
    normalizer = _random_adafactor(plain)
    plain.close()
    normed = GradientEngine(model, GradSpec(projection_dim=4), fixture_tokenizer.pad_token_id, normalizer=normalizer)
    fingerprint = {"name": "m", "revision": "", "config": "c", "weights": "w"}
    meta_plain = plain.table_meta(fingerprint, DataSpec("d"))
    meta_normed = normed.table_meta(fingerprint, DataSpec("d"))
    assert meta_normed.normalizer == normalizer.fingerprint and meta_plain.normalizer is None
    with pytest.raises(RayattrError, match="normalizer"):
        require_compatible(meta_plain, meta_normed)
    normed.close()
