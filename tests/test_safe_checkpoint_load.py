"""Nothing unsafe is loaded from a checkpoint folder: DCP would read its .metadata and its non-tensor
values with plain pickle; ours refuses anything but checkpoint metadata and plain data, before
any of it runs, and still loads real checkpoints exactly."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp
from bahe.training.safe_load import UnsafeCheckpointError, load_checkpoint


class RunsCode:
    """Unpickling this would run os.system (here: touch a marker file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def save(tmp_path, state):
    dcp.save(state, checkpoint_id=str(tmp_path / "ckpt"), no_dist=True)
    return tmp_path / "ckpt"


def load(path, state):
    load_checkpoint(state, path)


def test_a_real_checkpoint_loads_exactly(tmp_path):
    state = {"w": torch.randn(4, 3), "progress": {"step": torch.tensor(7)}, "groups": [{"lr": 0.1, "betas": (0.9, 0.99)}]}
    path = save(tmp_path, state)
    target = {"w": torch.zeros(4, 3), "progress": {"step": torch.tensor(0)}, "groups": [{"lr": 0.0, "betas": (0, 0)}]}
    load(path, target)
    assert torch.equal(target["w"], state["w"]) and int(target["progress"]["step"]) == 7
    assert target["groups"] == [{"lr": 0.1, "betas": (0.9, 0.99)}]


def test_a_metadata_file_that_would_run_code_is_refused(tmp_path):
    path = save(tmp_path, {"w": torch.ones(2)})
    marker = tmp_path / "ran"
    (path / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(UnsafeCheckpointError, match=r"asks to load (posix|os).system") as info:
        load(path, {"w": torch.zeros(2)})
    assert not marker.exists()
    assert "not checkpoint metadata" in str(info.value)


def test_a_non_tensor_value_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = save(tmp_path, {"w": torch.ones(2), "extra": {"x": RunsCode(marker)}})
    assert not marker.exists()  # saving pickles it, nothing runs
    with pytest.raises(UnsafeCheckpointError, match="'extra.x' is not plain data"):
        load(path, {"w": torch.zeros(2), "extra": {"x": None}})
    assert not marker.exists()


def test_unsafe_checkpoint_error_is_a_value_error():
    assert issubclass(UnsafeCheckpointError, ValueError)
