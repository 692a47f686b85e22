"""End-to-end demo: which training documents made the model state these facts?

Generates the offline fixture (tokenizer, tiny GPT-NeoX fine-tuned on a
synthetic biography corpus), builds a gradient index of the corpus through the
Ray pipeline into LanceDB, collects the query gradients the same way, and
ranks training documents by gradient cosine similarity, reading both tables
with plain LanceDB/numpy as any downstream analysis would.

    python examples/demo.py [--run runs/demo] [--workers 2]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

from rayattr.api import build_index, open_index
from rayattr.config import DataSpec, GradSpec, ModelSpec, RunSpec
from rayattr.fixtures import default_cache_dir, make_fixture, train_fixture_model


def unit_rows(matrix: np.ndarray) -> np.ndarray:
    matrix = matrix.astype(np.float32)
    return matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/demo", help="run directory (LanceDB database)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--show", type=int, default=5, help="queries to print")
    args = parser.parse_args()
    console = Console()

    fixture = make_fixture(default_cache_dir())
    model_dir = str(train_fixture_model(fixture))
    console.print(f"fixture: {fixture.root}\nfine-tuned model: {model_dir}")

    grads = GradSpec(projection_dim=16)
    model = ModelSpec(model=model_dir)
    index_spec = RunSpec(model, DataSpec(str(fixture.train)), grads)
    query_spec = RunSpec(model, DataSpec(str(fixture.queries), prompt_column="prompt", completion_column="completion"), grads)
    for name, spec, path in [("index", index_spec, args.run), ("queries", query_spec, f"{args.run}/query")]:
        done = build_index(path, spec, workers=args.workers)
        console.print(f"{name}: {done.written} rows, {done.tokens:,} tokens in {done.seconds:.1f} s")

    train_ids, train_vectors = open_index(args.run).read_matrix()
    query_ids, query_vectors = open_index(f"{args.run}/query").read_matrix()
    scores = unit_rows(query_vectors) @ unit_rows(train_vectors).T
    ranking = np.argsort(-scores, axis=1)

    texts = pq.read_table(fixture.train, columns=["text"]).column("text").to_pylist()
    queries = pq.read_table(fixture.queries).to_pylist()
    truth = json.loads(fixture.ground_truth.read_text())
    hits_at_5 = [
        bool(set(train_ids[ranking[q, :5]].tolist()) & set(truth[queries[qid]["query_id"]]))
        for q, qid in enumerate(query_ids)
    ]
    for q, qid in enumerate(query_ids[: args.show]):
        query = queries[qid]
        support = set(truth[query["query_id"]])
        table = Table("rank", "cosine", "support", "training document", title=f"query: {query['text']!r}")
        for rank, column in enumerate(ranking[q, :5], start=1):
            doc = int(train_ids[column])
            table.add_row(str(rank), f"{scores[q, column]:.3f}", "yes" if doc in support else "", texts[doc])
        console.print(table)
    console.print(f"queries with a ground-truth support in the top 5: {np.mean(hits_at_5):.0%} of {len(hits_at_5)}")


if __name__ == "__main__":
    main()
