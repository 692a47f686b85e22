"""TrackStar recall against the bytes stored per example, from one set of exact gradients.

Exact per-example gradients of every Linear module of the fine-tuned fixture
GPT-NeoX (queries: prompt + completion, loss on the completion; training
documents: summed loss) are computed once; each point then projects them
(Kronecker ``L G R^T`` with p x p per module, or one AFFD sketch of the
concatenated gradient), stores the training rows in the point's dtype
(``rayattr.codec``: float32, float16 or int4 codes; queries stay float32, as
``rayattr trackstar`` keeps them), and runs TrackStar exactly as ``rayattr
trackstar`` does: second moments of the query and training rows per module
(one block for a sketch), lambda where the pooled spectra cross at rank 100
(``mixing_lambda``), damping 0.1 x each module's mean eigenvalue,
``H_mix^-1/2`` on both sides, cosine. The default projection (``rayattr
trackstar``'s) runs beside the others; ``--sweep`` also runs it with one
setting changed at a time (crossing rank, damping, the index sample, Gaussian
factors, a rank budget). The
full-gradient reference applies the same damped ``H_mix^-1/2`` in the full
space (each module's mixed moment has rank at most queries + documents, so it
is inverted through the Gram matrix of its rows; the mean eigenvalue counts
the zero ones, as ``inverse_multiplier`` does). "whiten, then project" applies
that exact full-space ``H_mix^-1/2`` first and projects afterwards.

    PYTHONPATH=benchmarks:. python benchmarks/trackstar_storage.py [--variant hard] [--seeds 0 1 2] [--sweep]

Writes results/trackstar_storage_VARIANT.json.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import torch
from rich.table import Table

from common import tokenized_corpus, write_results
from fidelity import exact_gradients, kronecker, query_docs
from rayattr.codec import RowCodec
from rayattr.config import TRACKSTAR_GRADS
from rayattr.grads.allocation import allocate_ranks
from rayattr.fixtures import default_cache_dir, fact_tracing_quality, make_fixture, train_fixture_model
from rayattr.grads.sketch import make_sketch
from rayattr.hessian.factors import (
    TARGET_DOWNWEIGHT_COMPONENTS, apply_dense, eigh_psd, inverse_multiplier, mix, mixing_lambda,
)

METRICS = ("recall@1", "recall@10", "mrr")
DAMPING = 0.1
Blocks = list[tuple[int, int]]
KRONECKER_POINTS = ((8, "float32"), (16, "float32"), (16, "float16"), (22, "float16"), (32, "float16"), (45, "int4"),
                    (48, "float16"))


def second_moment_values(rows: torch.Tensor) -> torch.Tensor:
    """Nonzero-capable eigenvalues of ``rows^T rows / n`` through the smaller Gram matrix."""
    x = rows.double()
    small = x @ x.T if x.shape[0] <= x.shape[1] else x.T @ x
    return torch.linalg.eigvalsh(small / x.shape[0]).clamp_min(0.0)


@dataclass(frozen=True)
class Setting:
    """What TrackStar's operator depends on besides the rows: ``rayattr trackstar``'s defaults."""

    target: int = TARGET_DOWNWEIGHT_COMPONENTS  # --target-downweight-components
    damping: float = DAMPING  # times each module's mean eigenvalue
    sample: int | None = None  # --stats-sample-size: the first training rows the index moment sees; None: all


def crossing_lambda(queries: torch.Tensor, train: torch.Tensor, blocks: Blocks, target: int) -> float:
    lam, _ = mixing_lambda([second_moment_values(train[:, a:b]) for a, b in blocks],
                           [second_moment_values(queries[:, a:b]) for a, b in blocks], target)
    return lam


def whiten_small(queries: torch.Tensor, train: torch.Tensor, lam: float, setting: Setting = Setting()
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``H_mix^-1/2`` of one block small enough for its dense moment: rayattr's own operators."""
    moment = lambda x: x.double().T @ x.double() / x.shape[0]  # noqa: E731
    eigen = eigh_psd(mix(moment(queries), moment(train[: setting.sample]), lam))
    multiplier = inverse_multiplier(eigen.values, "damped_inverse", setting.damping, -0.5)
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


def whitened(queries: torch.Tensor, train: torch.Tensor, blocks: Blocks, setting: Setting = Setting()
             ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Both sides through ``H_mix^-1/2``; blocks wider than 4,096 (full gradients) at the default setting only."""
    lam = crossing_lambda(queries, train[: setting.sample], blocks, setting.target)
    if any(b - a > 4096 for a, b in blocks) and setting != Setting():
        raise ValueError("full-gradient blocks are whitened at the default setting only")
    parts = [whiten_small(queries[:, a:b], train[:, a:b], lam, setting) if b - a <= 4096
             else whiten_full(queries[:, a:b], train[:, a:b], lam) for a, b in blocks]
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
    parser.add_argument("--sweep", action="store_true", help="also vary each setting of the default, one at a time")
    args = parser.parse_args()
    torch.manual_seed(0)
    fixture = make_fixture(default_cache_dir(), variant=args.variant)
    started = time.perf_counter()
    docs = [query_docs(fixture, pq.read_metadata(fixture.queries).num_rows), tokenized_corpus(fixture)]
    (q_np, t_np), layouts = exact_gradients(train_fixture_model(fixture), docs)
    queries, train = torch.from_numpy(q_np), torch.from_numpy(t_np)
    print(f"exact gradients {tuple(train.shape)} in {time.perf_counter() - started:.0f} s", flush=True)
    rows: list[dict] = []

    def point(label: str, codec: RowCodec, seed: int | None, run: Callable[[], tuple[np.ndarray, float]]) -> None:
        began = time.perf_counter()
        scores, lam = run()
        rows.append({"method": label, "dims": codec.dim, "dtype": codec.dtype, "bytes": codec.bytes_per_row,
                     "seed": seed, "lambda": lam, "seconds": time.perf_counter() - began} | quality(fixture, scores))
        print(rows[-1], flush=True)

    def trackstar(q: torch.Tensor, t: torch.Tensor, blocks: Blocks, codec: RowCodec,
                  setting: Setting = Setting()) -> tuple[np.ndarray, float]:
        """TrackStar on float32 queries and training rows stored by ``codec``."""
        stored = torch.from_numpy(codec.encode(t.float().numpy())[0]).float()
        wq, wt, lam = whitened(q.float(), stored, blocks, setting)
        return cosine_scores(wq, wt), lam

    def kronecker_point(label: str, sizes: dict[str, tuple[int, int]], dtype: str, seed: int,
                        settings: dict[str, Setting] | None = None, **projection) -> None:
        """One projection of the exact gradients, scored at each setting (the default one when none given)."""
        kq, kt = (kronecker(x, layouts, sizes, seed, **projection) for x in (queries, train))
        widths = [sizes[lay.name][0] * sizes[lay.name][1] for lay in layouts]
        blocks = [(a, a + w) for a, w in zip(np.cumsum([0] + widths[:-1]).tolist(), widths)]
        codec = RowCodec(dtype, kq.shape[1], tuple(widths) if dtype == "int4" else ())
        for name, setting in (settings or {"": Setting()}).items():
            point(f"{label}{name}", codec, seed, lambda: trackstar(kq, kt, blocks, codec, setting))

    wq, wt, lam = whitened(queries, train, [(lay.offset, lay.offset + lay.width) for lay in layouts])
    point("full gradients", RowCodec("float32", queries.shape[1]), None, lambda: (cosine_scores(wq, wt), lam))
    square = lambda p: {lay.name: (p, p) for lay in layouts}  # noqa: E731
    for seed in args.seeds:
        for p, dtype in KRONECKER_POINTS:
            kronecker_point(f"Kronecker p={p}", square(p), dtype, seed)
        default_point(kronecker_point, layouts, seed, args.sweep)
        for dims in (2304, 4608):
            sketch = make_sketch("affd", queries.shape[1], dims, seed)
            sq, st = (torch.cat([sketch(x[i : i + 256]) for i in range(0, len(x), 256)]) for x in (queries, train))
            codec = RowCodec("float16", dims)
            point(f"AFFD sketch D={dims}", codec, seed, lambda: trackstar(sq, st, [(0, dims)], codec))
    for seed in args.seeds[:1]:
        point("whiten exactly, then Kronecker p=16", RowCodec("float32", 2304), seed,
              lambda: (cosine_scores(kronecker(wq.float(), layouts, square(16), seed),
                                     kronecker(wt.float(), layouts, square(16), seed)), lam))
    write_results(f"trackstar_storage_{args.variant}", "small", {"variant": args.variant, "rows": rows},
                  [summary_table(rows, args.variant)])


def default_point(kronecker_point: Callable, layouts, seed: int, sweep: bool) -> None:
    """``rayattr trackstar``'s projection (``TRACKSTAR_GRADS``); with ``sweep``, also with one thing changed at a
    time, at the same bytes or fewer (random rows instead of orthonormal ones are the curve's point of this p)."""
    p, dtype = TRACKSTAR_GRADS.projection_dim, TRACKSTAR_GRADS.dtype
    default = {"row_orthonormal": TRACKSTAR_GRADS.row_orthonormal, "kind": TRACKSTAR_GRADS.projection_type}
    label = f"Kronecker p={p}{', orthonormal rows' if default['row_orthonormal'] else ''} (default)"
    settings = {"": Setting()}
    if sweep:
        settings |= {f", target {t}": Setting(target=t) for t in (30, 300, 1000)}
        settings |= {f", damping {d}": Setting(damping=d) for d in (0.03, 0.3)}
        settings |= {f", index sample {n}": Setting(sample=n) for n in (500, 1000)}
    square = {lay.name: (p, p) for lay in layouts}
    kronecker_point(label, square, dtype, seed, settings, **default)
    if sweep:
        kronecker_point(f"{label}, Gaussian", square, dtype, seed, **(default | {"kind": "normal"}))
        shapes = {lay.name: (lay.out_features, lay.in_features) for lay in layouts}
        kronecker_point(f"{label}, rank budget {p * p} (p_out/p_in ~ sqrt(out/in))", allocate_ranks(shapes, p * p),
                        dtype, seed, **default)


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
