"""Per-module accumulators of curvature statistics; partial sums that add up.

Every accumulator keeps float64 sums and counts per module and never holds
per-example rows, so a worker's memory is independent of how much data it
sees, and the sums of several workers merge by plain addition (``merge``) into
exactly what one worker would have computed.

- second moment: ``sum_n p_n p_n^T`` of each module's (normalized, projected) rows
- K-FAC: ``A = sum_t a_t a_t^T``, ``S = sum_t g_t g_t^T`` over valid tokens
- EK-FAC: ``sum_n ((Q_S^T G_n Q_A)[o, i])^2`` given fitted eigenbases
- normalizer fits: ``sum_n G_n^2`` (Adam) reduced to row/column means (Adafactor)
"""

from __future__ import annotations

from typing import Literal

import torch

from rayattr.config import RayattrError
from rayattr.grads.collector import ModuleLayout
from rayattr.hessian.factors import ekfac_lambda

SECOND_MOMENT_PASS, KFAC_PASS, EKFAC_PASS, NORMALIZER_PASS = "second-moment", "kfac", "ekfac", "normalizer"  # the kinds of passes
Method = Literal["second-moment", "ekfac", "normalizer"]  # row passes (K-FAC taps tokens: TokenAccumulator)
Sums = dict[str, dict[str, torch.Tensor]]
PENDING_ROWS = 512  # second-moment rows gathered before one GEMM per module adds them


def merge(left: Sums, right: Sums) -> Sums:
    """Elementwise sum of two partial results over the same modules.

    A worker that saw no data has no keys yet for a module; its side counts as zero.
    """
    if set(left) != set(right):
        raise RayattrError(f"cannot merge statistics of different modules: {sorted(set(left) ^ set(right))[:4]}")
    merged: Sums = {}
    for name in left:
        keys = left[name].keys() | right[name].keys()
        merged[name] = {k: left[name][k] + right[name][k] if k in left[name] and k in right[name]
                        else (left[name].get(k) if k in left[name] else right[name][k]).clone() for k in keys}
    return merged


class RowAccumulator:
    """Statistics computed from finished gradient rows (one per document).

    ``second-moment`` and ``ekfac`` work on any projection (a projected row is
    the ``[p_out, p_in]`` matrix ``L G R^T``, whose K-FAC factors are the
    projected ones); ``normalizer`` needs full gradients (``projection_dim=0``).
    """

    def __init__(self, method: Method, layouts: list[ModuleLayout], eigenbases: Sums | None = None) -> None:
        if method == NORMALIZER_PASS and any(l.p_out != l.out_features or l.p_in != l.in_features for l in layouts):
            raise RayattrError("fitting a normalizer needs full gradients: use --projection-dim 0")
        if method == EKFAC_PASS and eigenbases is None:
            raise RayattrError("EK-FAC needs the K-FAC eigenbases of a first pass")
        self.method = method
        self.layouts = layouts
        self.eigenbases = eigenbases
        self._sums: Sums = {layout.name: {} for layout in layouts}
        self._pending: list[torch.Tensor] = []  # second-moment rows not yet in ``xx``

    @property
    def sums(self) -> Sums:
        """The partial sums over every row added so far."""
        self._flush()
        return self._sums

    def update(self, grads: torch.Tensor, tokens: int) -> None:
        """Add ``[rows, D]`` gradient rows (already normalized/projected by the collector) of
        documents holding ``tokens`` tokens, counted as the K-FAC pass counts them."""
        if self.method == SECOND_MOMENT_PASS:
            self._pending.append(grads)  # ``_flush`` adds ``x^T x`` of many batches at once
            if sum(len(rows) for rows in self._pending) >= PENDING_ROWS:
                self._flush()
        for layout in self.layouts:
            if self.method != SECOND_MOMENT_PASS:
                x = grads[:, layout.offset : layout.offset + layout.width].double()
                if self.method == EKFAC_PASS:
                    bases = self.eigenbases[layout.name]
                    lambda_sum = ekfac_lambda(x.view(-1, layout.p_out, layout.p_in), bases["q_out"], bases["q_in"])
                    self._add(layout.name, lambda_sum=lambda_sum)
                else:
                    self._add(layout.name, sq=x.square().sum(0).view(layout.out_features, layout.in_features))
            self._add(layout.name, count=torch.tensor(float(grads.shape[0]), dtype=torch.float64),
                      tokens=torch.tensor(float(tokens), dtype=torch.float64))

    def _flush(self) -> None:
        """``xx += X^T X`` of the pending rows, one float64 GEMM per module: per-batch updates of a
        wide moment are bound by writing the whole ``[D, D]`` sum, not by the products."""
        if not self._pending:
            return
        rows = torch.cat(self._pending)
        self._pending = []
        for layout in self.layouts:
            x = rows[:, layout.offset : layout.offset + layout.width].double()
            slot = self._sums[layout.name]
            if "xx" in slot:
                slot["xx"].addmm_(x.T, x)
            else:
                slot["xx"] = x.T @ x

    def _add(self, name: str, **values: torch.Tensor) -> None:
        slot = self._sums[name]
        for key, value in values.items():
            slot[key] = slot[key] + value if key in slot else value.clone()


class TokenAccumulator:
    """K-FAC factors from the collector's per-token tap: ``A = sum a a^T``, ``S = sum g g^T``."""

    def __init__(self, layouts: list[ModuleLayout]) -> None:
        self.sums: Sums = {
            layout.name: {
                "A": torch.zeros(layout.p_in, layout.p_in, dtype=torch.float64),
                "S": torch.zeros(layout.p_out, layout.p_out, dtype=torch.float64),
                "tokens": torch.zeros((), dtype=torch.float64),
            }
            for layout in layouts
        }

    def __call__(self, name: str, acts: torch.Tensor, grads: torch.Tensor) -> None:
        """The collector calls this with the valid tokens' ``a [n, p_in]`` and ``g [n, p_out]``.

        Tokens with a NaN/Inf activation or output gradient are left out (as
        documents with a non-finite gradient get no row), so one overflow does
        not poison the factors.
        """
        slot = self.sums[name]
        finite = torch.isfinite(acts).all(1) & torch.isfinite(grads).all(1)
        a, g = acts[finite].double(), grads[finite].double()
        slot["A"] += (a.T @ a).cpu()
        slot["S"] += (g.T @ g).cpu()
        slot["tokens"] += a.shape[0]
