"""A command group that imports each command's module only when that command runs, for a fast start-up.

``mlxman --help`` lists every command from one-line help strings kept with the registry (a test checks them
against each command's own help) and imports no command module; ``mlxman status`` imports ``cli/status.py``
and nothing of the other commands. Plain option values also skip typer's pydantic conversion (see below).
"""

from __future__ import annotations

import importlib
import inspect
import os
import types
import typing
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import typer
from typer.core import TyperArgument, TyperCommand, TyperOption
from typer.models import ParameterInfo, TyperInfo

from mlxman.cli.errors import MlxmanGroup


@dataclass(frozen=True)
class Lazy:
    """Where a command lives (``module:attr``: a command function, or a ``typer.Typer`` for a group) and the
    one line ``mlxman --help`` shows for it without importing it."""

    target: str
    help: str


def load(name: str, lazy: Lazy, markup: Any = None) -> Any:
    """Import ``lazy.target`` and build its click command, named ``name``, with help in ``markup`` mode."""
    module_name, _, attr = lazy.target.partition(":")
    obj = getattr(importlib.import_module(module_name), attr)
    command: Any
    if isinstance(obj, typer.Typer):
        # As add_typer builds a group: with the root's markup mode, not the group's own default.
        command = typer.main.get_group_from_info(
            TyperInfo(obj),
            pretty_exceptions_short=obj.pretty_exceptions_short,
            suggest_commands=obj.suggest_commands,
            rich_markup_mode=markup,
        )
    else:
        single = typer.Typer(add_completion=False, rich_markup_mode=markup)
        single.command(name)(obj)
        command = typer.main.get_command(single)
    command.name = name
    skip_pydantic_for_plain_values(command)
    _whole_listing_lines(command)
    return command


def _whole_listing_lines(command: Any) -> None:
    """A group lists each command by its help's first paragraph, wrapped, not cut at the first line's end."""
    for sub in getattr(command, "commands", {}).values():
        if sub.short_help is None and sub.help:
            sub.short_help = " ".join(sub.help.split("\n\n")[0].split())
        _whole_listing_lines(sub)


class _LazyCommands(MutableMapping[str, Any]):
    """The group's ``commands``: the registry's names, each imported and built on first access."""

    def __init__(self, loaded: MutableMapping[str, Any], registry: Mapping[str, Lazy], markup: Any) -> None:
        self._loaded = loaded
        self._registry = registry
        self._markup = markup

    def is_loaded(self, name: str) -> bool:
        return name in self._loaded

    def __getitem__(self, name: str) -> Any:
        if name not in self._loaded:
            if name not in self._registry:
                raise KeyError(name)
            self._loaded[name] = load(name, self._registry[name], self._markup)
        return self._loaded[name]

    def __setitem__(self, name: str, command: Any) -> None:
        self._loaded[name] = command

    def __delitem__(self, name: str) -> None:
        del self._loaded[name]

    def __iter__(self) -> Iterator[str]:
        yield from self._registry
        yield from (n for n in self._loaded if n not in self._registry)

    def __len__(self) -> int:
        return len(set(self._registry) | set(self._loaded))


class LazyGroup(MlxmanGroup):
    """The root group: commands from ``registry`` (name -> Lazy), imported when run or asked for help."""

    registry: ClassVar[Mapping[str, Lazy]] = {}

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.commands = _LazyCommands(self.commands, self.registry, self.rich_markup_mode)
        self._listing = False
        skip_pydantic_for_plain_values(self)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        commands = self.commands
        if self._listing and isinstance(commands, _LazyCommands) and not commands.is_loaded(cmd_name):
            lazy = self.registry.get(cmd_name)
            if lazy is not None:
                # Only its line in the listing is wanted: a stand-in, without importing the command.
                return TyperCommand(cmd_name, short_help=lazy.help, rich_markup_mode=self.rich_markup_mode)
        return commands.get(cmd_name)

    def list_commands(self, ctx: Any) -> list[str]:
        return list(self.commands)  # the names alone: TyperGroup's own listing builds every command

    def format_help(self, ctx: Any, formatter: Any) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False


# -- parameters without pydantic ------------------------------------------------------------------------
#
# Typer 0.29 converts every non-flag value (even an option left at its None default) through a pydantic
# TypeAdapter it builds on first use, and importing pydantic for it costs more than all of `mlxman status`
# otherwise takes. For the values whose result is known without it (an absent optional value; a string
# for a ``str`` parameter; an ordinary path for a ``Path`` parameter) the result typer's own conversion
# gives is produced here, and every other value goes through typer. tests/test_cli_startup.py checks the
# two agree on every parameter of every command.

_STR, _PATH = "str", "path"
# typer.Option/Argument's path checks at their defaults: only readability is checked (on a path that exists).
_PLAIN_PATH = {
    "exists": False,
    "file_okay": True,
    "dir_okay": True,
    "writable": False,
    "readable": True,
    "resolve_path": False,
    "allow_dash": False,
    "path_type": None,
}


def skip_pydantic_for_plain_values(command: Any) -> None:
    """Give every typer parameter of ``command`` (and its subcommands) the pydantic-free path."""
    hints = _hints(command.callback)
    for param in getattr(command, "params", []):
        if isinstance(param, (TyperOption, TyperArgument)) and param.name is not None:
            _install(param, _plain_kind(hints.get(param.name)))
    # --help is made per command on first use, outside ``params``: its value (None unless given) too.
    get_help_option = command.get_help_option

    def help_option(ctx: Any) -> Any:
        option = get_help_option(ctx)
        if isinstance(option, TyperOption) and not hasattr(option.process_value, "typer_process_value"):
            _install(option, None)
        return option

    setattr(command, "get_help_option", help_option)  # noqa: B010
    commands = getattr(command, "commands", {})
    for name in list(commands):
        if not isinstance(commands, _LazyCommands) or commands.is_loaded(name):
            skip_pydantic_for_plain_values(commands[name])


def _hints(callback: Callable[..., Any] | None) -> dict[str, Any]:
    if callback is None:
        return {}
    try:
        return typing.get_type_hints(inspect.unwrap(callback), include_extras=True)
    except Exception:  # an annotation that does not resolve: typer's own path for every value
        return {}


def _plain_kind(annotation: Any) -> str | None:
    """``str`` or ``path`` for a parameter typed so, with no parser and no path checks beyond the default."""
    if annotation is None:
        return None
    info: ParameterInfo | None = None
    if typing.get_origin(annotation) is typing.Annotated:
        annotation, *extras = typing.get_args(annotation)
        info = next((e for e in extras if isinstance(e, ParameterInfo)), None)
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            return None
        annotation = rest[0]
    if info is not None and info.parser is not None:
        return None
    if annotation is str:
        return _STR
    if annotation is Path and (info is None or all(getattr(info, k) == v for k, v in _PLAIN_PATH.items())):
        return _PATH
    return None


_SLOW = object()


def _plain_value(param: Any, kind: str | None, value: Any) -> Any:
    """Typer's conversion of ``value`` where it is known without pydantic; ``_SLOW`` where it is not."""
    if value is None:
        return _SLOW if param.multiple or param.nargs == -1 else None
    if not isinstance(value, str) or param.multiple or param.nargs != 1:
        return _SLOW
    if kind == _STR:
        return value
    if kind == _PATH and value:
        try:
            os.stat(value)
        except OSError:
            return Path(value)  # nothing there: typer checks nothing more
        except ValueError:
            return _SLOW
        return Path(value) if os.access(value, os.R_OK) else _SLOW
    return _SLOW


def _install(param: Any, kind: str | None) -> None:
    slow = param.process_value

    def process_value(ctx: Any, value: Any) -> Any:
        plain = _plain_value(param, kind, value)
        if plain is _SLOW or (param.required and param.value_is_missing(plain)):
            return slow(ctx, value)
        return param.callback(ctx, param, plain) if param.callback is not None else plain

    process_value.typer_process_value = slow  # type: ignore[attr-defined]
    setattr(param, "process_value", process_value)  # noqa: B010
