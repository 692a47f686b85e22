"""Ray tasks that combine partial statistics and decompose them, module by module.

Partial sums are merged in a fixed binary tree over the workers' order, so the
result is independent of scheduling; only the split of the data between
workers changes the float64 rounding. Eigendecompositions run as one task per
matrix, in parallel.
"""

from __future__ import annotations

import ray
import torch

from rayattr.hessian.factors import Eigen, eigh_psd
from rayattr.hessian.stats import Sums, merge

# Reduction tasks run while the worker actors still hold their CPUs (EK-FAC
# reuses them for a second pass), so they ask for the slice the pool leaves free.
REDUCE_CPUS = 0.5


@ray.remote(num_cpus=REDUCE_CPUS)
def _merge(left: Sums, right: Sums) -> Sums:
    return merge(left, right)


def tree_sum(partials: list[ray.ObjectRef]) -> ray.ObjectRef:
    """Sum the partial results pairwise, level by level, as Ray tasks."""
    level = list(partials)
    while len(level) > 1:
        pairs = [_merge.remote(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        level = pairs + ([level[-1]] if len(level) % 2 else [])
    return level[0]


@ray.remote(num_cpus=REDUCE_CPUS)
def _eigh(matrix: torch.Tensor) -> Eigen:
    return eigh_psd(matrix)


def eigh_all(matrices: dict[str, torch.Tensor]) -> dict[str, Eigen]:
    """Float64 eigendecompositions of many matrices, one Ray task each."""
    refs = {name: _eigh.remote(matrix) for name, matrix in matrices.items()}
    return dict(zip(refs, ray.get(list(refs.values()))))
