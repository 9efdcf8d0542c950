"""A run's checkpoint: written atomically with a checksum manifest, recovered after a crash in the
middle of a save, verified before anything is loaded from it.

``<output-dir>/checkpoint/`` holds ``model.safetensors`` and ``optimizer.pt`` (a distributed run:
``distributed/``, each rank's shards through ``torch.distributed.checkpoint``), ``scheduler.pt``,
``state.json`` (the step, the whole config, the run's history, the world size, the data file's
sha256) and ``manifest.json`` (size and sha256 of each of the others), written last. A checkpoint is
complete when its manifest is there and intact when every file matches it; resuming from one that
is not is an error naming the file, never a run on wrong weights.

A save writes ``checkpoint.tmp``, moves the previous checkpoint to ``checkpoint.old``, the new one
into place and deletes the old one: killed at any moment, a complete checkpoint is in one of the
three places, and :func:`recover` puts it back. A save that fails (a full disk, a read-only
directory) deletes its ``checkpoint.tmp`` and leaves the previous checkpoint as it was. With
``--save-total-limit N`` (N ≠ 1) the previous one is kept as ``checkpoint-STEP/`` instead, the oldest
of those deleted beyond N checkpoints in all (DESIGN.md, "Interrupts and checkpoints"); ``--resume``
always continues from ``checkpoint/``, the newest.

``state.json`` and ``run.json`` carry the run's identity (:mod:`galore_plus.app.identity`): a
checkpoint copied in from another run is refused on ``--resume``.

``<output-dir>/run.json`` (the config and the data file's sha256) is written when a run starts, so
a run killed before its first checkpoint can be resumed too: it starts over from step 0.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from .builtin_tasks import TASKS
from .config import FinetuneConfig, from_dict
from .errors import CheckpointError, ConfigError
from .identity import check_same_run, identity
from .retention import retire
from .checkpoint_weights import load_weights, save_weights
from .runtime import Runtime

CHECKPOINT = "checkpoint"
RUN = "run.json"
STATE = "state.json"
MANIFEST = "manifest.json"
FORMAT = 1
_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_json(path: Path, value: Any) -> None:
    """Write ``value`` as JSON atomically (a temporary file renamed over ``path``). NaN and infinities
    raise ``ValueError``: they are not JSON, and a reader would choke on them."""
    text = json.dumps(value, indent=1, allow_nan=False)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text + "\n")
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def make_readable(path: Path) -> None:
    """Give ``path`` (a file, or a directory and everything under it) the modes ``save_pretrained``'s
    files have: 0666 and 0777 less the umask (0644 and 0755 under the usual 022), for the files that
    safetensors writes 0600 (issue 28: others on the machine could not read the model)."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [path, *(path.rglob("*") if path.is_dir() else ())]:
        if p.is_symlink():
            continue
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} cannot be read as JSON: {err}") from None


# ---------------------------------------------------------------------------------------------- saving


def save(out: Path, model, optimizer, scheduler, step: int, config: FinetuneConfig, history: dict[str, Any], *,
         runtime: Runtime, data_sha256: str | None = None, eval_data_sha256: str | None = None) -> None:
    """Write ``out/checkpoint`` atomically (see the module docstring); ``runtime``: this process's place
    in the run.

    Distributed runs call it on every rank: model and optimizer go to ``distributed/`` through
    ``torch.distributed.checkpoint`` (each rank writes its shards), rank 0 writes the rest, hashes
    every file (the ranks share the file system, as ``torch.distributed.checkpoint`` needs) and moves
    the directory into place."""
    tmp = out / (CHECKPOINT + ".tmp")
    try:
        written = _write(tmp, model, optimizer, scheduler, step, config, history, runtime=runtime,
                         data_sha256=data_sha256, eval_data_sha256=eval_data_sha256)
    except BaseException:  # a full disk, a read-only directory, a second Ctrl-C: the previous checkpoint stays
        if runtime.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not written:  # another rank than 0: rank 0 moved the directory into place
        return
    final = out / CHECKPOINT
    old = out / (CHECKPOINT + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    retire(out, old, getattr(config, "save_total_limit", 1))
    runtime.barrier()


def _write(tmp: Path, model, optimizer, scheduler, step: int, config: FinetuneConfig, history: dict[str, Any], *,
           runtime: Runtime, data_sha256: str | None, eval_data_sha256: str | None) -> bool:
    """Write the checkpoint's files into ``tmp`` (the manifest last); False on the ranks that leave the
    rest to rank 0."""
    if runtime.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if runtime.is_distributed:
        from .. import distributed

        runtime.barrier()
        distributed.save_checkpoint(str(tmp / "distributed"), model, optimizer)
        runtime.barrier()
        if not runtime.is_main:
            runtime.barrier()  # rank 0 moves the directory into place
            return False
    frozen = None
    if not runtime.is_distributed:
        frozen = save_weights(model, tmp / "model.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    saved = dataclasses.asdict(config)
    write_json(tmp / STATE, {"format": FORMAT, "step": step, "world_size": runtime.world_size,
                             "data_sha256": data_sha256, "eval_data_sha256": eval_data_sha256,
                             "config": saved, "history": history,
                             "identity": identity(saved, data_sha256, eval_data_sha256),
                             **({"frozen_sha256": frozen} if frozen else {})})
    make_readable(tmp)
    write_manifest(tmp)
    return True


def write_manifest(ckpt: Path) -> int:
    """``manifest.json``: size and sha256 of every other file under ``ckpt``; returns their number."""
    files = sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST)
    write_json(ckpt / MANIFEST, {"format": FORMAT, "files": {
        p.relative_to(ckpt).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files}})
    return len(files)


def trust_unverified(directory: Path) -> bool:
    """Give a checkpoint written before galore-plus wrote manifests the manifest it lacks, so that it
    resumes (``finetune --resume DIR --trust-unverified-checkpoint``); returns whether one was written.

    Nothing can verify such a checkpoint: the user vouches for it, and stderr says what is done. It
    must be complete by the old rule — a ``state.json`` with its step and config (written last by the
    old save) and every other file of a checkpoint. What today's ``state.json`` holds beside is added:
    the world size (1: a checkpoint without ``distributed/`` was written by one process; an old
    distributed one is refused, since nothing says how many ranks wrote it) and the data files'
    sha256 as they are now. A checkpoint that has a manifest is left as it is (and verified)."""
    directory = Path(directory)
    recover(directory)
    ckpt = directory / CHECKPOINT
    if not ckpt.is_dir() or (ckpt / MANIFEST).exists():
        return False
    where = f"--resume {directory} --trust-unverified-checkpoint"
    if not (ckpt / STATE).is_file():
        raise CheckpointError(f"{where}: {ckpt} has no {STATE}, so it is incomplete (its save was cut short) and "
                              "cannot be trusted")
    state = _read_json(ckpt / STATE)
    if not (isinstance(state, dict) and isinstance(state.get("step"), int) and isinstance(state.get("config"), dict)
            and isinstance(state.get("history"), dict)):
        raise CheckpointError(f"{where}: {ckpt / STATE} has no step, config and history: not a galore-plus checkpoint")
    distributed = (ckpt / "distributed").is_dir()
    missing = [name for name in ("scheduler.pt", *(() if distributed else ("model.safetensors", "optimizer.pt")))
               if not (ckpt / name).is_file()]
    if missing:
        raise CheckpointError(f"{where}: {ckpt} has no {', '.join(missing)}: it is incomplete and cannot be trusted")
    added: dict[str, Any] = {}
    if "world_size" not in state:
        if distributed:
            raise CheckpointError(f"{where}: {ckpt / STATE} does not say how many ranks wrote its distributed/ "
                                  "shards, and a resume needs the same number; it cannot be trusted")
        added["world_size"] = 1
    for key, name in (("data_sha256", "data"), ("eval_data_sha256", "eval_data")):
        path = state["config"].get(name)
        if key not in state:
            added[key] = sha256_file(path) if path not in (None, *TASKS) and os.path.isfile(path) else None
    files = [p for p in ckpt.rglob("*") if p.is_file()]
    print(f"galore-plus: {ckpt} has no {MANIFEST} (it was written before galore-plus wrote manifests), so nothing "
          f"can verify it; trusting its {len(files)} files as they are (--trust-unverified-checkpoint) and writing "
          f"{MANIFEST}" + (f", with {', '.join(added)} added to {STATE}" if added else ""), file=sys.stderr)
    if added:
        write_json(ckpt / STATE, {"format": FORMAT, **state, **added})
    write_manifest(ckpt)
    return True


def recover(directory: Path) -> None:
    """Finish a :func:`save` that a crash cut short between its two renames.

    :func:`save` moves the previous checkpoint to ``checkpoint.old`` and then the new one from
    ``checkpoint.tmp`` into place; a crash between the two leaves no ``checkpoint``. The new one is
    complete once its manifest (written last) is there, so it is promoted; otherwise the old one is
    put back. Every rank of a distributed run may call this: a rename another rank already made is
    not an error."""
    final = directory / CHECKPOINT
    tmp, old = directory / (CHECKPOINT + ".tmp"), directory / (CHECKPOINT + ".old")
    for candidate in ([tmp] if (tmp / MANIFEST).exists() else []) + [old]:
        if final.exists():
            return
        if candidate.exists():
            try:
                os.replace(candidate, final)
            except OSError:  # another rank promoted one first
                continue
            print(f"galore-plus: {final} was missing after an interrupted save; restored it from {candidate.name}",
                  file=sys.stderr)


def write_run(out: Path, config: FinetuneConfig, data_sha256: str | None, eval_data_sha256: str | None = None) -> None:
    """``run.json``: what the run is, written when it starts (see the module docstring)."""
    saved = dataclasses.asdict(config)
    write_json(out / RUN, {"format": FORMAT, "config": saved, "data_sha256": data_sha256,
                           "eval_data_sha256": eval_data_sha256,
                           "identity": identity(saved, data_sha256, eval_data_sha256)})


# ---------------------------------------------------------------------------------------------- reading


def saved_config(directory: Path) -> FinetuneConfig:
    """The config of the run in ``directory``: its checkpoint's, else its ``run.json``'s (a run killed
    before its first checkpoint). Read, not verified: :func:`read_state` verifies before loading."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"--resume {directory}: no such directory")
    recover(directory)
    path = directory / CHECKPOINT / STATE
    if not path.exists():
        path = directory / RUN
    if not path.exists():
        raise CheckpointError(f"--resume {directory}: no run there (neither {CHECKPOINT}/{STATE} nor {RUN})")
    record = _read_json(path)
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise CheckpointError(f"{path} has no 'config' object: it was not written by galore-plus finetune")
    if path.name == STATE and (directory / RUN).exists():  # first: a foreign checkpoint is named as such
        check_same_run(record, _read_json(directory / RUN), directory)
    try:
        return from_dict(record["config"], str(path))
    except ConfigError as err:
        raise CheckpointError(str(err)) from None


def read_run(directory: Path) -> dict[str, Any] | None:
    path = Path(directory) / RUN
    return _read_json(path) if path.exists() else None


def read_state(directory: Path) -> dict[str, Any] | None:
    """The checkpoint's ``state.json`` once every file of the checkpoint matches its manifest;
    ``None`` when ``directory`` has no checkpoint. A missing, corrupt or inconsistent file raises
    :class:`CheckpointError` naming it."""
    recover(directory)
    ckpt = Path(directory) / CHECKPOINT
    if not ckpt.exists():
        return None
    files = verify(ckpt)
    for name in (STATE, "scheduler.pt"):
        if name not in files:
            raise CheckpointError(f"{ckpt}: the manifest lists no {name}; the checkpoint is incomplete")
    state = _read_json(ckpt / STATE)
    problems = []
    if not isinstance(state, dict):
        problems.append("not a JSON object")
    else:
        for key, kind in (("step", int), ("world_size", int), ("config", dict), ("history", dict)):
            if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
                problems.append(f"{key!r} is missing or not {'an' if kind is int else 'a'} {kind.__name__}")
    if problems:
        raise CheckpointError(f"{ckpt / STATE}: {'; '.join(problems)}")
    if (ckpt / "distributed").exists() != (state["config"].get("distributed", "none") != "none"):
        raise CheckpointError(f"{ckpt}: its files do not match its state.json (distributed: "
                              f"{state['config'].get('distributed')!r}, world size {state['world_size']})")
    return state


def verify(ckpt: Path) -> dict[str, Any]:
    """Check every file the manifest lists: present, same size, same sha256 (a checkpoint, or a run's
    ``final/``). Returns the listing."""
    path = ckpt / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete or was written before galore-plus "
                              "wrote manifests, and it is not loaded unverified (if you trust it, resume with "
                              "--trust-unverified-checkpoint)")
    manifest = _read_json(path)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{path} lists no files")
    for name, entry in files.items():
        file = ckpt / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing (the checkpoint's manifest lists it)")
        if file.stat().st_size != entry.get("bytes"):
            raise CheckpointError(f"{file} is corrupt: {file.stat().st_size} bytes where the manifest says "
                                  f"{entry.get('bytes')}")
        digest = sha256_file(file)
        if digest != entry.get("sha256"):
            raise CheckpointError(f"{file} is corrupt: its sha256 is {digest[:16]}…, the manifest's "
                                  f"{str(entry.get('sha256'))[:16]}…")
    return files


def check_resumable(state: dict[str, Any] | None, run: dict[str, Any] | None, directory: Path, data: str,
                    data_sha256: str | None, world_size: int, *, eval_data: str | None = None,
                    eval_data_sha256: str | None = None) -> None:
    """The run may continue here: the checkpoint was written by as many ranks as this run has (a
    rank's share of the sharded state — the residual's index set — is its own), and the data files
    are the ones the run started with."""
    if state is not None and state["world_size"] != world_size:
        raise CheckpointError(
            f"--resume {directory}: the checkpoint was written by {state['world_size']} rank(s) and this run has "
            f"{world_size}; resume it on the same number (torchrun --nproc_per_node {state['world_size']})")
    if state is not None and run is not None:
        check_same_run(state, run, directory)
    record = state if state is not None else run
    for name, path, digest in (("data_sha256", data, data_sha256), ("eval_data_sha256", eval_data, eval_data_sha256)):
        expected = record.get(name) if record else None
        if expected != digest:
            raise CheckpointError(f"--resume {directory}: the data file {path} has changed since the run started "
                                  f"(sha256 {str(digest)[:16]}…, the run's {str(expected)[:16]}…); a resumed run "
                                  "must train and evaluate on the same examples")


def load(directory: Path, state: dict[str, Any], model, optimizer, scheduler) -> None:
    """Load the verified checkpoint of ``directory`` into the run's model, optimizer and scheduler."""
    ckpt = Path(directory) / CHECKPOINT
    scheduler_state = torch.load(ckpt / "scheduler.pt", weights_only=True)
    if scheduler_state.get("last_epoch") != state["step"]:
        raise CheckpointError(f"{ckpt / 'scheduler.pt'} is at step {scheduler_state.get('last_epoch')} and "
                              f"{ckpt / STATE} at step {state['step']}: not one checkpoint")
    current = ckpt / "optimizer.pt"
    try:
        if (ckpt / "distributed").exists():
            from .. import distributed

            current = ckpt / "distributed"
            distributed.load_checkpoint(str(current), model, optimizer)
        else:
            current = ckpt / "model.safetensors"
            load_weights(current, state, model)
            current = ckpt / "optimizer.pt"
            optimizer.load_state_dict(torch.load(current, weights_only=True))
    except (RuntimeError, KeyError, ValueError) as err:
        raise CheckpointError(f"{current} does not fit this run's model and optimizer: "
                              f"{str(err).splitlines()[0]}") from None
    scheduler.load_state_dict(scheduler_state)
