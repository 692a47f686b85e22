"""Per-module Kronecker projection sizes from a budget (``GradSpec.proj_rank_total``).

A fixed ``p x p`` projection gives a 64 x 2048 module and a 2048 x 2048 one the
same ``p`` on both sides. With a budget ``T`` each module instead gets
``(p_out, p_in)`` with ``p_out * p_in <= T`` shaped like the module:

1. the ideal split has ``p_out / p_in = sqrt(O / I)`` and ``p_out * p_in = T``,
   i.e. ``p_out = sqrt(T) (O / I)^(1/4)`` (each side proportional to the square
   root of its size);
2. ``p_out`` is that, rounded down and clamped to ``[min, min(O, T // min)]``;
3. ``p_in = min(I, T // p_out)``, then ``p_out`` grows to ``min(O, T // p_in)``:
   what rounding ``p_in`` down (or ``p_in`` reaching ``I``) left of the budget
   goes to the output side.

Both sides stay ``>= min`` (or the module's size, when that is smaller),
``<= `` the module's size, and ``p_out * p_in <= T``. The rule uses integer
arithmetic after one float square root, so every worker computes the same sizes.
"""

from __future__ import annotations

import math


def allocate_ranks(shapes: dict[str, tuple[int, int]], total: int, minimum: int = 1) -> dict[str, tuple[int, int]]:
    """``{module: (p_out, p_in)}`` for modules of ``shapes`` ``{module: (O, I)}``."""
    return {name: _module_ranks(out_f, in_f, total, minimum) for name, (out_f, in_f) in shapes.items()}


def _module_ranks(out_features: int, in_features: int, total: int, minimum: int) -> tuple[int, int]:
    low_out, low_in = min(minimum, out_features), min(minimum, in_features)
    ideal = math.sqrt(total) * (out_features / in_features) ** 0.25
    p_out = max(low_out, min(math.floor(ideal), out_features, total // low_in))
    p_in = min(in_features, total // p_out)
    p_out = max(p_out, min(out_features, total // p_in))
    return p_out, p_in
