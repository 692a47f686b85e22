"""The documents a retrain or a metagradient replay trains on, read whole in the process that trains.

Training needs every document of its set (its batches mix them), so these read a
dataset split to the end; the sets a counterfactual run uses are fine-tuning sets.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from rayattr.config import DataSpec, ModelSpec, RayattrError
from rayattr.data import TokenizedDocs, plan_shards, read_shard, tokenize
from rayattr.model import max_positions, tokenizer_source
from rayattr.tokenizer import load_tokenizer


def read_docs(data: DataSpec, model: ModelSpec, model_config) -> TokenizedDocs:
    """Every document of ``data``, tokenized as a build would (ids: the split's row numbers), in id order."""
    if data.reward_column or data.conversation_column:
        raise RayattrError("counterfactual runs train on plain or prompt/completion documents; drop "
                           "--reward-column and --conversation-column")
    tokenizer = load_tokenizer(tokenizer_source(model), model.revision)
    max_length = min(data.max_length or 10**9, max_positions(model_config))
    parts = [tokenize(table, data, tokenizer, max_length)
             for shard in plan_shards(data) for table in read_shard(data, shard)]
    if not parts:
        raise RayattrError(f"{data.dataset} split {data.split!r} has no rows")
    docs = TokenizedDocs.from_arrow(pa.concat_tables(parts))
    return docs.take(np.argsort(docs.ids, kind="stable"))
