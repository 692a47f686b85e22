"""``rayattr doctor``'s escalation ladder (no Ray, no CLI)."""

from __future__ import annotations

from rayattr.config import ModelSpec
from rayattr.doctor import ladder


def test_ladder_skips_rungs_that_change_nothing(offline_fixture) -> None:
    fp32 = [a.flags for a in ladder(ModelSpec("m"))]
    assert fp32 == ["(given)", "--force-math-sdp", "--force-math-sdp --precision fp32 --use-tf32-matmuls"]
    assert len(ladder(ModelSpec("m", precision="bf16"))) == 4
