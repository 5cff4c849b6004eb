"""One writer per folder: an exclusive OS lock (``fcntl.flock``) on ``<folder>/.lock``.

A store being built (``bahe-encode build``) and a run folder being trained into (``bahe-train --out``)
each take it for the whole of their write. The OS drops the lock when its holder exits, however it
exits (a crash, SIGKILL), so the file a dead process leaves behind blocks nobody; while held, the file
names the holder (PID, host, start time) for the message the second writer gets. Under torchrun, rank 0
holds the lock and every rank learns whether it got it, so all ranks fail together and none is left
waiting at a barrier.

flock is per host on most network filesystems (NFS without lock support): there it guards against a
second writer on the same machine only.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist

LOCK_FILE = ".lock"


class FolderLockError(ValueError):
    """The folder or its lock file cannot be made (a file in the way, no permission, a full disk)."""


class FolderBusyError(FolderLockError):
    """Another process holds the folder's lock: its message names the holder and what to do."""


class FolderLock:
    """An exclusive, non-blocking lock on ``<folder>/.lock``; ``busy`` words the refusal, e.g.
    ``"store {folder} is being built by {holder}; wait for it or use another store"``."""

    def __init__(self, folder: str | os.PathLike, busy: str):
        self.folder, self.busy = Path(folder), busy
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None

    def acquire(self, wait_s: float = 0.0) -> FolderLock:
        """Take the lock, retrying for up to ``wait_s`` seconds; FolderBusyError if another process holds it.
        OSError if the lock file cannot be made (a missing or unwritable folder)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise FolderBusyError(self.busy.format(folder=self.folder, holder=self.holder())) from None
                time.sleep(0.2)
        self._fd = fd
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        return self

    def holder(self) -> str:
        """'PID 123 on host h (since 2025-01-01T10:00:00+00:00)', from the lock file the holder wrote."""
        try:
            info = json.loads(self.path.read_text())
            return f"PID {info['pid']} on host {info['host']} (since {info['since']})"
        except (OSError, ValueError, KeyError, TypeError):  # the holder has not written it yet
            return "another process (it has not written its PID yet)"

    def release(self) -> None:
        """Empty the file (so it names nobody) and drop the lock; closing the descriptor drops it too."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _share_text(text: str) -> str:
    """Rank 0's ``text`` on every rank (UTF-8 bytes in tensors: no pickling)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return text
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    data = text.encode()
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    dist.broadcast(size, src=0)
    buffer = torch.zeros(int(size.item()), dtype=torch.uint8, device=device)
    if dist.get_rank() == 0 and data:
        buffer.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buffer, src=0)
    return buffer.cpu().numpy().tobytes().decode()


@contextlib.contextmanager
def rank0_folder_lock(folder: str | os.PathLike, busy: str, wait_s: float = 0.0):
    """Make ``folder`` and hold ``FolderLock(folder, busy)`` on rank 0 for the block. If rank 0 cannot
    (FolderBusyError; FolderLockError when the folder or lock file cannot be made), every rank raises:
    rank 0 its own error, the others one with rank 0's message. Call it on every rank (after the process
    group is set up, if there is one)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    lock, failure, message = None, None, ""
    if rank == 0:
        try:
            try:
                Path(folder).mkdir(parents=True, exist_ok=True)
                lock = FolderLock(folder, busy).acquire(wait_s)
            except OSError as err:
                reason = f"{err.strerror} ({errno.errorcode.get(err.errno, err.errno)})" if err.strerror else str(err)
                raise FolderLockError(f"cannot make or lock {Path(folder) / LOCK_FILE}: {reason}; choose a folder "
                                      "this user can write") from err
        except FolderLockError as err:
            failure, message = err, str(err)
    message = _share_text(message)
    if message:
        if failure is not None:
            raise failure
        raise FolderBusyError(f"{message} (reported by rank 0)")
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
