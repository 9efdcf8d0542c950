"""Data-parallel training with GaLore: DDP's split refresh, checkpoints, launching (DESIGN.md, "Distributed").

**FSDP2** needs nothing from here: an optimizer built with its plain constructor on ``fully_shard``
parameters (sharded ``Shard(0)`` over a 1-D mesh) runs the low-rank math on the row shards without
gathering a full gradient (``sharding.RowShards``); with the projected backward (built after
``wrap_model(model, "fsdp", ...)``) the ranks reduce the targets' projected gradients themselves
(``sharding.ProjectedRows``) and FSDP2 reduce-scatters only the other parameters; a randomized or
cross-head refresh comes from the ranks' factors (``sharding.FactoredRows``).

**DDP** works with the plain constructor too: DDP averages the gradients, and every rank computes the
same projectors (every random draw is ``rng.generator_for(seed, parameter index, refresh count)``), so
parameters stay identical across ranks. ``distribute(optimizer)`` is the one optional call: it makes
the ranks *split* each refresh — each computes the projectors of its share of the parameters (owners
balanced by estimated cost, largest first) and broadcasts them, so a refresh costs about 1/N of the
single-process one. It hands the optimizer a ``SplitRefresh`` (``use_refresher``) and, with a
projected backward attached, gives that backward its process group; a refresh the projected backward
sketches from the ranks' factors (``distributed_sketch``) is computed by every rank together instead
(each product needs them all).

Layer-wise mode (``LayerwiseOptimizer``) is refused under DDP and FSDP2 (``layerwise.py`` says why).

Checkpoints go through ``torch.distributed.checkpoint`` (``save_checkpoint`` / ``load_checkpoint``):
every value is a tensor (numbers as 0-d tensors). DCP keeps its index, ``.metadata``, as a pickle,
which ``torch.distributed.checkpoint.FileSystemReader`` loads with ``pickle.load``: a crafted
checkpoint directory would run code on resume (issue 25). ``load_checkpoint`` reads it with
:class:`SafeMetadataReader` instead: an unpickler that builds only the classes a DCP index holds
(:data:`METADATA_CLASSES`, torch dtypes, ``torch.Size``, paths) and refuses anything else before
it is called. Sharded tensors
are saved sharded; per-rank state (an FSDP2 parameter's residual) under per-rank keys, so a resume
needs the same world size, which ``load_checkpoint`` checks.

Bytes the optimizer itself communicates are counted in ``optimizer.comm_bytes`` (per phase, ``"step"``
and ``"refresh"``, and per collective); DDP's gradient all-reduce and FSDP2's all-gather /
reduce-scatter are the same as for any optimizer and not counted.
"""

from __future__ import annotations

import os
import pickle
from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from . import projection
from .distributed_sketch import RankMeanGradient
from .layerwise import LayerwiseOptimizer, layerwise_unsupported_reason
from .lowrank import LowRankOptimizer, compute_dtype
from .sharding import checkpoint_placement, empty_placed, is_dtensor, layout_of

__all__ = ["distribute", "SplitRefresh", "save_checkpoint", "load_checkpoint", "init_from_env", "wrap_model",
           "layerwise_unsupported_reason", "process_rank", "barrier", "sum_across_ranks", "shutdown"]


# ---------------------------------------------------------------------------------------------- DDP


class SplitRefresh:
    """DDP: the due projectors of a step are computed by their owner ranks and broadcast."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group

    def refresh(self, optimizer: LowRankOptimizer, due: list[tuple[Tensor, Tensor]]) -> None:
        rank, world = dist.get_rank(self.group), dist.get_world_size(self.group)
        with optimizer.comm.refresh():
            # a refresh from the ranks' factors (the projected backward's sketched refresh) needs every
            # rank in each of its products: every rank computes it, in the order given (the same on every
            # rank); owners split the rest (DESIGN.md, "Distributed", sketched refresh across ranks)
            together = [(p, grad) for p, grad in due if isinstance(grad, RankMeanGradient)]
            due = [(p, grad) for p, grad in due if not isinstance(grad, RankMeanGradient)]
            for p, grad in together:
                optimizer.refresh_projector(p, grad)
            costs = [_refresh_cost(optimizer.group_of(p), p) for p, _ in due]
            owners = _balanced_owners(costs, world)
            for (p, grad), owner in zip(due, owners):
                if owner == rank:
                    optimizer.refresh_projector(p, grad)
            for (p, _), owner in zip(due, owners):
                self._share(optimizer, p, owner, owner == rank)

    def _share(self, optimizer: LowRankOptimizer, p: Tensor, owner: int, mine: bool) -> None:
        """Broadcast ``p``'s new projector from ``owner``; the others store it as their refresh."""
        side, rank = optimizer.projection_side(p), projection.resolve_rank(optimizer.group_of(p)["rank"], p.shape)
        m, n = p.shape
        shapes = ((m, rank) if side in (projection.LEFT, projection.FULL) else None,
                  (rank, n) if side in (projection.RIGHT, projection.FULL) else None)
        current = optimizer.projector(p) if mine else (None, None)
        received = []
        for tensor, shape in zip(current, shapes):
            if shape is None:
                received.append(None)
                continue
            t = tensor.contiguous() if mine else torch.empty(shape, dtype=compute_dtype(p), device=p.device)
            optimizer.comm.add("broadcast", t)
            dist.broadcast(t, src=dist.get_global_rank(self.group, owner), group=self.group)
            received.append(t)
        if not mine:
            optimizer.store_projector(p, *received)


def _refresh_cost(group: dict[str, Any], p: Tensor) -> float:
    """Rough flops of one projector refresh, to balance the owners."""
    m, n = p.shape
    rank = projection.resolve_rank(group["rank"], p.shape)
    if group["num_heads"] is not None:  # the SVD of the chosen heads' rows
        rows = projection.heads_needed(rank, m // group["num_heads"]) * (m // group["num_heads"])
        return rows * n * min(rows, n)
    if group["svd"] == "randomized":
        return m * n * (rank + group["oversample"]) * (2 * group["power_iters"] + 2)
    return m * n * min(m, n)


def _balanced_owners(costs: list[float], world: int) -> list[int]:
    """Owner rank of each refresh: largest first to the least-loaded rank (the same on every rank)."""
    load, owners = [0.0] * world, [0] * len(costs)
    for j in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        owners[j] = min(range(world), key=lambda r: (load[r], r))
        load[owners[j]] += costs[j]
    return owners


def distribute(optimizer: LowRankOptimizer, process_group: dist.ProcessGroup | None = None) -> LowRankOptimizer:
    """Under DDP, split each projector refresh across the ranks of ``process_group`` (default: the
    world); returns ``optimizer``. Optional: without it every rank computes every projector (the same
    ones). Under FSDP2 it only checks (the sharded math needs no call). It sets
    ``optimizer.use_refresher`` and, with a projected backward attached, its process group
    (``reduce_over``); a copy of the optimizer refreshes locally again.
    With the projected backward installed it is required: it makes each step average the target
    matrices' gradients (projected between refreshes) over the group, which ``wrap_model(model,
    "ddp", ...)`` leaves out of DDP's own all-reduce.

    Raises:
        TypeError: not a ``LowRankOptimizer``; ValueError: a ``LayerwiseOptimizer``; RuntimeError: no
        process group.
    """
    if isinstance(optimizer, LayerwiseOptimizer):
        raise ValueError(layerwise_unsupported_reason())
    if not isinstance(optimizer, LowRankOptimizer):
        raise TypeError(f"distribute() needs a galore_plus LowRankOptimizer, got {type(optimizer).__name__}")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("distribute() needs an initialised torch.distributed process group "
                           "(launch with torchrun and call torch.distributed.init_process_group)")
    group = process_group if process_group is not None else dist.group.WORLD
    sharded = any(layout_of(p, optimizer.comm).sharded for g in optimizer.param_groups for p in g["params"])
    if not sharded and dist.get_world_size(group) > 1:
        optimizer.use_refresher(SplitRefresh(group))
        projected = optimizer.projected_backward
        if projected is not None:  # it averages the targets' gradients (DDP leaves them out), over this group
            projected.reduce_over(group)
    return optimizer


# ---------------------------------------------------------------------------------------------- checkpoints


def _flat_state(model: torch.nn.Module, optimizer: LowRankOptimizer) -> dict[str, Any]:
    """Model and optimizer as one flat dict of tensors for ``torch.distributed.checkpoint``.

    Keys: ``model/<name>``; ``optim/state/<param name>/<key>/<layout>`` with layout ``shard`` or
    ``replicate`` (sharded tensors, ``sharding.checkpoint_placement``), ``rank<r>`` (this rank's local
    state of a sharded parameter), ``tensor`` (replicated plain tensor), ``int``/``float`` (numbers as
    0-d tensors); ``optim/group/<i>/<key>/...`` for the groups' numeric hyper-parameters."""
    rank = process_rank()
    out: dict[str, Any] = {f"model/{k}": v for k, v in model.state_dict().items()}
    out[WORLD_SIZE_KEY] = torch.tensor(dist.get_world_size() if dist.is_initialized() else 1)
    names = {id(p): n for n, p in model.named_parameters()}
    for i, group in enumerate(optimizer.param_groups):
        for key, value in group.items():
            if key == "params":
                continue
            encoded = _encode_number(value)
            if encoded is not None:
                out[f"optim/group/{i}/{key}/{encoded[1]}"] = encoded[0]
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                base = f"optim/state/{names[id(p)]}/{key}"
                placement = checkpoint_placement(value)
                if placement is not None:
                    out[f"{base}/{placement}"] = value
                elif isinstance(value, Tensor):
                    out[f"{base}/rank{rank}" if is_dtensor(p) and value.dim() > 0 else f"{base}/tensor"] = value
                else:
                    encoded = _encode_number(value)
                    if encoded is None:
                        raise TypeError(f"optimizer state {key!r} of {names[id(p)]} is a {type(value).__name__}; "
                                        "only tensors and numbers can be checkpointed")
                    out[f"{base}/{encoded[1]}"] = encoded[0]
    return out


WORLD_SIZE_KEY = "meta/world_size"

#: What a DCP ``.metadata`` pickle may name (read off checkpoints of torch 2.13: tensors of every
#: dtype, one process and FSDP2 shards), beside torch dtypes: anything else is refused unbuilt. Not
#: ``BytesStorageMetadata``: ``save_checkpoint`` writes tensors only, and DCP loads a bytes entry with
#: ``torch.load(weights_only=False)``, so an index claiming one for a key we read would run its pickle.
METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorProperties", "TensorStorageMetadata",
        "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
     ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in METADATA_CLASSES or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name}")


def _safe_reader(path: str) -> Any:
    """A ``FileSystemReader`` of ``path`` whose ``read_metadata`` builds only :data:`METADATA_CLASSES`."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    class SafeMetadataReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
            meta_path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(meta_path, "rb") as stream:
                try:
                    metadata = _MetadataUnpickler(stream).load()
                except pickle.UnpicklingError as err:
                    raise ValueError(f"checkpoint {path}: its {os.path.basename(str(meta_path))} names {err}, which a "
                                     "checkpoint index never holds; refusing to load it (it could run code)") from None
            if not isinstance(metadata, Metadata):
                raise ValueError(f"checkpoint {path}: its index is a {type(metadata).__name__}, not DCP metadata")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeMetadataReader(str(path))


def _saved_world_size(path: str, metadata: dict[str, Any]) -> int | None:
    """The world size a checkpoint was written with (older ones: the largest per-rank key, if any)."""
    import torch.distributed.checkpoint as dcp

    if WORLD_SIZE_KEY in metadata:
        holder = {WORLD_SIZE_KEY: torch.tensor(0)}
        dcp.load(holder, storage_reader=_safe_reader(path))
        return int(holder[WORLD_SIZE_KEY])
    ranks = [int(k.rsplit("/rank", 1)[1]) for k in metadata if k.rsplit("/", 1)[-1].startswith("rank")]
    return max(ranks) + 1 if ranks else None


def _encode_number(value: Any) -> tuple[Tensor, str] | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return torch.tensor(value, dtype=torch.int64), "int"
    if isinstance(value, float):
        return torch.tensor(value, dtype=torch.float64), "float"
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                         for v in value):
        return torch.tensor(value, dtype=torch.float64), "tuple"
    return None


def save_checkpoint(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Save model and optimizer to directory ``path`` with ``torch.distributed.checkpoint``; call it on
    every rank (each writes its shards). ``model`` is the DDP or FSDP2 model the optimizer trains (or
    the module inside DDP); any optimizer whose state is tensors and numbers works."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_flat_state(model, optimizer), checkpoint_id=str(path))


def load_checkpoint(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load what ``save_checkpoint`` wrote into ``model`` and ``optimizer`` (same world size), in place;
    the optimizer's state is replaced. Call it on every rank. A checkpoint written by another number
    of ranks raises ``ValueError`` (an FSDP2 parameter's residual is per rank; it is not resharded)."""
    import torch.distributed.checkpoint as dcp

    rank = process_rank()
    metadata = _safe_reader(path).read_metadata().state_dict_metadata
    world = dist.get_world_size() if dist.is_initialized() else 1
    saved_world = _saved_world_size(path, metadata)
    if saved_world is not None and saved_world != world:
        raise ValueError(f"checkpoint {path} was written by {saved_world} ranks and this run has {world}; resume it on "
                         f"{saved_world} ranks (torchrun --nproc_per_node {saved_world})")
    model_state = model.state_dict()
    params = {n: p for n, p in model.named_parameters()}
    template: dict[str, Any] = {f"model/{k}": v for k, v in model_state.items()}
    missing = sorted(k for k in template if k not in metadata)
    if missing:
        raise KeyError(f"checkpoint {path} has no {missing[:3]}{'...' if len(missing) > 3 else ''}")
    for key, meta in metadata.items():
        if not key.startswith("optim/"):
            continue
        layout = key.rsplit("/", 1)[1]
        size, dtype = tuple(meta.size), meta.properties.dtype
        if layout in ("shard", "replicate"):
            template[key] = empty_placed(size, dtype, params[_param_of(key)], layout)
        elif layout.startswith("rank"):
            if layout == f"rank{rank}":
                template[key] = torch.empty(size, dtype=dtype)
        else:
            template[key] = torch.empty(size, dtype=dtype)
    dcp.load(template, storage_reader=_safe_reader(path))
    model.load_state_dict({k[len("model/"):]: v for k, v in template.items() if k.startswith("model/")})
    by_name = {id(p): n for n, p in params.items()}
    states: dict[str, dict[str, Any]] = defaultdict(dict)
    for key, value in template.items():
        if key.startswith("optim/state/"):
            name = _param_of(key)
            state_key, layout = key[len(f"optim/state/{name}/"):].rsplit("/", 1)
            states[name][state_key] = _decode(value, layout)
        elif key.startswith("optim/group/"):
            _, _, i, rest = key.split("/", 3)
            group_key, layout = rest.rsplit("/", 1)
            optimizer.param_groups[int(i)][group_key] = _decode(value, layout)
    optimizer.state.clear()
    for group in optimizer.param_groups:
        for p in group["params"]:
            if by_name[id(p)] in states:
                optimizer.state[p] = states[by_name[id(p)]]


def _param_of(key: str) -> str:
    """The parameter name inside ``optim/state/<name>/<key>/<layout>`` (names contain dots, not slashes)."""
    return key[len("optim/state/"):].split("/", 1)[0]


def _decode(value: Tensor, layout: str) -> Any:
    if layout == "int":
        return int(value.item())
    if layout == "float":
        return float(value.item())
    if layout == "tuple":
        return tuple(float(v) for v in value.tolist())
    return value


# ---------------------------------------------------------------------------------------------- launching


def init_from_env(device_type: str = "cpu") -> tuple[int, int, int]:
    """Join the process group ``torchrun`` describes in the environment (gloo on CPU; on CUDA, NCCL for
    CUDA tensors and gloo for the few CPU ones: the run's flags and sums, checkpoints' numbers);
    returns ``(rank, world size, local rank)``. Raises RuntimeError outside torchrun."""
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing and not dist.is_initialized():
        raise RuntimeError(f"a distributed run needs torchrun (or accelerate launch); {', '.join(missing)} "
                           "not set: torchrun --nproc_per_node N -m galore_plus.app finetune --distributed ddp ...")
    if not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return dist.get_rank(), dist.get_world_size(), local_rank


def wrap_model(model: torch.nn.Module, mode: str, device: torch.device) -> torch.nn.Module:
    """``mode="ddp"``: the ``DistributedDataParallel`` wrapper (train with it, evaluate and save the
    model itself); matrices with the projected backward are left out of DDP's all-reduce (call
    ``distribute(optimizer)``, which averages them). ``mode="fsdp"``: ``fully_shard`` on every block
    of each ``nn.ModuleList`` (a transformer's decoder layers), then on the root, over a 1-D mesh of
    all ranks; returns ``model``, sharded in place. Build the optimizer after ``fsdp`` wrapping (its
    parameters become sharded tensors)."""
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        projected = projected_weights(model)
        if projected:
            # DDP's documented way to leave parameters out of its all-reduce (its own docstring calls
            # it the workaround until pytorch issue 43690 gives a public API): the projected backward
            # averages these matrices' r-sized gradients itself (distribute)
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, projected)
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        for module in list(model.modules()):
            if isinstance(module, torch.nn.ModuleList):
                for block in module:
                    fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    raise ValueError(f"mode={mode!r} is not 'ddp' or 'fsdp'")


def projected_weights(model: torch.nn.Module) -> list[str]:
    """Names of ``model``'s parameters whose gradients the projected backward computes."""
    from .projected import is_projected

    return [f"{name}.weight" if name else "weight" for name, module in model.named_modules() if is_projected(module)]


def process_rank() -> int:
    """This process's rank in the default group (0 when none is initialised)."""
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def sum_across_ranks(*numbers: float) -> tuple[float, ...]:
    """The sums over ranks of a few numbers (for logging), in float64."""
    t = torch.tensor(numbers, dtype=torch.float64)
    dist.all_reduce(t)
    return tuple(t.tolist())


def shutdown() -> None:
    """Wait for every rank, then leave the process group."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
