"""Inner-product fidelity of the stored rows: rayattr's TrackStar rows against Bergson's p = 16 index.

Every query and the first ``FIDELITY_DOCS`` training documents of a fixture
variant are built three ways, each tool as its own command line, the output
head left out by both: exact gradients (``rayattr build --projection-dim 0``),
the rows ``rayattr trackstar`` computes (its default projection, orthonormal
rows and row dtype, through ``rayattr build``, read back from the LanceDB
table), and ``bergson build`` at its default projection 16 (read from its
index, ``gradients.bin`` + ``info.json``). Per projection seed: the Pearson
correlation of every query x document inner product, and of every cosine,
with the exact ones. The peers' environments are ``peers.py``'s.

    PYTHONPATH=benchmarks:. python benchmarks/peer_fidelity.py [--variants easy hard] [--seeds 0 1 2]
        [--skip-install] [--workdir DIR]

Writes results/peer_fidelity.json (about 8 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from rich.table import Table

from common import write_results
from peer_tools import PEERS, peer_env, run_steps
from peers import HEAD, Context, bergson, bergson_data, peer_venvs, variant_context
from rayattr.config import TRACKSTAR_GRADS
from rayattr.store import GradientTable

FIDELITY_DOCS = 300  # training documents (x every query) of the Gram comparison
BERGSON_DIM = 16  # its default projection
Build = Callable[[str, list[str]], Path]  # (run name, extra arguments) -> run path, of the queries or the documents


def rayattr_rows(run: Path) -> np.ndarray:
    """A rayattr gradient table's rows in id order, decoded to float64."""
    return GradientTable.open(str(run)).read_matrix()[1].astype(np.float64)


def bergson_rows(run: Path) -> np.ndarray:
    """Rows of a Bergson index (``gradients.bin``, example i in row i), float64."""
    info = json.loads((run / "info.json").read_text())
    rows = np.memmap(run / "gradients.bin", dtype=np.dtype(info["base_dtype"]), mode="r",
                     shape=(info["num_grads"], sum(info["grad_sizes"].values())))
    return np.asarray(rows, np.float64)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def cosines(queries: np.ndarray, docs: np.ndarray) -> np.ndarray:
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    return unit(queries) @ unit(docs).T


def builders(ctx: Context) -> tuple[tuple[Build, Build], tuple[Build, Build]]:
    """``((rayattr queries, rayattr documents), (Bergson queries, Bergson documents))`` build commands."""
    train, queries, model = bergson_data(ctx)
    ray_sides = {"queries": ctx.model_args(ctx.fixture.queries, "--prompt-column", "prompt", "--completion-column",
                                           "completion"),
                 "docs": ctx.model_args(ctx.fixture.train, "--split", f"train[:{FIDELITY_DOCS}]")}
    berg_sides = {"queries": queries, "docs": [*train, "--split", f"train[:{FIDELITY_DOCS}]"]}

    def rayattr_side(side: str) -> Build:
        def build(name: str, extra: list[str]) -> Path:
            run = f"fidelity/{name}-{side}"
            if not (ctx.root / run).exists():  # the exact rows serve every seed
                run_steps([("build", ctx.rayattr("build", run, *ray_sides[side], *HEAD, *extra))], ctx.log("fidelity"))
            return ctx.root / run
        return build

    def bergson_side(side: str) -> Build:
        def build(name: str, extra: list[str]) -> Path:
            run = ctx.root / f"fidelity/{name}-{side}"
            run_steps([("build", bergson(ctx, "build", str(run), "--model", str(model), *berg_sides[side],
                                         "--projection_dim", str(BERGSON_DIM), "--filter_modules", "*lm_head,*embed_out",
                                         "--nproc_per_node", "1", "--token_batch_size", "256", *extra))],
                      ctx.log("fidelity"), peer_env(ctx.venvs["bergson"]))
            return run
        return build

    return (rayattr_side("queries"), rayattr_side("docs")), (bergson_side("queries"), bergson_side("docs"))


def gram_fidelity(variant: str, ctx: Context, seeds: list[int]) -> list[dict]:
    """Per tool and projection seed, correlations with the exact Gram matrix of one variant."""
    (ray_q, ray_d), (berg_q, berg_d) = builders(ctx)
    exact = [rayattr_rows(build("exact", ["--projection-dim", "0"])) for build in (ray_q, ray_d)]
    exact_ip, exact_cos = exact[0] @ exact[1].T, cosines(*exact)
    grads = TRACKSTAR_GRADS
    ours_args = ["--projection-dim", str(grads.projection_dim), "--dtype", grads.dtype,
                 *(["--row-orthonormal"] if grads.row_orthonormal else [])]
    ours_label = f"p={grads.projection_dim}{' orthonormal' if grads.row_orthonormal else ''} {grads.dtype}"
    rows = []
    for seed in seeds:
        runs = [build(f"trackstar-rows-seed{seed}", [*ours_args, "--seed", str(seed)]) for build in (ray_q, ray_d)]
        ours, our_bytes = [rayattr_rows(run) for run in runs], GradientTable.open(str(runs[1])).codec.bytes_per_row
        theirs = [bergson_rows(build(f"bergson-p{BERGSON_DIM}-seed{seed}", ["--projection_seed", str(seed)]))
                  for build in (berg_q, berg_d)]
        for tool, projection, pair, row_bytes in (
            ("rayattr", ours_label, ours, our_bytes),
            (f"Bergson {PEERS['bergson'].version}", f"p={BERGSON_DIM} float32", theirs, theirs[1].shape[1] * 4),
        ):
            rows.append({"variant": variant, "tool": tool, "projection": projection, "seed": seed,
                         "dims": pair[1].shape[1], "bytes": row_bytes,
                         "pearson": pearson(pair[0] @ pair[1].T, exact_ip),
                         "pearson_cosine": pearson(cosines(*pair), exact_cos)})
            print(rows[-1], flush=True)
    return rows


def fidelity_table(rows: list[dict]) -> Table:
    """Mean [min, max] over projection seeds."""
    table = Table("variant", "tool", "projection", "dims", "bytes/example", "Pearson, inner products",
                  "Pearson, cosines", title=f"Inner-product fidelity of the stored rows against exact gradients (every "
                                            f"query x the first {FIDELITY_DOCS} training documents, output head left out)")
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["variant"], row["tool"], row["projection"]), []).append(row)
    for (variant, tool, projection), runs in groups.items():
        cells = []
        for key in ("pearson", "pearson_cosine"):
            values = np.array([r[key] for r in runs])
            cells.append(f"{values.mean():.3f} [{values.min():.3f}, {values.max():.3f}]")
        table.add_row(variant, tool, projection, f"{runs[0]['dims']:,}", f"{runs[0]['bytes']:,}", *cells)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", choices=["easy", "hard"], default=["easy", "hard"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--skip-install", action="store_true", help="use the peers' environments as they are")
    parser.add_argument("--torch", default="torch==2.13.0", help="what the peers' environments install torch from")
    parser.add_argument("--workdir", help="keep every job's output in this new directory (default: a temporary one)")
    args = parser.parse_args()
    started = time.perf_counter()
    venvs = peer_venvs(args)
    with tempfile.TemporaryDirectory(prefix="peer-fidelity-") as tmp:
        root = Path(args.workdir or tmp)
        rows = [row for variant in args.variants
                for row in gram_fidelity(variant, variant_context(variant, root, 1, venvs), args.seeds)]
    write_results("peer_fidelity", "small", {"rows": rows, "wall_s": time.perf_counter() - started},
                  [fidelity_table(rows)])


if __name__ == "__main__":
    main()
