"""Tokenized documents in, gradient rows out: batching around the collector.

This is the in-process engine. Ray workers wrap the very same object, so a
distributed build equals an in-process one row by row.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from rayattr.codec import RowCodec
from rayattr.config import DataSpec, GradSpec, ModelSpec, RunSpec, to_dict
from rayattr.data import TokenizedDocs, token_budget_batches
from rayattr.grads.collector import GradientCollector, ModuleLayout
from rayattr.grads.objective import TokenBatch
from rayattr.grads.normalizer import Normalizer
from rayattr.model import load_model, model_fingerprint, tokenizer_source
from rayattr.tokenizer import load_tokenizer
from rayattr.space import TableMeta

@dataclass
class GradientRows:
    """Gradient rows of a set of documents, in columns (one row per doc or per token)."""

    ids: np.ndarray  # int64 [R]
    num_tokens: np.ndarray  # int32 [R]: tokens in the document
    loss: np.ndarray  # float32 [R]: the document's summed loss
    grads: np.ndarray  # [R, D] the values a table stores: float16/float32 (int4 codes read back as float32)
    token_pos: np.ndarray | None = None  # int32 [R] in per-token mode
    skipped: np.ndarray | None = None  # ids of documents with no loss token (empty or too short)
    non_finite: np.ndarray | None = None  # ids of documents whose loss or gradient overflowed: no row
    stored: dict[str, pa.Array] | None = None  # the vector columns as written (``RowCodec.encode``); None: ``grads``

    def encode(self, codec: RowCodec, values: np.ndarray) -> None:
        """Replace the vectors by ``values`` as ``codec`` stores them."""
        self.grads, self.stored = codec.encode(values)

    def to_arrow(self) -> pa.Table:
        """The gradient-table layout: ``id, num_tokens, loss, [token_pos,] grad[, grad_step]``."""
        columns = {
            "id": pa.array(self.ids, pa.int64()),
            "num_tokens": pa.array(self.num_tokens, pa.int32()),
            "loss": pa.array(self.loss, pa.float32()),
        }
        if self.token_pos is not None:
            columns["token_pos"] = pa.array(self.token_pos, pa.int32())
        if self.stored is None:
            self.grads, self.stored = RowCodec(self.grads.dtype.name, self.grads.shape[1]).encode(self.grads)
        return pa.table(columns | self.stored)


def collate(docs: TokenizedDocs, index: np.ndarray, pad_token_id: int, padding_side: str = "right") -> TokenBatch:
    """Pad the chosen documents into one batch (positions count from each document's start)."""
    seqs = [docs.tokens[i] for i in index]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.bool)
    for row, seq in enumerate(seqs):
        cols = slice(0, len(seq)) if padding_side == "right" else slice(width - len(seq), width)
        input_ids[row, cols] = torch.from_numpy(seq)
        attention[row, cols] = True
    positions = (attention.long().cumsum(1) - 1).clamp(min=0)
    label_start = torch.from_numpy(docs.label_start[index]).unsqueeze(1)
    label_mask = attention & (positions >= label_start.clamp(min=1))
    if docs.label_masks is not None:
        marked = torch.zeros_like(attention)
        for row, i in enumerate(index):
            mask = torch.from_numpy(docs.label_masks[i])
            cols = slice(0, len(mask)) if padding_side == "right" else slice(width - len(mask), width)
            marked[row, cols] = mask
        label_mask &= marked
    weight = None if docs.loss_weights is None else torch.from_numpy(docs.loss_weights[index])
    return TokenBatch(input_ids, attention, label_mask, positions, weight, torch.from_numpy(docs.ids[index]))


class GradientEngine:
    """A frozen model with gradient hooks, fed in token-budget batches."""

    def __init__(
        self, model: nn.Module, spec: GradSpec, pad_token_id: int, padding_side: str = "right",
        normalizer: Normalizer | None = None,
    ) -> None:
        self.model = model
        self.spec = spec
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side
        self.normalizer = normalizer
        self.collector = GradientCollector(model, spec, normalizer)
        self.device = next(model.parameters()).device

    @property
    def layouts(self) -> list[ModuleLayout]:
        return self.collector.layouts

    @property
    def dim(self) -> int:
        return self.collector.dim

    @property
    def codec(self) -> RowCodec:
        return collector_codec(self.collector)

    def close(self) -> None:
        self.collector.close()

    def table_meta(self, model_fingerprint: dict[str, str], data: DataSpec, model: ModelSpec | None = None) -> TableMeta:
        """The description every table of this engine's rows carries."""
        return rows_meta(self.collector, model_fingerprint, data, model)

    def rows(self, docs: TokenizedDocs) -> GradientRows:
        """Gradient rows of ``docs`` in input order; docs without a loss token are skipped."""
        lengths, has_target, batches = self._plan(docs)
        parts: list[tuple[np.ndarray, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        for index in batches:
            batch = collate(docs, index, self.pad_token_id, self.padding_side).to(self.device)
            out = self.collector.collect(batch)
            parts.append((index, out.grads, out.loss, out.row_example, out.row_token_pos))
        return self._assemble(docs, lengths, parts, skipped=docs.ids[~has_target])

    def observe(self, docs: TokenizedDocs) -> None:
        """Run forward+backward over ``docs`` for the collector's tap only (no rows)."""
        for index in self._plan(docs)[2]:
            self.collector.collect(collate(docs, index, self.pad_token_id, self.padding_side).to(self.device),
                                   emit_rows=False)

    def passes(self, docs: TokenizedDocs) -> int:
        """How many forward+backward passes ``rows`` or ``observe`` run for ``docs``."""
        return len(self._plan(docs)[2])

    def idle_pass(self) -> None:
        """One forward+backward over a fully masked one-document batch: it yields no row
        and shows a tap no token. Workers sharing ZeRO-3 partitions run these to match
        the pass count of a worker with more data (each module's gather is a collective)."""
        empty = torch.zeros((1, 2), dtype=torch.bool)
        batch = TokenBatch(torch.full((1, 2), self.pad_token_id, dtype=torch.long), empty, empty, empty.long(),
                           doc_ids=torch.zeros(1, dtype=torch.long))
        self.collector.collect(batch.to(self.device))

    def _plan(self, docs: TokenizedDocs) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """Token counts, which docs have a loss token, and the token-budget batches (doc indices) of those."""
        lengths = np.array([len(t) for t in docs.tokens], dtype=np.int64)
        has_target = lengths > np.maximum(docs.label_start, 1)
        if docs.label_masks is not None:  # a conversation without an assistant token has no target
            has_target &= np.array([bool(mask[1:].any()) for mask in docs.label_masks])
        kept = np.flatnonzero(has_target)
        return lengths, has_target, [kept[b] for b in token_budget_batches(lengths[kept], self.spec.token_batch_size)]

    def _assemble(self, docs: TokenizedDocs, lengths: np.ndarray, parts: list, skipped: np.ndarray) -> GradientRows:
        """Concatenate batch outputs and restore input order (docs, then tokens)."""
        if not parts:
            empty = np.zeros(0, dtype=np.int64)
            token_pos = np.zeros(0, np.int32) if self.spec.per_token else None
            rows = GradientRows(empty, empty.astype(np.int32), empty.astype(np.float32), np.zeros((0, self.dim)),
                                token_pos, skipped, empty)
            rows.encode(self.codec, rows.grads)
            return rows
        doc_index = np.concatenate([index[example.cpu().numpy()] for index, _, _, example, _ in parts])
        doc_loss = np.zeros(len(docs), np.float32)
        for index, _, loss, _, _ in parts:
            doc_loss[index] = loss.cpu().numpy()
        grads = torch.cat([grads for _, grads, _, _, _ in parts]).cpu().numpy()
        token_pos = None
        if self.spec.per_token:
            token_pos = np.concatenate([pos.cpu().numpy() for *_, pos in parts]).astype(np.int32)
            order = np.lexsort((token_pos, doc_index))
            token_pos = token_pos[order]
        else:
            order = np.argsort(doc_index, kind="stable")
        doc_index, grads = doc_index[order], grads[order]
        # A document whose loss or any gradient entry is not finite gets no row (LanceDB
        # refuses NaN vectors, and one would poison every score and statistic).
        finite = np.isfinite(doc_loss)
        finite[doc_index[~np.isfinite(grads).all(axis=1)]] = False
        keep = finite[doc_index]
        doc_index = doc_index[keep]
        rows = GradientRows(
            ids=docs.ids[doc_index],
            num_tokens=lengths[doc_index].astype(np.int32),
            loss=doc_loss[doc_index],
            grads=grads[keep],
            token_pos=None if token_pos is None else token_pos[keep],
            skipped=skipped,
            non_finite=docs.ids[~finite],  # documents in no batch (skipped) have loss 0: finite
        )
        rows.encode(self.codec, rows.grads)
        return rows


def collector_codec(collector: GradientCollector) -> RowCodec:
    """How a collector's rows are stored: int4 steps per module, or one for a whole sketch."""
    spec = collector.spec
    widths = (collector.dim,) if spec.sketched else tuple(layout.width for layout in collector.layouts)
    return RowCodec(spec.dtype, collector.dim, widths if spec.dtype == "int4" else ())


def projection_meta(collector: GradientCollector) -> dict[str, Any]:
    """Type, dim, seed and fingerprint; plus the options that change the space when set.

    Per-module sizes (also those allocated from a rank budget) are in the
    module layout; a sketch records the length of the concatenation it maps.
    """
    meta = collector.spec.projection_fields() | {"fingerprint": collector.spec.projection_fingerprint()}
    if collector.spec.sketched:
        meta["input_dim"] = collector.width
    return meta


def rows_meta(collector: GradientCollector, model_fingerprint: dict[str, str], data: DataSpec | None,
              model: ModelSpec | None = None, **extra: Any) -> TableMeta:
    """The description every table of a collector's rows carries (a build's, or a training run's with
    ``extra`` fields), so rows of either kind are compared by one rule."""
    normalizer = collector.normalizer
    meta = TableMeta(
        model=model_fingerprint,
        modules=[layout.to_meta() for layout in collector.layouts],
        projection=projection_meta(collector),
        dtype=collector.spec.dtype,
        dim=collector.dim,
        per_token=collector.spec.per_token,
        normalizer=normalizer.fingerprint if normalizer else None,
        data=to_dict(data) if data else {},
        source={"model": to_dict(model) if model else None, "grads": to_dict(collector.spec)},
    )
    return dataclasses.replace(meta, **extra)


def engine_for(spec: RunSpec) -> tuple[GradientEngine, TableMeta]:
    """Load the model, tokenizer and normalizer of a run and wrap them in an engine.

    The one place a worker or an in-process run builds its engine, so both
    produce identical rows and identical table metadata.
    """
    model = load_model(spec.model)
    tokenizer = load_tokenizer(tokenizer_source(spec.model), spec.model.revision)
    normalizer = Normalizer.load(spec.grads.normalizer) if spec.grads.normalizer else None
    engine = GradientEngine(model, spec.grads, tokenizer.pad_token_id, normalizer=normalizer)
    return engine, engine.table_meta(model_fingerprint(model, spec.model), spec.data, spec.model)
