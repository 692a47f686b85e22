"""The configs of `rayattr build`, `hessian` and `score`, and running any saved config:
what `rayattr run`, the CLI's `--save-config` and `jobs/` share.

The same file (format: ``rayattr.configfile``) runs on a laptop (`rayattr
run`) and on a cluster (`ray job submit -- python jobs/<command>.py CONFIG.yaml`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rayattr import storage
from rayattr.config import RayattrError, RunSpec, from_dict, one_line_warnings
from rayattr.configfile import COMMANDS, config_command
from rayattr.hessian.methods import SecondMoment
from rayattr.ray.entry import build, fit, score
from rayattr.ray.score import ScoreSettings
from rayattr.trackstar import trackstar


@config_command("build")
@dataclass(frozen=True)
class BuildConfig:
    """`rayattr build`: the gradient table of ``spec.data`` in ``run_path``."""

    run_path: str
    spec: RunSpec
    workers: int = 1
    zero_stage: int = 0  # 3: the model partitioned over the workers (DeepSpeed ZeRO-3) instead of replicated


@config_command("hessian")
@dataclass(frozen=True)
class HessianConfig:
    """`rayattr hessian`: statistics of ``spec.data`` in ``run_path``/stats."""

    run_path: str
    spec: RunSpec
    method: str = SecondMoment.name
    workers: int = 1
    zero_stage: int = 0


@config_command("score")
@dataclass(frozen=True)
class ScoreConfig:
    """`rayattr score`: ``spec`` scores on the fly, ``index_path`` scores a built table."""

    run_path: str
    query_path: str | None  # None with settings.self_influence
    settings: ScoreSettings = dataclasses.field(default_factory=ScoreSettings)
    spec: RunSpec | None = None
    index_path: str | None = None
    workers: int = 1
    zero_stage: int = 0


def load_config(path: str | Path, expected: str | None = None) -> tuple[str, Any]:
    """``(command, config)`` from a YAML file; ``expected`` names the only command accepted."""
    try:
        payload = yaml.safe_load(storage.read_bytes(str(path)))
    except (OSError, yaml.YAMLError) as exc:
        raise RayattrError(f"cannot read run config {path}: {exc}") from exc
    if not isinstance(payload, dict) or len(payload) != 1 or next(iter(payload)) not in COMMANDS:
        raise RayattrError(f"{path} is not a rayattr run config: expected one top-level key of {sorted(COMMANDS)}")
    command, body = next(iter(payload.items()))
    if expected is not None and command != expected:
        raise RayattrError(f"{path} configures `{command}`, not `{expected}`; run it with jobs/{command}.py")
    return command, from_dict(COMMANDS[command], body)


def run_config(command: str, config: Any, *, resume: bool = False, ray_address: str | None = None,
               log: Callable[[str], None] = print) -> Any:
    """Run one loaded config, logging progress lines through ``log``."""
    progress = _progress_logger(command, log)
    if command == "build":
        return build(config.run_path, config.spec, workers=config.workers, ray_address=ray_address, on_progress=progress,
                     zero_stage=config.zero_stage)
    if command == "hessian":
        return fit(storage.join(config.run_path, "stats"), config.spec, config.method, workers=config.workers,
                   ray_address=ray_address, zero_stage=config.zero_stage)
    if command == "score":
        return score(config.run_path, config.query_path, config.settings, spec=config.spec, index_path=config.index_path,
                     workers=config.workers, ray_address=ray_address, on_progress=progress, zero_stage=config.zero_stage)
    return trackstar(config, resume=resume, ray_address=ray_address, on_step=lambda step: log(step.describe()))


def _progress_logger(command: str, log: Callable[[str], None], every_seconds: float = 10.0) -> Callable:
    """A progress callback that logs at most every ``every_seconds`` (job logs are plain text)."""
    last = [0.0]

    def show(progress) -> None:
        now = time.monotonic()
        if now - last[0] >= every_seconds or progress.docs == progress.total_docs:
            last[0] = now
            log(f"{command}: {progress.docs:,}/{progress.total_docs:,} documents, {progress.tokens_per_second:,.0f} tokens/s")

    return show


def job_main(command: str) -> None:
    """Entry point of ``jobs/<command>.py CONFIG.yaml [--resume]`` (what `ray job submit` runs)."""
    import argparse

    parser = argparse.ArgumentParser(description=f"rayattr {command} job")
    parser.add_argument("config", help="YAML run config (written by `rayattr ... --save-config` or by hand)")
    parser.add_argument("--resume", action="store_true", help="trackstar: continue a run, skipping completed steps")
    args = parser.parse_args()
    one_line_warnings()
    _, config = load_config(args.config, expected=command)
    started = time.perf_counter()
    run_config(command, config, resume=args.resume, log=lambda line: print(line, flush=True))
    print(f"{command}: finished in {time.perf_counter() - started:.1f} s", flush=True)
