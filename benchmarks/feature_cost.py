"""What each loss and view costs: engine throughput relative to a plain build, in process.

On the benchmark GPT-NeoX (21.3M parameters, 256-token packed documents, token
batches of 2,048, projection 16, fp32), interleaved rounds of the same documents:
the limit (forward + backward to activations only), the plain cross-entropy build,
reward weights (``loss_weights``), assistant-only masks (half of each document's
tokens, as a conversation's), attention heads split into blocks (QKV and output
projection, 8 heads each), and a rank-8 LoRA adapter on the attention and MLP
projections with the cross-entropy and with the KL loss (one more forward of the
base, without gradients). Also the tokenizer's rate on plain text against the
chat template's on the same text as two-turn conversations.

    PYTHONPATH=benchmarks:. python benchmarks/feature_cost.py [--size small|full] [--device cpu|cuda]

Writes results/feature_cost.json (small) or results/feature_cost_full.json.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from rich.table import Table

from common import TOKEN_BATCH_SIZE, bench_inputs, first_documents, forward_backward, machine, packed_corpus, timed, write_results
from rayattr.config import DataSpec, GradSpec, ModelSpec
from rayattr.data import TokenizedDocs, token_budget_batches, tokenize
from rayattr.grads.engine import GradientEngine
from rayattr.model import load_model
from rayattr.tokenizer import load_tokenizer

SEQ_LEN = 256
SIZES = {"small": {"docs": 32, "rounds": 3}, "full": {"docs": 96, "rounds": 5}}
LIMIT, PLAIN = "forward + backward to activations (limit)", "plain build (cross-entropy)"


def with_lora(model: torch.nn.Module) -> torch.nn.Module:
    """A rank-8 LoRA on every attention and MLP projection; B drawn small (not zero), as after training."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                        target_modules=["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"])
    adapted = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    adapted.requires_grad_(False)
    return adapted.eval()


def cases(model, adapted, docs: TokenizedDocs, pad_id: int) -> dict[str, Callable[[], None]]:
    batches = token_budget_batches(np.array([len(t) for t in docs.tokens]), TOKEN_BATCH_SIZE)
    rewarded = dataclasses.replace(docs, loss_weights=np.linspace(-1, 1, len(docs)).astype(np.float32))
    masked = dataclasses.replace(docs, label_masks=[np.arange(len(t)) >= len(t) // 2 for t in docs.tokens])
    base = GradSpec(projection_dim=16, token_batch_size=TOKEN_BATCH_SIZE)
    heads = dataclasses.replace(base, split_attention=("*attention.query_key_value", "*attention.dense"))

    def engine(target, spec: GradSpec, subject: TokenizedDocs) -> Callable[[], None]:
        def run() -> None:
            collector = GradientEngine(target, spec, pad_id)
            try:
                collector.rows(subject)
            finally:
                collector.close()
        return run

    return {
        LIMIT: lambda: forward_backward(model, docs, batches, pad_id, weights=False),
        PLAIN: engine(model, base, docs),
        "reward advantages (--reward-column)": engine(model, base, rewarded),
        "assistant-only masks (--conversation-column)": engine(model, base, masked),
        "attention heads, 8 per QKV and output (--split-attention)": engine(model, heads, docs),
        "LoRA adapter modules, cross-entropy": engine(adapted, base, docs),
        "LoRA adapter modules, KL (--loss-fn kl)": engine(adapted, dataclasses.replace(base, loss_fn="kl"), docs),
    }


def tokenizer_rates(texts: list[str], tokenizer, rounds: int) -> dict[str, float]:
    """Documents per second through ``tokenize``: plain text, and the same text as user + assistant turns."""
    ids = pa.array(np.arange(len(texts)), pa.int64())
    plain = pa.table({"text": texts, "id": ids})
    halves = [(t[: len(t) // 2], t[len(t) // 2 :]) for t in texts]
    chats = pa.table({"messages": [[{"role": "user", "content": u}, {"role": "assistant", "content": a}] for u, a in halves],
                      "id": ids})
    runs = {"plain text": lambda: tokenize(plain, DataSpec("d", truncation=True), tokenizer, 10**6),
            "two-turn conversations (chat template)": lambda: tokenize(
                chats, DataSpec("d", conversation_column="messages", truncation=True), tokenizer, 10**6)}
    return {name: rate for name, rate in timed(runs, len(texts), rounds).items()}


def main() -> None:
    args, size, fixture, model_dir, tokenizer = bench_inputs(__doc__, SIZES, SEQ_LEN)
    tokenizer.chat_template = load_tokenizer(str(fixture.neox)).chat_template
    corpus = packed_corpus(fixture, Path(tempfile.mkdtemp(prefix="feature-cost-")) / "packed.parquet",
                           size["docs"], tokenizer, SEQ_LEN)
    head, _, docs = first_documents(corpus, size["docs"], tokenizer, SEQ_LEN)
    model = load_model(ModelSpec(str(model_dir), device=args.device))
    adapted = with_lora(load_model(ModelSpec(str(model_dir), device=args.device)))
    tokens = sum(len(t) for t in docs.tokens)
    rates = timed(cases(model, adapted, docs, tokenizer.pad_token_id), tokens, size["rounds"])
    tokenizing = tokenizer_rates(head.column("text").to_pylist(), tokenizer, size["rounds"])

    params = sum(p.numel() for p in model.parameters())
    table = Table("measurement", "tokens/s", "ratio to plain build", "ratio to limit", title=(
        f"{params / 1e6:.1f}M GPT-NeoX, {len(docs)} x {SEQ_LEN} tokens, projection 16, {machine()}"))
    for name, rate in rates.items():
        table.add_row(name, f"{rate:,.0f}", f"{rate / rates[PLAIN]:.2f}", f"{rate / rates[LIMIT]:.2f}")
    tok_table = Table("tokenize", "documents/s", "ratio to plain text", title="tokenization of the same documents")
    for name, rate in tokenizing.items():
        tok_table.add_row(name, f"{rate:,.0f}", f"{rate / tokenizing['plain text']:.2f}")
    write_results("feature_cost", args.size, {
        "model_parameters": params, "docs": len(docs), "tokens": tokens, "rounds": size["rounds"], "device": args.device,
        "tokens_per_s": rates, "ratio_to_plain": {n: r / rates[PLAIN] for n, r in rates.items()},
        "tokenize_docs_per_s": tokenizing,
    }, [table, tok_table])


if __name__ == "__main__":
    main()
