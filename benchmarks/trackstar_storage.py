"""TrackStar recall against the bytes stored per example, from one set of exact gradients.

Exact per-example gradients of every Linear module of the fine-tuned fixture
GPT-NeoX (queries: prompt + completion, loss on the completion; training
documents: summed loss) are computed once; each point then projects them
(Kronecker ``L G R^T`` with p x p per module, or one AFFD sketch of the
concatenated gradient), rounds the rows to the stored dtype, and runs
TrackStar exactly as ``rayattr trackstar`` does: second moments of the query
and training rows per module (one block for a sketch), lambda where the pooled
spectra cross at rank ``--target`` (``mixing_lambda``), damping 0.1 x each
module's mean eigenvalue, ``H_mix^-1/2`` on both sides, cosine. The
full-gradient reference applies the same damped ``H_mix^-1/2`` in the full
space (each module's mixed moment has rank at most queries + documents, so it
is inverted through the Gram matrix of its rows; the mean eigenvalue counts
the zero ones, as ``inverse_multiplier`` does). "whiten, then project" applies
that exact full-space ``H_mix^-1/2`` first and projects afterwards.

    PYTHONPATH=benchmarks:. python benchmarks/trackstar_storage.py [--variant hard] [--seeds 0 1 2]

Writes results/trackstar_storage_VARIANT.json (about 10 minutes on 2 cores, most of it the full-gradient reference).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import pyarrow.parquet as pq
import torch
from rich.table import Table

from common import tokenized_corpus, write_results
from fidelity import exact_gradients, kronecker, query_docs
from rayattr.fixtures import default_cache_dir, fact_tracing_quality, make_fixture, train_fixture_model
from rayattr.grads.sketch import make_sketch
from rayattr.hessian.factors import apply_dense, eigh_psd, inverse_multiplier, mix, mixing_lambda

METRICS = ("recall@1", "recall@10", "mrr")
DAMPING = 0.1
BYTES = {"float32": 4, "float16": 2}
Blocks = list[tuple[int, int]]


def second_moment_values(rows: torch.Tensor) -> torch.Tensor:
    """Nonzero-capable eigenvalues of ``rows^T rows / n`` through the smaller Gram matrix."""
    x = rows.double()
    small = x @ x.T if x.shape[0] <= x.shape[1] else x.T @ x
    return torch.linalg.eigvalsh(small / x.shape[0]).clamp_min(0.0)


def crossing_lambda(queries: torch.Tensor, train: torch.Tensor, blocks: Blocks, target: int) -> float:
    lam, _ = mixing_lambda([second_moment_values(train[:, a:b]) for a, b in blocks],
                           [second_moment_values(queries[:, a:b]) for a, b in blocks], target)
    return lam


def whiten_small(queries: torch.Tensor, train: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``H_mix^-1/2`` of one block small enough for its dense moment: rayattr's own operators."""
    moment = lambda x: x.double().T @ x.double() / x.shape[0]  # noqa: E731
    eigen = eigh_psd(mix(moment(queries), moment(train), lam))
    multiplier = inverse_multiplier(eigen.values, "damped_inverse", DAMPING, -0.5)
    return apply_dense(queries.double(), eigen, multiplier), apply_dense(train.double(), eigen, multiplier)


def whiten_full(queries: torch.Tensor, train: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The same operator for a block wider than its rows: ``H_mix = M^T M`` with ``M`` the scaled rows, so
    ``H^-1/2 x = x / sqrt(f) + W^T diag((s + f)^-1/2 - f^-1/2) W x`` from the eigenpairs ``s`` of ``M M^T``."""
    m = torch.cat([queries.double() * (lam / len(queries)) ** 0.5, train.double() * ((1 - lam) / len(train)) ** 0.5])
    floor = DAMPING * float(m.square().sum()) / m.shape[1]  # mean eigenvalue over all m.shape[1] of them
    values, vectors = torch.linalg.eigh(m @ m.T)
    keep = values > values.max() * 1e-12
    basis = (vectors[:, keep].T @ m) / values[keep].sqrt()[:, None]  # orthonormal rows spanning the moment
    gain = (values[keep] + floor).rsqrt() - floor**-0.5
    op = lambda x: floor**-0.5 * x.double() + ((x.double() @ basis.T) * gain) @ basis  # noqa: E731
    return op(queries), op(train)


def whitened(queries: torch.Tensor, train: torch.Tensor, blocks: Blocks, target: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    lam = crossing_lambda(queries, train, blocks, target)
    parts = [(whiten_small if b - a <= 4096 else whiten_full)(queries[:, a:b], train[:, a:b], lam) for a, b in blocks]
    return torch.cat([q for q, _ in parts], 1), torch.cat([t for _, t in parts], 1), lam


def cosine_scores(queries: torch.Tensor, train: torch.Tensor) -> np.ndarray:
    unit = lambda x: x / x.norm(dim=1, keepdim=True).clamp_min(1e-300)  # noqa: E731
    return (unit(queries.double()) @ unit(train.double()).T).numpy()


def quality(fixture, scores: np.ndarray) -> dict[str, float]:
    ranked = np.argsort(-scores, axis=1, kind="stable")
    found = fact_tracing_quality(fixture, np.arange(len(scores)), ranked)
    return {m: found[m] for m in METRICS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=("easy", "hard"), default="hard")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--target", type=int, default=100, help="target_downweight_components (the default)")
    args = parser.parse_args()
    torch.manual_seed(0)
    fixture = make_fixture(default_cache_dir(), variant=args.variant)
    started = time.perf_counter()
    docs = [query_docs(fixture, pq.read_metadata(fixture.queries).num_rows), tokenized_corpus(fixture)]
    (q_np, t_np), layouts = exact_gradients(train_fixture_model(fixture), docs)
    queries, train = torch.from_numpy(q_np), torch.from_numpy(t_np)
    print(f"exact gradients {tuple(train.shape)} in {time.perf_counter() - started:.0f} s", flush=True)
    modules = [(lay.offset, lay.offset + lay.width) for lay in layouts]
    rows: list[dict] = []

    def point(label: str, dims: int, dtype: str, seed: int | None, run: Callable[[], tuple[np.ndarray, float]]) -> None:
        began = time.perf_counter()
        scores, lam = run()
        rows.append({"method": label, "dims": dims, "dtype": dtype, "bytes": dims * BYTES[dtype], "seed": seed,
                     "lambda": lam, "seconds": time.perf_counter() - began} | quality(fixture, scores))
        print(rows[-1], flush=True)

    def trackstar(q: torch.Tensor, t: torch.Tensor, blocks: Blocks) -> tuple[np.ndarray, float]:
        wq, wt, lam = whitened(q, t, blocks, args.target)
        return cosine_scores(wq, wt), lam

    def stored(x: torch.Tensor, dtype: str) -> torch.Tensor:
        return x.to(getattr(torch, dtype)).float()

    wq, wt, lam = whitened(queries, train, modules, args.target)
    point("full gradients", queries.shape[1], "float32", None, lambda: (cosine_scores(wq, wt), lam))
    for seed in args.seeds:
        for p, dtype in ((8, "float32"), (16, "float32"), (16, "float16"), (22, "float16"), (32, "float16"),
                         (48, "float16")):
            kq, kt = (stored(kronecker(x, layouts, {lay.name: (p, p) for lay in layouts}, seed), dtype)
                      for x in (queries, train))
            blocks = [(i * p * p, (i + 1) * p * p) for i in range(len(layouts))]
            point(f"Kronecker p={p}", kq.shape[1], dtype, seed, lambda: trackstar(kq, kt, blocks))
        for dims in (2304, 4608):
            sketch = make_sketch("affd", queries.shape[1], dims, seed)
            sq, st = (stored(torch.cat([sketch(x[i : i + 256]) for i in range(0, len(x), 256)]), "float16")
                      for x in (queries, train))
            point(f"AFFD sketch D={dims}", dims, "float16", seed, lambda: trackstar(sq, st, [(0, dims)]))
    for seed in args.seeds[:1]:
        sizes = {lay.name: (16, 16) for lay in layouts}
        point("whiten exactly, then Kronecker p=16", 2304, "float32", seed,
              lambda: (cosine_scores(kronecker(wq.float(), layouts, sizes, seed),
                                     kronecker(wt.float(), layouts, sizes, seed)), lam))
    write_results(f"trackstar_storage_{args.variant}", "small", {"variant": args.variant, "rows": rows},
                  [summary_table(rows, args.variant)])


def summary_table(rows: list[dict], variant: str) -> Table:
    """Mean [min, max] over projection seeds per point."""
    table = Table("projection", "dims", "dtype", "bytes/example", *[f"{m} mean [min, max]" for m in METRICS],
                  title=f"TrackStar on the {variant} fixture against the bytes stored per example")
    points: dict[tuple, list[dict]] = {}
    for row in rows:
        points.setdefault((row["method"], row["dims"], row["dtype"]), []).append(row)
    for (method, dims, dtype), runs in points.items():
        cells = []
        for metric in METRICS:
            values = np.array([r[metric] for r in runs])
            cells.append(f"{values.mean():.3f}" if len(values) == 1 else
                         f"{values.mean():.3f} [{values.min():.3f}, {values.max():.3f}]")
        table.add_row(method, f"{dims:,}", dtype, f"{runs[0]['bytes']:,}", *cells)
    return table


if __name__ == "__main__":
    main()
