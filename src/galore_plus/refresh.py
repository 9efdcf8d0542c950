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
  every ``update_proj_gap`` updates. Where a full gradient exists the share is measured exactly by
  the engine (``LowRankOptimizer.projector_due(p, grad)``) on the update's own gradient before the
  refresh decision, so the refresh comes from the gradient that fell out of the subspace. The
  projected backward has no ``G`` between refreshes: there it sketches ``G`` with
  :data:`SHARE_SKETCH` random columns on the side the projector leaves whole (``G Ω = dyᵀ(x Ω)``,
  summed over micro-batches and averaged over DDP ranks like the projected gradient), estimates the
  share as ``‖Pᵀ G Ω‖ / ‖G Ω‖`` at ``step()`` and, when it is below the threshold, refreshes at the
  *next* update (from that update's gradient, as the projected backward's refreshes do: from
  factors where the projector allows it). Two-sided projectors, FSDP2-sharded and tied weights and
  layer-wise mode take no estimate there: the interval.
"""

from __future__ import annotations

import math
from typing import Any

from .lowrank import IntervalRefresh
from .registry import register_refresh_policy


#: random columns of the projected backward's sketch of the captured share (DESIGN.md, "Refresh"): its
#: relative error is about ``√(2/(k·ρ))`` for a gradient of effective rank ``ρ`` outside the subspace,
#: its cost ``tokens·k·(m+n)`` a step, half the projection's at rank 16
SHARE_SKETCH = 8


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
    ``capture_threshold`` (strictly), or when the previous update's was and no refresh came since (the
    projected backward's estimate, recorded after that update), or ``update_proj_gap`` updates after
    the last refresh. Without either share it is the interval."""

    reads_share = True
    requires = ("capture_threshold",)

    def due(self, state: dict[str, Any], group: dict[str, Any]) -> bool:
        if super().due(state, group):
            return True
        step, measured = state.get("step", 0), state.get("capture_step")
        if measured is None or state["capture_share"] >= group["capture_threshold"]:
            return False
        # this update's own (exact, measured before the decision), or the previous update's when that
        # update did not refresh (``last_refresh`` is the ``step`` before the update that refreshed)
        return measured == step + 1 or (measured == step and state["last_refresh"] < step - 1)
