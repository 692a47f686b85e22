"""End-to-end demo: which training documents made the model state these facts?

Generates the offline fixture (tokenizer, tiny GPT-NeoX fine-tuned on a
synthetic biography corpus, queries with ground-truth supporting documents),
runs the full TrackStar pipeline with the ``rayattr trackstar`` command on an
embedded local Ray, and then reads the results back with plain LanceDB, as
any downstream analysis would: per-query top-5 with ground-truth marks, and
recall@10 and MRR over all queries. Last, it writes the run's static HTML report
(what `rayattr report RUN` writes) and prints where it is.

    python examples/demo.py [--run runs/demo] [--workers 2]
"""

from __future__ import annotations

import argparse
import json

import lancedb
import numpy as np
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table
from shell import rayattr

from rayattr.api import ReportConfig, run
from rayattr.fixtures import default_cache_dir, fact_tracing_quality, make_fixture, train_fixture_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/demo", help="run directory (LanceDB database)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--show", type=int, default=4, help="queries to print")
    args = parser.parse_args()
    console = Console()

    fixture = make_fixture(default_cache_dir())
    model_dir = train_fixture_model(fixture)
    rayattr(console, "trackstar", args.run, "--model", str(model_dir), "--dataset", str(fixture.train),
            "--query-dataset", str(fixture.queries), "--query-prompt-column", "prompt",
            "--query-completion-column", "completion", "--optimizer-state", str(model_dir / "optimizer.pt"),
            "--keep-gradients", "--workers", str(args.workers), "--resume")

    db = lancedb.connect(args.run)
    topk = db.open_table("topk").to_pandas()
    texts = pq.read_table(fixture.train, columns=["text"]).column("text").to_pylist()
    queries = pq.read_table(fixture.queries).to_pylist()
    truth = json.loads(fixture.ground_truth.read_text())
    ranked = {qid: group.sort_values("rank")["id"].to_numpy() for qid, group in topk.groupby("query_id")}
    query_ids = np.array(sorted(ranked))
    for qid in query_ids[: args.show]:
        query = queries[qid]
        support = set(truth[query["query_id"]])
        table = Table("rank", "score", "support", "training document", title=f"query: {query['text']!r}")
        for row in topk[topk.query_id == qid].sort_values("rank").head(5).itertuples():
            table.add_row(str(row.rank), f"{row.score:.3f}", "yes" if row.id in support else "", texts[row.id])
        console.print(table)
    quality = fact_tracing_quality(fixture, query_ids, np.stack([ranked[q] for q in query_ids]))
    console.print(
        f"fact tracing over {quality['queries']} queries: recall@10 = {quality['recall@10']:.3f} "
        f"(random ranking: {quality['random_recall@10']:.4f}), MRR = {quality['mrr']:.3f}"
    )
    console.print(f"HTML report (open it in a browser): {run(ReportConfig(args.run))}", soft_wrap=True)


if __name__ == "__main__":
    main()
