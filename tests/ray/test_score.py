"""Scores from reduce + score equal a brute-force computation from exact per-example gradients.

The reference takes one backward pass per document with weight gradients on,
applies the normalizer formula to the full ``G``, forms each module's second
moment and its damped inverse densely, and scores with numpy. rayattr's side
runs the real Ray pipeline: ``fit`` for the normalizer and the statistics,
``build`` for the index, ``reduce`` for the queries and ``score``.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from helpers import read_scores
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from rayattr.config import DataSpec, GradSpec, ModelSpec, RayattrError, RunSpec
from rayattr.data import plan_shards, read_shard, tokenize
from rayattr.grads.normalizer import ADAFACTOR_EPS, ADAM_EPS, Normalizer
from rayattr.ray.entry import build, fit, score
from rayattr.ray.score import ScoreSettings, reduce
import rayattr.ray.score as ray_score
from rayattr.store import SCORES, ScoreMeta, ScoreTable
from rayattr.topk import TopK

MODULES = ("*.attention.dense", "*.mlp.dense_4h_to_h")
INDEX_DOCS, QUERIES = 24, 6


@pytest.fixture(scope="module")
def micro_model(offline_fixture, tmp_path_factory) -> str:
    """A one-layer, 16-wide GPT-NeoX, so dense second moments at projection 0 stay small."""
    config = AutoConfig.from_pretrained(offline_fixture.neox)
    config.update({"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32})
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("micro")
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(offline_fixture.tokenizer).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def data(offline_fixture) -> tuple[DataSpec, DataSpec]:
    index = DataSpec(str(offline_fixture.train), split=f"train[:{INDEX_DOCS}]")
    queries = DataSpec(str(offline_fixture.queries), split=f"train[:{QUERIES}]", prompt_column="prompt",
                       completion_column="completion")
    return index, queries


def exact_gradients(model_dir: str, data: DataSpec) -> dict[str, np.ndarray]:
    """Per-document weight gradients of the summed label-token loss, one backward each, ``{module: [N, O*I]}``."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    modules = {name: m for name, m in model.named_modules() if name.endswith(("attention.dense", "mlp.dense_4h_to_h"))}
    out: dict[str, list[np.ndarray]] = {name: [] for name in modules}
    for shard in plan_shards(data):
        for table in read_shard(data, shard):
            docs = tokenize(table, data, tokenizer, 10**6)
            for ids, start in zip(docs.column("input_ids").to_pylist(), docs.column("label_start").to_pylist()):
                model.zero_grad()
                tokens = torch.tensor([ids])
                logits = model(tokens).logits[0, :-1]
                loss = torch.nn.functional.cross_entropy(logits, tokens[0, 1:], reduction="none")
                loss[torch.arange(1, len(ids)) >= max(start, 1)].sum().backward()
                for name, module in modules.items():
                    out[name].append(module.weight.grad.detach().clone().numpy())
    return {name: np.stack(grads) for name, grads in out.items()}


def normalize(grads: dict[str, np.ndarray], normalizer: Normalizer | None) -> np.ndarray:
    """The normalizer formula on full ``G``, modules concatenated in order."""
    parts = []
    for name, g in grads.items():
        if normalizer is not None and normalizer.kind == "adam":
            g = g / (np.sqrt(normalizer.moments[name]["v"].double().numpy()) + ADAM_EPS)
        elif normalizer is not None:
            row = normalizer.moments[name]["row"].double().numpy() + ADAFACTOR_EPS
            col = normalizer.moments[name]["col"].double().numpy() + ADAFACTOR_EPS
            g = g / np.sqrt(np.outer(row, col) / row.mean())
        parts.append(g.reshape(len(g), -1))
    return np.concatenate(parts, axis=1)


def dense_power(index: np.ndarray, widths: list[int], power: float, damping: float = 0.1) -> np.ndarray:
    """Block-diagonal ``(H + c mu I)^power`` of the per-module second moments of ``index``."""
    blocks, offset = [], 0
    for width in widths:
        x = index[:, offset : offset + width]
        values, vectors = np.linalg.eigh(x.T @ x / len(x))
        values = np.clip(values, 0, None)
        blocks.append((vectors * (values + damping * values.mean()) ** power) @ vectors.T)
        offset += width
    out = np.zeros((offset, offset))
    start = 0
    for block in blocks:
        out[start : start + len(block), start : start + len(block)] = block
        start += len(block)
    return out


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def rel_err(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(got - expected).max() / np.abs(expected).max())


@pytest.fixture(scope="module", params=[None, "adam", "adafactor"])
def micro_run(request, ray_session, tmp_path_factory, micro_model, data):
    """Per normalizer kind: normalizer, second-moment statistics, index and raw query table,
    and the brute-force normalized gradients ``x`` (index) and ``q`` (queries)."""
    kind, root = request.param, tmp_path_factory.mktemp(f"micro-{request.param}")
    index_data, query_data = data
    grads, normalizer = GradSpec(projection_dim=0, modules=MODULES), None
    if kind is not None:
        fit(str(root / "normalizer"), RunSpec(ModelSpec(micro_model), index_data, grads), "normalizer", normalizer_kind=kind)
        normalizer = Normalizer.load(root / "normalizer")
        grads = GradSpec(projection_dim=0, modules=MODULES, normalizer=str(root / "normalizer"))
    index_spec, query_spec = RunSpec(ModelSpec(micro_model), index_data, grads), RunSpec(ModelSpec(micro_model), query_data, grads)
    fit(str(root / "stats"), index_spec, "second-moment")
    build(str(root / "index"), index_spec)
    reduce(str(root / "q-raw"), query_spec, aggregation="none")
    index_exact = exact_gradients(micro_model, index_data)
    x = normalize(index_exact, normalizer)
    q = normalize(exact_gradients(micro_model, query_data), normalizer)
    return kind, root, query_spec, x, q, [g[0].size for g in index_exact.values()]


def scored(root, name: str, query: str, settings: ScoreSettings) -> np.ndarray:
    """Score the micro index against a query table; the scores ordered by id."""
    score(str(root / name), str(root / query), settings, index_path=str(root / "index"))
    ids, got = read_scores(str(root / name))
    np.testing.assert_array_equal(ids, np.arange(INDEX_DOCS))
    return got


def test_scores_equal_brute_force(micro_run):
    """Inner product and TrackStar's cosine with H^-1/2 on both sides, with each normalizer."""
    kind, root, _, x, q, widths = micro_run
    h_half = dense_power(x, widths, -0.5)
    stats = str(root / "stats")
    assert rel_err(scored(root, "inner", "q-raw", ScoreSettings()), x @ q.T) <= 1e-4
    cosine_h = scored(root, "cosine-h", "q-raw", ScoreSettings(unit_normalize=True, hessian=stats))
    assert rel_err(cosine_h, unit(x @ h_half) @ unit(q @ h_half).T) <= 1e-4


@pytest.mark.parametrize("micro_run", [None], indirect=True)  # aggregation does not depend on the normalizer
def test_aggregated_and_reduce_time_preconditioned_queries_equal_brute_force(micro_run):
    """mean/sum aggregation, H^-1 on the query only, and H^-1/2 applied at reduce time."""
    _, root, query_spec, x, q, widths = micro_run
    stats = str(root / "stats")
    h_inv, h_half = dense_power(x, widths, -1.0), dense_power(x, widths, -0.5)
    reduce(str(root / "q-mean"), query_spec, aggregation="mean")
    reduce(str(root / "q-sum-h"), query_spec, aggregation="sum", hessian=stats)
    reduce(str(root / "q-unit-h"), query_spec, aggregation="none", unit_normalize=True, hessian=stats)
    cosine_of_mean = scored(root, "cosine-mean", "q-mean", ScoreSettings(unit_normalize=True))
    assert rel_err(cosine_of_mean, unit(x) @ unit(q.mean(0, keepdims=True)).T) <= 1e-4
    inner_h = scored(root, "inner-h", "q-sum-h", ScoreSettings())
    assert rel_err(inner_h, x @ (h_inv @ q.sum(0, keepdims=True).T)) <= 1e-4
    early = scored(root, "cosine-h-early", "q-unit-h", ScoreSettings(unit_normalize=True, hessian=stats))
    assert rel_err(early, unit(x @ h_half) @ unit(q @ h_half).T) <= 1e-4
    reduce(str(root / "q-less"), query_spec, aggregation="mean", unit_normalize=True)  # LESS: mean of unit queries
    less = scored(root, "less", "q-less", ScoreSettings(unit_normalize=True))
    assert rel_err(less, unit(x) @ unit(unit(q).mean(0, keepdims=True)).T) <= 1e-4
    nearest = scored(root, "max", "q-raw", ScoreSettings(mode="max"))
    assert rel_err(nearest, (x @ q.T).max(1, keepdims=True)) <= 1e-4
    with pytest.raises(RayattrError, match="unit-normalized but scoring is by inner product"):
        scored(root, "bad", "q-unit-h", ScoreSettings(hessian=stats))
    with pytest.raises(RayattrError, match="does not match this scoring"):
        scored(root, "bad", "q-unit-h", ScoreSettings(unit_normalize=True))


@pytest.mark.parametrize("micro_run", [None], indirect=True)
def test_self_influence_equals_brute_force_on_the_fly_and_from_an_index(micro_run, micro_model, data):
    """``g^T H^-1 g`` per training row (``|g|^2`` without statistics), streaming, either way."""
    _, root, _, x, _, widths = micro_run
    stats = str(root / "stats")
    want = np.einsum("nd,de,ne->n", x, dense_power(x, widths, -1.0), x)[:, None]
    settings = ScoreSettings(self_influence=True, hessian=stats)
    score(str(root / "self-index"), None, settings, index_path=str(root / "index"))
    spec = RunSpec(ModelSpec(micro_model), data[0], GradSpec(projection_dim=0, modules=MODULES))
    score(str(root / "self-fly"), None, settings, spec=spec)
    score(str(root / "self-plain"), None, ScoreSettings(self_influence=True), index_path=str(root / "index"))
    for name, expected in (("self-index", want), ("self-fly", want), ("self-plain", (x * x).sum(1, keepdims=True))):
        ids, got = read_scores(str(root / name))
        np.testing.assert_array_equal(ids, np.arange(INDEX_DOCS))
        assert rel_err(got, expected) <= 1e-4
    with pytest.raises(RayattrError, match="--self scores each document's g\\^T H\\^-1 g: drop --unit-normalize"):
        ScoreSettings(self_influence=True, unit_normalize=True)
    with pytest.raises(RayattrError, match="--query-path.*or each document's self-influence \\(--self\\), one of them"):
        score(str(root / "bad"), str(root / "q-raw"), settings, index_path=str(root / "index"))


@pytest.fixture(scope="module")
def fixture_run(offline_fixture, tmp_path_factory, ray_session):
    """A small projected index and query set on the fixture model, with statistics."""
    root = tmp_path_factory.mktemp("scoring")
    grads = GradSpec(projection_dim=4)
    index = RunSpec(ModelSpec(str(offline_fixture.neox)), DataSpec(str(offline_fixture.train), split="train[:80]"), grads)
    query = RunSpec(index.model, DataSpec(str(offline_fixture.queries), split="train[:7]", prompt_column="prompt",
                                          completion_column="completion"), grads)
    fit(str(root / "stats"), index, "second-moment")
    build(str(root / "index"), index)
    reduce(str(root / "query"), query, aggregation="none", unit_normalize=True, hessian=str(root / "stats"))
    return root, index


def test_on_the_fly_equals_from_index_for_any_worker_count(fixture_run):
    root, index = fixture_run
    settings = ScoreSettings(unit_normalize=True, hessian=str(root / "stats"), top_k=5)
    results = {
        "index": score(str(root / "s-index"), str(root / "query"), settings, index_path=str(root / "index")),
        "fly-1": score(str(root / "s-fly-1"), str(root / "query"), settings, spec=index, workers=1),
        "fly-2": score(str(root / "s-fly-2"), str(root / "query"), settings, spec=index, workers=2),
    }
    fly = results["fly-2"].progress  # clocked from the call, as a build is; every actor reports its peak RSS
    assert 0 < fly.first_row_seconds <= fly.seconds and 1 <= len(fly.worker_peak_rss_mb) <= 2
    ids, reference = read_scores(str(root / "s-index"))
    for name in results:
        got_ids, got = read_scores(str(root / f"s-{name}"))
        np.testing.assert_array_equal(got_ids, ids)
        np.testing.assert_allclose(got, reference, rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(results[name].topk.ids, results["index"].topk.ids)
    brute = TopK.of_block(5, ids, reference)  # numpy top-k of the whole matrix
    expected = ids[np.argsort(-reference, axis=0, kind="stable")[:5]].T
    np.testing.assert_array_equal(results["index"].topk.ids, expected)
    np.testing.assert_array_equal(brute.ids, expected)
    np.testing.assert_allclose(results["index"].topk.scores, np.sort(reference, axis=0)[::-1][:5].T, rtol=1e-6)
    for mode, expected in (("mean", reference.mean(1)), ("nearest", reference.max(1))):
        score(str(root / f"s-{mode}"), str(root / "query"), ScoreSettings(mode, True, str(root / "stats")),
              index_path=str(root / "index"))
        np.testing.assert_allclose(read_scores(str(root / f"s-{mode}"))[1][:, 0], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["individual", "nearest"])
def test_per_token_scores_sum_to_document_scores(fixture_run, mode):
    root, index = fixture_run
    settings = ScoreSettings(mode=mode, unit_normalize=True, hessian=str(root / "stats"), per_token=True)
    score(str(root / f"tok-{mode}"), str(root / "query"), settings, spec=index)
    plain = ScoreSettings(mode=mode, unit_normalize=True, hessian=str(root / "stats"))
    score(str(root / f"doc-{mode}"), str(root / "query"), plain, index_path=str(root / "index"))
    ids, docs = read_scores(str(root / f"doc-{mode}"))
    tokens = ScoreTable.open(str(root / f"tok-{mode}"), "token_scores").table.to_arrow()
    token_ids = tokens.column("id").to_numpy()
    token_scores = np.stack(tokens.column("scores").to_numpy(zero_copy_only=False))
    sums = np.zeros_like(docs)
    np.add.at(sums, np.searchsorted(ids, token_ids), token_scores)
    np.testing.assert_allclose(sums, docs, rtol=1e-4, atol=1e-5)


def test_query_from_another_projection_is_refused(fixture_run, offline_fixture):
    root, index = fixture_run
    other = RunSpec(index.model, DataSpec(str(offline_fixture.queries), split="train[:2]"), GradSpec(projection_dim=4, seed=7))
    reduce(str(root / "other-query"), other, aggregation="mean")
    with pytest.raises(RayattrError, match="disagree on projection"):
        score(str(root / "s-other"), str(root / "other-query"), ScoreSettings(), index_path=str(root / "index"))
    with pytest.raises(RayattrError, match="disagree on projection"):
        score(str(root / "s-other-fly"), str(root / "other-query"), ScoreSettings(), spec=index)


def test_query_dim_and_empty_query_set_are_refused(fixture_run, offline_fixture):
    from rayattr.score import Preprocess, Scorer

    with pytest.raises(RayattrError, match="query vectors have 3 dimensions but the index has 5"):
        Scorer(torch.zeros(2, 3), Preprocess()).score(torch.zeros(4, 5))
    with pytest.raises(RayattrError, match="query set has no gradients"):
        Scorer(torch.zeros(0, 3), Preprocess())
    root, index = fixture_run
    empty = RunSpec(index.model, DataSpec(str(offline_fixture.queries), split="train[:3]", text_column="answer",
                                          max_length=1, truncation=True), index.grads)
    with pytest.raises(RayattrError, match="produced no gradients"):
        reduce(str(root / "empty-query"), empty, aggregation="mean")


@pytest.mark.parametrize("block_rows", [None, 16])
def test_topk_of_a_score_table_equals_one_sort(ray_session, tmp_path, monkeypatch, block_rows):
    """Streamed on the driver (a table of one block) or per block on Ray tasks (more blocks): the same top-k."""
    if block_rows is not None:
        monkeypatch.setattr(ray_score, "TOPK_BLOCK_ROWS", block_rows)
    rng = np.random.default_rng(0)
    ids, scores = rng.permutation(70).astype(np.int64), rng.standard_normal((70, 3)).astype(np.float32)
    table = ScoreTable.create(str(tmp_path), ScoreMeta(width=3, per_token=False, query_ids=[5, 6, 7], settings={}), SCORES)
    for part in np.array_split(np.arange(70), 4):  # several fragments
        table.append(pa.table({"id": ids[part], "num_tokens": np.ones(len(part), np.int32),
                               "scores": pa.FixedSizeListArray.from_arrays(pa.array(scores[part].reshape(-1)), 3)}))
    got = ray_score.distributed_topk(ScoreTable.open(str(tmp_path)), 5)
    want = TopK.of_block(5, ids, scores)
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_array_equal(got.scores, want.scores)
