"""When to refresh (issue 29, item 3; DESIGN.md, "Refresh"): a schedule tied to the run's length, and
a refresh triggered by the captured share of the gradient.

- **Run length.** ``refresh_gap(S, K)`` is the ``update_proj_gap`` that gives a run of ``S`` steps
  ``K`` refreshes, the first at step 1: ``T = ⌈S/K⌉``. Refreshes fall at ``1, 1+T, 1+2T, …``, so
  ``S`` steps get ``⌊(S−1)/T⌋ + 1`` of them: exactly ``K`` whenever some constant gap gives ``K``
  (always when ``K² − K + 1 ≤ S``), else fewer (``T − 1`` would give more). It is a gap, not a
  policy: the run's length reaches the optimizer as ``update_proj_gap``, which its state dict keeps,
  so a resumed run keeps its gap even when it is extended (``--max-steps`` raised).
- **Captured share** (``refresh="capture"``, :class:`CaptureRefresh`): refresh when the share of the
  update's full gradient ``G`` that the current projector captures, ``‖PᵀG‖_F / ‖G‖_F`` (``‖G Q‖``,
  ``‖Pᵀ G Q‖`` for right and two-sided projectors), is below ``capture_threshold``, and at the latest
  every ``update_proj_gap`` updates. The share is measured by the engine
  (``LowRankOptimizer.projector_due(p, grad)``) on the update's own gradient before the refresh
  decision, so the refresh comes from the gradient that fell out of the subspace. It is exact where
  a full gradient exists. The projected backward has none between refreshes (``‖G‖`` cannot be had
  from the projected gradient, and not exactly from ``x``, ``dy`` once micro-batches or DDP ranks
  are summed), so there the policy is ``interval``: its refreshes come every ``update_proj_gap``
  updates.
"""

from __future__ import annotations

import math
from typing import Any

from .lowrank import IntervalRefresh
from .registry import register_refresh_policy


def refresh_gap(total_steps: int, refreshes: int) -> int:
    """``update_proj_gap`` for ``refreshes`` refreshes over ``total_steps`` steps: ``⌈S/K⌉`` (the
    smallest constant gap with at most ``K``; see the module docstring)."""
    for name, value in (("total_steps", total_steps), ("refreshes", refreshes)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r} must be an int ≥ 1")
    if refreshes > total_steps:
        raise ValueError(f"refreshes={refreshes} is more than the run's {total_steps} steps (at most one refresh "
                         "per step)")
    return math.ceil(total_steps / refreshes)


def refresh_steps(total_steps: int, gap: int) -> list[int]:
    """The steps (from 1) at which a gap of ``gap`` refreshes in a run of ``total_steps`` steps."""
    return list(range(1, total_steps + 1, gap))


@register_refresh_policy("capture")
class CaptureRefresh(IntervalRefresh):
    """Refresh when this update's captured share ``‖PᵀG‖/‖G‖`` is below the group's
    ``capture_threshold`` (strictly), or ``update_proj_gap`` updates after the last refresh. Without
    a share measured for this update (the projected backward between refreshes) it is the interval."""

    reads_share = True
    requires = ("capture_threshold",)

    def due(self, state: dict[str, Any], group: dict[str, Any]) -> bool:
        if super().due(state, group):
            return True
        measured = state.get("capture_step") == state.get("step", 0) + 1
        return measured and state["capture_share"] < group["capture_threshold"]
