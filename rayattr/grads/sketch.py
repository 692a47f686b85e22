"""Structured sketches of flattened gradient vectors (Schioppa et al., "Efficient
Sketches for Training Data Attribution and Studying the Loss Landscape").

A sketch is a seeded linear map ``S: R^N -> R^D`` applied to a batch ``[B, N]``.
Every sketch here is scaled so that ``E[<Sx, Sy>] = <x, y>``, the property that
makes sketched inner products and cosines estimate the exact ones. Only the
dense reference stores a ``D x N`` matrix; the structured ones keep O(N + D)
random numbers (FJL keeps a sparse matrix whose size grows with ``D``, the cost
the paper's lookup-free sketches remove).

Notation (the paper's): ``B`` a diagonal of random signs, ``H_N`` the orthonormal
Walsh-Hadamard matrix of size ``N`` (inputs zero-padded to a power of two),
``G`` a diagonal of standard Gaussians, ``R_D`` the restriction to the first
``D`` coordinates. Randomness is drawn on the CPU from generators seeded with
``stable_seed(kind, role, seed)`` and then moved, so every worker, device and
run builds the same sketch; it is drawn once per sketch, never per batch.
"""

from __future__ import annotations

import math

import torch

from rayattr.config import RayattrError, SketchType
from rayattr.grads.hadamard import fwht, next_pow2, pad_to_pow2
from rayattr.grads.projection import stable_seed

DENSE_MAX_BYTES = 1 << 30  # 1 GiB: the largest dense D x N float32 matrix built by default


class Sketch:
    """A seeded linear map ``R^n -> R^dim`` on the last dimension of a batch.

    Subclasses draw their random state in ``__init__`` (CPU tensors attributes
    listed in ``_state``) and implement ``_apply`` on float32 ``[B, n]`` input.
    """

    kind: SketchType
    _state: tuple[str, ...] = ()

    def __init__(self, n: int, dim: int, seed: int) -> None:
        if n < 1 or dim < 1:
            raise RayattrError(f"a sketch needs input and output sizes >= 1, got {n} -> {dim}")
        self.n, self.dim, self.seed = n, dim, seed
        self.padded = next_pow2(n)

    def _generator(self, role: str) -> torch.Generator:
        """A CPU generator for one part of the random state, independent of the global RNG."""
        return torch.Generator(device="cpu").manual_seed(stable_seed(f"sketch:{self.kind}", role, self.seed))

    def _signs(self) -> torch.Tensor:
        """The diagonal ``B``: ``padded`` random signs (the padding's are never used)."""
        draw = torch.randint(0, 2, (self.padded,), generator=self._generator("signs"), dtype=torch.int8)
        return draw.to(torch.float32).mul_(2).sub_(1)

    def _gaussians(self, role: str, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self._generator(role), dtype=torch.float32)

    def to(self, device: torch.device | str) -> Sketch:
        """Move the cached random state to ``device`` (in place; returns ``self``)."""
        for name in self._state:
            setattr(self, name, getattr(self, name).to(device))
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., n]`` -> ``[..., dim]`` float32."""
        if x.shape[-1] != self.n:
            raise RayattrError(f"{self.kind} sketch expects vectors of length {self.n}, got {x.shape[-1]}")
        lead = x.shape[:-1]
        return self._apply(x.reshape(-1, self.n).float()).reshape(*lead, self.dim)

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def leading_hadamard_rows(z: torch.Tensor, dim: int) -> torch.Tensor:
    """``sqrt(N/dim) R_dim H_N z`` for ``z [B, N]``, ``N`` a power of two, in O(N + dim log dim).

    In Sylvester order the first ``d = 2^j`` rows of the unnormalized ``H_N``
    are ``[H_d H_d ... H_d]``, so ``R_d H_N z = sqrt(d/N) H_d fold_d(z)`` where
    ``fold_d`` sums the ``N/d`` consecutive blocks of length ``d``. ``dim`` that
    is not a power of two keeps the first ``dim`` rows of the next power ``d``.
    """
    rows, size = z.shape
    d = next_pow2(dim)
    folded = z.view(rows, size // d, d).sum(1)
    return fwht(folded)[:, :dim] * math.sqrt(d / dim)


class PreconditionedSketch(Sketch):
    """A sketch of ``H_N B x``: random signs, then the Hadamard transform spreads mass over all coordinates."""

    def __init__(self, n: int, dim: int, seed: int) -> None:
        super().__init__(n, dim, seed)
        self._check_dim_fits()
        self.signs = self._signs()

    def _check_dim_fits(self) -> None:
        """The sketch subsamples a ``padded``-long vector, so ``dim`` cannot exceed it."""
        if self.dim > self.padded:
            raise RayattrError(
                f"{self.kind} sketch dimension {self.dim} exceeds the padded input length {self.padded}; "
                "use a smaller --projection-dim (a sketch larger than its input saves nothing)"
            )

    def _preconditioned(self, x: torch.Tensor) -> torch.Tensor:
        return fwht(pad_to_pow2(x) * self.signs)


class DenseSketch(Sketch):
    """Gaussian JL reference: ``S x`` with ``S[D, N]`` iid ``N(0, 1/D)``.

    The classical dense Johnson-Lindenstrauss map the paper compares against;
    its ``D x N`` matrix is what makes it unusable at gradient scale, so it
    refuses sizes over ``max_bytes``.
    """

    kind = "dense"
    _state = ("matrix",)

    def __init__(self, n: int, dim: int, seed: int, max_bytes: int = DENSE_MAX_BYTES) -> None:
        super().__init__(n, dim, seed)
        size = 4 * n * dim
        if size > max_bytes:
            raise RayattrError(
                f"a dense {dim} x {n} sketch needs {size / 2**30:.2f} GiB (budget {max_bytes / 2**30:.2f} GiB); "
                "use a structured sketch (--projection-type afjl, affd or qk) or a smaller --projection-dim"
            )
        self.matrix = self._gaussians("matrix", dim, n).div_(math.sqrt(dim))

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.matrix.T


class FJLSketch(PreconditionedSketch):
    """FJL (the fast JL transform of Ailon and Chazelle, the paper's baseline): ``P H_N B x``.

    ``P[D, N]`` is sparse with Gaussian non-zeros; applying it is a gather
    ("look-up") per non-zero, and its storage grows as ``D log^2 N``: the
    memory wall the paper's Fig. 3 shows and AFJL removes.
    Departures: the paper's sparsity ``q ~ log^2 N / N`` is kept as exactly
    ``m = min(N, ceil(log2(N)^2))`` non-zeros per row at uniform positions drawn
    with replacement (instead of iid Bernoulli(q) entries), which keeps memory
    predictable and the estimator unbiased with scale ``sqrt(N / (D m))``.
    """

    kind = "fjl"
    _state = ("signs", "sparse")

    def __init__(self, n: int, dim: int, seed: int) -> None:
        super().__init__(n, dim, seed)
        per_row = min(self.padded, math.ceil(math.log2(self.padded) ** 2) or 1)
        cols = torch.randint(0, self.padded, (dim * per_row,), generator=self._generator("columns"))
        rows = torch.arange(dim).repeat_interleave(per_row)
        values = self._gaussians("values", dim * per_row) * math.sqrt(self.padded / (dim * per_row))
        self.sparse = torch.sparse_coo_tensor(
            torch.stack((rows, cols)), values, (dim, self.padded), check_invariants=True
        ).coalesce()  # repeated positions in a row add up

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sparse.mm(self.sparse, self._preconditioned(x).T).T


class AFJLSketch(PreconditionedSketch):
    """AFJL (the paper's look-up-free FJL): ``sqrt(N/D) G_D R_D H_N B x``.

    Steps: random signs ``B``; Hadamard preconditioning ``H_N``; FJL's sparse
    Gaussian matrix replaced by the restriction ``R_D`` to the first ``D``
    coordinates (a slice, not a gather) and a Gaussian diagonal ``G_D``.
    Departures: the input is zero-padded to a power of two ``N``; ``R_D H_N``
    is computed as one fold and a length-``D`` transform (``leading_hadamard_rows``),
    which is the same matrix in O(N + D log D).
    """

    kind = "afjl"
    _state = ("signs", "gaussians")

    def __init__(self, n: int, dim: int, seed: int) -> None:
        super().__init__(n, dim, seed)
        self.gaussians = self._gaussians("gaussians", dim)

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        return leading_hadamard_rows(pad_to_pow2(x) * self.signs, self.dim) * self.gaussians


class AFFDSketch(PreconditionedSketch):
    """AFFD (the paper's look-up-free Fastfood): ``sqrt(N/D) R_D H_N G H_N B x``.

    Fastfood's ``S H G Pi H B`` with the permutation ``Pi`` (a gather) and the
    row-norm correction ``S`` removed, and its random subsampling replaced by
    the restriction ``R_D`` to the first ``D`` coordinates. The Gaussian
    diagonal ``G`` between the two transforms makes every output coordinate a
    Gaussian combination of the preconditioned input.
    Departures: zero-padding to a power of two; the outer ``R_D H_N`` is
    computed by ``leading_hadamard_rows`` (same matrix, O(N + D log D)).
    """

    kind = "affd"
    _state = ("signs", "gaussians")

    def __init__(self, n: int, dim: int, seed: int) -> None:
        super().__init__(n, dim, seed)
        self.gaussians = self._gaussians("gaussians", self.padded)

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        return leading_hadamard_rows(self._preconditioned(x) * self.gaussians, self.dim)


class QKSketch(PreconditionedSketch):
    """QK (the paper's Kronecker-factored sketch): ``D^-1/2 (K_1 (x) K_2) H_N B x``.

    The preconditioned vector is reshaped to ``[N_1, N_2]`` (``N_1 N_2 = N``)
    and multiplied by Gaussian factors ``K_1[D_1, N_1]`` and ``K_2[D_2, N_2]``
    (``D_1 D_2 = D``) on each side: two dense matmuls, no look-ups, and
    O(D_1 N_1 + D_2 N_2) random numbers instead of ``D N``. Since
    ``E[K_i^T K_i] = D_i I``, ``E[(K_1 (x) K_2)^T (K_1 (x) K_2)] = D I``.
    Departures: the paper's preconditioner is a Kronecker product of random
    orthogonal blocks ``Q`` (matmul-friendly on TPUs); here it is ``H_N B``,
    because a Haar-orthogonal ``Q_i`` next to a Gaussian ``K_i`` is absorbed by
    it (``K_i Q_i`` is again Gaussian) while the FWHT is cheap on CPU and GPU.
    ``D_1`` is the largest divisor of ``D`` not above ``sqrt(D)``.
    """

    kind = "qk"
    _state = ("signs", "left", "right")

    def __init__(self, n: int, dim: int, seed: int) -> None:
        super().__init__(n, dim, seed)
        self.left = self._gaussians("left", self.rows_out, self.rows_in)
        self.right = self._gaussians("right", self.cols_out, self.cols_in).div_(math.sqrt(dim))

    def _check_dim_fits(self) -> None:
        """Factor the input and output sizes; each output factor must fit its input factor."""
        bits = self.padded.bit_length() - 1
        self.rows_in, self.cols_in = 1 << (bits // 2), 1 << (bits - bits // 2)
        self.rows_out = max(d for d in range(1, math.isqrt(self.dim) + 1) if self.dim % d == 0)
        self.cols_out = self.dim // self.rows_out
        if self.rows_out > self.rows_in or self.cols_out > self.cols_in:
            raise RayattrError(
                f"qk sketch cannot factor {self.dim} = {self.rows_out} x {self.cols_out} within the input's "
                f"{self.rows_in} x {self.cols_in} blocks; use a power of two --projection-dim <= {self.padded}"
            )

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        blocks = self._preconditioned(x).view(-1, self.rows_in, self.cols_in)
        return (self.left @ blocks @ self.right.T).reshape(-1, self.dim)


SKETCHES: dict[str, type[Sketch]] = {cls.kind: cls for cls in (DenseSketch, FJLSketch, AFJLSketch, AFFDSketch, QKSketch)}


def make_sketch(kind: SketchType, n: int, dim: int, seed: int) -> Sketch:
    """The sketch of ``kind`` from ``R^n`` to ``R^dim``, on the CPU."""
    if kind not in SKETCHES:
        raise RayattrError(f"unknown sketch type {kind!r}; use one of {', '.join(SKETCHES)}")
    return SKETCHES[kind](n, dim, seed)
