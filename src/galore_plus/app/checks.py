"""The checks a command's options share, whatever the command (``finetune``, ``evaluate``): values of
the dataclass fields' types, a device that exists here, a writable output directory, a torchrun launch."""

from __future__ import annotations

import os
import tempfile
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

from ..spec import is_int, is_real
from .errors import ConfigError

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def value_type(name: str, cls: type) -> type:
    """``int`` for ``int`` and ``int | None``, and so on."""
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def nullable(name: str, cls: type) -> bool:
    return type(None) in typing.get_args(typing.get_type_hints(cls)[name])


def check_types(c: Any) -> None:
    cls = type(c)
    for f in fields(c):
        value, kind = getattr(c, f.name), value_type(f.name, cls)
        if value is None and nullable(f.name, cls):
            continue
        others = [a for a in typing.get_args(typing.get_type_hints(cls)[f.name]) if a not in (kind, type(None))]
        ok = (is_int(value) if kind is int else is_real(value) or isinstance(value, float) if kind is float
              else isinstance(value, kind)) or any(_is_a(value, a) for a in others)  # a union: --rank
        if not ok:
            raise ConfigError(f"{f.name}={value!r} must be {'an' if kind is int else 'a'} {kind.__name__}"
                              + "".join(f" or {_is_a(None, a, name=True)}" for a in others)
                              + (" or None" if nullable(f.name, cls) else ""))


def _is_a(value: Any, kind: Any, name: bool = False) -> Any:
    """Whether ``value`` is of ``kind``, a type or a ``Literal`` (``name``: how a message says it)."""
    words = typing.get_args(kind) if typing.get_origin(kind) is typing.Literal else None
    if name:
        return " or ".join(map(repr, words)) if words is not None else f"a {kind.__name__}"
    return value in words if words is not None else isinstance(value, kind)


def check_device(name: str) -> None:
    import torch

    if name == "auto":
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {name!r} is not a device; use auto, cpu, cuda, cuda:N, mps, ...") from None
    if device.type == "cpu":
        return
    module = getattr(torch, device.type, None)
    is_available = getattr(module, "is_available", None)
    if device.type == "mps":
        is_available = torch.backends.mps.is_available
    if is_available is None or not is_available():
        raise ConfigError(f"--device {name}: no {device.type} device is available here; use auto or cpu")
    count = getattr(module, "device_count", None)
    if device.index is not None and count is not None and device.index >= count():
        raise ConfigError(f"--device {name}: there are {count()} {device.type} device(s), numbered from 0")


def check_launch(distributed: str) -> None:
    """A distributed run was started by torchrun (checked by the run, not by ``validation.validated``: a
    config is valid whatever launches it)."""
    missing = [k for k in TORCHRUN_ENV if k not in os.environ]
    if distributed != "none" and missing:
        raise ConfigError(f"--distributed {distributed} runs under torchrun (or accelerate launch), which sets "
                          f"{', '.join(missing)}: torchrun --nproc_per_node N -m galore_plus.app finetune "
                          f"--distributed {distributed} ...")


def check_output_dir(path: str, option: str = "--output-dir") -> None:
    """The directory exists and is writable, or can be made: its first existing ancestor is a
    directory one can write in. An empty path is refused (it would mean the current directory,
    issue 25)."""
    if not str(path).strip():
        raise ConfigError(f"{option} is empty; give a directory (e.g. runs/finetune)")
    target = Path(path).absolute()
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not existing.is_dir():
        where = "is a file" if existing == target else f"is under {existing}, which is a file"
        raise ConfigError(f"{option} {path} {where}; give a directory")
    try:  # a real probe: os.access says yes to root, and to read-only mounts such as /proc
        os.rmdir(tempfile.mkdtemp(prefix=".galore-plus-probe-", dir=existing))
    except OSError as err:
        raise ConfigError(f"{option} {path}: cannot write in {existing} ({err.strerror})") from None
