"""The report's two kinds of page: the index (the run's settings, counts and timings, and every reported
query with a link to its page) and a query's page (its text, score histogram, proponents and opponents).

A page per query keeps every page small however many queries a run has.
"""

from __future__ import annotations

from dataclasses import dataclass
from html import escape

import numpy as np

from rayattr.report.html import NEGATIVE, POSITIVE, document, histogram, legend, num_cell, number, page, table
from rayattr.report.rankings import Ranking
from rayattr.report.run import Step
from rayattr.store import Completion

QUERIES_DIR = "queries"
SNIPPET = 160  # characters of a query's text in the index


@dataclass(frozen=True)
class Shown:
    """One training row on a query's page."""

    id: int
    rank: int
    score: float
    body: str  # HTML: the document, or its token heatmap


def query_file(column: int) -> str:
    """A query's page, relative to the index."""
    return f"{QUERIES_DIR}/{column}.html"


def query_page(ranking: Ranking, text: tuple[str, str], proponents: list[Shown], opponents: list[Shown],
               neighbours: tuple[Ranking | None, Ranking | None], scale: float | None, note: str) -> str:
    """A query's page; ``scale``: the token score of full colour when the documents are heatmaps."""
    previous, following = neighbours
    links = ['<a href="../index.html">&larr; all queries</a>']
    links += [f'<a href="{r.column}.html">{label} (query {r.query_id})</a>'
              for r, label in ((previous, "previous"), (following, "next")) if r is not None]
    rows = int(ranking.counts.sum())
    kth_top, kth_bottom = float(ranking.top_scores[-1]), float(ranking.bottom_scores[-1])
    marks = [(0.0, "#444", "0"), (kth_top, f"rgb{POSITIVE}", f"the score at rank {len(proponents)} from the top"),
             (kth_bottom, f"rgb{NEGATIVE}", f"the score at rank {len(opponents)} from the bottom")]
    key = legend(scale) if scale is not None else ""
    body = [
        f"<nav>{''.join(links)}</nav>",
        f"<h1>Query {ranking.query_id}</h1>",
        document(*text, css="query-text"),
        f"<h2>Scores of the {rows:,} training rows</h2>",
        histogram(ranking.counts, ranking.edges, marks),
        f'<p class="muted">{len(ranking.counts)} equal bins from the lowest score to the highest; dashed lines: '
        f"0 and the scores at rank {len(proponents)} from the top and from the bottom.</p>",
        f'<h2>Proponents: the {len(proponents)} highest scores</h2>{key}',
        _examples("proponents", proponents),
        f'<h2>Opponents: the {len(opponents)} lowest scores</h2>{key}',
        _examples("opponents", opponents),
    ]
    if note:
        body.append(f'<p class="muted">{escape(note)}</p>')
    return page(f"Query {ranking.query_id}", "\n".join(body))


def _examples(name: str, shown: list[Shown]) -> str:
    rows = [[str(s.rank), num_cell(s.score), str(s.id), s.body] for s in shown]
    return table(["rank", "score", "id", "training document"], rows, f' class="examples" id="{name}"',
                 [f' class="example" data-id="{s.id}"' for s in shown])


def token_scale(scores: list[np.ndarray]) -> float:
    """The magnitude of full colour on a page: its largest token score, so tokens compare across its documents."""
    finite = [np.abs(s[np.isfinite(s)]).max() for s in scores if np.isfinite(s).any()]
    return float(max(finite)) if finite else 0.0


def index_page(run_path: str, facts: list[tuple[str, str]], steps: list[Step], completions: list[Completion],
               config: tuple[str, str], rankings: list[Ranking], texts: dict[int, tuple[str, str]]) -> str:
    """The summary page; ``config`` is the run config's ``(path, text)``, ``texts`` the queries' by query id."""
    body = [f'<h1>Attribution report</h1><p class="muted">{escape(run_path)}</p>', "<h2>Run</h2>",
            table(["", ""], [[f'<td class="key">{escape(what)}</td>', escape(value)] for what, value in facts],
                  ' id="settings"')]
    if steps:
        rows = [[escape(s.name), num_cell(s.seconds), escape(_detail(s.detail))] for s in steps]
        rows.append(["<strong>total</strong>", num_cell(sum(s.seconds for s in steps)), ""])
        body += ["<h2>Steps</h2>", table(["step", "seconds", "result"], rows, ' id="steps"')]
    if completions:
        rows = [[escape(c.table), f"{c.rows:,}", f"{len(c.skipped):,}", f"{len(c.non_finite):,}"] for c in completions]
        body += ["<h2>Finished tables</h2>",
                 table(["table", "rows", "skipped (no loss token)", "left out (non-finite)"], rows, ' id="tables"')]
    body += [f"<h2>Queries ({len(rankings):,})</h2>", _query_list(rankings, texts),
             f"<details><summary>Run config: {escape(config[0])}</summary><pre>{escape(config[1])}</pre></details>"]
    return page(f"rayattr report: {run_path}", "\n".join(body))


def _query_list(rankings: list[Ranking], texts: dict[int, tuple[str, str]]) -> str:
    rows = []
    for ranking in rankings:
        text = "".join(texts[ranking.query_id])
        snippet = text if len(text) <= SNIPPET else text[: SNIPPET - 1] + "\u2026"
        rows.append([str(ranking.query_id), f'<a href="{query_file(ranking.column)}">{escape(snippet)}</a>',
                     num_cell(float(ranking.top_scores[0])), num_cell(float(ranking.bottom_scores[0]))])
    return table(["query", "text", "highest score", "lowest score"], rows, ' id="queries"',
                 [' class="query"'] * len(rows))


def _detail(detail: dict) -> str:
    """A step's recorded result as ``key value`` pairs, numbers with thousands separators."""
    def shown(value) -> str:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return str(value)
        return f"{value:,}" if isinstance(value, int) else number(value)

    return ", ".join(f"{key} {shown(value)}" for key, value in detail.items())
