"""Pieces the benchmark scripts share: the fixture corpus as tokens, the reference passes, plotting."""

from __future__ import annotations

from types import ModuleType

import numpy as np
import pyarrow.parquet as pq
from rich.console import Console

from rayattr.data import TokenizedDocs
from rayattr.grads.collector import per_example_loss
from rayattr.grads.engine import collate
from rayattr.model import load_tokenizer

TOKEN_BATCH_SIZE = 2048


def tokenized_corpus(fixture, docs: int | None = None) -> TokenizedDocs:
    """The fixture's training documents (the first ``docs``), tokenized, loss on every token."""
    tokenizer = load_tokenizer(str(fixture.neox))
    texts = pq.read_table(fixture.train, columns=["text"]).column("text").to_pylist()[:docs]
    tokens = [np.array(t, np.int64) for t in tokenizer(texts)["input_ids"]]
    return TokenizedDocs(np.arange(len(tokens)), tokens, np.ones(len(tokens), np.int64))


def forward_backward(model, docs: TokenizedDocs, batches, pad_id: int, weights: bool) -> None:
    """One pass over the batches; ``weights=False`` is the activation-only limit."""
    model.requires_grad_(weights)
    embed = model.get_input_embeddings()
    hook = None if weights else embed.register_forward_hook(lambda m, i, o: o.requires_grad_(True))
    try:
        for index in batches:
            batch = collate(docs, index, pad_id)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long(),
                           position_ids=batch.position_ids, use_cache=False).logits
            per_example_loss(logits, batch.input_ids, batch.label_mask).sum().backward()
            model.zero_grad(set_to_none=True)
    finally:
        if hook:
            hook.remove()


def pyplot(console: Console) -> ModuleType | None:
    """matplotlib's pyplot on the Agg backend, or None with a note: tables and JSON never need it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        console.print("matplotlib is not installed: PNG skipped (pip install 'rayattr[bench]', or pip install matplotlib)",
                      markup=False)
        return None
    return plt
