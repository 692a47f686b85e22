"""Statistics equal dense brute-force computations in process (through Ray with 1-3 workers:
``tests/ray/test_stats_ray.py``)."""

from __future__ import annotations

import pytest
import torch
from helpers import fixture_engine as _engine
from helpers import rel_norm as _rel
from helpers import stats_docs  # noqa: F401 - the fixture docs

from rayattr.data import TokenizedDocs
from rayattr.hessian.stats import RowAccumulator, TokenAccumulator, merge


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
