"""What the CLI prints: the shared stderr console, progress bars and result tables."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console(stderr=True)


@contextlib.contextmanager
def progress_bar(label: str) -> Iterator[Callable]:
    """A transient rich bar over documents; yields the ``on_progress`` callback the API takes."""
    with Progress(
        TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(), console=console, transient=True,
    ) as bar:
        task = bar.add_task(label, total=None, rate="")

        def show(progress) -> None:
            bar.update(task, total=progress.total_docs, completed=progress.docs,
                       rate=f"{progress.tokens_per_second:,.0f} tok/s")

        yield show


def print_progress(title: str, result) -> None:
    """The summary table of a streaming pass (build, reduce, score)."""
    summary = Table("", "value", title=title)
    first = "-" if result.first_row_seconds is None else f"{result.first_row_seconds:.1f} s"
    if result.first_row_after_load_seconds is not None:
        first += f" ({result.first_row_after_load_seconds:.1f} s after its worker loaded the model)"
    steady = "-" if result.steady_tokens_per_second is None else f"{result.steady_tokens_per_second:,.0f}"
    for key, value in [
        ("documents processed", f"{result.docs:,}"), ("rows written", f"{result.written:,}"),
        ("skipped (no loss token)", f"{result.skipped:,}"),
        ("excluded (NaN/Inf loss or gradient)", f"{len(result.non_finite_ids):,}"), ("tokens", f"{result.tokens:,}"),
        ("wall time", f"{result.seconds:.1f} s"), ("tokens/s (end to end)", f"{result.tokens_per_second:,.0f}"),
        ("tokens/s (steady: after each worker's first write)", steady), ("first row written after", first),
    ]:
        summary.add_row(key, value)
    Console().print(summary)


def print_topk(top, query_ids, queries: int = 5, ranks: int = 5) -> None:
    """The best ``ranks`` training ids (with scores) of the first ``queries`` queries."""
    table = Table("query", *[f"#{r}" for r in range(1, ranks + 1)], title="top training ids (score)")
    for qid, ids, scores in list(zip(query_ids, top.ids, top.scores))[:queries]:
        table.add_row(str(qid), *[f"{i} ({s:.3f})" for i, s in zip(ids[:ranks], scores[:ranks])])
    Console().print(table)


def cut(text: str, width: int = 120) -> str:
    """A text shortened to ``width`` characters for a table cell."""
    return text if len(text) <= width else text[: width - 1] + "…"
