"""Commands on gradient tables: build one, verify a run, index it for search and query it."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from rayattr import storage
from rayattr.cli.application import app
from rayattr.cli.options import (DATA, MODEL, Group, RayAddressOpt, RunPathArg, SaveConfigOpt, choices, run_spec,
                                 run_with_progress, user_errors, with_options)
from rayattr.cli.render import console, cut, print_progress
from rayattr.commands import BuildConfig
from rayattr.config import DataSpec, GradSpec, RayattrError

BUILD = Group(BuildConfig)
ALL_GRADS = Group(GradSpec)  # a build stores rows: their dtype and per-token layout too
QUERY_DATA = Group(DataSpec, include=("split", "subset", "text_column", "prompt_column", "completion_column",
                                      "conversation_column"))
AnnMetric = choices("AnnMetric", ("cosine", "dot"))


@app.command()
@user_errors
@with_options(MODEL, DATA, ALL_GRADS, BUILD)
def build(run_path: RunPathArg, ray_address: RayAddressOpt = None, save_config: SaveConfigOpt = None,
          options: dict | None = None) -> None:
    """Collect per-example (projected) gradients of a dataset into a LanceDB table; reruns resume."""
    config = BUILD.build(options, run_path=run_path, spec=run_spec(options, ALL_GRADS))
    result = run_with_progress(config, "build", save_config, ray_address)
    if result is not None:
        print_progress(f"build {run_path}", result)


@app.command("verify")
@user_errors
def verify_command(run_path: RunPathArg) -> None:
    """Check a run: every id once, vector widths and dtypes, no NaN/Inf, finished tables, statistics checksums
    and fingerprints. Exits 1 with the list of problems."""
    from rayattr.verify import verify

    with storage.reachable(run_path):
        report = verify(run_path)
    checked = Table("checked", title=f"verify {run_path}")
    for item in report.checked:
        checked.add_row(escape(item))
    Console().print(checked)
    if not report.ok:
        for problem in report.problems:
            console.print(f"[bold red]problem:[/] {escape(problem)}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    Console().print(f"{run_path}: no problems")


@app.command("index")
@user_errors
def index_command(
    run_path: RunPathArg,
    ann: Annotated[bool, typer.Option(help="Build an IVF-PQ index on the gradients for `rayattr query --ann`")] = False,
    metric: Annotated[AnnMetric, typer.Option(help="cosine (for --unit-norm queries) or dot (inner product)")] = AnnMetric.cosine,
    num_partitions: Annotated[int | None, typer.Option(help="IVF partitions (default sqrt(rows), at most rows/256)")] = None,
    num_sub_vectors: Annotated[int | None, typer.Option(help="PQ sub-vectors; must divide the dimension (default dim/8, at least 16)")] = None,
) -> None:
    """Show what a gradient table offers for search; --ann builds an approximate-search index on it."""
    from rayattr.search import Index, ann_metric, build_ann_index

    rows = []
    if ann:
        with console.status("building IVF-PQ index"):
            built = build_ann_index(run_path, metric.value, num_partitions, num_sub_vectors)
        rows = [("IVF partitions", f"{built.num_partitions:,}"), ("PQ sub-vectors", f"{built.num_sub_vectors:,}")]
    index = Index.open(run_path)
    summary = Table("", "value", title=f"index {run_path}")
    for key, value in [
        ("rows", f"{index.table.count():,}"), ("dimensions", f"{index.meta.dim:,}"), ("model", index.meta.model["name"]),
        ("ANN index metric", ann_metric(index.table) or "none (exact search only)"), *rows,
    ]:
        summary.add_row(key, value)
    Console().print(summary)


@app.command("query")
@user_errors
@with_options(QUERY_DATA)
def query_command(
    run_path: RunPathArg,
    text: Annotated[list[str] | None, typer.Option(help="Query text, loss on every token (repeatable)")] = None,
    query_dataset: Annotated[str | None, typer.Option(help="Dataset of queries (same forms as --dataset)")] = None,
    k: Annotated[int, typer.Option("-k", "--k", help="Training rows to show per query")] = 10,
    unit_norm: Annotated[bool, typer.Option("--unit-norm", "--unit-normalize", help="Rank by cosine instead of inner product")] = False,
    hessian: Annotated[str | None, typer.Option("--hessian", "--hessian-path", help="Statistics directory: H^-1 on the query (H^-1/2 both sides with --unit-norm)")] = None,
    ann: Annotated[bool, typer.Option(help="Approximate search with the index from `rayattr index --ann`")] = False,
    nprobes: Annotated[int, typer.Option(help="IVF partitions searched (--ann)")] = 20,
    refine_factor: Annotated[int, typer.Option(help="Candidates re-ranked exactly, as a multiple of k (--ann)")] = 20,
    model: Annotated[str | None, typer.Option(help="Load the index's model from here instead of its recorded path")] = None,
    options: dict | None = None,
) -> None:
    """Rank the training documents of an index for query texts by gradient similarity."""
    from rayattr.config import from_dict
    from rayattr.data import read_rows, row_texts
    from rayattr.search import Index, dataset_gradients, query_gradients

    if bool(text) == bool(query_dataset):
        raise RayattrError("pass query text with --text \"...\" (repeatable) or a query dataset with --query-dataset D, not both")
    index = Index.open(run_path)
    with console.status("computing query gradients"):
        if text:
            labels, queries = text, query_gradients(index.meta, text, model)
        else:
            data = QUERY_DATA.build(options, dataset=query_dataset, max_length=index.meta.data.get("max_length"),
                                    truncation=index.meta.data.get("truncation", False))
            ids, queries = dataset_gradients(index.meta, data, model)
            labels = row_texts(read_rows(data, ids), data)
    with console.status("searching"):
        found = index.search(queries, k, unit_normalize=unit_norm, hessian=hessian, ann=ann, nprobes=nprobes,
                             refine_factor=refine_factor)
    train = from_dict(DataSpec, index.meta.data)
    hits = read_rows(train, found.ids[found.ids >= 0])
    texts = dict(zip(hits.column("id").to_pylist(), row_texts(hits, train)))
    for label, ids, scores in zip(labels, found.ids, found.scores):
        table = Table("rank", "score", "id", "training text", title=f"query: {escape(cut(label))}", title_justify="left")
        for rank, (row_id, score) in enumerate(zip(ids.tolist(), scores.tolist()), start=1):
            if row_id >= 0:
                table.add_row(str(rank), f"{score:.4g}", str(row_id), escape(cut(texts[row_id])))
        Console().print(table)
