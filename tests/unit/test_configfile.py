"""Hand-written run configs: fields left out take the command's own defaults, nested specs included."""

from __future__ import annotations

import yaml

from rayattr.config import TRACKSTAR_GRADS, GradSpec
from rayattr.runconfig import load_config


def test_partial_grads_keep_each_commands_own_defaults(tmp_path):
    model, train, grads = {"model": "m"}, {"dataset": "t"}, {"seed": 3}
    configs = {
        "trackstar": {"run_path": "r", "model": model, "train": train, "query": {"dataset": "q"}, "grads": grads},
        "build": {"run_path": "r", "spec": {"model": model, "data": train, "grads": grads}},
    }
    for command, body in configs.items():
        (tmp_path / f"{command}.yaml").write_text(yaml.safe_dump({command: body}))
    trackstar = load_config(tmp_path / "trackstar.yaml")[1].grads
    build = load_config(tmp_path / "build.yaml")[1].spec.grads
    assert trackstar.seed == build.seed == 3
    assert (trackstar.projection_dim, trackstar.dtype) == (TRACKSTAR_GRADS.projection_dim, TRACKSTAR_GRADS.dtype) == (45, "int4")
    assert (build.projection_dim, build.dtype) == (GradSpec().projection_dim, GradSpec().dtype) == (16, "float32")
