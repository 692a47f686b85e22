"""Cluster configs: the Ray cluster launcher's and KubeRay's manifests are sane (read as YAML, no Ray)."""

from __future__ import annotations

import yaml
from helpers import ROOT


def test_cluster_launcher_config_is_sane():
    config = yaml.safe_load((ROOT / "cluster" / "aws.yaml").read_text())
    types = config["available_node_types"]
    assert config["head_node_type"] in types and types[config["head_node_type"]]["resources"]["CPU"] == 0
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu and all(t["min_workers"] <= t["max_workers"] for t in gpu)
    assert config["docker"]["image"].startswith("rayproject/ray:")
    assert any("rayattr" in command for command in config["setup_commands"])


def test_kuberay_manifests_are_sane():
    cluster = yaml.safe_load((ROOT / "cluster" / "kuberay-raycluster.yaml").read_text())
    job = yaml.safe_load((ROOT / "cluster" / "kuberay-rayjob.yaml").read_text())
    assert (cluster["kind"], job["kind"]) == ("RayCluster", "RayJob")
    for spec in (cluster["spec"], job["spec"]["rayClusterSpec"]):
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
        workers = spec["workerGroupSpecs"][0]
        assert head["image"].startswith("rayproject/ray:")
        gpu = workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
        assert int(gpu) >= 1 and workers["minReplicas"] <= workers["maxReplicas"]
    assert "trackstar.yaml" in job["spec"]["entrypoint"] and "rayattr" in job["spec"]["entrypoint"]
