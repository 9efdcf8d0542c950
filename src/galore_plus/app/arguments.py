"""The command line of ``galore-plus``: the argparse parser generated from the config dataclasses
(``config.FinetuneConfig``, ``evaluate_config.EvaluateConfig``), one argument per field, and the config of
what was given."""

from __future__ import annotations

import argparse
import typing
from dataclasses import fields
from typing import Any

from .checks import value_type
from .config import FinetuneConfig, flag
from .errors import ConfigError


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises :class:`ConfigError` (one line, exit code 2) instead of printing its usage."""

    def error(self, message: str) -> typing.NoReturn:
        command = self.prog.removeprefix("galore-plus").strip()
        raise ConfigError(f"{command + ': ' if command else ''}{message} (see {self.prog} --help)")


def add_arguments(parser: argparse.ArgumentParser, cls: type = FinetuneConfig) -> None:
    """One argument per field of ``cls``, in field order. Defaults stay out of the namespace
    (``argparse.SUPPRESS``): it holds what was given, which is what :func:`resumed` compares, and the
    dataclass fills in the rest. A field whose default is None and shown as "required" is required."""
    groups: dict[str, Any] = {}
    for f in fields(cls):
        meta, kind = f.metadata, value_type(f.name, cls)
        shown = meta["shown"] or ("on" if f.default is True else "off" if f.default is False else f.default)
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS,
                                  "help": f"{meta['help']} (default: {shown})".replace("%", "%%")}
        if meta["shown"] == "required":
            kwargs.update(required=True, help=meta["help"])
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _reader(f.name, cls)
            if list in typing.get_args(typing.get_type_hints(cls)[f.name]):  # --data: several values
                kwargs["nargs"] = "+"
            if meta["choices"]:
                kwargs["choices"] = meta["choices"]
            elif kind in (int, float):
                kwargs["metavar"] = "N" if kind is int else "X"
        target = parser
        if meta["group"]:
            if meta["group"] not in groups:
                groups[meta["group"]] = parser.add_mutually_exclusive_group()
            target = groups[meta["group"]]
        target.add_argument(flag(f.name, cls), **kwargs)


def _reader(name: str, cls: type) -> Any:
    """What reads field ``name``'s text: its type; for a union (``--rank``: ``int | float |
    Literal["full"]``, so ``32``, ``0.5`` or ``full``) the first of its types, in the order written,
    that reads it (a ``Literal`` reads its own words). Other text is refused as the first type
    refuses it (argparse: ``invalid int value: 'x'``)."""
    kinds = [a for a in typing.get_args(typing.get_type_hints(cls)[name]) if a is not type(None)]
    if len(kinds) < 2 or typing.get_origin(kinds[0]) is typing.Literal:
        return value_type(name, cls)

    def read(text: str) -> Any:
        for kind in kinds:
            if typing.get_origin(kind) is typing.Literal:
                if text in typing.get_args(kind):
                    return text
                continue
            try:
                return kind(text)
            except ValueError:
                continue
        raise ValueError(text)

    read.__name__ = kinds[0].__name__
    return read


def from_arguments(given: dict[str, Any]) -> FinetuneConfig:
    """The config of the options given on the command line (the rest at their defaults)."""
    given = dict(given)
    from .presets import check_given

    check_given(given)  # --preset against options given beside it (DESIGN.md, "Presets")
    if given.get("epochs") is not None:
        given.setdefault("max_steps", None)  # --epochs replaces the default length
    return FinetuneConfig(**given)
