"""Parameter groups for the GaLore+ recipe, from (name, parameter, head count) triples."""

from __future__ import annotations

from typing import Any, Iterable

from torch import Tensor

from .options import PAPER_RESIDUAL_RATIO


def galore_plus_param_groups(
    matrices: Iterable[tuple[str, Tensor, int | None]],
    rank: int,
    *,
    residual_ratio: float = PAPER_RESIDUAL_RATIO,
    plain: Iterable[tuple[str, Tensor]] = (),
    **low_rank_options: Any,
) -> list[dict[str, Any]]:
    """The paper's parameter groups (GaLore+ Section 4; DESIGN.md, "Projectors" and "Residual").

    ``matrices`` are ``(name, parameter, num_heads)``: ``num_heads`` for the query/key projections
    (q_proj: attention heads; k_proj: key/value heads under grouped-query attention), ``None`` for
    v/o/MLP. Matrices with a head count get cross-head projection and the sparse residual; one
    group per distinct head count. The others get a plain low-rank group, and ``plain`` (embeddings,
    ``lm_head``, norms, biases) a group without ``rank``. ``low_rank_options`` (e.g.
    ``update_proj_gap``, ``scale``, ``svd``) go to every low-rank group. Use with
    ``GaLorePlusAdamW``, whose default ``svd`` is ``"randomized"``.
    """
    by_heads: dict[int | None, list[tuple[str, Tensor]]] = {}
    for name, param, heads in matrices:
        by_heads.setdefault(heads, []).append((name, param))
    groups = []
    for heads, members in by_heads.items():
        group: dict[str, Any] = {
            "params": [p for _, p in members], "param_names": [n for n, _ in members], "rank": rank,
            **low_rank_options,
        }
        if heads is not None:
            group.update(num_heads=heads, residual_ratio=residual_ratio)
        groups.append(group)
    plain = list(plain)
    if plain:
        groups.append({"params": [p for _, p in plain], "param_names": [n for n, _ in plain]})
    return groups
