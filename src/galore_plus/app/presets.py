"""``galore-plus finetune --preset NAME``: the library's named settings (``spec.PRESETS``) as the command
applies them (DESIGN.md, "Presets").

A preset sets some options (``quality``: ``--method galore --rank full --scale 1``) and, unless ``--lr``
is given, the learning rate of another method (``quality``: AdamW's, ``config.DEFAULT_LR``).
:func:`with_preset` gives a config its preset's values, in ``validation.validated``: an option still at the
command's default takes the preset's value, one set otherwise must agree with it. On the command line,
where what was given is known, :func:`check_given` refuses an option given against the preset even at
the default's value (``--preset quality --rank 32``). A run records the resolved options (``run.json``,
``config.yaml``) with the preset's name, so a resume or ``--config`` of it computes the same.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..spec import PRESETS
from .config import PRESET_LR, FinetuneConfig, flag
from .errors import ConfigError

__all__ = ["PRESET_LR", "check_given", "with_preset"]


def with_preset(config: FinetuneConfig) -> FinetuneConfig:
    """``config`` with the values of its ``preset`` (unchanged without one): the options the preset
    sets take its values where they are at the command's defaults (its rate is ``config.learning_rate``'s).
    :class:`ConfigError` for an option set to a value the preset contradicts."""
    name = config.preset
    if name not in PRESETS:  # "none" (a bad name: validated() names it)
        return config
    changes: dict[str, Any] = {}
    for option, value in PRESETS[name].items():
        current = getattr(config, option)
        if current == FinetuneConfig.__dataclass_fields__[option].default:
            changes[option] = value
        elif current != value:
            raise ConfigError(_contradiction(name, option, current))
    return dataclasses.replace(config, **changes)


def check_given(given: dict[str, Any]) -> None:
    """The options given on the command line (and by a ``--config`` file) agree with their ``preset``:
    an option the preset sets, given with another value, raises :class:`ConfigError` (the default's value
    too, which :func:`with_preset` cannot tell from an option left out)."""
    name = given.get("preset")
    if name not in PRESETS:  # "none", absent, or a bad name: validated() names it
        return
    for option, value in PRESETS[name].items():
        if option in given and given[option] != value:
            raise ConfigError(_contradiction(name, option, given[option]))


def _contradiction(name: str, option: str, value: Any) -> str:
    preset = ", ".join(f"{flag(k)} {v:g}" if isinstance(v, float) else f"{flag(k)} {v}"
                       for k, v in PRESETS[name].items())
    return (f"--preset {name} sets {preset}, and {flag(option)} {value} contradicts it; drop {flag(option)} or the "
            "preset")
