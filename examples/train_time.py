"""Train-time attribution: fine-tune in a Ray Train group that writes every example's rows, then score them.

The fixture model is fine-tuned for one more epoch on its biographies by two DDP workers
(`rayattr run` of a `train:` config, the route `ray job submit -- python jobs/train.py`
takes on a cluster). Each worker appends its examples' projected gradients at every
optimizer step. The queries' rows are taken at the checkpoint the run started from, and
`score --step all` sums each document's rows over the steps with learning-rate weights
(TracIn's sum over checkpoints), so documents that state a query's fact should rank high.

    python examples/train_time.py [--run runs/train-time] [--workers 2]
"""

from __future__ import annotations

import argparse

import numpy as np
import pyarrow.parquet as pq
from rich.console import Console
from shell import rayattr

from rayattr.api import read_topk
from rayattr.commands import TrainConfig
from rayattr.config import DataSpec, GradSpec, ModelSpec, RunSpec
from rayattr.configfile import save_config
from rayattr.fixtures import default_cache_dir, fact_tracing_quality, make_fixture, train_fixture_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/train-time", help="directory of the run's LanceDB databases")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    console = Console()

    fixture = make_fixture(default_cache_dir())
    model = str(train_fixture_model(fixture))
    grads = GradSpec(projection_dim=16)
    config = TrainConfig(f"{args.run}/train", RunSpec(ModelSpec(model), DataSpec(str(fixture.train)), grads),
                         workers=args.workers, batch_size=8, learning_rate=1e-4)
    rayattr(console, "run", save_config(f"{args.run}/train.yaml", config))
    rayattr(console, "reduce", f"{args.run}/query", "--model", model, "--dataset", str(fixture.queries),
            "--prompt-column", "prompt", "--completion-column", "completion", "--aggregation", "none",
            "--projection-dim", str(grads.projection_dim))
    rayattr(console, "score", f"{args.run}/scores", "--query-path", f"{args.run}/query",
            "--index-path", f"{args.run}/train", "--step", "all", "--unit-normalize", "--top-k", "10")

    top, query_ids = read_topk(f"{args.run}/scores")
    ranked = top.ids[np.argsort(query_ids)]
    quality = fact_tracing_quality(fixture, np.sort(query_ids), ranked)
    texts = pq.read_table(fixture.train, columns=["text"]).column("text").to_pylist()
    queries = pq.read_table(fixture.queries, columns=["text"]).column("text").to_pylist()
    for query, row in zip(queries[:3], ranked[:3]):
        console.print(f"[bold]{query}[/]: top document {row[0]}: {texts[row[0]]}", highlight=False)
    console.print(f"train-time attribution over {quality['queries']} queries: recall@10 = {quality['recall@10']:.3f} "
                  f"(random: {quality['random_recall@10']:.4f}), MRR = {quality['mrr']:.3f}")


if __name__ == "__main__":
    main()
