"""Apply ``H^-1`` or ``H^-1/2`` from saved statistics to gradient rows, module by module.

Dense second moments act on each module's flattened (projected) gradient;
K-FAC and EK-FAC act on the ``[p_out, p_in]`` matrix view by rotating into the
eigenbasis, scaling and rotating back. Damping is relative to each module's
mean eigenvalue (the mean of the K-FAC grid or of the EK-FAC corrections).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from rayattr.config import RayattrError, stable_hash
from rayattr.hessian.factors import InversionMode, apply_dense, apply_factored, load_stats
from rayattr.hessian.methods import HessianMethod
from rayattr.space import TableMeta, require_same_space, space_of


@dataclass
class Preconditioner:
    """Per-module ``H^power`` (power -1 or -1/2) ready to multiply gradient rows."""

    method: str
    power: float
    modules: list[dict]
    operators: dict[str, tuple]  # dense: (Eigen, multiplier); factored: (q_out, q_in, multiplier grid)
    identity: dict
    fingerprint: str

    @classmethod
    def load(cls, directory: str | Path, power: float = -1.0, mode: InversionMode = "damped_inverse",
             damping: float = 0.1) -> Preconditioner:
        tensors, manifest = load_stats(directory)
        method = manifest["method"]
        plan = HessianMethod.registry.get(method)
        if plan is None or not plan.preconditions:
            raise RayattrError(f"{directory} holds {method!r} statistics, which cannot precondition gradients")
        operators = {name: plan.operator(t, mode, damping, power) for name, t in tensors.items()}
        identity = space_of(manifest)
        fingerprint = stable_hash({"stats": manifest["fingerprint"], "power": power, "mode": mode, "damping": damping})
        return cls(method, power, manifest["modules"], operators, identity, fingerprint)

    def check(self, meta: TableMeta) -> None:
        """The rows to precondition live in the space the statistics were fitted in."""
        require_same_space(meta, self.identity, "the Hessian statistics and the gradients",
                           "fit the statistics with the same model, modules, projection and normalizer")

    def apply(self, rows: torch.Tensor) -> torch.Tensor:
        """``[N, D]`` rows -> ``H^power`` applied to each module's slice (float64 inside)."""
        out = torch.empty_like(rows)
        for module in self.modules:
            cols = slice(module["offset"], module["offset"] + module["width"])
            ops = self.operators[module["name"]]
            if len(ops) == 2:
                out[:, cols] = apply_dense(rows[:, cols], *ops)
            else:
                q_out, q_in, multiplier = ops
                grads = rows[:, cols].view(-1, module["p_out"], module["p_in"])
                out[:, cols] = apply_factored(grads, q_out, q_in, multiplier).flatten(1)
        return out
