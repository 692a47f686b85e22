"""The CLI's options, made from the configs' fields: each field's ``setting`` (``rayattr.config``) gives
the option its name, default, choices and help, so nothing here repeats them.

A ``Group`` turns the fields of one spec or config into Typer parameters and
builds that object back from the parsed values; ``with_options`` appends the
groups' parameters to a command, which receives the parsed values as one dict.
Also here: the options that belong to no config (the run path, the Ray
address, ``--save-config``), the one-line error wrapper and ``saved``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import types
import typing
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape

from rayattr.cli.render import console, progress_bar
from rayattr.config import DataSpec, GradSpec, ModelSpec, RayattrError, RunSpec

Values = dict[str, Any]  # parsed option values, by parameter name


def choices(name: str, values: tuple[str, ...]) -> type[Enum]:
    """A CLI choice type over ``values`` (members named like the values, ``-`` as ``_``)."""
    return Enum(name, {value.replace("-", "_"): value for value in values}, type=str)


@dataclasses.dataclass(frozen=True)
class Group:
    """Command-line options from the fields of ``cls`` that carry a help text.

    ``prefix`` names the options (``query_`` gives ``--query-dataset``); ``include`` / ``exclude``
    pick fields; ``defaults`` is an instance whose values replace the class defaults (TrackStar's
    own gradient settings); with ``optional``, required fields become optional and ``build``
    returns None when they are not given.
    """

    cls: type
    prefix: str = ""
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    defaults: Any = None
    optional: bool = False

    def fields(self) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(self.cls) if "help" in f.metadata and f.name not in self.exclude
                and (self.include is None or f.name in self.include)]

    def names(self) -> list[str]:
        return [self.prefix + f.name for f in self.fields()]

    def parameters(self) -> list[inspect.Parameter]:
        hints = typing.get_type_hints(self.cls)
        return [self._parameter(f, hints[f.name]) for f in self.fields()]

    def _parameter(self, spec_field: dataclasses.Field, hint: Any) -> inspect.Parameter:
        name = self.prefix + spec_field.name
        kind, default = option_type(f"{self.cls.__name__}_{spec_field.name}", hint, spec_field.metadata), self._default(spec_field)
        if isinstance(kind, type) and issubclass(kind, Enum) and default is not inspect.Parameter.empty:
            default = kind(default)
        if default is inspect.Parameter.empty and self.optional:
            kind, default = Optional[kind], None
        flags = () if self.prefix else spec_field.metadata.get("flags", ())
        annotation = Annotated[kind, typer.Option(*flags, help=spec_field.metadata["help"])]
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)

    def _default(self, spec_field: dataclasses.Field) -> Any:
        if self.defaults is not None:
            value = getattr(self.defaults, spec_field.name)
        elif spec_field.default is not dataclasses.MISSING:
            value = spec_field.default
        else:
            return inspect.Parameter.empty
        return None if isinstance(value, tuple) else value  # repeatable options start empty: ``build`` fills in

    def build(self, values: Values, **fixed: Any) -> Any:
        """The spec or config from the parsed ``values`` (and ``fixed`` fields the command sets itself)."""
        given = {}
        for spec_field in self.fields():
            value = values.get(self.prefix + spec_field.name)
            if isinstance(value, Enum):
                value = value.value
            if value is None and isinstance(getattr(self.defaults, spec_field.name, spec_field.default), tuple):
                continue  # an empty repeatable option keeps the default
            if isinstance(value, list):
                value = tuple(value)
            given[spec_field.name] = value
        if self.optional and any(given.get(f.name) is None for f in self.fields() if self._default(f) is inspect.Parameter.empty):
            return None
        base = {} if self.defaults is None else {f.name: getattr(self.defaults, f.name)
                                                 for f in dataclasses.fields(self.cls) if f.init}
        return self.cls(**(base | given | fixed))


def option_type(name: str, hint: Any, metadata: typing.Mapping) -> Any:
    """The Typer type of a field: choices for Literals (and ``choices`` metadata), lists for tuples."""
    if metadata.get("choices"):
        return choices(name, tuple(metadata["choices"]))
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return choices(name, args)
    if origin is tuple:
        return Optional[list[args[0]]]
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        return Optional[option_type(name, next(a for a in args if a is not type(None)), metadata)]
    return hint


def with_options(*groups: Group) -> Callable[[Callable], Callable]:
    """Append the groups' options to a command's own parameters; the command receives their values as
    ``options``. Typer reads the signature, so the wrapper advertises the command's parameters first."""

    def decorate(command: Callable) -> Callable:
        added = [p for group in groups for p in group.parameters()]
        own = [p for name, p in inspect.signature(command, eval_str=True).parameters.items() if name != "options"]
        names = [p.name for p in own + added]
        if len(set(names)) != len(names):
            raise TypeError(f"{command.__name__}: options named twice: {sorted({n for n in names if names.count(n) > 1})}")

        @functools.wraps(command)
        def wrapper(**kwargs):
            options = {p.name: kwargs.pop(p.name) for p in added}
            return command(**kwargs, options=options)

        parameters = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own + added]
        wrapper.__signature__ = inspect.Signature(parameters)
        wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
        return wrapper

    return decorate


def user_errors(command: Callable) -> Callable:
    """Print a RayattrError as one line and exit 1 instead of a traceback.

    A pass that fails leaves its other batches' calls unread; Ray would log each of their errors (the same
    failure, as pages of trace) when it drops them, after the one line, unless told to ignore them.
    """

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except RayattrError as exc:
            os.environ["RAY_IGNORE_UNHANDLED_ERRORS"] = "1"  # read by the driver when it drops an unread error
            console.print(f"[bold red]error:[/] {escape(str(exc))}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


# Options that belong to no config: where a run writes, which Ray it joins, whether it only saves its config.
RunPathArg = Annotated[str, typer.Argument(help="Run directory / LanceDB database (local path or URI)")]
RayAddressOpt = Annotated[Optional[str], typer.Option(help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")]
SaveConfigOpt = Annotated[Optional[Path], typer.Option(
    help="Write this command's YAML config (for `rayattr run` / `ray job submit ... jobs/`) and exit")]


def run_with_progress(config, label: str, save_config: Path | None, ray_address: str | None) -> Any:
    """Save ``config`` (``--save-config``: returns None), or run it under a progress bar and return its result."""
    from rayattr.api import run

    if saved(save_config, config):
        return None
    with progress_bar(label) as show:
        return run(config, ray_address=ray_address, on_progress=show)


def saved(path: Path | None, config) -> bool:
    """With ``--save-config PATH``: write the command's YAML config instead of running it."""
    if path is None:
        return False
    from rayattr.configfile import command_of, save_config

    Console().print(f"wrote {save_config(path, config)}; run it with `rayattr run {path}` or "
                    f"`ray job submit --working-dir . -- python jobs/{command_of(config)}.py {path}`")
    return True


# The groups most commands stream a dataset with: a model, a dataset, and how gradients are taken.
MODEL = Group(ModelSpec)
DATA = Group(DataSpec)
GRADS = Group(GradSpec, exclude=("dtype", "per_token"))  # `build` alone stores rows: it takes all of GradSpec
STREAMING = (MODEL, DATA, GRADS)


def run_spec(options: Values, grads: Group = GRADS, **fixed_grads: Any) -> RunSpec:
    """The RunSpec of a command that streams a dataset through the model."""
    return RunSpec(MODEL.build(options), DATA.build(options), grads.build(options, **fixed_grads))
