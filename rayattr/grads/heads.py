"""Attention heads as their own gradient blocks (``--split-attention GLOB``).

A matched attention projection's weight gradient is cut into ``num_heads``
equal contiguous blocks along one axis: the output axis of a query/key/value
projection (GPT-NeoX's fused QKV stores each head's q, k and v together, so a
block is one head), the input axis of an output projection (its inputs are the
heads' concatenated values). Each block becomes a module of the row layout,
``MODULE.head_H`` with its own shape, seeded projection and statistics; at
projection 0 the blocks are exactly the module's gradient rearranged.
"""

from __future__ import annotations

import fnmatch

from torch import nn

from rayattr.config import GradSpec, RayattrError

OUTPUT_PROJECTIONS = frozenset({"dense", "o_proj", "out_proj", "c_proj"})  # split on their input axis
HeadSource = tuple[str, str, int]  # (module name, axis "out" | "in", first index of the block on that axis)


def model_heads(model: nn.Module) -> int:
    """The attention head count of the model's config (``--num-heads`` overrides it)."""
    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    if not heads:
        raise RayattrError("the model config names no attention head count; pass --num-heads N")
    return int(heads)


def head_axis(name: str) -> str:
    """``in`` for output projections (by the module's own name), ``out`` for every other projection."""
    return "in" if name.rsplit(".", 1)[-1] in OUTPUT_PROJECTIONS else "out"


def split_heads(
    model: nn.Module, shapes: dict[str, tuple[int, int]], spec: GradSpec,
) -> tuple[dict[str, tuple[int, int]], dict[str, HeadSource]]:
    """Replace each module matching ``spec.split_attention`` by its head blocks, in head order.

    Returns the new ``{block: (out, in)}`` (other modules unchanged, model order
    kept) and ``{block: (module, axis, start)}`` for the blocks.
    """
    if not spec.split_attention:
        return shapes, {}
    heads = spec.num_heads or model_heads(model)
    matched = [name for name in shapes if any(fnmatch.fnmatchcase(name, p) for p in spec.split_attention)]
    if not matched:
        raise RayattrError(f"--split-attention {list(spec.split_attention)} matches none of the chosen modules "
                           f"(e.g. {', '.join(list(shapes)[:4])})")
    split: dict[str, tuple[int, int]] = {}
    sources: dict[str, HeadSource] = {}
    for name, (out_features, in_features) in shapes.items():
        if name not in matched:
            split[name] = (out_features, in_features)
            continue
        axis = head_axis(name)
        size = out_features if axis == "out" else in_features
        if size % heads:
            raise RayattrError(
                f"--split-attention: {name} has {size} {'outputs' if axis == 'out' else 'inputs'}, which "
                f"{heads} heads do not divide; pass the model's head count with --num-heads or leave it out"
            )
        width = size // heads
        for head in range(heads):
            block = f"{name}.head_{head}"
            split[block] = (width, in_features) if axis == "out" else (out_features, width)
            sources[block] = (name, axis, head * width)
    return split, sources
