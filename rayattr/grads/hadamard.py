"""Fast Walsh-Hadamard transform: ``H x`` in O(N log N) without forming ``H``.

``H`` is the orthonormal Sylvester-ordered Hadamard matrix of size ``2^k``
(``H_1 = [1]``, ``H_2m = [[H_m, H_m], [H_m, -H_m]] / sqrt(2)``), so the
transform is its own inverse and preserves inner products. Structured sketches
use it to spread a vector's mass evenly over all coordinates before sampling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def next_pow2(n: int) -> int:
    """The smallest power of two ``>= n`` (``n >= 1``)."""
    if n < 1:
        raise ValueError(f"length must be >= 1, got {n}")
    return 1 << (n - 1).bit_length()


def pad_to_pow2(x: torch.Tensor) -> torch.Tensor:
    """Zero-pad the last dimension to the next power of two (no copy when it is one)."""
    n = x.shape[-1]
    size = next_pow2(n)
    return x if size == n else F.pad(x, (0, size - n))


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Walsh-Hadamard transform of the last dimension, batched over the others.

    A last dimension that is not a power of two is zero-padded to the next one,
    so the result is longer than ``x`` then. Each of the ``log2 N`` butterfly
    stages pairs entries ``h`` apart through a reshape; it runs on whatever
    device ``x`` lives on.
    """
    y = pad_to_pow2(x)
    size = y.shape[-1]
    lead = y.shape[:-1]
    y = y.reshape(-1, size)
    rows, half = y.shape[0], 1
    while half < size:
        pairs = y.view(rows, size // (2 * half), 2, half)
        top, bottom = pairs[:, :, 0], pairs[:, :, 1]
        y = torch.stack((top + bottom, top - bottom), dim=2).view(rows, size)
        half *= 2
    return (y * size**-0.5).view(*lead, size)
