"""The registries of the engine's variable parts, by name: inner rules (``RULES``) and refresh
policies (``REFRESH_POLICIES``). A new rule or policy is one class (``lowrank.InnerRule`` /
``lowrank.RefreshPolicy``) and one ``register_rule`` / ``register_refresh_policy`` line (DESIGN.md,
"Extending"); ``spec.LowRankSpec`` checks its ``rule`` and ``refresh`` against them. Names only: this
module sits below both and imports neither."""

from __future__ import annotations

from typing import Any, Callable

#: The inner rules by name: ``LowRankSpec.rule`` and ``LowRankOptimizer.from_spec`` pick one.
RULES: dict[str, type] = {}
#: When projectors refresh, by name: a low-rank group's ``refresh`` key picks one.
REFRESH_POLICIES: dict[str, type] = {}
_POLICY: dict[str, Any] = {}


def register_rule(name: str) -> Callable[[type], type]:
    """Class decorator: make an ``InnerRule`` subclass available as ``rule=name`` (spec, from_spec)."""
    def add(cls: type) -> type:
        if name in RULES and RULES[name] is not cls:
            raise ValueError(f"an inner rule named {name!r} is already registered ({RULES[name].__name__})")
        RULES[name] = cls
        cls.registry_name = name
        return cls
    return add


def register_refresh_policy(name: str) -> Callable[[type], type]:
    """Class decorator: make a ``RefreshPolicy`` subclass available as a group's ``refresh=name``."""
    def add(cls: type) -> type:
        if name in REFRESH_POLICIES and REFRESH_POLICIES[name] is not cls:
            raise ValueError(f"a refresh policy named {name!r} is already registered")
        REFRESH_POLICIES[name] = cls
        _POLICY.pop(name, None)
        return cls
    return add


def refresh_policy(name: str) -> Any:
    """The (stateless, shared) instance of the registered policy ``name``."""
    policy = _POLICY.get(name)
    if policy is None:
        policy = _POLICY[name] = REFRESH_POLICIES[name]()
    return policy
