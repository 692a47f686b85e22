"""Statistics equal dense brute-force computations, in process and through Ray with 1-3 workers."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from rayattr.config import DataSpec, GradSpec, ModelSpec, RunSpec
from rayattr.data import TokenizedDocs
from rayattr.grads.engine import GradientEngine
from rayattr.grads.normalizer import Normalizer
from rayattr.hessian.factors import load_stats
from rayattr.hessian.stats import RowAccumulator, TokenAccumulator, merge
from rayattr.ray.entry import fit

SPLIT = "train[:48]"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a.double() - b.double()) / torch.linalg.norm(b.double()))


@pytest.fixture(scope="module")
def docs(offline_fixture, fixture_tokenizer) -> TokenizedDocs:
    texts = pq.read_table(offline_fixture.train, columns=["text"]).column("text").to_pylist()[:48]
    tokens = [np.array(t) for t in fixture_tokenizer(texts)["input_ids"]]
    return TokenizedDocs(np.arange(len(texts)), tokens, np.ones(len(texts), np.int64))


@pytest.fixture(scope="module")
def brute(offline_fixture, docs):
    """Per document at batch size 1, through ``retain_grad`` (not the collector's hooks):
    per-token activations ``a`` and output gradients ``g`` of every Linear, in float64."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(offline_fixture.neox, dtype=torch.float64).eval()
    model.requires_grad_(False)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    per_doc = []
    for tokens in docs.tokens:
        captured = {}

        def keep(name, module, inputs, output):
            output.retain_grad()
            captured[name] = (inputs[0], output)

        handles = [m.register_forward_hook(lambda mod, i, o, n=n: keep(n, mod, i, o)) for n, m in linears.items()]
        embeds = model.get_input_embeddings()(torch.tensor(tokens)[None]).requires_grad_(True)
        logits = model(inputs_embeds=embeds).logits[0, :-1]
        torch.nn.functional.cross_entropy(logits, torch.tensor(tokens[1:]), reduction="sum").backward()
        per_doc.append({n: (a[0].detach(), out.grad[0]) for n, (a, out) in captured.items()})
        for h in handles:
            h.remove()
    return per_doc


def _engine(offline_fixture, fixture_tokenizer, **grads) -> GradientEngine:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(offline_fixture.neox).eval()
    return GradientEngine(model, GradSpec(**grads), fixture_tokenizer.pad_token_id)


def test_second_moment_equals_brute_force(offline_fixture, fixture_tokenizer, docs, brute):
    engine = _engine(offline_fixture, fixture_tokenizer, projection_dim=4, token_batch_size=256)
    accumulator = RowAccumulator("second-moment", engine.layouts)
    for half in (slice(0, 20), slice(20, 48)):  # two updates, as a worker sees batches
        part = TokenizedDocs(docs.ids[half], docs.tokens[half], docs.label_start[half])
        rows = engine.rows(part)
        accumulator.update(torch.from_numpy(rows.grads), int(rows.num_tokens.sum()))
    for layout in engine.layouts:
        left, right = (m.double() for m in engine.collector.projections[layout.name])
        p = torch.stack([(left @ (g.T @ a) @ right.T).flatten() for a, g in (d[layout.name] for d in brute)])
        sums = accumulator.sums[layout.name]
        assert int(sums["count"]) == len(docs)
        assert int(sums["tokens"]) == sum(len(t) for t in docs.tokens)  # counted as the K-FAC tap counts them
        assert _rel(sums["xx"], p.T @ p) <= 1e-4  # float32 collection vs float64 reference
    engine.close()


def test_kfac_factors_equal_brute_force(offline_fixture, fixture_tokenizer, docs, brute):
    engine = _engine(offline_fixture, fixture_tokenizer, projection_dim=0, token_batch_size=256)
    accumulator = TokenAccumulator(engine.layouts)
    engine.collector.tap = accumulator
    engine.rows(docs)
    for layout in engine.layouts:
        a = torch.cat([d[layout.name][0] for d in brute])
        g = torch.cat([d[layout.name][1] for d in brute])
        sums = accumulator.sums[layout.name]
        assert int(sums["tokens"]) == sum(len(t) for t in docs.tokens)
        assert _rel(sums["A"], a.T @ a) <= 1e-4
        assert _rel(sums["S"], g.T @ g) <= 1e-4
    engine.close()


def test_ekfac_and_normalizer_sums_equal_brute_force(offline_fixture, fixture_tokenizer, docs, brute):
    engine = _engine(offline_fixture, fixture_tokenizer, projection_dim=0, token_batch_size=256)
    rows = torch.from_numpy(engine.rows(docs).grads)
    generator = torch.Generator().manual_seed(0)
    bases = {l.name: {"q_out": torch.linalg.qr(torch.randn(l.out_features, l.out_features, generator=generator, dtype=torch.float64))[0],
                      "q_in": torch.linalg.qr(torch.randn(l.in_features, l.in_features, generator=generator, dtype=torch.float64))[0]}
             for l in engine.layouts}
    ekfac = RowAccumulator("ekfac", engine.layouts, bases)
    squares = RowAccumulator("normalizer", engine.layouts)
    ekfac.update(rows, 0)
    squares.update(rows, 0)
    for layout in engine.layouts:
        full = torch.stack([g.T @ a for a, g in (d[layout.name] for d in brute)])  # [N, O, I]
        q_out, q_in = bases[layout.name]["q_out"], bases[layout.name]["q_in"]
        assert _rel(ekfac.sums[layout.name]["lambda_sum"], ((q_out.T @ full @ q_in) ** 2).sum(0)) <= 1e-4
        assert _rel(squares.sums[layout.name]["sq"], (full**2).sum(0)) <= 1e-4
    engine.close()


def test_merge_of_partial_sums_equals_one_pass(offline_fixture, fixture_tokenizer, docs):
    engine = _engine(offline_fixture, fixture_tokenizer, projection_dim=4)
    rows = torch.from_numpy(engine.rows(docs).grads)
    whole, left, right, empty = (RowAccumulator("second-moment", engine.layouts) for _ in range(4))
    whole.update(rows, 170)
    left.update(rows[:17], 100)
    right.update(rows[17:], 70)
    merged = merge(merge(left.sums, empty.sums), right.sums)  # a worker that saw nothing counts as zero
    for name, sums in whole.sums.items():
        assert _rel(merged[name]["xx"], sums["xx"]) <= 1e-12
        assert float(merged[name]["count"]) == len(docs) and float(merged[name]["tokens"]) == 170
    engine.close()


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


def test_projected_kfac_factors_are_projections_of_full_ones(offline_fixture, fixture_tokenizer, docs):
    full_engine = _engine(offline_fixture, fixture_tokenizer, projection_dim=0)
    full = TokenAccumulator(full_engine.layouts)
    full_engine.collector.tap = full
    full_engine.rows(docs)
    projected_engine = _engine(offline_fixture, fixture_tokenizer, projection_dim=4)
    projected = TokenAccumulator(projected_engine.layouts)
    projected_engine.collector.tap = projected
    projected_engine.rows(docs)
    for layout in projected_engine.layouts:
        left, right = (m.double() for m in projected_engine.collector.projections[layout.name])
        sums, reference = projected.sums[layout.name], full.sums[layout.name]
        assert sums["A"].shape == (4, 4)
        assert _rel(sums["A"], right @ reference["A"] @ right.T) <= 1e-5
        assert _rel(sums["S"], left @ reference["S"] @ left.T) <= 1e-5
    full_engine.close()
    projected_engine.close()
