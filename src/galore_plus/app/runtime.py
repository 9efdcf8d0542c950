"""This process's place in a fine-tune: its rank among the run's processes, its device, and the
few collective steps the run takes (a barrier, sums over ranks), each a no-op for one process.

:meth:`Runtime.start` builds it once, in set-up (joining the process group ``torchrun`` describes
when ``--distributed`` is ``ddp`` or ``fsdp``); it is passed where rank or world size matters, so no
other module of the application asks ``torch.distributed`` where it stands.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, TypeVar

import torch

__all__ = ["Runtime"]

T = TypeVar("T")


@dataclass(frozen=True)
class Runtime:
    """``rank`` of ``world_size`` processes (``local_rank`` on its machine), on ``device``;
    ``distributed``: ``"none"`` (one process, no process group), ``"ddp"`` or ``"fsdp"`` (under
    torchrun; possibly one rank). The defaults are a single process on the CPU."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    distributed: str = "none"

    @classmethod
    def start(cls, distributed: str, device: torch.device) -> Runtime:
        """One process on ``device`` for ``distributed="none"``; otherwise join the process group
        ``torchrun`` describes in the environment (gloo on CPU, NCCL on CUDA) and, on CUDA, take the
        local rank's GPU as the device."""
        if distributed == "none":
            return cls(device=device)
        from .. import distributed as group

        rank, world_size, local_rank = group.init_from_env(device.type)
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        return cls(rank, world_size, local_rank, device, distributed)

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes the run's logs, metrics, plot and files."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """Whether the run has a process group (``--distributed ddp`` or ``fsdp``)."""
        return self.distributed != "none"

    def barrier(self) -> None:
        """Wait for every rank (a no-op for one process)."""
        if self.is_distributed:
            from .. import distributed as group

            group.barrier()

    def sum_across_ranks(self, *numbers: float) -> tuple[float, ...]:
        """The sums over ranks of a few numbers, in float64; one process gets them back unchanged."""
        if self.world_size == 1:
            return numbers
        from .. import distributed as group

        return group.sum_across_ranks(*numbers)

    def share(self, items: Sequence[T]) -> Sequence[T]:
        """This rank's share of a global batch: every ``world_size``-th item from ``rank`` on."""
        return items[self.rank::self.world_size]

    def shutdown(self) -> None:
        """Wait for every rank, then leave the process group (a no-op for one process)."""
        if self.is_distributed:
            from .. import distributed as group

            group.shutdown()
