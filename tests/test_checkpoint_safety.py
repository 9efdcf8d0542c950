"""Issue 25, security: a distributed (DCP) checkpoint's index, ``.metadata``, is a pickle that
``torch.distributed.checkpoint`` loads with ``pickle.load``; ``galore_plus.distributed.load_checkpoint``
reads it with an unpickler that builds only DCP's index classes, so a crafted checkpoint directory is
refused with one line and its payload never runs (also a bytes entry, which DCP would
``torch.load(weights_only=False)``)."""

from __future__ import annotations

import os
import pickle
import warnings

import pytest
import torch
from torch import nn

from galore_plus import GaLoreAdamW
from galore_plus.distributed import load_checkpoint, save_checkpoint


class Payload:
    """Unpickling it runs a command (what an attacker would put in a checkpoint)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def trained(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 4))
    opt = GaLoreAdamW([{"params": [model[0].weight, model[1].weight], "rank": 2},
                       {"params": [model[0].bias, model[1].bias]}], lr=1e-2)
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        save_checkpoint(str(tmp_path / "ckpt"), model, opt)
    return model, opt


def fresh():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 4))
    return model, GaLoreAdamW([{"params": [model[0].weight, model[1].weight], "rank": 2},
                               {"params": [model[0].bias, model[1].bias]}], lr=1e-2)


def load(path, model, opt):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_checkpoint(str(path), model, opt)


def test_a_checkpoint_loads_through_the_safe_reader(tmp_path):
    model, opt = trained(tmp_path)
    other, other_opt = fresh()
    load(tmp_path / "ckpt", other, other_opt)
    for p, q in zip(model.parameters(), other.parameters()):
        assert torch.equal(p, q)
    assert torch.equal(other_opt.state[other[0].weight]["exp_avg"], opt.state[model[0].weight]["exp_avg"])


def test_a_crafted_index_is_refused_and_its_payload_never_runs(tmp_path):
    trained(tmp_path)
    marker = tmp_path / "pwned"
    (tmp_path / "ckpt" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(ValueError, match=r"\.metadata names posix\.system, which a checkpoint index never holds"):
        load(tmp_path / "ckpt", *fresh())
    assert not marker.exists()
    # what torch's own reader would have done with it (the door this closes)
    from torch.distributed.checkpoint import FileSystemReader

    with pytest.raises(AttributeError):  # after the payload ran: os.system's return value has no storage_meta
        FileSystemReader(str(tmp_path / "ckpt")).read_metadata()
    assert marker.exists()


def test_a_bytes_entry_is_refused_before_any_data_is_read(tmp_path):
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    trained(tmp_path)
    path = tmp_path / "ckpt" / ".metadata"
    with open(path, "rb") as f:
        metadata = pickle.load(f)
    key = next(k for k in metadata.state_dict_metadata if k.startswith("model/"))
    metadata.state_dict_metadata[key] = BytesStorageMetadata()
    path.write_bytes(pickle.dumps(metadata))
    with pytest.raises(ValueError, match="BytesStorageMetadata"):
        load(tmp_path / "ckpt", *fresh())
