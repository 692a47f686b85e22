"""What the default ``rayattr trackstar`` depends on, swept over projection seeds on a fact-tracing fixture.

Every point is one ``rayattr trackstar`` run (the CLI, Kronecker projection,
every Linear) that differs from the defaults in one setting: the normalizer
(Adafactor fitted from the data, or none), ``--target-downweight-components``
(the eigen-rank where the query and index spectra cross; the query moment has
rank at most the number of queries, and a target above it saturates lambda at
1, leaving the low-rank query moment as H_mix) and the projection
(``--projection-dim`` and the row ``--dtype``). Each point runs with several
projection seeds: the spread is what the random projection alone moves.

    PYTHONPATH=benchmarks:. python benchmarks/trackstar_sweep.py [--variant hard] [--seeds 0 1 2]
        [--targets 1000 300 100 30] [--normalizers adafactor none] [--projections 45:int4 16:float32]
        [--suffix _projection]

Writes results/trackstar_sweep_VARIANT[SUFFIX].json.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from rich.table import Table

from common import write_results
from peers import METRICS, Context, rayattr_trackstar
from rayattr.config import TRACKSTAR_GRADS
from rayattr.fixtures import default_cache_dir, fact_tracing_quality, make_fixture, train_fixture_model


def sweep(variant: str, seeds: list[int], targets: list[int], normalizers: list[str], projections: list[str],
          root: Path) -> list[dict]:
    fixture = make_fixture(default_cache_dir(), variant=variant)
    ctx = Context(fixture, train_fixture_model(fixture), root, pq.read_metadata(fixture.queries).num_rows,
                  pq.read_metadata(fixture.train).num_rows, 1, {})
    rows = []
    for normalizer, target, projection, seed in itertools.product(normalizers, targets, projections, seeds):
        name = f"{normalizer}-t{target}-p{projection}-s{seed}"
        print(name, flush=True)
        dim, dtype = projection.split(":")
        scores, seconds = rayattr_trackstar(ctx, name, "--normalizer", normalizer, "--seed", str(seed),
                                            "--target-downweight-components", str(target),
                                            "--projection-dim", dim, "--dtype", dtype)
        ranked = np.argsort(-scores, axis=1, kind="stable")
        quality = fact_tracing_quality(fixture, np.arange(ctx.num_queries), ranked)
        rows.append({"normalizer": normalizer, "target": target, "projection": projection, "seed": seed,
                     "wall_s": sum(seconds.values())}
                    | {m: quality[m] for m in METRICS})
    return rows


def summary_table(report: dict) -> Table:
    """Mean and range over seeds of each point."""
    table = Table("normalizer", "target", "projection", *[f"{m} mean [min, max]" for m in METRICS],
                  "recall@10 per seed", title=report["title"])
    points: dict[tuple, list[dict]] = {}
    for row in report["rows"]:
        points.setdefault((row["normalizer"], row["target"], row.get("projection", "16:float32")), []).append(row)
    for (normalizer, target, projection), runs in points.items():
        cells = []
        for metric in METRICS:
            values = np.array([r[metric] for r in runs])
            cells.append(f"{values.mean():.3f} [{values.min():.3f}, {values.max():.3f}]")
        table.add_row(normalizer, str(target), projection, *cells, ", ".join(f"{r['recall@10']:.3f}" for r in runs))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="hard", choices=["easy", "hard"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--targets", type=int, nargs="+", default=[1000, 300, 100, 30])
    parser.add_argument("--normalizers", nargs="+", default=["adafactor", "none"], choices=["adafactor", "none"])
    parser.add_argument("--projections", nargs="+", default=[f"{TRACKSTAR_GRADS.projection_dim}:{TRACKSTAR_GRADS.dtype}"],
                        help="P:DTYPE pairs, --projection-dim and --dtype of each point (default: the trackstar default)")
    parser.add_argument("--suffix", default="", help="appended to the results file name, to keep earlier sweeps")
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sweep-") as tmp:
        rows = sweep(args.variant, args.seeds, args.targets, args.normalizers, args.projections, Path(tmp))
    report = {"variant": args.variant, "seeds": args.seeds, "rows": rows, "wall_s": time.perf_counter() - started,
              "title": f"rayattr trackstar, {args.variant} fixture: one setting changed per row, "
                       f"{len(args.seeds)} projection seeds"}
    write_results(f"trackstar_sweep_{args.variant}{args.suffix}", "small", report, [summary_table(report)])


if __name__ == "__main__":
    main()
