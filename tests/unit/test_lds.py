"""The LDS and `rayattr validate`, without Ray: known linear datamodels, a bank and a scores table on disk."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from rayattr.config import RayattrError
from rayattr.lds.bank import Bank, BankMeta, subset_of
from rayattr.lds.metric import average_ranks, linear_datamodeling_score, spearman
from rayattr.lds.validate import validate
from rayattr.store import SCORES, ScoreMeta, ScoreTable

TRAIN, QUERIES, RUNS = 40, 5, 24


def test_average_ranks_share_ties():
    assert average_ranks(np.array([3.0, 1.0, 3.0, 2.0, 3.0])).tolist() == [3.0, 0.0, 3.0, 1.0, 3.0]


def test_spearman_equals_the_textbook_formula_without_ties():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 30)), rng.normal(size=(3, 30))
    d = np.argsort(np.argsort(a, 1), 1) - np.argsort(np.argsort(b, 1), 1)
    textbook = 1 - 6 * (d**2).sum(1) / (30 * (30**2 - 1))
    np.testing.assert_allclose(spearman(a, b), textbook, rtol=1e-12)
    assert np.isnan(spearman(np.ones((1, 5)), np.arange(5.0)[None]))[0]


def linear_world(seed: int = 0):
    """Subsets of a training set and query losses that a linear datamodel ``theta`` gives exactly."""
    rng = np.random.default_rng(seed)
    theta = rng.normal(size=(TRAIN, QUERIES))  # effect of each training document on each query: helps when > 0
    masks = np.stack([np.isin(np.arange(TRAIN), subset_of(np.arange(TRAIN), 0.5, seed, run)) for run in range(RUNS)])
    losses = 3.0 - masks @ theta  # training on helpful documents lowers the loss
    return theta, masks, losses


def test_the_lds_of_the_datamodel_that_made_the_losses_is_one_and_of_its_negation_minus_one():
    theta, masks, losses = linear_world()
    exact = linear_datamodeling_score(masks @ theta, losses)
    assert exact.lds == pytest.approx(1.0, abs=1e-12) and exact.low == pytest.approx(1.0) and exact.queries == QUERIES
    assert linear_datamodeling_score(masks @ -theta, losses).lds == pytest.approx(-1.0, abs=1e-12)
    # a monotone map of the losses keeps the ranks, so the LDS too
    assert linear_datamodeling_score(masks @ theta, np.exp(losses / 10)).lds == pytest.approx(1.0, abs=1e-12)


def test_the_lds_of_noisy_scores_is_the_mean_of_the_per_query_rank_correlations():
    theta, masks, losses = linear_world(1)
    scores = theta + np.random.default_rng(2).normal(scale=1.5, size=theta.shape)
    result = linear_datamodeling_score(masks @ scores, losses, bootstrap=2000)
    expected = [spearman((masks @ scores)[:, q][None], -losses[:, q][None])[0] for q in range(QUERIES)]
    assert result.per_query == pytest.approx(expected, abs=1e-12)
    assert result.lds == pytest.approx(np.mean(expected), abs=1e-12)
    assert 0 < result.lds < 1 and result.low < result.lds < result.high


def test_too_few_subsets_are_refused():
    with pytest.raises(RayattrError, match="at least 3 retrained subsets"):
        linear_datamodeling_score(np.zeros((2, 3)), np.zeros((2, 3)))


def test_subsets_are_seeded_sorted_and_of_the_fraction():
    ids = np.arange(100, 140)
    first = subset_of(ids, 0.5, 7, 3)
    assert first.size == 20 and np.all(np.diff(first) > 0) and np.isin(first, ids).all()
    assert np.array_equal(first, subset_of(ids, 0.5, 7, 3)) and not np.array_equal(first, subset_of(ids, 0.5, 7, 4))
    with pytest.raises(RayattrError, match="fraction"):
        subset_of(ids, 0.0, 7, 0)


def bank_meta(query_ids, **changes) -> BankMeta:
    return BankMeta(**{"query_ids": list(query_ids), "train_ids": TRAIN, "fraction": 0.5, "seed": 0,
                       "settings": {"fingerprint": "x"}} | changes)


def write_scores(path: str, ids: np.ndarray, query_ids: list[int], scores: np.ndarray) -> None:
    meta = ScoreMeta(width=len(query_ids), per_token=False, query_ids=query_ids, settings={"method": "test"})
    table = ScoreTable.create(path, meta, SCORES)
    table.append(pa.table({"id": ids, "num_tokens": np.full(len(ids), 5, np.int32),
                           "scores": pa.FixedSizeListArray.from_arrays(scores.astype(np.float32).reshape(-1),
                                                                       len(query_ids))}))


def test_validate_streams_a_scores_table_against_a_bank(tmp_path):
    theta, masks, losses = linear_world()
    train_ids, query_ids = np.arange(TRAIN) + 1000, [7, 8, 9, 10, 11]
    bank = Bank.create(str(tmp_path / "bank"), bank_meta(query_ids))
    for run in range(RUNS):  # recorded out of order, one run twice (a retried task): read keeps one
        bank.append(RUNS - 1 - run, train_ids[masks[RUNS - 1 - run]], losses[RUNS - 1 - run])
    bank.append(0, train_ids[masks[0]], losses[0])
    # the scores table holds its queries in another order, one the bank lacks, and rows in any order
    order = np.random.default_rng(3).permutation(TRAIN)
    scored = [9, 7, 99, 8, 10, 11]
    columns = np.stack([theta[:, query_ids.index(q)] if q in query_ids else np.zeros(TRAIN) for q in scored], 1)
    write_scores(str(tmp_path / "run"), train_ids[order], scored, columns[order])
    truth = {"9": [int(train_ids[np.argmax(theta[:, 2])])], "7": [int(train_ids[np.argsort(theta[:, 0])[-3]])]}
    (tmp_path / "truth.json").write_text(json.dumps(truth))
    result = validate(str(tmp_path / "run"), str(tmp_path / "bank"), ground_truth=str(tmp_path / "truth.json"))
    assert result.lds.lds == pytest.approx(1.0, abs=1e-6) and result.lds.queries == 5 and result.lds.subsets == RUNS
    assert result.ranking == {"queries": 2.0, "recall@1": 0.5, "recall@10": 1.0, "mrr": pytest.approx((1 + 1 / 3) / 2)}


def test_a_bank_resumed_with_other_settings_is_refused(tmp_path):
    Bank.create(str(tmp_path), bank_meta([1, 2]))
    assert Bank.create(str(tmp_path), bank_meta([1, 2])).meta == bank_meta([1, 2])
    with pytest.raises(RayattrError, match="other settings \\(fraction\\)"):
        Bank.create(str(tmp_path), bank_meta([1, 2], fraction=0.3))


def test_scores_without_a_column_per_query_are_refused(tmp_path):
    Bank.create(str(tmp_path / "bank"), bank_meta([1, 2]))
    meta = ScoreMeta(width=1, per_token=False, query_ids=[1, 2], settings={})
    ScoreTable.create(str(tmp_path / "run"), meta, SCORES)
    with pytest.raises(RayattrError, match="--aggregation none"):
        validate(str(tmp_path / "run"), str(tmp_path / "bank"))
