"""Checkpoints with torch.distributed.checkpoint (DCP): sharded tables included, every rank writes
its own shards; the step, the data position (training rows consumed, which does not depend on the
world size) and the learning-rate schedules travel along. DCP reshards the tables on load, so a run
may resume on another number of ranks.

The frozen behaviour table and its (lr=0) optimizer state are left out: they come from the
behaviour store, which the trainer loads at start-up, so checkpoints stay small.

Layout: ``<dir>/step-000100/`` (a DCP checkpoint) and ``<dir>/LATEST`` naming the newest COMPLETE
one. A checkpoint is written under ``.partial-step-...`` and renamed only after every rank has
finished, and LATEST moves after that, so a crash never leaves a half-written checkpoint current.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from embeddings.store import write_text_atomic

FROZEN_MARKER = "embeddings.behaviours."


def without_frozen(tree):
    """A copy of a (nested) state dict without the frozen behaviour table's entries (tensors shared)."""
    if isinstance(tree, dict):
        return {k: without_frozen(v) for k, v in tree.items() if FROZEN_MARKER not in str(k)}
    return tree


def merge_into(target: dict, loaded: dict) -> None:
    """Write ``loaded``'s values into ``target`` in place (keys absent from ``loaded`` stay as they are)."""
    for key, value in loaded.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            merge_into(target[key], value)
        else:
            target[key] = value


class Checkpointer:
    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.rows_seen = 0  # the data position of the restored checkpoint (0 for a fresh run)

    def _is_rank0(self) -> bool:
        return not dist.is_initialized() or dist.get_rank() == 0

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def latest(self) -> Path | None:
        pointer = self.directory / "LATEST"
        if not pointer.is_file():
            return None
        path = self.directory / pointer.read_text().strip()
        return path if path.is_dir() else None

    def save(self, step: int, dmp, optimizer, schedulers, *, rows_seen: int) -> Path:
        name = f"step-{step:07d}"
        partial = self.directory / f".partial-{name}"
        if self._is_rank0():
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        self._barrier()
        state = {"model": without_frozen(dmp.state_dict()), "optimizer": without_frozen(optimizer.state_dict()),
                 "progress": {"step": torch.tensor(step), "rows_seen": torch.tensor(rows_seen),
                              "schedulers": torch.tensor([s.last_epoch for s in schedulers])}}
        dcp.save(state, checkpoint_id=str(partial))
        self._barrier()
        final = self.directory / name
        if self._is_rank0():
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            write_text_atomic(self.directory / "LATEST", name + "\n")
        self._barrier()
        return final

    def restore(self, dmp, optimizer, schedulers) -> int:
        """Load the newest complete checkpoint in place; returns its step (0 when there is none)."""
        path = self.latest()
        if path is None:
            return 0
        # AdamW creates its moments lazily at the first step; a fresh optimizer's state dict would have
        # no slots for them and they would silently not be restored. torchrec's init_state() runs one
        # zero-gradient step to create them; everything it touches is overwritten by the load below.
        optimizer.init_state()
        model_state, optimizer_state = dmp.state_dict(), optimizer.state_dict()
        state = {"model": without_frozen(model_state), "optimizer": without_frozen(optimizer_state),
                 "progress": {"step": torch.tensor(0), "rows_seen": torch.tensor(0),
                              "schedulers": torch.zeros(len(schedulers), dtype=torch.long)}}
        dcp.load(state, checkpoint_id=str(path))
        merge_into(model_state, state["model"])
        merge_into(optimizer_state, state["optimizer"])
        dmp.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        for scheduler, last in zip(schedulers, state["progress"]["schedulers"].tolist()):
            scheduler.last_epoch = last
            for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
                group["lr"] = base * scheduler.lr_lambdas[0](last)
        self.rows_seen = int(state["progress"]["rows_seen"])
        return int(state["progress"]["step"])
