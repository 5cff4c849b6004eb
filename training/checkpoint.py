"""Checkpoints with torch.distributed.checkpoint (DCP): sharded tables included, every rank writes
its own shards; the step, the data position (training rows consumed, which does not depend on the
world size) and the learning-rate schedules travel along. DCP reshards the tables on load, so a run
may resume on another number of ranks.

The frozen behaviour table and its (lr=0) optimizer state are left out: they come from the
behaviour store, which the trainer loads at start-up, so checkpoints stay small.
:func:`load_into` is the one loader: a resume, the best checkpoint at the end, and a warm start from
another run (``bahe-train --init-from``, training/init_from.py: weights, and optimizer state on request).

Layout: ``<dir>/step-000100/`` (a DCP checkpoint) and ``<dir>/LATEST`` naming the newest COMPLETE
one. A checkpoint is written under ``.partial-step-...`` and renamed only after every rank has
finished, and LATEST moves after that, so a crash never leaves a half-written checkpoint current.

A write that fails (a full disk, an unwritable folder) raises :class:`CheckpointWriteError` on every
rank, naming the folder, the rank(s) and the OS's reason; the partial folder is removed and the last
complete checkpoint stays LATEST, so the next run resumes from it.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from bahe.embeddings.store import write_text_atomic
from bahe.training.faults import inject_fault
from bahe.training.run_record import write_record
from bahe.training.safe_load import load_checkpoint

FROZEN_MARKER = "embeddings.behaviours."


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the message names the folder, the reason and what to do.
    The last complete checkpoint is intact and still LATEST."""


def os_error_in(err: BaseException) -> OSError | None:
    """The first OSError in ``err``'s chain: torch.save reports a failed write as a RuntimeError ('unexpected
    pos ...') whose context is the OSError."""
    seen, inner = set(), err
    while inner is not None and id(inner) not in seen:
        if isinstance(inner, OSError) and inner.errno is not None:
            return inner
        seen.add(id(inner))
        inner = inner.__cause__ or inner.__context__
    return None


def describe_os_error(err: OSError) -> str:
    """'/path: No space left on device (ENOSPC)' (a failed write() names no file)."""
    where = f"{err.filename}: " if err.filename else ""
    return f"{where}{err.strerror} ({errno.errorcode.get(err.errno, err.errno)})"


class _ReportingWriter(dcp.FileSystemWriter):
    """DCP's file writer that remembers why this rank failed: DCP gathers the ranks' failures into a
    CheckpointException, and the OSError (ENOSPC, EFBIG, EACCES) is lost on the way."""

    failure: str | None = None

    def _remember(self, method, *args):
        try:
            return method(*args)
        except BaseException as err:
            found = os_error_in(err)
            if found is not None:
                self.failure = describe_os_error(found)
            raise

    def prepare_local_plan(self, plan):
        return self._remember(super().prepare_local_plan, plan)

    def write_data(self, plan, planner):
        return self._remember(super().write_data, plan, planner)

    def finish(self, metadata, results):
        return self._remember(super().finish, metadata, results)


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
    def __init__(self, directory: Path, run_config=None, record_extra: dict | None = None):
        self.directory = Path(directory)
        self.run_config = run_config  # a TrainConfig: its model flags are recorded beside each checkpoint
        self.record_extra = record_extra  # recorded with them: the store, initialized_from (run_record.py)
        self.rows_seen = 0  # the data position of the restored checkpoint (0 for a fresh run)

    def _is_rank0(self) -> bool:
        return not dist.is_initialized() or dist.get_rank() == 0

    def latest(self) -> Path | None:
        """The newest complete checkpoint; None for a fresh run (no LATEST). A LATEST naming a folder that
        is gone is an error: restarting from step 0 would silently throw the run's progress away."""
        pointer = self.directory / "LATEST"
        if not pointer.is_file():
            return None
        name = pointer.read_text().strip()
        if not re.fullmatch(r"step-\d{7}", name):  # never a path out of the checkpoint folder
            raise ValueError(f"{pointer} names {name!r}, not a checkpoint (step-NNNNNNN): restore it or delete LATEST")
        path = self.directory / name
        if not path.is_dir():
            raise FileNotFoundError(f"{pointer} names {path.name}, which is not in {self.directory}: restore that "
                                    "folder, point LATEST at another complete step-* folder, or delete LATEST to "
                                    "start this run from step 0")
        return path

    def named(self, name: str) -> Path:
        if not re.fullmatch(r"step-\d{7}", name) or not (self.directory / name).is_dir():
            raise FileNotFoundError(f"{self.directory} holds no complete checkpoint {name!r} (BEST.json names it): "
                                    "restore that folder, or evaluate the latest step (bahe-evaluate --which latest)")
        return self.directory / name

    def _latest_name(self) -> str | None:
        try:
            return (self.directory / "LATEST").read_text().strip() or None
        except OSError:
            return None

    def _what_now(self) -> str:
        try:
            latest = self.latest()
        except (ValueError, FileNotFoundError):  # a damaged LATEST: report the write failure all the same
            latest = None
        kept = f"The last complete checkpoint {latest.name} is intact and still LATEST" if latest else \
            "There is no earlier complete checkpoint"
        return (f"{kept}; free space on that filesystem or make {self.directory} a writable folder (or choose "
                f"another run folder, bahe-train --out), then run again: training resumes from the last complete "
                f"checkpoint")

    def on_rank0(self, action, what: str) -> None:
        """Run ``action`` on rank 0 and raise on every rank if it failed (a bare barrier would leave the other
        ranks waiting for a rank 0 that has raised)."""
        reason = None
        if self._is_rank0():
            try:
                action()
            except OSError as err:
                reason = describe_os_error(err)
        if dist.is_initialized():
            box = [reason]
            dist.broadcast_object_list(box, src=0)
            reason = box[0]
        if reason is not None:
            raise CheckpointWriteError(f"cannot {what}: {reason}. {self._what_now()}")

    def save(self, step: int, dmp, optimizer, schedulers, *, rows_seen: int) -> Path:
        name = f"step-{step:07d}"
        partial, final = self.directory / f".partial-{name}", self.directory / name

        def start() -> None:
            if self.directory.exists() and not self.directory.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, "a file, not a folder", str(self.directory))
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)

        self.on_rank0(start, f"create the checkpoint folder for {name}")
        state = {"model": without_frozen(dmp.state_dict()), "optimizer": without_frozen(optimizer.state_dict()),
                 "progress": {"step": torch.tensor(step), "rows_seen": torch.tensor(rows_seen),
                              "schedulers": torch.tensor([s.last_epoch for s in schedulers])}}
        writer = _ReportingWriter(str(partial))
        try:
            dcp.save(state, storage_writer=writer)
        except dcp.CheckpointException as err:  # DCP gathers the ranks' failures: every rank raises it
            self._save_failed(name, partial, writer, err)
        inject_fault(dist.get_rank() if dist.is_initialized() else 0, step, "checkpoint")

        def publish() -> None:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            try:
                if self.run_config is not None:  # before LATEST: never a current checkpoint without its record
                    write_record(self.directory.parent, self.run_config, self.record_extra)
                write_text_atomic(self.directory / "LATEST", name + "\n")
            except OSError:
                if self._latest_name() != name:  # complete but not current: only in the way
                    shutil.rmtree(final, ignore_errors=True)
                raise

        self.on_rank0(publish, f"publish checkpoint {name} in {self.directory}")
        return final

    def _save_failed(self, name: str, partial: Path, writer: _ReportingWriter, err: dcp.CheckpointException) -> None:
        """Every rank: remove the partial folder, then raise CheckpointWriteError for a failed write (the
        ranks' OSErrors), or ``err`` itself for any other failure."""
        if dist.is_initialized():
            reasons = [None] * dist.get_world_size()
            dist.all_gather_object(reasons, writer.failure)
        else:
            reasons = [writer.failure]
        found = [f"rank {rank}: {why}" for rank, why in enumerate(reasons) if why]
        if not found:  # an OSError raised outside the writer's methods (its chain is lost in the gathering)
            found = [f"rank {rank}: {describe_os_error(cause)}" for rank, (inner, _) in sorted(err.failures.items())
                     if (cause := os_error_in(inner)) is not None]
        if self._is_rank0():
            shutil.rmtree(partial, ignore_errors=True)  # every rank is done with it: give the space back
        if not found:
            raise err
        raise CheckpointWriteError(f"cannot write checkpoint {name} into {partial} ({'; '.join(found)}); the "
                                   f"partial folder was removed. {self._what_now()}") from err

    def restore(self, dmp, optimizer, schedulers, *, name: str | None = None) -> int:
        """Load the newest complete checkpoint (or the one called ``name``, e.g. the best) in place; returns
        its step (0 when there is none)."""
        path = self.latest() if name is None else self.named(name)
        if path is None:
            return 0
        progress = {"step": torch.tensor(0), "rows_seen": torch.tensor(0),
                    "schedulers": torch.zeros(len(schedulers), dtype=torch.long)}
        load_into(path, dmp, optimizer, progress=progress)
        for scheduler, last in zip(schedulers, progress["schedulers"].tolist()):
            scheduler.last_epoch = last
            for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
                group["lr"] = base * scheduler.lr_lambdas[0](last)
        self.rows_seen = int(progress["rows_seen"])
        return int(progress["step"])


def load_into(path: Path, dmp, optimizer=None, *, progress: dict | None = None) -> None:
    """Load checkpoint ``path`` in place: the model's trainable weights into ``dmp`` (DCP reshards them to
    this launch's ranks and sharding plan), the optimizer state into ``optimizer`` when given (its
    hyper-parameters, e.g. learning rates, are not in checkpoints and stay), and the ``progress`` tensors
    when given. The frozen behaviour table is neither read nor touched: the store supplies it."""
    if optimizer is not None:
        # AdamW creates its moments lazily at the first step; a fresh optimizer's state dict would have
        # no slots for them and they would silently not be restored. torchrec's init_state() runs one
        # zero-gradient step to create them; everything it touches is overwritten by the load below.
        optimizer.init_state()
    model_state = dmp.state_dict()
    state = {"model": without_frozen(model_state)}
    if optimizer is not None:
        optimizer_state = optimizer.state_dict()
        state["optimizer"] = without_frozen(optimizer_state)
    if progress is not None:
        state["progress"] = progress
    # restricted loaders: a checkpoint folder may come from someone else (training/safe_load.py)
    load_checkpoint(state, path)
    merge_into(model_state, state["model"])
    dmp.load_state_dict(model_state)
    if optimizer is not None:
        merge_into(optimizer_state, state["optimizer"])
        optimizer.load_state_dict(optimizer_state)
