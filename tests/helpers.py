"""Assertions the tests share."""

from __future__ import annotations

import numpy as np


def assert_rows_close(actual: np.ndarray, expected: np.ndarray, tol: float = 1e-5) -> None:
    """Gradient rows equal up to float32 summation order: error relative to each row's largest entry.

    Other batch compositions reorder float32 sums, which moves small entries of a
    row by ~1e-7 of the row's scale; an elementwise rtol would flag those.
    """
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = np.maximum(np.abs(expected).max(axis=1, keepdims=True), 1e-30)
    worst = float((np.abs(actual.astype(np.float64) - expected) / scale).max())
    assert worst <= tol, f"rows differ by {worst:.3g} of their scale (> {tol})"
