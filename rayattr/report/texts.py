"""The texts a report shows: documents as their parts (a prompt/completion row's completion apart), and for
per-token heatmaps each document as the tokens it was scored as, with each token's score.

A ``token_scores`` row (``id, token_pos, scores``) is the part of the document's score that
flows through input position ``token_pos`` (every position but the last, whose output feeds no
loss), so the report colours the token at that position. Documents are tokenized again the way
scoring tokenized them (``rayattr.data.tokenize``), so positions line up, and every token is
shown as it decodes on its own.
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import pyarrow as pa

from rayattr.codec import vectors_of
from rayattr.config import DataSpec
from rayattr.data import row_texts, tokenize
from rayattr.store import ScoreTable

IDS_PER_READ = 1000  # ids in one filtered read of the token table


def document_texts(rows: pa.Table, data: DataSpec) -> dict[int, tuple[str, str]]:
    """Each row's document (``rows`` from ``rayattr.data.read_rows``) as ``(text, completion)`` by id; the
    completion is empty unless ``data`` has a completion column."""
    if data.completion_column and not data.conversation_column:
        parts = [["" if text is None else str(text) for text in rows.column(column).to_pylist()]
                 for column in data.document_columns]
        pairs = zip(*parts)
    else:
        pairs = ((text, "") for text in row_texts(rows, data))
    return dict(zip(rows.column("id").to_numpy().tolist(), pairs))


def token_pieces(rows: pa.Table, data: DataSpec, tokenizer) -> dict[int, list[str]]:
    """Each row's document (``rows`` from ``rayattr.data.read_rows``) as the tokens the model read, by id."""
    # A reward weighs a document's loss, not its tokens; without a length limit nothing is cut (or refused):
    # tokens past the scored ones are shown uncoloured.
    shown = dataclasses.replace(data, reward_column=None, skip_nan_rewards=False)
    tokens = tokenize(rows, shown, tokenizer, sys.maxsize)
    return {int(doc): tokenizer.batch_decode([[token] for token in ids], clean_up_tokenization_spaces=False)
            for doc, ids in zip(tokens.column("id").to_numpy(), tokens.column("input_ids").to_pylist())}


def read_token_scores(table: ScoreTable, wanted: dict[int, set[int]]) -> dict[tuple[int, int], np.ndarray]:
    """``(id, query column) -> [num_tokens]`` token scores (NaN where none) for the ``wanted`` columns of each id.

    The table is read through a filter on the ids, a chunk of ids at a time, and only the wanted
    columns are kept, so memory follows what the report shows, not the table.
    """
    found: dict[tuple[int, int], np.ndarray] = {}
    ids = np.array(sorted(wanted), np.int64)
    for chunk in np.array_split(ids, -(-ids.size // IDS_PER_READ)) if ids.size else ():
        where = f"id IN ({','.join(map(str, chunk.tolist()))})"
        for batch in table.iter_batches(["id", "num_tokens", "token_pos", "scores"], where=where):
            batch_ids = batch.column("id").to_numpy()
            positions = batch.column("token_pos").to_numpy()
            lengths = batch.column("num_tokens").to_numpy()
            scores = vectors_of(batch.column("scores"), table.meta.width)
            for doc in np.unique(batch_ids):
                rows = np.flatnonzero(batch_ids == doc)
                for column in wanted[int(doc)]:
                    key = (int(doc), column)
                    if key not in found:
                        found[key] = np.full(int(lengths[rows[0]]), np.nan, np.float32)
                    found[key][positions[rows]] = scores[rows, column]
    return found
