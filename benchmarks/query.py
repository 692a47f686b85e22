"""Search latency and recall: exact streaming search against LanceDB IVF-PQ on generated vectors.

For each table size it writes a gradient table of float16 vectors (default
1024-dim, in chunks, so memory stays bounded), drawn from a mixture of Gaussian
clusters (gradients of related documents point in related directions; pure
isotropic noise would be the worst case for any ANN index), then:

- exact: ``Index.search`` (streaming matmul over the table with a running
  top-k), one query at a time: latency p50/p99; a batch of all queries gives
  the ground truth;
- ANN: the IVF-PQ index ``rayattr index --ann`` builds (build time), then
  one query at a time for several ``nprobes``: latency p50/p99 and recall@10
  against the exact top-10 (cosine, as TrackStar scores).

    python benchmarks/query.py [--rows 100000 1000000] [--dim 1024] [--queries 50]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from rich.console import Console
from rich.table import Table

from rayattr.search import Index, build_ann_index
from rayattr.store import GradientTable, TableMeta

CHUNK_ROWS = 65_536
CLUSTERS = 1_000
NPROBES = (10, 20, 50)


def synthetic_meta(dim: int) -> TableMeta:
    """Metadata of a table that no model made (the search never needs one)."""
    return TableMeta(model={"name": "synthetic"}, modules=[], projection={"type": "none", "dim": dim}, dtype="float16",
                     dim=dim, data={"generator": "gaussian-mixture"})


def write_table(uri: str, rows: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """Write ``rows`` clustered float16 vectors in chunks; returns the cluster centres (for queries)."""
    centres = rng.standard_normal((CLUSTERS, dim), dtype=np.float32)
    table = GradientTable.create(uri, synthetic_meta(dim))
    for start in range(0, rows, CHUNK_ROWS):
        n = min(CHUNK_ROWS, rows - start)
        vectors = centres[rng.integers(0, CLUSTERS, n)] + 0.5 * rng.standard_normal((n, dim), dtype=np.float32)
        table.append(pa.table({
            "id": pa.array(np.arange(start, start + n), pa.int64()),
            "num_tokens": pa.array(np.ones(n, np.int32)),
            "loss": pa.array(np.zeros(n, np.float32)),
            "grad": pa.FixedSizeListArray.from_arrays(pa.array(vectors.astype(np.float16).ravel()), dim),
        }))
    table.optimize()
    return centres


def latencies(search, queries: np.ndarray) -> tuple[list[float], list[np.ndarray]]:
    """Per-query wall times (ms) and result ids of ``search(one_query)``."""
    times, ids = [], []
    for query in queries:
        started = time.perf_counter()
        result = search(query[None])
        times.append((time.perf_counter() - started) * 1000)
        ids.append(result.ids[0])
    return times, ids


def recall(found: list[np.ndarray], truth: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(f[:k].tolist()) & set(t[:k].tolist())) / k for f, t in zip(found, truth)]))


def run_size(rows: int, dim: int, queries: int, exact_queries: int, root: Path, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    uri = str(root / f"rows-{rows}")
    started = time.perf_counter()
    centres = write_table(uri, rows, dim, rng)
    write_seconds = time.perf_counter() - started
    probe = centres[rng.integers(0, CLUSTERS, queries)] + 0.5 * rng.standard_normal((queries, dim), dtype=np.float32)
    index = Index.open(uri)
    truth = index.search(probe, k=10, unit_normalize=True).ids  # one batched exact pass
    exact_ms, exact_ids = latencies(lambda q: index.search(q, k=10, unit_normalize=True), probe[:exact_queries])
    started = time.perf_counter()
    built = build_ann_index(uri, metric="cosine")
    build_seconds = time.perf_counter() - started
    ann = {}
    for nprobes in NPROBES:
        search = lambda q, n=nprobes: index.search(q, k=10, unit_normalize=True, ann=True, nprobes=n)  # noqa: E731
        search(probe[:1])  # warm: open the index files
        ms, ids = latencies(search, probe)
        ann[nprobes] = {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
                        "recall_at_10": recall(ids, truth, 10)}
    return {
        "rows": rows, "dim": dim, "queries": queries, "write_seconds": write_seconds,
        "exact": {"p50_ms": float(np.percentile(exact_ms, 50)), "p99_ms": float(np.percentile(exact_ms, 99)),
                  "recall_at_10": recall(exact_ids, truth, 10), "queries": exact_queries},
        "ann_build_seconds": build_seconds, "ann_partitions": built.num_partitions,
        "ann_sub_vectors": built.num_sub_vectors, "ann": ann,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--exact-queries", type=int, default=5, help="single-query exact scans timed (each reads the table)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/query.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_size(rows, args.dim, args.queries, args.exact_queries, Path(tmp), args.seed) for rows in args.rows]
    table = Table("rows", "search", "p50 ms", "p99 ms", "recall@10", "build s",
                  title=f"top-10 cosine search, {args.dim}-dim float16, one query at a time")
    for result in results:
        exact = result["exact"]
        table.add_row(f"{result['rows']:,}", "exact (streaming)", f"{exact['p50_ms']:.1f}", f"{exact['p99_ms']:.1f}",
                      f"{exact['recall_at_10']:.3f}", "-")
        for nprobes, row in result["ann"].items():
            table.add_row("", f"IVF-PQ nprobes {nprobes}", f"{row['p50_ms']:.1f}", f"{row['p99_ms']:.1f}",
                          f"{row['recall_at_10']:.3f}", f"{result['ann_build_seconds']:.1f}")
    Console().print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
