"""Kronecker-factored random projections, seeded per module.

A module's per-example gradient ``G[O, I]`` is compressed to ``P = L G R^T``
with ``L[p, O]`` and ``R[p, I]`` whose entries are iid with variance ``1/p``,
so ``E[<P_n, P_m>] = <G_n, G_m>`` (the JL scaling). The matrices depend only on
``(module name, role, seed, shape, kind)``: they are generated on the CPU with a
seed from a stable hash and then moved, so every worker, device and run builds
the same ones.

With ``row_orthonormal`` a factor is the draw's QR orthogonalisation, scaled to
``Q^T sqrt(cols / rows)``: its rows are orthogonal with squared norm
``cols / rows``, and since the row space of an iid Gaussian or Rademacher draw
is spread evenly (``E[Q Q^T] = (rows / cols) I`` by symmetry), ``E[L^T L] = I``
still, so projected inner products stay unbiased.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import torch

from rayattr.config import KroneckerType, RayattrError


def stable_seed(module_name: str, role: str, seed: int) -> int:
    """A 63-bit generator seed from ``(module, role, global seed)``.

    Python's ``hash`` is salted per process, so a cryptographic digest is used
    to make the seed identical in every process.
    """
    digest = hashlib.sha256(f"{seed}/{module_name}/{role}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def random_matrix(rows: int, cols: int, kind: KroneckerType, seed: int, row_orthonormal: bool = False) -> torch.Tensor:
    """A float32 ``[rows, cols]`` matrix with iid entries of variance ``1/rows``, or with ``row_orthonormal`` the
    draw orthonormalised: its rows scaled to keep ``E[M^T M] = I`` when ``rows <= cols``, else its columns (an
    isometry, ``M^T M = I``: more rows than the side has cannot be orthogonal)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    if kind == "rademacher":
        signs = torch.randint(0, 2, (rows, cols), generator=generator, dtype=torch.int8)
        matrix = signs.to(torch.float32).mul_(2).sub_(1)
    elif kind == "normal":
        matrix = torch.randn(rows, cols, generator=generator, dtype=torch.float32)
    else:
        raise RayattrError(f"unknown projection type {kind!r}; use 'rademacher' or 'normal'")
    if not row_orthonormal:
        return matrix.div_(rows**0.5)
    if rows > cols:
        q, r = torch.linalg.qr(matrix.double())  # q [rows, cols]: orthonormal columns
        return (q * torch.sign(torch.diagonal(r))).float()
    q, r = torch.linalg.qr(matrix.double().T)  # q [cols, rows]: orthonormal columns spanning the draw's rows
    q = q * torch.sign(torch.diagonal(r))  # fix QR's sign ambiguity so the result is a function of the draw
    return (q.T * (cols / rows) ** 0.5).float()


class KroneckerProjection(NamedTuple):
    """The two factors of one module's projection: ``P = left @ G @ right.T``."""

    left: torch.Tensor  # [p_out, O]
    right: torch.Tensor  # [p_in, I]


def module_projection(
    module_name: str, out_features: int, in_features: int, dim: int | tuple[int, int], kind: KroneckerType, seed: int,
    row_orthonormal: bool = False,
) -> KroneckerProjection:
    """The projection factors of one module: ``dim`` rows on each side, or ``(p_out, p_in)``."""
    p_out, p_in = (dim, dim) if isinstance(dim, int) else dim
    return KroneckerProjection(
        left=random_matrix(p_out, out_features, kind, stable_seed(module_name, "left", seed), row_orthonormal),
        right=random_matrix(p_in, in_features, kind, stable_seed(module_name, "right", seed), row_orthonormal),
    )
