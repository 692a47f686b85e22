"""Fact-tracing quality per method on the fixture, and on-the-fly scoring throughput.

For each method, the fixture's queries (prompt/completion, loss on the
completion) are scored against all training documents and the ranking is
compared with the ground-truth supporting documents: recall@10 and MRR.
Methods: raw inner product, cosine, cosine with the Adafactor normalizer from
the fine-tune's AdamW state, cosine with normalizer and the index second
moment (``H^-1/2`` both sides), and TrackStar (mixed query/index second
moment). Scoring a built table (``--index-path``) gives the same scores as on
the fly (tests/test_score.py), so the quality rows reuse one index per
normalizer; the throughput rows time a build and an on-the-fly score of the
same corpus with the same workers.

    python benchmarks/fact_tracing.py [--variant easy] [--workers 2] [--out benchmarks/results/fact_tracing.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from rayattr.config import DataSpec, GradSpec, ModelSpec, RunSpec
from rayattr.fixtures import (
    default_cache_dir,
    fact_tracing_quality,
    make_fixture,
    train_fixture_model,
)
from rayattr.grads.normalizer import from_optimizer_state
from rayattr.hessian.mixing import mix_stats
from rayattr.model import load_model
from rayattr.ray.fit import fit
from rayattr.ray.pipeline import build, ensure_ray
from rayattr.ray.score import ScoreSettings, reduce, score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="easy", choices=["easy", "hard"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--projection-dim", type=int, default=16)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    fixture = make_fixture(default_cache_dir(), variant=args.variant)
    model_dir = train_fixture_model(fixture)
    ensure_ray()
    root = Path(tempfile.mkdtemp(prefix="fact-tracing-"))
    model = ModelSpec(str(model_dir))
    train = DataSpec(str(fixture.train))
    queries = DataSpec(str(fixture.queries), prompt_column="prompt", completion_column="completion")
    from_optimizer_state(model_dir / "optimizer.pt", load_model(ModelSpec(str(model_dir), device="cpu"))).save(root / "normalizer")
    raw = GradSpec(projection_dim=args.projection_dim)
    normalized = GradSpec(projection_dim=args.projection_dim, normalizer=str(root / "normalizer"))
    common = {"workers": args.workers}

    timings = {}
    for name, grads in (("raw", raw), ("norm", normalized)):
        timings[f"build {name}"] = build(str(root / f"index-{name}"), RunSpec(model, train, grads), **common)
        reduce(str(root / f"query-{name}"), RunSpec(model, queries, grads), aggregation="none", **common)
    fit(str(root / "index-stats"), RunSpec(model, train, normalized), "second-moment", **common)
    fit(str(root / "query-stats"), RunSpec(model, queries, normalized), "second-moment", **common)
    lam, _ = mix_stats(str(root / "query-stats"), str(root / "index-stats"), str(root / "mixed"))

    methods = {
        "inner product": ("raw", ScoreSettings(top_k=50)),
        "cosine": ("raw", ScoreSettings(unit_normalize=True, top_k=50)),
        "cosine + normalizer": ("norm", ScoreSettings(unit_normalize=True, top_k=50)),
        "cosine + normalizer + H_index^-1/2": ("norm", ScoreSettings(unit_normalize=True, hessian=str(root / "index-stats"), top_k=50)),
        f"TrackStar (mixed H, lambda {lam:.3f})": ("norm", ScoreSettings(unit_normalize=True, hessian=str(root / "mixed"), top_k=50)),
    }
    rows = []
    for label, (side, settings) in methods.items():
        result = score(str(root / f"scores-{len(rows)}"), str(root / f"query-{side}"), settings,
                       index_path=str(root / f"index-{side}"), **common)
        rows.append({"method": label, **fact_tracing_quality(fixture, result.query_ids, result.topk.ids)})
    trackstar_settings = methods[next(reversed(methods))][1]
    timings["score on the fly"] = score(str(root / "scores-fly"), str(root / "query-norm"), trackstar_settings,
                                        spec=RunSpec(model, train, normalized), **common).progress

    console = Console()
    quality = Table("method", "recall@10", "MRR", title=(
        f"fact tracing, {args.variant} fixture: {rows[0]['queries']} queries, projection {args.projection_dim}, "
        f"random recall@10 {rows[0]['random_recall']:.4f}"))
    for row in rows:
        quality.add_row(row["method"], f"{row['recall_at_k']:.3f}", f"{row['mrr']:.3f}")
    console.print(quality)
    speed = Table("pass", "tokens", "wall s", "tokens/s", "ratio to build", title=f"{args.workers} worker(s), end to end")
    reference = timings["build norm"].tokens_per_second
    for name, progress in timings.items():
        speed.add_row(name, f"{progress.tokens:,}", f"{progress.seconds:.1f}", f"{progress.tokens_per_second:,.0f}",
                      f"{progress.tokens_per_second / reference:.2f}")
    console.print(speed)
    out = Path(args.out or Path(__file__).parent / "results" / f"fact_tracing_{args.variant}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "variant": args.variant, "projection_dim": args.projection_dim, "workers": args.workers, "quality": rows,
        "throughput": {name: {"tokens": p.tokens, "seconds": p.seconds, "tokens_per_second": p.tokens_per_second}
                       for name, p in timings.items()},
    }, indent=1))
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
