"""Fidelity of projections and sketches on real per-example gradients of the fixture model.

For the fine-tuned and the random-init tiny GPT-NeoX: exact per-example
gradients (all Linear modules, concatenated) of fixture queries and training
documents; then, per projection type and budget D, Pearson and Spearman
correlation between projected and exact query-train inner products (and
Pearson of cosines), the mean top-10 overlap of each query's attribution
ranking, and the smallest D reaching Pearson r > 0.95 / 0.98 / 0.99.
Kronecker types get D as a budget: p = floor(sqrt(D / modules)) per side, or
a per-module rank budget D // modules (``kronecker-alloc``), so their real
dimension is at most D (the JSON keeps it). One seed per point.

    python benchmarks/fidelity.py [--size small|full] [--out benchmarks/results/fidelity.json]
    (from the repository root, with PYTHONPATH=.)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM

from common import pyplot, tokenized_corpus
from rayattr.config import GradSpec, RayattrError
from rayattr.data import TokenizedDocs
from rayattr.fixtures import default_cache_dir, make_fixture, train_fixture_model
from rayattr.grads.allocation import allocate_ranks
from rayattr.grads.collector import ModuleLayout
from rayattr.grads.engine import GradientEngine
from rayattr.grads.projection import module_projection
from rayattr.grads.sketch import SKETCHES, make_sketch
from rayattr.tokenizer import load_tokenizer

SIZES = {  # max log2 D, training documents, queries (small: a few minutes on 2 CPU cores; full: ~8)
    "small": (14, 64, 12),
    "full": (16, 96, 16),
}
TYPES = ("kronecker-rademacher", "kronecker-alloc", *SKETCHES)
THRESHOLDS = (0.95, 0.98, 0.99)
TOP = 10


def query_docs(fixture, count: int) -> TokenizedDocs:
    """Fixture queries as prompt + completion, loss on the completion."""
    tokenizer = load_tokenizer(str(fixture.neox))
    rows = pq.read_table(fixture.queries, columns=["prompt", "completion"]).to_pylist()[:count]
    prompts = [tokenizer(r["prompt"])["input_ids"] for r in rows]
    tokens = [np.array(p + tokenizer(r["completion"], add_special_tokens=False)["input_ids"], np.int64)
              for p, r in zip(prompts, rows)]
    return TokenizedDocs(np.arange(len(tokens)), tokens, np.array([len(p) for p in prompts], np.int64))


def exact_gradients(model_dir: Path, docs: list[TokenizedDocs]) -> tuple[list[np.ndarray], list[ModuleLayout]]:
    """Full concatenated per-example gradients of each document set."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pad_id = load_tokenizer(str(model_dir)).pad_token_id
    engine = GradientEngine(model, GradSpec(projection_dim=0), pad_id)
    try:
        return [engine.rows(d).grads for d in docs], engine.layouts
    finally:
        engine.close()


def kronecker(rows: torch.Tensor, layouts: list[ModuleLayout], sizes: dict[str, tuple[int, int]],
              seed: int = 0, kind: str = "rademacher", row_orthonormal: bool = False) -> torch.Tensor:
    """``L G R^T`` per module of full rows, concatenated (what the engine's hooks compute)."""
    parts = []
    for lay in layouts:
        proj = module_projection(lay.name, lay.out_features, lay.in_features, sizes[lay.name], kind, seed,
                                 row_orthonormal)
        block = rows[:, lay.offset : lay.offset + lay.width].view(-1, lay.out_features, lay.in_features)
        parts.append((proj.left @ block @ proj.right.T).flatten(1))
    return torch.cat(parts, 1)


def project(kind: str, dim: int, rows: torch.Tensor, layouts: list[ModuleLayout]) -> torch.Tensor:
    shapes = {lay.name: (lay.out_features, lay.in_features) for lay in layouts}
    if kind == "kronecker-rademacher":
        p = int((dim // len(layouts)) ** 0.5)
        return kronecker(rows, layouts, {name: (p, p) for name in shapes})
    if kind == "kronecker-alloc":
        return kronecker(rows, layouts, allocate_ranks(shapes, dim // len(layouts)))
    return make_sketch(kind, rows.shape[1], dim, seed=0)(rows)


def ranks(x: np.ndarray) -> np.ndarray:
    out = np.empty(x.size)
    out[np.argsort(x, kind="stable")] = np.arange(x.size)
    return out


def fidelity(exact: np.ndarray, approx: np.ndarray, exact_cos: np.ndarray, approx_cos: np.ndarray) -> dict[str, float]:
    """Correlations over all query-train pairs and the mean top-10 overlap per query."""
    top_exact = np.argsort(-exact, axis=1)[:, :TOP]
    top_approx = np.argsort(-approx, axis=1)[:, :TOP]
    overlap = np.mean([len(set(a) & set(b)) / TOP for a, b in zip(top_exact, top_approx)])
    return {
        "pearson": float(np.corrcoef(exact.ravel(), approx.ravel())[0, 1]),
        "spearman": float(np.corrcoef(ranks(exact.ravel()), ranks(approx.ravel()))[0, 1]),
        "pearson_cosine": float(np.corrcoef(exact_cos.ravel(), approx_cos.ravel())[0, 1]),
        "top10_overlap": float(overlap),
    }


def cosines(queries: torch.Tensor, train: torch.Tensor) -> np.ndarray:
    unit = lambda x: x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)  # noqa: E731
    return (unit(queries) @ unit(train).T).numpy()


def evaluate(queries: np.ndarray, train: np.ndarray, layouts, dims: list[int]) -> dict[str, list[dict]]:
    q, t = torch.from_numpy(queries).double(), torch.from_numpy(train).double()
    exact, exact_cos = (q @ t.T).numpy(), cosines(q, t)
    both = torch.from_numpy(np.concatenate((queries, train)))
    results: dict[str, list[dict]] = {kind: [] for kind in TYPES}
    for kind in TYPES:
        for dim in dims:
            start = time.perf_counter()
            try:
                sketched = project(kind, dim, both, layouts).double()
            except RayattrError as exc:  # the dense reference refuses large matrices
                results[kind].append({"D": dim, "refused": str(exc)})
                continue
            sq, st = sketched[: len(queries)], sketched[len(queries):]
            row = {"D": dim, "actual_dim": sketched.shape[1], "seconds": time.perf_counter() - start}
            results[kind].append(row | fidelity(exact, (sq @ st.T).numpy(), exact_cos, cosines(sq, st)))
    return results


def smallest_dims(rows: list[dict]) -> dict[str, int | None]:
    """The smallest D whose Pearson r of inner products exceeds each threshold."""
    return {str(x): next((r["D"] for r in rows if r.get("pearson", -1) > x), None) for x in THRESHOLDS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="small")
    parser.add_argument("--out", default="benchmarks/results/fidelity.json")
    args = parser.parse_args()
    max_log, n_train, n_queries = SIZES[args.size]
    dims = [2**k for k in range(6, max_log + 1)]

    fixture = make_fixture(default_cache_dir())
    docs = [query_docs(fixture, n_queries), tokenized_corpus(fixture, n_train)]
    models = {"fine-tuned": train_fixture_model(fixture), "random-init": fixture.neox}
    report: dict = {"size": args.size, "train_docs": n_train, "queries": n_queries, "models": {}}
    console = Console()
    for label, path in models.items():
        (queries, train), layouts = exact_gradients(path, docs)
        results = evaluate(queries, train, layouts, dims)
        report["models"][label] = {
            "gradient_length": int(queries.shape[1]), "modules": len(layouts), "results": results,
            "smallest_dim": {kind: smallest_dims(rows) for kind, rows in results.items()},
        }
        print_tables(console, label, report["models"][label], dims)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    plot(report, out.with_suffix(".png"), console)


def print_tables(console: Console, label: str, model: dict, dims: list[int]) -> None:
    title = (f"{label}: Pearson r of inner products (N = {model['gradient_length']:,}, "
             f"{model['modules']} modules; '-' refused)")
    table = Table("type", *[f"2^{d.bit_length() - 1}" for d in dims], title=title)
    for kind, rows in model["results"].items():
        table.add_row(kind, *[f"{r['pearson']:.3f}" if "pearson" in r else "-" for r in rows])
    console.print(table)
    table = Table("type", *[f"r > {x}" for x in THRESHOLDS], "top-10 overlap at 2^10", title=f"{label}: smallest D")
    for kind, found in model["smallest_dim"].items():
        at = next((r for r in model["results"][kind] if r["D"] == 1024 and "top10_overlap" in r), None)
        table.add_row(kind, *[f"2^{d.bit_length() - 1}" if d else "> max" for d in found.values()],
                      f"{at['top10_overlap']:.2f}" if at else "-")
    console.print(table)


def plot(report: dict, path: Path, console: Console) -> None:
    plt = pyplot(console)
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(report["models"]), figsize=(6 * len(report["models"]), 4), sharey=True)
    for ax, (label, model) in zip(np.atleast_1d(axes), report["models"].items()):
        for kind, rows in model["results"].items():
            done = [r for r in rows if "pearson" in r]
            ax.plot([r["D"] for r in done], [r["pearson"] for r in done], marker="o", label=kind)
        ax.set(xscale="log", xlabel="D", title=label, ylabel="Pearson r (inner products)")
        ax.grid(True, alpha=0.3)
    np.atleast_1d(axes)[0].legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
