"""Search latency and recall: exact streaming search against LanceDB IVF-PQ on generated vectors.

For each table size (``--size``, rows) it writes a gradient table of float16
vectors (default 1024-dim, in chunks, so memory stays bounded) and, chunk by
chunk as it writes, the exact cosine top-10 of the queries by brute force in
numpy (ground truth that does not go through the code under test). Then:

- exact: ``Index.search`` (streaming matmul over the table with a running
  top-k), one query at a time: latency p50/p99 and recall@10;
- ANN: per ``--sub-vectors`` value, the IVF-PQ index that ``rayattr index
  --ann`` builds (build time; ``--device cuda`` trains it on the GPU), then one
  query at a time per ``nprobes`` and ``--refine`` factor: latency p50/p99 and
  recall@10.

The vectors are clustered, low-rank plus noise, as projected gradients are:
documents on related topics have related gradients (1,000 clusters), the
gradient covariance has a decaying spectrum (a rank-256 latent space whose
i-th direction has variance 1/i), and isotropic noise of 0.3 of the signal's
scale sits on top. Their local intrinsic dimension at k=20 is ~30, in the range
of real embedding sets. Isotropic Gaussians (LID ~ the full 1024) would make
every ANN index look broken, and the previous generator (Gaussian centres plus
noise of half their scale, LID ~100) made each cluster's members near-ties.

    PYTHONPATH=benchmarks:. python benchmarks/query.py [--size small|full] [--rows 1e5 1e6] [--device cpu|cuda]
        [--sub-vectors 64 128] [--refine 1 10] [--queries 50]

``small`` is 1e5 rows, ``full`` 1e5 and 1e6 (``--rows`` overrides either).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from rich.table import Table

from common import write_results
from rayattr.search import REFINE_FACTOR, Index, build_ann_index
from rayattr.space import TableMeta
from rayattr.store import GradientTable
from rayattr.topk import TopK

SIZES = {"small": [100_000], "full": [100_000, 1_000_000]}  # table rows
K = 10
CHUNK_ROWS = 65_536
NPROBES = (10, 20, 50)
RANK = 256  # latent directions
CLUSTERS = 1_000
SPREAD = 0.5  # within-cluster latent spread, relative to the spread of the centres
NOISE = 0.3  # isotropic noise per coordinate, relative to the signal's


@dataclass(frozen=True)
class Embeddings:
    """Vectors ``(centre + SPREAD z) @ basis + noise``: clustered, low rank, plus isotropic noise."""

    basis: np.ndarray  # [RANK, dim]; row i scaled by i^-1/2, so variance falls off as 1/i
    centres: np.ndarray  # [CLUSTERS, RANK]
    noise: float  # isotropic standard deviation per coordinate

    @classmethod
    def make(cls, dim: int, rng: np.random.Generator) -> Embeddings:
        scales = np.arange(1, RANK + 1, dtype=np.float32) ** -0.5
        basis = rng.standard_normal((RANK, dim), dtype=np.float32) * scales[:, None]
        signal = np.sqrt((1 + SPREAD**2) * np.square(basis).sum() / dim)
        return cls(basis, rng.standard_normal((CLUSTERS, RANK), dtype=np.float32), NOISE * float(signal))

    def draw(self, n: int, rng: np.random.Generator) -> np.ndarray:
        latent = self.centres[rng.integers(0, CLUSTERS, n)] + SPREAD * rng.standard_normal((n, RANK), dtype=np.float32)
        return latent @ self.basis + self.noise * rng.standard_normal((n, self.basis.shape[1]), dtype=np.float32)


def synthetic_meta(dim: int) -> TableMeta:
    """Metadata of a table that no model made (the search never needs one)."""
    return TableMeta(model={"name": "synthetic"}, modules=[], projection={"type": "none", "dim": dim}, dtype="float16",
                     dim=dim, data={"generator": "clustered low-rank plus noise"})


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def write_table(uri: str, rows: int, embeddings: Embeddings, probe: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Write ``rows`` vectors in chunks; returns the exact cosine top-``K`` ids of ``probe`` ([Q, K]),
    scored chunk by chunk against the float16 rows as stored."""
    table = GradientTable.create(uri, synthetic_meta(embeddings.basis.shape[1]))
    unit_probe = unit(probe).T
    best = TopK.empty(K, len(probe))
    for start in range(0, rows, CHUNK_ROWS):
        ids = np.arange(start, min(rows, start + CHUNK_ROWS))
        vectors = embeddings.draw(len(ids), rng).astype(np.float16)
        table.append(pa.table({
            "id": pa.array(ids, pa.int64()),
            "num_tokens": pa.array(np.ones(len(ids), np.int32)),
            "loss": pa.array(np.zeros(len(ids), np.float32)),
            "grad": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), vectors.shape[1]),
        }))
        best = best.merge(TopK.of_block(K, ids, unit(vectors.astype(np.float32)) @ unit_probe))
    table.optimize()
    return best.ids


def timed_search(search, queries: np.ndarray, truth: np.ndarray) -> dict:
    """Latency p50/p99 (ms) of ``search(one_query)`` and recall@K against ``truth``."""
    times, hits = [], []
    for query, expected in zip(queries, truth):
        started = time.perf_counter()
        found = search(query[None]).ids[0]
        times.append((time.perf_counter() - started) * 1000)
        hits.append(len(set(found[:K].tolist()) & set(expected.tolist())) / K)
    return {"p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99)),
            "recall_at_10": float(np.mean(hits)), "queries": len(queries)}


def ann_runs(index: Index, probe: np.ndarray, truth: np.ndarray, sub_vectors: int | None, refines: list[int],
             accelerator: str | None) -> dict:
    """Build one IVF-PQ index and search it at every ``nprobes`` x refine factor."""
    started, cpu = time.perf_counter(), time.process_time()
    built = build_ann_index(index.table.uri, metric="cosine", num_sub_vectors=sub_vectors, accelerator=accelerator)
    result = {"build_seconds": time.perf_counter() - started, "build_cpu_seconds": time.process_time() - cpu,
              "partitions": built.num_partitions,
              "sub_vectors": built.num_sub_vectors, "searches": []}
    for nprobes in NPROBES:
        for refine in refines:
            def search(q: np.ndarray, n: int = nprobes, r: int = refine):
                return index.search(q, k=K, unit_normalize=True, ann=True, nprobes=n, refine_factor=r)
            search(probe[:1])  # warm: open the index files
            result["searches"].append({"nprobes": nprobes, "refine_factor": refine, **timed_search(search, probe, truth)})
    return result


def run_size(rows: int, args: argparse.Namespace, root: Path) -> dict:
    """Write one table, then time exact search and every requested ANN index on it."""
    rng = np.random.default_rng(args.seed)
    embeddings = Embeddings.make(args.dim, rng)
    probe = embeddings.draw(args.queries, rng)
    uri = str(root / f"rows-{rows}")
    started = time.perf_counter()
    truth = write_table(uri, rows, embeddings, probe, rng)
    write_seconds = time.perf_counter() - started
    index = Index.open(uri)
    exact = timed_search(lambda q: index.search(q, k=K, unit_normalize=True), probe[: args.exact_queries], truth)
    accelerator = "cuda" if args.device == "cuda" else None
    ann = [ann_runs(index, probe, truth, sub_vectors, args.refine, accelerator) for sub_vectors in args.sub_vectors]
    return {"rows": rows, "dim": args.dim, "write_seconds": write_seconds, "exact": exact, "ann": ann}


def rows_arg(text: str) -> int:
    """Row counts as ``100000`` or ``1e5``."""
    return int(float(text))


def query_table(results: list[dict], args: argparse.Namespace) -> Table:
    table = Table("rows", "search", "p50 ms", "p99 ms", "recall@10", "build s", "build CPU s",
                  title=f"top-{K} cosine search, {args.dim}-dim float16, one query at a time ({args.device})")
    for result in results:
        exact = result["exact"]
        table.add_row(f"{result['rows']:,}", "exact (streaming)", f"{exact['p50_ms']:.1f}", f"{exact['p99_ms']:.1f}",
                      f"{exact['recall_at_10']:.3f}", "-", "-")
        for built in result["ann"]:
            for row in built["searches"]:
                name = (f"IVF-PQ {built['partitions']}x{built['sub_vectors']}, nprobes {row['nprobes']}, "
                        f"refine {row['refine_factor']}")
                table.add_row("", name, f"{row['p50_ms']:.1f}", f"{row['p99_ms']:.1f}", f"{row['recall_at_10']:.3f}",
                              f"{built['build_seconds']:.1f}", f"{built['build_cpu_seconds']:.1f}")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--rows", type=rows_arg, nargs="+", default=None, help="table rows, e.g. 1e5 1e6 (default: by --size)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the IVF-PQ index is trained")
    parser.add_argument("--sub-vectors", type=int, nargs="+", default=[None],
                        help="PQ sub-vectors, one index per value (default: rayattr's)")
    parser.add_argument("--refine", type=int, nargs="+", default=[REFINE_FACTOR], help="refine factors searched")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--exact-queries", type=int, default=5, help="single-query exact scans timed (each reads the table)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_size(rows, args, Path(tmp)) for rows in args.rows or SIZES[args.size]]
    write_results("query", args.size, {"device": args.device, "sizes": results}, [query_table(results, args)])


if __name__ == "__main__":
    main()
