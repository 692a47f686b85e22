"""Run configurations as YAML files, and the registry of which dataclass each command reads.

A config file has one top-level key naming the command (``build``,
``hessian``, ``score`` or ``trackstar``) whose value is that command's
dataclass in dict form. Each config dataclass registers itself here with
``config_command``, where it is defined, so writing a config needs nothing
above this module; reading one (``rayattr.commands.load_config``) sits
beside every registered dataclass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml

from rayattr import storage
from rayattr.config import to_dict

COMMANDS: dict[str, type] = {}  # command name -> its config dataclass
Config = TypeVar("Config", bound=type)


def config_command(name: str):
    """Class decorator: the dataclass is the config of command ``name``."""

    def register(cls: Config) -> Config:
        COMMANDS[name] = cls
        return cls

    return register


def command_of(config: Any) -> str:
    """The command a config object runs."""
    return next(name for name, cls in COMMANDS.items() if isinstance(config, cls))


def save_config(path: str | Path, config: Any) -> str:
    """Write ``config`` under its command's key (a local path or a URI)."""
    storage.write_bytes(str(path), yaml.safe_dump({command_of(config): to_dict(config)}, sort_keys=False).encode())
    return str(path)
