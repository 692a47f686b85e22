"""Running a command's config (``rayattr.commands``): the one route of every command.

The CLI builds a config and calls ``run_config``; `rayattr run` and
``jobs/<command>.py`` load the same config from YAML (``rayattr.configfile``)
and call it too, on a laptop or on a cluster (`ray job submit -- python
jobs/<command>.py CONFIG.yaml`).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

from rayattr import storage
from rayattr.commands import (BuildConfig, HessianConfig, MagicConfig, NormalizerConfig, ReduceConfig, ReportConfig,
                              RetrainConfig, ScoreConfig, TrackstarSpec, TrainConfig, ValidateConfig, load_config)
from rayattr.config import one_line_warnings
from rayattr.hessian.factors import STATS_SUBDIR
from rayattr.lds.validate import validate
from rayattr.lease import Lease
from rayattr.ray.entry import build, fit, make_normalizer, score
from rayattr.ray.retrain import magic, retrain
from rayattr.ray.score import reduce
from rayattr.ray.traintime import train
from rayattr.report import write_report
from rayattr.trackstar import trackstar

Config = (BuildConfig | HessianConfig | MagicConfig | NormalizerConfig | ReduceConfig | ReportConfig | RetrainConfig
          | ScoreConfig | TrackstarSpec | TrainConfig | ValidateConfig)


def run(config: Config, *, resume: bool = False, ray_address: str | None = None,
        on_progress: Callable | None = None, on_step: Callable | None = None) -> Any:
    """Run a command's config; what it returns (a build's progress, a fit's summary, a score's result, trackstar's
    step reports, a bank, a validation, a report's index page) is the command's to render. ``on_progress`` sees
    streaming passes, ``on_step`` trackstar's steps and a bank's finished runs (anything with ``describe()``).
    A command that writes a run path holds its lease while it runs, so a second writer is refused. An object store
    that cannot be reached fails it with one line (``storage.reachable``)."""
    written = written_path(config)
    where = written or (config.scores_path if isinstance(config, ValidateConfig) else config.run_path)
    with storage.reachable(where), (Lease(written) if written is not None else nullcontext()):
        return _run(config, resume, ray_address, on_progress, on_step)


def written_path(config: Config) -> str | None:
    """The run path (bank, normalizer directory) a command writes; None for those that only read one."""
    if isinstance(config, (ValidateConfig, ReportConfig)):
        return None
    if isinstance(config, RetrainConfig):
        return config.bank_path
    return config.out if isinstance(config, NormalizerConfig) else config.run_path


def _run(config: Config, resume: bool, ray_address: str | None, on_progress: Callable | None,
         on_step: Callable | None) -> Any:
    if isinstance(config, ValidateConfig):
        result = validate(config.scores_path, config.bank, config.table, config.ground_truth, config.bootstrap)
        if config.out:
            storage.write_bytes(config.out, json.dumps(result.to_dict(), indent=1).encode())
        return result
    if isinstance(config, ReportConfig):
        return write_report(config)
    if isinstance(config, RetrainConfig):
        return retrain(config, ray_address, on_run=on_step)
    if isinstance(config, MagicConfig):
        return magic(config, ray_address)
    common = {"workers": config.workers, "ray_address": ray_address}
    if isinstance(config, NormalizerConfig):
        return make_normalizer(config, ray_address)
    if isinstance(config, BuildConfig):
        return build(config.run_path, config.spec, on_progress=on_progress, zero_stage=config.zero_stage, **common)
    if isinstance(config, HessianConfig):
        return fit(storage.join(config.run_path, STATS_SUBDIR), config.spec, config.method, zero_stage=config.zero_stage,
                   **common)
    if isinstance(config, ReduceConfig):
        preprocess = config.preprocess
        return reduce(config.run_path, config.spec, aggregation=preprocess.aggregation, hessian=preprocess.hessian,
                      unit_normalize=preprocess.unit_normalize, on_progress=on_progress, **common)
    if isinstance(config, TrainConfig):
        return train(config, ray_address)
    if isinstance(config, ScoreConfig):
        return score(config.run_path, config.query_path, config.settings, spec=config.spec, index_path=config.index_path,
                     step=config.step, on_progress=on_progress, zero_stage=config.zero_stage, **common)
    return trackstar(config, resume=resume, ray_address=ray_address, on_step=on_step)


def progress_logger(command: str, log: Callable[[str], None], every_seconds: float = 10.0) -> Callable:
    """A progress callback that logs at most every ``every_seconds`` (job logs are plain text)."""
    last = [0.0]

    def show(progress) -> None:
        now = time.monotonic()
        if now - last[0] >= every_seconds or progress.docs == progress.total_docs:
            last[0] = now
            nodes = len(progress.nodes)  # on a cluster: whether the work spread over its nodes
            log(f"{command}: {progress.docs:,}/{progress.total_docs:,} documents, {progress.tokens_per_second:,.0f} tokens/s, "
                f"rows from {nodes} node{'s' if nodes != 1 else ''}")

    return show


def job_main(command: str) -> None:
    """Entry point of ``jobs/<command>.py CONFIG.yaml [--resume]`` (what `ray job submit` runs)."""
    parser = argparse.ArgumentParser(description=f"rayattr {command} job")
    parser.add_argument("config", help="YAML run config (written by `rayattr ... --save-config` or by hand)")
    parser.add_argument("--resume", action="store_true", help="trackstar: continue a run, skipping completed steps")
    args = parser.parse_args()
    one_line_warnings()
    _, config = load_config(args.config, expected=command)
    started = time.perf_counter()
    log = lambda line: print(line, flush=True)  # noqa: E731
    run(config, resume=args.resume, on_progress=progress_logger(command, log), on_step=lambda step: log(step.describe()))
    print(f"{command}: finished in {time.perf_counter() - started:.1f} s", flush=True)
