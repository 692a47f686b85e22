"""Structured documents: conversations rendered by a chat template, and the prompt groups
and rewards that Dr. GRPO advantages are computed from (the split-wide group means are
``rayattr.data.reward_baselines``).

A conversation is a list of ``{"role", "content"}`` messages. The tokenizer's
own chat template renders it, and the loss covers the characters the template
emits for each assistant turn (its content and end-of-turn marker, not the
role header the template writes before it). Those spans are found by rendering
the conversation's prefixes, so any template that renders a conversation as
the concatenation of its turns works, with or without ``{% generation %}``
markers; the rendered text is then tokenized once with offsets, and a token is
a target when it starts inside an assistant span.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from rayattr.config import DataSpec, RayattrError

ASSISTANT = "assistant"
Message = dict[str, str]


def messages_of(value: Any, row_id: int, column: str) -> list[Message]:
    """One row's conversation as a list of ``{role, content}`` dicts, or a one-line error naming the row."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = None
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    ):
        raise RayattrError(
            f"row {row_id} of --conversation-column {column!r} is not a list of {{role, content}} messages "
            f"(got {str(value)[:80]!r}); store each conversation as [{{'role': 'user', 'content': ...}}, ...]"
        )
    return [{"role": m["role"], "content": m["content"]} for m in value]


def require_chat_template(tokenizer) -> None:
    """Conversations need the tokenizer's chat template and character offsets (a fast tokenizer)."""
    if not getattr(tokenizer, "chat_template", None):
        raise RayattrError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template: set "
            "`tokenizer.chat_template` and save it with the model, or pass plain text with --text-column"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise RayattrError("conversations need a fast tokenizer (character offsets); save the model with its tokenizer.json")


def render(tokenizer, messages: Sequence[Message]) -> tuple[str, list[tuple[int, int]]]:
    """The conversation's text and the character spans ``[start, stop)`` of its assistant turns."""
    text = tokenizer.apply_chat_template(list(messages), tokenize=False)
    spans = []
    for turn, message in enumerate(messages):
        if message["role"] != ASSISTANT:
            continue
        header = tokenizer.apply_chat_template(list(messages[:turn]), tokenize=False, add_generation_prompt=True) \
            if turn else _header_only(tokenizer)
        through = tokenizer.apply_chat_template(list(messages[: turn + 1]), tokenize=False)
        if not (text.startswith(through) and through.startswith(header)):
            raise RayattrError(
                "the chat template does not render a conversation as the concatenation of its turns, so the "
                "assistant tokens cannot be located; use a template without per-conversation rewriting"
            )
        spans.append((len(header), len(through)))
    return text, spans


def _header_only(tokenizer) -> str:
    """What the template emits before a first assistant turn (its generation prompt alone)."""
    return tokenizer.apply_chat_template([], tokenize=False, add_generation_prompt=True)


def tokenize_conversations(tokenizer, conversations: list[list[Message]]) -> tuple[list[list[int]], list[np.ndarray]]:
    """Token ids of each rendered conversation and a bool mask of its assistant tokens."""
    require_chat_template(tokenizer)
    rendered = [render(tokenizer, messages) for messages in conversations]
    encoded = tokenizer([text for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
    masks = []
    for (_, spans), offsets in zip(rendered, encoded["offset_mapping"]):
        starts = np.array([start for start, _ in offsets], dtype=np.int64)
        mask = np.zeros(len(starts), dtype=bool)
        for lo, hi in spans:
            mask |= (starts >= lo) & (starts < hi)
        masks.append(mask)
    return encoded["input_ids"], masks


def prompt_key(messages: Sequence[Message]) -> str:
    """A conversation's group for advantages: everything before its last assistant turn."""
    last = max((i for i, m in enumerate(messages) if m["role"] == ASSISTANT), default=len(messages))
    return json.dumps(list(messages[:last]), sort_keys=True, ensure_ascii=False)


def conversation_texts(table: pa.Table, column: str) -> list[str]:
    """Each row's conversation as ``role: content`` lines, for display."""
    return ["\n".join(f"{m['role']}: {m['content']}" for m in messages_of(value, int(i), column))
            for value, i in zip(table.column(column).to_pylist(), table.column("id").to_numpy())]


def group_keys(table: pa.Table, spec: DataSpec) -> list[str]:
    """Each row's prompt group: its prompt, or its conversation before the last assistant turn."""
    if spec.conversation_column:
        column = table.column(spec.conversation_column).to_pylist()
        return [prompt_key(messages_of(value, int(i), spec.conversation_column))
                for value, i in zip(column, table.column("id").to_numpy())]
    return ["" if text is None else str(text) for text in table.column(spec.prompt_column or spec.text_column).to_pylist()]


def rewards_of(table: pa.Table, spec: DataSpec) -> np.ndarray:
    """The reward column as float64; a NaN one is a one-line error unless ``--skip-nan-rewards``."""
    rewards = np.array([np.nan if r is None else r for r in table.column(spec.reward_column).to_pylist()], np.float64)
    bad = np.flatnonzero(np.isnan(rewards))
    if bad.size and not spec.skip_nan_rewards:
        raise RayattrError(
            f"row {int(table.column('id')[int(bad[0])].as_py())} has a NaN reward in {spec.reward_column!r} "
            f"({bad.size} such row(s) in this shard); fix the data or pass --skip-nan-rewards to leave them out"
        )
    return rewards


def advantages(table: pa.Table, spec: DataSpec, baselines: dict[str, float] | None) -> np.ndarray:
    """Each row's reward minus its group's mean (Dr. GRPO's advantage; NaN where the reward is NaN)."""
    if baselines is None:
        raise ValueError("a reward column needs the split's reward_baselines")
    rewards = rewards_of(table, spec)
    keys = group_keys(table, spec)
    return np.array([reward - baselines.get(key, reward) for key, reward in zip(keys, rewards)], np.float64)
