"""Tests for the offline fixture: determinism, caching, ground truth and model loading."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel, GPTNeoXForCausalLM
from transformers.pytorch_utils import Conv1D

from rayattr import fixtures as F


@pytest.fixture(scope="session", params=F.VARIANTS)
def fixture(request: pytest.FixtureRequest) -> F.Fixture:
    return F.make_fixture(F.default_cache_dir(), seed=0, variant=request.param)


@pytest.fixture(scope="session")
def easy() -> F.Fixture:
    return F.make_fixture(F.default_cache_dir(), seed=0, variant="easy")


@pytest.fixture(scope="session")
def hard() -> F.Fixture:
    return F.make_fixture(F.default_cache_dir(), seed=0, variant="hard")


def _rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def _tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def _ngrams(words: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def _temp_dirs(root: Path) -> list[Path]:
    return [p for p in root.iterdir() if ".tmp-" in p.name]


# ----------------------------------------------------------------------- generation


@pytest.mark.parametrize("variant", F.VARIANTS)
def test_generation_is_byte_identical(tmp_path: Path, variant: str, capfd) -> None:
    a = F.make_fixture(tmp_path / "a", seed=3, variant=variant)
    printed = "".join(capfd.readouterr())
    assert "Writing model shards" not in printed and "WARNING" not in printed, printed  # rayattr's output only
    b = F.make_fixture(tmp_path / "b", seed=3, variant=variant)
    hashes = _tree_hashes(a.root)
    assert hashes == _tree_hashes(b.root)
    for name in ["train.parquet", "queries.parquet", "ground_truth.json", "conversations.parquet", "tokenizer/tokenizer.json",
                 "neox/model.safetensors", "gpt2/model.safetensors"]:
        assert name in hashes
    vocab_a = AutoTokenizer.from_pretrained(a.tokenizer).get_vocab()
    assert vocab_a == AutoTokenizer.from_pretrained(b.tokenizer).get_vocab()
    other = F.make_fixture(tmp_path / "a", seed=4, variant=variant)
    assert other.root != a.root
    assert _tree_hashes(other.root)["train.parquet"] != hashes["train.parquet"]


def test_cache_hit_does_not_regenerate(easy: F.Fixture, monkeypatch: pytest.MonkeyPatch) -> None:
    mtime = easy.train.stat().st_mtime_ns

    def boom(*args: object) -> None:
        raise AssertionError("regenerated a cached fixture")

    monkeypatch.setattr(F, "_build", boom)
    again = F.make_fixture(easy.root.parent, seed=0, variant="easy")
    assert again == easy
    assert easy.train.stat().st_mtime_ns == mtime
    assert easy.root.name == f"v{F.FIXTURE_VERSION}-easy-seed0"


def test_failed_generation_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = F._build

    def half_then_fail(out: Path, seed: int, variant: str) -> None:
        real(out, seed, variant)
        raise KeyboardInterrupt

    monkeypatch.setattr(F, "_build", half_then_fail)
    with pytest.raises(KeyboardInterrupt):
        F.make_fixture(tmp_path, seed=0, variant="hard")
    assert list(tmp_path.iterdir()) == []


def test_losing_a_race_keeps_the_winner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = F._build
    winner: list[F.Fixture] = []

    def racing(out: Path, seed: int, variant: str) -> None:
        real(out, seed, variant)
        monkeypatch.setattr(F, "_build", real)
        winner.append(F.make_fixture(tmp_path, seed, variant))  # another process finishes first
        (out / "loser-marker").write_text("")

    monkeypatch.setattr(F, "_build", racing)
    fx = F.make_fixture(tmp_path, seed=0, variant="hard")
    assert winner == [fx]
    assert not (fx.root / "loser-marker").exists()
    assert fx.train.is_file() and fx.gpt2.is_dir()
    assert _temp_dirs(tmp_path) == []


def test_unknown_variant_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="variant"):
        F.make_fixture(tmp_path, variant="medium")


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RAYATTR_FIXTURE_CACHE", str(tmp_path / "x"))
    assert F.default_cache_dir() == tmp_path / "x"
    monkeypatch.delenv("RAYATTR_FIXTURE_CACHE")
    assert F.default_cache_dir() == Path.home() / ".cache/rayattr/fixtures"


# ----------------------------------------------------------------------- corpus


def test_tables_have_expected_shape(fixture: F.Fixture) -> None:
    train, queries = pq.read_table(fixture.train), pq.read_table(fixture.queries)
    assert train.column_names == ["doc_id", "text", "person", "fact", "kind"]
    assert queries.column_names == ["query_id", "prompt", "completion", "text", "answer", "person", "fact"]
    assert train.num_rows >= 2000
    assert 100 <= queries.num_rows <= 200
    assert train.column("doc_id").to_pylist() == list(range(train.num_rows))
    rows = train.to_pylist()
    kinds = [r["kind"] for r in rows]
    assert set(kinds) == {"bio", "distractor"}
    assert kinds.count("distractor") >= 300
    for r in rows:
        assert (r["kind"] == "distractor") == (r["person"] == "") == (r["fact"] == "")
    first_half = [r["kind"] for r in rows[: len(rows) // 2]]
    assert 0.05 < first_half.count("distractor") / len(first_half) < 0.4  # shuffled, not appended
    for q in queries.to_pylist():
        assert re.fullmatch(r"q\d{4}", q["query_id"])
        assert q["text"] == q["prompt"] + q["completion"]
        assert q["completion"].startswith(" ") and q["answer"] in q["completion"]
        assert q["fact"] in F.FACTS
    manifest = json.loads((fixture.root / "manifest.json").read_text())
    assert manifest["n_train"] == train.num_rows and manifest["fixture_version"] == F.FIXTURE_VERSION


def test_ground_truth_is_sound_and_complete(fixture: F.Fixture) -> None:
    train, queries = _rows(fixture.train), _rows(fixture.queries)
    truth = json.loads(fixture.ground_truth.read_text())
    assert list(truth) == [q["query_id"] for q in queries]
    for q in queries:
        support = truth[q["query_id"]]
        assert support, q
        for idx in support:
            doc = train[idx]
            assert q["answer"] in doc["text"] and q["person"] in doc["text"]
            assert doc["person"] == q["person"] and q["fact"] in doc["fact"].split(",")
        others = [
            i for i, r in enumerate(train) if r["person"] == q["person"] and i not in support
        ]
        assert all(q["answer"] not in train[i]["text"] for i in others)
    all_support = {i for ids in truth.values() for i in ids}
    assert all(train[i]["kind"] == "bio" for i in all_support)


def test_distractors_mention_no_person(fixture: F.Fixture) -> None:
    train = _rows(fixture.train)
    people = {r["person"] for r in train if r["person"]}
    assert len(people) >= 250
    first_names = {p.split()[0] for p in people}
    for r in train:
        if r["kind"] == "distractor":
            assert not set(_words(r["text"])) & {w.lower() for w in first_names}, r["text"]


def test_documents_are_short(fixture: F.Fixture) -> None:
    tok = AutoTokenizer.from_pretrained(fixture.tokenizer)
    lengths = [len(ids) for ids in tok([r["text"] for r in _rows(fixture.train)])["input_ids"]]
    assert 10 <= min(lengths) and max(lengths) <= 80


def test_easy_queries_reuse_training_wording(easy: F.Fixture) -> None:
    corpus = " ".join(r["text"] for r in _rows(easy.train))
    bios = [r for r in _rows(easy.train) if r["kind"] == "bio"]
    assert sum("," in r["fact"] for r in bios) > len(bios) / 2  # mostly multi-fact biographies
    for q in _rows(easy.queries):
        for piece in q["prompt"].split(q["person"]):
            assert piece.strip() in corpus, q["prompt"]


def test_hard_queries_share_no_trigram_with_training(hard: F.Fixture) -> None:
    train = _rows(hard.train)
    train_grams = set().union(*(_ngrams(_words(r["text"]), 3) for r in train))
    for q in _rows(hard.queries):
        for piece in q["prompt"].split(q["person"]):
            assert not _ngrams(_words(piece), 3) & train_grams, q["prompt"]
    docs_per_person: dict[str, int] = {}
    for r in train:
        if r["kind"] == "bio":
            assert r["fact"] in F.FACTS  # exactly one fact per document
            docs_per_person[r["person"]] = docs_per_person.get(r["person"], 0) + 1
    assert min(docs_per_person.values()) >= len(F.FACTS)


# ----------------------------------------------------------------------- tokenizer and models


def test_tokenizer(fixture: F.Fixture) -> None:
    tok = AutoTokenizer.from_pretrained(fixture.tokenizer)
    assert 2000 <= len(tok) <= 4000
    eos = tok.convert_tokens_to_ids(F.EOS)
    assert tok.eos_token_id == tok.bos_token_id == tok.pad_token_id == eos
    assert tok.padding_side == "right"
    text = _rows(fixture.queries)[0]["text"]
    assert tok.decode(tok(text)["input_ids"]) == text


@pytest.mark.parametrize(
    ("attr", "cls"), [("neox", GPTNeoXForCausalLM), ("gpt2", GPT2LMHeadModel)]
)
def test_models_load_and_run(fixture: F.Fixture, attr: str, cls: type) -> None:
    path = getattr(fixture, attr)
    assert (path / "model.safetensors").is_file()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert isinstance(model, cls)
    assert model.config.vocab_size == len(tok)
    assert model.config.eos_token_id == model.config.pad_token_id == tok.eos_token_id
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    texts = [q["text"] for q in _rows(fixture.queries)[:4]]
    batch = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**batch, labels=batch["input_ids"])
    assert out.logits.shape == (*batch["input_ids"].shape, len(tok))
    assert 6.0 < out.loss.item() < 9.0  # random init: close to log(vocab)


def test_model_architectures(easy: F.Fixture) -> None:
    neox = AutoModelForCausalLM.from_pretrained(easy.neox)
    assert neox.config.hidden_size == 64 and neox.config.num_hidden_layers == 2
    assert neox.config.tie_word_embeddings is False
    assert neox.get_output_embeddings().weight.data_ptr() != neox.get_input_embeddings().weight.data_ptr()
    gpt2 = AutoModelForCausalLM.from_pretrained(easy.gpt2)
    assert sum(isinstance(m, Conv1D) for m in gpt2.modules()) == 4 * gpt2.config.n_layer


# ----------------------------------------------------------------------- training


@pytest.fixture()
def fixture_copy(easy: F.Fixture, tmp_path: Path) -> F.Fixture:
    """A private copy of the cached fixture, so short test trainings never land in the cache."""
    shutil.copytree(easy.root, tmp_path / easy.root.name, ignore=shutil.ignore_patterns(F.TRAINED_DIRNAME))
    return F.make_fixture(tmp_path, seed=0, variant="easy")


def test_train_fixture_model(fixture_copy: F.Fixture, tmp_path: Path) -> None:
    out = F.train_fixture_model(fixture_copy, steps=40, seed=0)
    assert out == fixture_copy.root / F.TRAINED_DIRNAME
    summary = json.loads((out / "training.json").read_text())
    assert summary["final_loss"] < summary["initial_loss"] - 1.0

    tok = AutoTokenizer.from_pretrained(out)
    texts = [r["text"] for r in _rows(fixture_copy.train)[:64]]
    docs = [ids + [tok.eos_token_id] for ids in tok(texts)["input_ids"]]
    before = F.mean_token_loss(AutoModelForCausalLM.from_pretrained(fixture_copy.neox), docs, tok.eos_token_id)
    trained = AutoModelForCausalLM.from_pretrained(out)
    after = F.mean_token_loss(trained, docs, tok.eos_token_id)
    assert after < before - 1.0

    state = torch.load(out / "optimizer.pt", weights_only=True)
    names = json.loads((out / "optimizer_param_names.json").read_text())
    params = dict(trained.named_parameters())
    assert sorted(names) == sorted(params)
    assert [i for g in state["param_groups"] for i in g["params"]] == list(range(len(names)))
    assert [g["weight_decay"] for g in state["param_groups"]] == [F.TRAIN_WEIGHT_DECAY, 0.0]
    for i, name in enumerate(names):
        assert state["state"][i]["exp_avg_sq"].shape == params[name].shape, name
        assert int(state["state"][i]["step"]) == 40

    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert F.train_fixture_model(fixture_copy, steps=40, seed=0) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="steps=40"):
        F.train_fixture_model(fixture_copy, steps=41, seed=0)

    twin = shutil.copytree(fixture_copy.root, tmp_path / "twin" / fixture_copy.root.name,
                           ignore=shutil.ignore_patterns(F.TRAINED_DIRNAME))
    twin_out = F.train_fixture_model(F.make_fixture(twin.parent, seed=0, variant="easy"), steps=40, seed=0)
    assert _tree_hashes(twin_out)["model.safetensors"] == _tree_hashes(out)["model.safetensors"]


# ----------------------------------------------------------------------- quality


def test_fact_tracing_quality_of_perfect_and_random_rankings(easy: F.Fixture) -> None:
    supports = list(json.loads(easy.ground_truth.read_text()).values())
    num_docs = pq.read_metadata(easy.train).num_rows
    query_ids = np.arange(len(supports))
    perfect = np.stack([np.r_[s, np.setdiff1d(np.arange(num_docs), s)] for s in supports])
    best = F.fact_tracing_quality(easy, query_ids, perfect, ks=(1, 10))
    assert best["mrr"] == 1.0 and best["queries"] == len(supports)
    assert best["recall@1"] == pytest.approx(np.mean([1 / len(s) for s in supports]))
    assert best["recall@10"] == pytest.approx(np.mean([min(1, 10 / len(s)) for s in supports]))

    rng = np.random.default_rng(0)
    shuffled = [F.fact_tracing_quality(easy, query_ids, np.stack([rng.permutation(num_docs) for _ in supports]))
                for _ in range(50)]
    assert np.mean([q["mrr"] for q in shuffled]) == pytest.approx(best["random_mrr"], rel=0.25)
    assert np.mean([q["recall@10"] for q in shuffled]) == pytest.approx(best["random_recall@10"], rel=0.25)
    cut = F.fact_tracing_quality(easy, query_ids, perfect[:, :5], ks=(10,))
    assert cut["random_recall@10"] == 5 / num_docs and cut["random_mrr"] < best["random_mrr"]
