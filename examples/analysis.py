"""Downstream analysis of a finished run with plain LanceDB, pyarrow and pandas (no rayattr import).

A run path is a LanceDB database. ``scores`` holds one row per training
document (``id, num_tokens, scores[Q]``), ``topk`` the best documents per
query (``query_id, rank, id, score``), ``gradients`` the training gradients
when the run kept them (``--keep-gradients``), and ``query/`` the query
gradients. Each table's schema metadata (key ``rayattr``) says how its numbers
were made. This script answers three questions:

1. the top proponents of each query, joined with the training text;
2. the score distribution per data source (a column of the training data);
3. the nearest training neighbours of one training document in gradient space.

    python examples/analysis.py --run runs/demo --train TRAIN.parquet [--source-column kind] [--example 0]
"""

from __future__ import annotations

import argparse
import json

import lancedb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq


def top_proponents(db, train: pd.DataFrame, per_query: int) -> pd.DataFrame:
    """The ``topk`` table joined with the training text (dataset row id = parquet row number)."""
    topk = db.open_table("topk").to_pandas()
    joined = topk[topk["rank"] <= per_query].merge(train, left_on="id", right_index=True, how="left")
    return joined.sort_values(["query_id", "rank"])


def score_distribution(db, train: pd.DataFrame, source_column: str) -> pd.DataFrame:
    """Quantiles of every (document, query) score per data source, streamed batch by batch."""
    table = db.open_table("scores")
    parts = []
    for batch in table.to_lance().to_batches(columns=["id", "scores"], batch_size=8192):
        width = batch.schema.field("scores").type.list_size
        scores = batch.column("scores").flatten().to_numpy().reshape(-1, width)
        ids = batch.column("id").to_numpy()
        parts.append(pd.DataFrame({"source": train[source_column].to_numpy()[ids], "best": scores.max(1),
                                   "mean": scores.mean(1)}))
    frame = pd.concat(parts)
    return frame.groupby("source")["best"].describe(percentiles=[0.5, 0.9, 0.99])


def gradient_vectors(batch, meta: dict) -> np.ndarray:
    """A batch's ``grad`` vectors as float32: float rows as they are, ``int4`` rows decoded (README, Gradient table)."""
    if meta["dtype"] != "int4":
        return batch.column("grad").flatten().to_numpy().reshape(-1, meta["dim"]).astype(np.float32)
    packed = batch.column("grad").flatten().to_numpy().reshape(batch.num_rows, -1)
    nibbles = np.stack([packed & 0x0F, packed >> 4], axis=2).reshape(batch.num_rows, -1)[:, : meta["dim"]]
    codes = (nibbles.astype(np.int8) ^ 8) - 8  # two's complement, -8 .. 7
    steps = batch.column("grad_step").flatten().to_numpy().reshape(batch.num_rows, -1)
    sketched = meta["projection"]["type"] in ("afjl", "affd", "qk", "fjl", "dense")
    widths = [meta["dim"]] if sketched else [module["width"] for module in meta["modules"]]
    return (codes + 0.5) * np.repeat(steps, widths, axis=1)


def nearest_training_neighbours(db, example: int, k: int) -> pd.DataFrame:
    """Cosine neighbours of one training document's gradient, by an exact streaming scan."""
    table = db.open_table("gradients")
    meta = json.loads(table.schema.metadata[b"rayattr"])
    columns = ["id", "grad", "grad_step"] if meta["dtype"] == "int4" else ["id", "grad"]
    row = table.to_lance().to_table(columns=columns, filter=f"id = {example}")
    if not row.num_rows:
        raise SystemExit(f"document {example} is not in the gradients table")
    target = gradient_vectors(row.combine_chunks().to_batches()[0], meta)[0]
    target /= np.linalg.norm(target)
    best = None
    for batch in table.to_lance().to_batches(columns=columns, batch_size=8192):
        vectors = gradient_vectors(batch, meta)
        cosine = vectors @ target / np.maximum(np.linalg.norm(vectors, axis=1), 1e-30)
        block = pd.DataFrame({"id": batch.column("id").to_numpy(), "cosine": cosine})
        best = pd.concat([best, block]).nlargest(k + 1, "cosine") if best is not None else block.nlargest(k + 1, "cosine")
    return best[best["id"] != example].head(k)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/demo")
    parser.add_argument("--train", required=True, help="the training parquet the run scored")
    parser.add_argument("--source-column", default="kind", help="column that names each document's data source")
    parser.add_argument("--example", type=int, default=0, help="training id whose neighbours to list")
    parser.add_argument("-k", type=int, default=3)
    args = parser.parse_args()
    pd.set_option("display.width", 160)
    pd.set_option("display.max_colwidth", 80)

    db = lancedb.connect(args.run)
    train = pq.read_table(args.train, columns=["text", args.source_column]).to_pandas()
    print("== top proponents (first 3 queries)")
    proponents = top_proponents(db, train, args.k)
    print(proponents[proponents["query_id"] < 3][["query_id", "rank", "id", "score", "text"]].to_string(index=False))
    print(f"\n== best score per document, by {args.source_column}")
    print(score_distribution(db, train, args.source_column).to_string())
    if "gradients" in db.list_tables().tables:
        print(f"\n== nearest training neighbours of document {args.example}: {train['text'][args.example]!r}")
        neighbours = nearest_training_neighbours(db, args.example, args.k).merge(train, left_on="id", right_index=True)
        print(neighbours[["id", "cosine", "text"]].to_string(index=False))
    else:
        print("\n(no gradients table: rerun the trackstar/score step with --keep-gradients for neighbours)")


if __name__ == "__main__":
    main()
