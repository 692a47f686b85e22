"""Writing a run's report: rank the reported queries, read the texts their pages show, render the pages.

Only the ``topk`` table, two streamed passes over ``scores`` (``rankings``), the dataset rows of the
documents shown and, with per-token scores, those documents' token rows are read, so a large run's
report costs a pass over its scores, not memory.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from rayattr import storage
from rayattr.commands import ReportConfig
from rayattr.data import read_rows
from rayattr.model import tokenizer_source
from rayattr.tokenizer import load_tokenizer
from rayattr.report.html import document, heatmap
from rayattr.report.pages import QUERIES_DIR, Shown, index_page, query_file, query_page, token_scale
from rayattr.report.rankings import Ranking, rank_queries
from rayattr.report.run import RunRecord, load_run
from rayattr.report.summary import run_facts
from rayattr.report.texts import document_texts, read_token_scores, token_pieces
from rayattr.store import TOKEN_SCORES, ScoreMeta, ScoreTable, table_exists

INDEX = "index.html"
Heatmaps = dict[tuple[int, int], tuple[list[str], np.ndarray]]  # (id, query column) -> (tokens, their scores)


def write_report(config: ReportConfig) -> str:
    """Write the report of the run in ``config.run_path`` under ``config.out``; returns the index page's path."""
    run_path = config.run_path
    scores = ScoreTable.open(run_path)
    record = load_run(run_path, scores.meta, config.run_config)
    rankings = rank_queries(scores, config.k, config.queries)
    rows = read_rows(record.train, np.unique(np.concatenate([_shown_ids(r) for r in rankings])))
    documents = document_texts(rows, record.train)
    heatmaps, note = _heatmaps(record, rankings, rows)
    queries = _query_texts(record, scores.meta, rankings)
    storage.remove_tree(storage.join(config.out, QUERIES_DIR))  # pages of queries an earlier report had
    for i, ranking in enumerate(rankings):
        neighbours = (rankings[i - 1] if i else None, rankings[i + 1] if i + 1 < len(rankings) else None)
        page = _query_page(ranking, queries[ranking.query_id], documents, heatmaps, neighbours, note)
        storage.write_bytes(storage.join(config.out, query_file(ranking.column)), page.encode())
    facts = run_facts(record, scores.meta, scores.count(), len(rankings), table_exists(run_path, TOKEN_SCORES))
    run_config = (record.config_path, storage.read_bytes(record.config_path).decode())
    index = storage.join(config.out, INDEX)
    storage.write_bytes(index, index_page(run_path, facts, record.steps, record.completions, run_config, rankings,
                                          queries).encode())
    return index


def _shown_ids(ranking: Ranking) -> np.ndarray:
    return np.concatenate([ranking.top_ids, ranking.bottom_ids])


def _heatmaps(record: RunRecord, rankings: list[Ranking], rows: pa.Table) -> tuple[Heatmaps, str]:
    """The tokens and token scores of every shown document under each query that shows it (none without a
    ``token_scores`` table), and a note for the pages when there are token scores but no tokenizer."""
    if not table_exists(record.run_path, TOKEN_SCORES):
        return {}, ""
    if record.model is None:
        return {}, "This run has per-token scores, but its config names no model whose tokenizer splits the texts."
    wanted: dict[int, set[int]] = {}
    for ranking in rankings:
        for doc in _shown_ids(ranking).tolist():
            wanted.setdefault(doc, set()).add(ranking.column)
    scores = read_token_scores(ScoreTable.open(record.run_path, TOKEN_SCORES), wanted)
    tokenizer = load_tokenizer(tokenizer_source(record.model), record.model.revision)
    pieces = token_pieces(rows, record.train, tokenizer)
    return {key: (pieces[key[0]], values) for key, values in scores.items()}, ""


def _query_texts(record: RunRecord, meta: ScoreMeta, rankings: list[Ranking]) -> dict[int, tuple[str, str]]:
    """Each reported query's text by query id, or what its score column stands for when it is no one query."""
    mode = meta.settings.get("mode", "individual")
    reduced = (record.query_meta.source.get("reduce") or {}) if record.query_meta else {}
    if mode != "individual":
        label = {"mean": "The mean score over the query set", "nearest": "The nearest query's score (max over the "
                 "query set)", "self": "Each training document against itself (self-influence)"}.get(mode, mode)
    elif reduced.get("aggregation", "none") != "none":
        label = f"The {reduced['aggregation']} of the query set's gradients"
    elif record.query is None:
        label = "The run names no query texts"
    else:
        return document_texts(read_rows(record.query, np.array([r.query_id for r in rankings])), record.query)
    return {ranking.query_id: (label, "") for ranking in rankings}


def _query_page(ranking: Ranking, text: tuple[str, str], documents: dict[int, tuple[str, str]], heatmaps: Heatmaps,
                neighbours: tuple[Ranking | None, Ranking | None], note: str) -> str:
    """A query's page: its proponents ranked from the top, its opponents by their rank from the top too."""
    column = ranking.column
    shown = [(int(doc), column) for doc in _shown_ids(ranking)]
    scale = token_scale([heatmaps[key][1] for key in shown if key in heatmaps]) if heatmaps else None

    def body(doc: int) -> str:
        return heatmap(*heatmaps[doc, column], scale) if (doc, column) in heatmaps else document(*documents[doc])

    rows = int(ranking.counts.sum())
    proponents = [Shown(int(doc), rank + 1, float(score), body(int(doc)))
                  for rank, (doc, score) in enumerate(zip(ranking.top_ids, ranking.top_scores))]
    opponents = [Shown(int(doc), rows - rank, float(score), body(int(doc)))
                 for rank, (doc, score) in enumerate(zip(ranking.bottom_ids, ranking.bottom_scores))]
    return query_page(ranking, text, proponents, opponents, neighbours, scale, note)
