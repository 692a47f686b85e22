"""The report's HTML pieces, every text escaped: the page frame with its inline style, tables, the score
histogram (inline SVG) and the token heatmap. Plain HTML and CSS with nothing fetched, so a page opens
offline, from a file, anywhere.
"""

from __future__ import annotations

import math
from html import escape

import numpy as np

POSITIVE = (214, 96, 77)  # the colour of the strongest positive score (a diverging scale through white)
NEGATIVE = (67, 147, 195)  # ... and of the strongest negative one
STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em auto; max-width: 1150px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.45em; margin-bottom: .2em; }
h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; width: 100%; margin: .4em 0; }
th, td { text-align: left; vertical-align: top; padding: 4px 8px; border-bottom: 1px solid #eee; }
th { background: #f5f5f5; font-weight: 600; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.key { width: 14em; color: #555; } .muted { color: #777; } nav a { margin-right: 1.2em; }
.doc { max-height: 11em; overflow: auto; white-space: pre-wrap; overflow-wrap: anywhere; }
.query-text { font-size: 1.1em; background: #f5f5f5; padding: .6em 1em; border-left: 4px solid #999;
              white-space: pre-wrap; }
mark.completion { background: #fff1a8; } .tok { border-radius: 2px; }
.legend { display: flex; align-items: center; gap: .5em; font-size: .9em; color: #555; margin: .3em 0; }
.legend .scale { width: 180px; height: 12px; border: 1px solid #ccc; }
svg.histogram .bar { fill: #8c8c8c; } svg.histogram text { font-size: 11px; fill: #555; }
pre { background: #f5f5f5; padding: 1em; overflow: auto; }
"""


def page(title: str, body: str) -> str:
    """A whole HTML document around ``body`` (HTML), titled ``title`` (text)."""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head>'
            f"<body>\n{body}\n</body></html>\n")


def table(headers: list[str], rows: list[list[str]], attributes: str = "",
          row_attributes: list[str] | None = None) -> str:
    """A table of HTML cells under text ``headers`` (none when all are empty); a cell starting with ``<td``
    keeps its own tag."""
    head = f"<thead><tr>{''.join(f'<th>{escape(h)}</th>' for h in headers)}</tr></thead>" if any(headers) else ""
    extra = row_attributes or [""] * len(rows)
    body = "\n".join(f"<tr{attrs}>" + "".join(c if c.startswith("<td") else f"<td>{c}</td>" for c in row) + "</tr>"
                     for row, attrs in zip(rows, extra))
    return f"<table{attributes}>{head}<tbody>\n{body}\n</tbody></table>"


def number(value: float) -> str:
    """A score as the report prints it (plain text): four significant digits, NaN as a dash."""
    return "\u2013" if value is None or not math.isfinite(value) else f"{value:.4g}"


def num_cell(value: float) -> str:
    return f'<td class="num">{number(value)}</td>'


def score_colour(score: float, scale: float) -> str:
    """The diverging colour of ``score`` on a scale whose ends, ``-scale`` and ``scale``, are full colour."""
    strength = min(1.0, abs(score) / scale) if scale > 0 else 0.0
    end = POSITIVE if score > 0 else NEGATIVE
    red, green, blue = (round(255 + (channel - 255) * strength) for channel in end)
    return f"rgb({red}, {green}, {blue})"


def legend(scale: float) -> str:
    """The key of the token colours: full blue at ``-scale``, white at 0, full red at ``scale``."""
    gradient = f"linear-gradient(to right, rgb{NEGATIVE}, #fff, rgb{POSITIVE})"
    return (f'<div class="legend">token score <span>{number(-scale)}</span><span class="scale" '
            f'style="background: {gradient}"></span><span>{number(scale)}</span>'
            '<span class="muted">(hover a token for its score)</span></div>')


def heatmap(pieces: list[str], scores: np.ndarray, scale: float) -> str:
    """The tokens of a document, each coloured by its score; tokens with no score (the last) stay white."""
    spans = []
    for position, piece in enumerate(pieces):
        score = float(scores[position]) if position < len(scores) else math.nan
        if math.isnan(score):
            spans.append(f'<span class="tok" title="token {position}: not scored">{escape(piece)}</span>')
        else:
            spans.append(f'<span class="tok" data-score="{score:.6g}" title="token {position}: {score:.4g}" '
                         f'style="background: {score_colour(score, scale)}">{escape(piece)}</span>')
    return f'<div class="doc heatmap">{"".join(spans)}</div>'


def document(prompt: str, completion: str = "", css: str = "doc") -> str:
    """A document's text; the completion of a prompt/completion row is marked."""
    marked = f'<mark class="completion">{escape(completion)}</mark>' if completion else ""
    return f'<div class="{css}">{escape(prompt)}{marked}</div>'


def histogram(counts: np.ndarray, edges: np.ndarray, marks: list[tuple[float, str, str]], width: int = 640,
              height: int = 170) -> str:
    """An SVG bar chart of ``counts`` per bin between ``edges``, with vertical ``marks`` (value, colour, label).

    A bin with any row is at least a pixel high, so a few outliers stay visible next to the bulk.
    """
    left, right, top, bottom = 44, 12, 10, 26
    plot_width, plot_height = width - left - right, height - top - bottom
    low, high, tallest = float(edges[0]), float(edges[-1]), max(int(counts.max()), 1)

    def x(value: float) -> float:
        return left + (value - low) / (high - low) * plot_width

    parts = []
    for count, start, stop in zip(counts, edges[:-1], edges[1:]):
        bar = 0.0 if not count else max(1.0, count / tallest * plot_height)
        parts.append(f'<rect class="bar" x="{x(start):.1f}" y="{top + plot_height - bar:.1f}" '
                     f'width="{max(x(stop) - x(start) - 1, 0.5):.1f}" height="{bar:.1f}">'
                     f"<title>{number(start)} to {number(stop)}: {int(count):,} rows</title></rect>")
    for value, colour, label in marks:
        if low <= value <= high:
            parts.append(f'<line x1="{x(value):.1f}" x2="{x(value):.1f}" y1="{top}" y2="{top + plot_height}" '
                         f'stroke="{colour}" stroke-width="1.5" stroke-dasharray="4 2">'
                         f"<title>{escape(label)}</title></line>")
    axis = top + plot_height
    parts.append(f'<line x1="{left}" x2="{left + plot_width}" y1="{axis}" y2="{axis}" stroke="#999"/>')
    ticks = [low, high] + ([0.0] if low < 0 < high else [])
    parts += [f'<text x="{x(t):.1f}" y="{axis + 16}" text-anchor="middle">{number(t)}</text>' for t in ticks]
    parts.append(f'<text x="{left - 6}" y="{top + 10}" text-anchor="end">{tallest:,}</text>')
    parts.append(f'<text x="{left - 6}" y="{axis}" text-anchor="end">0</text>')
    return (f'<svg class="histogram" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="score histogram">{"".join(parts)}</svg>')
