"""Parameter groups for the GaLore+ recipe, from (name, parameter, heads) triples."""

from __future__ import annotations

from typing import Any, Iterable

from torch import Tensor

from .options import PAPER_RESIDUAL_RATIO


def galore_plus_param_groups(
    matrices: Iterable[tuple[str, Tensor, int | dict[str, Any] | None]],
    rank: int | float | str,
    *,
    residual_ratio: float = PAPER_RESIDUAL_RATIO,
    plain: Iterable[tuple[str, Tensor]] = (),
    **low_rank_options: Any,
) -> list[dict[str, Any]]:
    """The paper's parameter groups (GaLore+ Section 4; DESIGN.md, "Projectors" and "Residual").

    ``matrices`` are ``(name, parameter, heads)`` with ``heads`` one of:

    - an int, ``num_heads``, for the query/key projections (q_proj: attention heads; k_proj:
      key/value heads under grouped-query attention): cross-head projection and the sparse residual,
      one group per distinct head count;
    - a dict, ``head_blocks`` (``{"count", "eligible", "dim"}``, see ``spec.LowRankSpec.head_blocks``),
      for a fused q/k/v matrix (``Target.head_blocks``): cross-head projection drawn from its q and k
      blocks, one group per distinct layout, and *no* sparse residual: the paper's residual is for the
      q/k matrices, and a fused matrix's residual would have to be restricted to its q/k entries,
      which the residual does not do (a group's ``residual_ratio`` covers every entry);
    - None for v/o/MLP: a plain low-rank group.

    ``plain`` (embeddings, ``lm_head``, norms, biases) gets a group without ``rank``.
    ``low_rank_options`` (e.g. ``update_proj_gap``, ``scale``, ``svd``) go to every low-rank group;
    ``residual_ratio`` to the ``num_heads`` groups only. Groups come in the order their first matrix
    does. Use with ``GaLorePlusAdamW``, whose default ``svd`` is ``"randomized"``.
    """
    by_heads: dict[Any, tuple[dict[str, Any], list[tuple[str, Tensor]]]] = {}
    for name, param, heads in matrices:
        if isinstance(heads, dict):
            # a copy per group (the optimizer checks it); equal layouts share a group
            key = ("head_blocks", repr(heads))
            extra = {"head_blocks": {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in heads.items()}}
        elif heads is None:
            key, extra = None, {}
        else:
            key, extra = ("num_heads", heads), {"num_heads": heads, "residual_ratio": residual_ratio}
        by_heads.setdefault(key, (extra, []))[1].append((name, param))
    groups = []
    for extra, members in by_heads.values():
        groups.append({
            "params": [p for _, p in members], "param_names": [n for n, _ in members], "rank": rank,
            **low_rank_options, **extra,
        })
    plain = list(plain)
    if plain:
        groups.append({"params": [p for _, p in plain], "param_names": [n for n, _ in plain]})
    return groups
