"""Chat + reward attribution: which training documents make the model prefer the right answer?

The fixture's chat split asks 24 fact questions as user turns, each answered
rightly (reward 1) and wrongly (reward 0). With ``--reward-column`` each
conversation's gradient is its Dr. GRPO advantage (+0.5 or -0.5 against its
prompt's mean reward) times the gradient of its assistant-token loss, so the
sum over a prompt's two conversations is the gradient of the preference for
the right answer. The training documents are scored against every
conversation on the fly (full gradients, inner product), the two scores of
each prompt are added with pyarrow, and the documents that state the asked
fact should rank high.

    python examples/chat_rewards.py [--run runs/chat] [--workers 2]
"""

from __future__ import annotations

import argparse
import json

import lancedb
import numpy as np
import pyarrow.parquet as pq
from rich.console import Console
from shell import rayattr

from rayattr.fixtures import default_cache_dir, fact_tracing_quality, make_fixture, train_fixture_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/chat", help="directory of the run's LanceDB databases")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    console = Console()

    fixture = make_fixture(default_cache_dir())
    model = str(train_fixture_model(fixture))
    full = ["--projection-dim", "0"]
    rayattr(console, "reduce", f"{args.run}/query", "--model", model, "--dataset", str(fixture.conversations),
            "--conversation-column", "messages", "--reward-column", "reward", "--aggregation", "none", *full)
    rayattr(console, "score", f"{args.run}/scores", "--query-path", f"{args.run}/query", "--model", model,
            "--dataset", str(fixture.train), "--workers", str(args.workers), *full)

    scores = lancedb.connect(f"{args.run}/scores").open_table("scores")
    conversations = pq.read_table(fixture.conversations, columns=["query_id"]).column("query_id").to_pylist()
    table = scores.to_arrow()
    ids = table.column("id").to_numpy()
    meta = json.loads(table.schema.metadata[b"rayattr"])
    columns = table.column("scores").combine_chunks().flatten().to_numpy().reshape(len(ids), -1)
    per_conversation = columns[:, np.argsort(meta["query_ids"])]  # column c: conversation row c
    prompts = sorted(set(conversations))
    preference = np.stack([per_conversation[:, [c for c, q in enumerate(conversations) if q == prompt]].sum(1)
                           for prompt in prompts])  # [prompts, documents]: right-minus-wrong, halved
    ranked = ids[np.argsort(-preference, axis=1, kind="stable")]
    query_rows = {q["query_id"]: i for i, q in enumerate(pq.read_table(fixture.queries, columns=["query_id"]).to_pylist())}
    quality = fact_tracing_quality(fixture, np.array([query_rows[p] for p in prompts]), ranked)
    texts = pq.read_table(fixture.train, columns=["text"]).column("text").to_pylist()
    for prompt, row in zip(prompts[:3], ranked[:3]):
        console.print(f"[bold]{prompt}[/]: top document {row[0]}: {texts[row[0]]}", highlight=False)
    console.print(f"preference attribution over {quality['queries']} prompts: recall@10 = {quality['recall@10']:.3f} "
                  f"(random: {quality['random_recall@10']:.4f}), MRR = {quality['mrr']:.3f}")


if __name__ == "__main__":
    main()
