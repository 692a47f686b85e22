"""`rayattr validate`: a scores table against a retrain bank (LDS) and, when given, a ground truth
(recall@k, MRR), in one streamed pass over the scores.

Memory is the bank's subsets plus ``[M, Q]`` sums and a ``k x Q`` top list, however many
training rows the table holds. A per-token table adds every token's score to its document's
subsets: the LDS of token scores is that of their per-document sums, since the bank retrains
on whole documents.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from rayattr import storage
from rayattr.config import RayattrError
from rayattr.lds.bank import Bank
from rayattr.lds.metric import BOOTSTRAP_SAMPLES, LDSResult, linear_datamodeling_score
from rayattr.store import SCORES, ScoreTable
from rayattr.topk import TopK

RANKING_KS = (1, 10)


@dataclass
class Validation:
    """What ``validate`` measured: the LDS, and recall@k/MRR against a ground truth when one was given."""

    lds: LDSResult
    ranking: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"lds": self.lds.to_dict(), "ranking": self.ranking}


def validate(scores_path: str, bank_path: str, table: str = SCORES, ground_truth: str | None = None,
             bootstrap: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> Validation:
    """The LDS of the scores in ``scores_path`` (table ``table``) on the bank at ``bank_path``."""
    scores = ScoreTable.open(scores_path, table)
    bank = Bank.open(bank_path)
    if scores.meta.width != len(scores.meta.query_ids):
        raise RayattrError(f"table {table!r} in {scores_path} holds {scores.meta.width} score(s) per row, not one per "
                           "query; for an LDS, reduce the queries with --aggregation none and score with --score individual")
    columns, banked = _common_queries(scores.meta.query_ids, bank.meta.query_ids, scores_path, bank_path)
    _, subsets, losses = bank.read()
    truth = _read_truth(ground_truth) if ground_truth else None
    ranked = TopK.empty(max(RANKING_KS), len(columns)) if truth else None
    predicted = np.zeros((len(subsets), len(columns)))
    for batch in scores.iter_batches(["id", "scores"]):
        ids = batch.column("id").to_numpy()
        block = np.stack(batch.column("scores").to_numpy(zero_copy_only=False))[:, columns].astype(np.float64)
        membership = np.stack([_contains(subset, ids) for subset in subsets]) if subsets else np.zeros((0, len(ids)))
        predicted += membership @ block
        if ranked is not None:
            ranked = ranked.merge(TopK.of_block(ranked.k, ids, block))
    result = Validation(linear_datamodeling_score(predicted, losses[:, banked], bootstrap, seed))
    if truth is not None:
        query_ids = [scores.meta.query_ids[c] for c in columns]
        result.ranking = ranking_quality(truth, query_ids, ranked.ids)
    return result


def ranking_quality(truth: dict[int, set[int]], query_ids: list[int], ranked: np.ndarray,
                    ks: tuple[int, ...] = RANKING_KS) -> dict[str, float]:
    """Mean recall@k and MRR over the queries that have ground truth (``ranked[q]``: ids, best first)."""
    rows = [(truth[q], row) for q, row in zip(query_ids, ranked) if truth.get(q)]
    if not rows:
        raise RayattrError("the ground truth names none of the scored queries; check its query ids")
    quality = {"queries": float(len(rows))}
    for k in ks:
        quality[f"recall@{k}"] = float(np.mean([len(s.intersection(row[:k].tolist())) / len(s) for s, row in rows]))
    quality["mrr"] = float(np.mean([next((1.0 / r for r, doc in enumerate(row.tolist(), 1) if doc in s), 0.0)
                                    for s, row in rows]))
    return quality


def _common_queries(scored: list[int], banked: list[int], scores_path: str, bank_path: str) -> tuple[list, list]:
    """Column positions, in the scores and in the bank, of the queries both hold."""
    position = {q: i for i, q in enumerate(banked)}
    pairs = [(i, position[q]) for i, q in enumerate(scored) if q in position]
    if not pairs:
        raise RayattrError(f"the scores in {scores_path} and the bank in {bank_path} share no query id; score the "
                           "bank's queries")
    return [i for i, _ in pairs], [j for _, j in pairs]


def _contains(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    at = np.searchsorted(sorted_ids, ids).clip(max=max(len(sorted_ids) - 1, 0))
    return (sorted_ids[at] == ids) if len(sorted_ids) else np.zeros(len(ids), bool)


def _read_truth(path: str) -> dict[int, set[int]]:
    """``{query id: supporting training ids}`` from a JSON object."""
    try:
        payload = json.loads(storage.read_bytes(path))
        return {int(q): {int(i) for i in ids} for q, ids in payload.items()}
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise RayattrError(f"cannot read ground truth {path} ({exc}); pass a JSON object {{query id: [training "
                           "ids]}}") from exc
