"""Statistics on the Ray path refuse sketched rows (their factors are per module)."""

from __future__ import annotations

import pytest

from rayattr.config import DataSpec, GradSpec, ModelSpec, RayattrError, RunSpec
from rayattr.ray.entry import fit


def test_statistics_refuse_sketched_rows(tmp_path):
    spec = RunSpec(ModelSpec("m"), DataSpec("d"), GradSpec(projection_dim=64, projection_type="qk"))
    with pytest.raises(RayattrError, match="per module.*qk sketch"):
        fit(str(tmp_path), spec, "second-moment")
