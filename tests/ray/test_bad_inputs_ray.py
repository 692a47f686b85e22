"""Bad input on the session's Ray: non-finite and empty documents are skipped and recorded, and
a full disk while saving statistics damages nothing.

Complements the CLI's data errors (``tests/e2e/test_cli_e2e.py``) and test_store.py's
format-version errors.
"""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import assert_rows_close
from transformers import AutoModelForCausalLM, AutoTokenizer

from rayattr import storage
from rayattr.api import collect_in_process, open_index
from rayattr.config import DataSpec, GradSpec, ModelSpec, RayattrError, RunSpec
from rayattr.hessian.factors import load_stats
from rayattr.ray.entry import build, fit
from rayattr.store import Completion
from rayattr.verify import verify

DOCS = 32


@pytest.fixture(scope="module")
def poisoned(offline_fixture, fixture_tokenizer, tmp_path_factory) -> tuple[str, int]:
    """The fixture model with one token's embedding set to inf: documents holding that token
    get a NaN loss and gradient, the others are untouched. Returns ``(model dir, token id)``."""
    texts = pq.read_table(offline_fixture.train).column("text").to_pylist()[:DOCS]
    in_docs = np.bincount(np.concatenate([np.unique(ids) for ids in fixture_tokenizer(texts)["input_ids"]]))
    token = int(np.flatnonzero((in_docs >= 2) & (in_docs <= 6))[0])  # in a few documents, not all
    model = AutoModelForCausalLM.from_pretrained(offline_fixture.neox)
    with torch.no_grad():
        model.get_input_embeddings().weight[token] = float("inf")
    out = tmp_path_factory.mktemp("poisoned")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(offline_fixture.tokenizer).save_pretrained(out)
    return str(out), token


def test_non_finite_documents_get_no_row_and_stay_out_of_statistics(ray_session, tmp_path, offline_fixture, poisoned,
                                                                    fixture_tokenizer):
    model, token = poisoned
    data = DataSpec(str(offline_fixture.train), split=f"train[:{DOCS}]")
    texts = pq.read_table(offline_fixture.train).column("text").to_pylist()[:DOCS]
    bad = np.array([i for i, t in enumerate(texts) if token in fixture_tokenizer(t)["input_ids"]])
    assert 0 < bad.size < DOCS
    progress = build(str(tmp_path / "run"), RunSpec(ModelSpec(model), data, GradSpec(projection_dim=4)))
    assert sorted(progress.non_finite_ids) == bad.tolist() and progress.written == DOCS - bad.size
    ids, vectors = open_index(str(tmp_path / "run")).read_matrix()
    np.testing.assert_array_equal(ids, np.setdiff1d(np.arange(DOCS), bad))
    clean = [rows for _, rows in collect_in_process(RunSpec(ModelSpec(str(offline_fixture.neox)), data, GradSpec(projection_dim=4)))]
    clean_ids = np.concatenate([r.ids for r in clean])
    assert_rows_close(vectors, np.concatenate([r.grads for r in clean])[np.isin(clean_ids, ids)])
    assert Completion.load(str(tmp_path / "run"), "gradients").non_finite == bad.tolist()
    assert verify(str(tmp_path / "run")).ok  # excluded on purpose, not missing
    # Statistics over the same documents equal those of the clean documents alone.
    kept = tmp_path / "kept.parquet"
    pq.write_table(pq.read_table(offline_fixture.train).slice(0, DOCS).take(ids), kept)
    fit(str(tmp_path / "stats"), RunSpec(ModelSpec(model), data, GradSpec(projection_dim=4)), "second-moment")
    fit(str(tmp_path / "clean"), RunSpec(ModelSpec(str(offline_fixture.neox)), DataSpec(str(kept)), GradSpec(projection_dim=4)),
        "second-moment")
    (got, got_manifest), (want, _) = load_stats(tmp_path / "stats"), load_stats(tmp_path / "clean")
    assert got_manifest["examples"] == DOCS - bad.size
    for name, tensors in want.items():
        scale = tensors["second_moment"].abs().max()
        assert float((got[name]["second_moment"] - tensors["second_moment"]).abs().max() / scale) <= 1e-5


def test_empty_documents_are_skipped_counted_and_recorded(ray_session, tmp_path, offline_fixture, fixture_tokenizer):
    texts = pq.read_table(offline_fixture.train).column("text").to_pylist()[:8]
    texts[2] = ""
    texts[5] = fixture_tokenizer.decode(fixture_tokenizer(texts[5])["input_ids"][:1])
    assert len(fixture_tokenizer(texts[5])["input_ids"]) == 1  # one token: nothing to predict either
    train = tmp_path / "train.parquet"
    pq.write_table(pa.table({"text": texts}), train)
    run = str(tmp_path / "run")
    progress = build(run, RunSpec(ModelSpec(str(offline_fixture.neox)), DataSpec(str(train)), GradSpec(projection_dim=4)))
    assert progress.skipped == 2 and sorted(progress.skipped_ids) == [2, 5] and progress.written == 6
    np.testing.assert_array_equal(open_index(run).read_matrix()[0], [0, 1, 3, 4, 6, 7])
    assert Completion.load(run, "gradients").skipped == [2, 5]
    assert verify(run).ok


def test_disk_full_while_saving_statistics(ray_session, tmp_path, offline_fixture, monkeypatch):
    spec = RunSpec(ModelSpec(str(offline_fixture.neox)), DataSpec(str(offline_fixture.train), split="train[:8]"),
                   GradSpec(projection_dim=4))
    real_open = open

    def full_disk(path, mode="r", *args, **kwargs):
        if "w" in mode and str(path).startswith(str(tmp_path / "stats")):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", full_disk)
    with pytest.raises(RayattrError, match=r"cannot write .*No space left on device.*free space"):
        fit(str(tmp_path / "stats"), spec, "second-moment")
    monkeypatch.undo()
    assert not storage.exists(str(tmp_path / "stats" / "manifest.json"))  # nothing looks complete
    assert not [p for p in Path(tmp_path / "stats").glob(".*tmp*")]  # no temp file left behind
    fit(str(tmp_path / "stats"), spec, "second-moment")  # with space again, the same command works
    assert load_stats(tmp_path / "stats")[1]["examples"] == 8
