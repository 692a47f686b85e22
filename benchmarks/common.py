"""Pieces the benchmark scripts share: the fixture corpus as tokens, the reference passes,
the bench model, plotting, and where results go."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, GPTNeoXConfig

from rayattr.config import DataSpec
from rayattr.data import TokenizedDocs, tokenize
from rayattr.grads.engine import collate
from rayattr.grads.objective import per_example_loss
from rayattr.fixtures import default_cache_dir, make_fixture
from rayattr.tokenizer import load_tokenizer

TOKEN_BATCH_SIZE = 2048
RESULTS = Path(__file__).parent / "results"

HEAD_MODULES = ("lm_head", "embed_out")  # GPT-NeoX's output head: lm_head since transformers 5, embed_out before


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
    device = next(model.parameters()).device
    try:
        for index in batches:
            batch = collate(docs, index, pad_id).to(device)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long(),
                           position_ids=batch.position_ids, use_cache=False).logits
            per_example_loss(logits, batch.input_ids, batch.label_mask).sum().backward()
            model.zero_grad(set_to_none=True)
    finally:
        if hook:
            hook.remove()


def repeated_corpus(source: Path, out: Path, copies: int, docs: int | None = None, row_group_size: int | None = None) -> int:
    """The first ``docs`` documents of ``source`` written ``copies`` times with distinct ``doc_id``,
    one copy in memory at a time; returns the rows written."""
    base = pq.read_table(source)
    base = base.slice(0, docs) if docs else base
    column = base.schema.get_field_index("doc_id")
    with pq.ParquetWriter(out, base.schema) as writer:
        for copy in range(copies):
            shifted = base.set_column(column, "doc_id", pc.add(base.column("doc_id"), copy * base.num_rows))
            writer.write_table(shifted, row_group_size=row_group_size)
    return copies * base.num_rows


def packed_corpus(fixture, out: Path, docs: int, tokenizer, min_tokens: int) -> Path:
    """The fixture's training texts joined into ``docs`` documents of at least ``min_tokens`` tokens each."""
    texts = pq.read_table(fixture.train, columns=["text"]).column("text").to_pylist()
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    packed, current, width, cursor = [], [], 0, 0
    while len(packed) < docs:
        current.append(texts[cursor % len(texts)])
        width += lengths[cursor % len(texts)]
        cursor += 1
        if width >= min_tokens:
            packed.append(" ".join(current))
            current, width = [], 0
    pq.write_table(pa.table({"text": packed}), out)
    return out


def first_documents(corpus: Path, count: int, tokenizer, seq_len: int) -> tuple[pa.Table, DataSpec, TokenizedDocs]:
    """A packed corpus as a build reads it, and its first ``count`` rows raw and tokenized (in-process timing)."""
    data = DataSpec(str(corpus), max_length=seq_len, truncation=True)
    head = pq.read_table(corpus).slice(0, count)
    tokens = tokenize(head.append_column("id", pa.array(np.arange(head.num_rows))), data, tokenizer, seq_len)
    return head, data, TokenizedDocs.from_arrow(tokens)


def bench_inputs(description: str, sizes: dict, max_positions: int) -> tuple[argparse.Namespace, dict, Any, Path, Any]:
    """The shared command line (``--size``, ``--device``) and inputs of the bench-model scripts:
    ``(args, the size's settings, fixture, bench model directory, its tokenizer)``."""
    parser = argparse.ArgumentParser(description=description.splitlines()[0])
    parser.add_argument("--size", choices=sorted(sizes), default="small")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    fixture = make_fixture(default_cache_dir())
    model_dir = bench_model(fixture, default_cache_dir() / "bench-neox-21m", max_positions=max_positions)
    return args, sizes[args.size], fixture, model_dir, load_tokenizer(str(model_dir))


def bench_model(fixture, out: Path, max_positions: int, seed: int = 0) -> Path:
    """A ~21M-parameter GPT-NeoX (512 wide, 6 layers) with the fixture tokenizer, saved once.

    Random init from a fixed seed: throughput does not depend on what the
    model has learned, and nothing has to be downloaded.
    """
    if (out / "config.json").exists():
        return out
    tokenizer = load_tokenizer(str(fixture.neox))
    tokenizer.model_max_length = max_positions  # tools that size batches by it see the model's real limit
    eos = tokenizer.eos_token_id
    config = GPTNeoXConfig(
        vocab_size=len(tokenizer), hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
        intermediate_size=2048, max_position_embeddings=max_positions, rotary_pct=0.25,
        tie_word_embeddings=False, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
    )
    torch.manual_seed(seed)
    staging = out.with_name(out.name + f".tmp{os.getpid()}")
    AutoModelForCausalLM.from_config(config).save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return out


def machine() -> str:
    """The machine in a few words, for table titles and JSON."""
    return (f"{os.cpu_count()}-core {platform.machine()}, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}")


def markdown(table: Table) -> str:
    """A printed rich table as a markdown table (title as a bold line), for the README."""
    lines = [f"**{table.title}**", ""] if table.title else []
    lines.append("| " + " | ".join(str(column.header) for column in table.columns) + " |")
    lines.append("|" + "---|" * len(table.columns))
    for row in zip(*(column.cells for column in table.columns)):
        lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
    return "\n".join(lines)


def write_results(name: str, size: str, payload: dict[str, Any], tables: list[Table]) -> Path:
    """Print ``tables`` and write ``results/NAME.json`` (default size) or ``results/NAME_SIZE.json``.

    The JSON keeps the tables as markdown too, so ``report.py`` can refresh the
    README from whatever ``make bench`` last measured.
    """
    console = Console()
    for table in tables:
        console.print(table)
    out = RESULTS / (f"{name}.json" if size == "small" else f"{name}_{size}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"size": size, "machine": machine(), "date": time.strftime("%Y-%m-%d")} | payload
    out.write_text(json.dumps(record | {"markdown": [markdown(t) for t in tables]}, indent=1))
    console.print(f"wrote {out}")
    return out


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


def timed(runs: dict[str, Callable[[], None]], tokens: int, rounds: int) -> dict[str, float]:
    """Medians over interleaved rounds after a warm-up, in tokens/s."""
    for run in runs.values():
        run()
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    return {name: tokens / statistics.median(values) for name, values in seconds.items()}
