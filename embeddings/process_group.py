"""The process group's life: its timeout, set explicitly wherever bahe creates a group (issue 28, item 3), and
its end, while the interpreter is still alive (:func:`close_process_group`).

A collective that waits longer than the timeout fails instead of hanging; the same timeout bounds start-up:
the rendezvous (every rank reaching the store) and the first collectives, which on a large store include
each rank's shard load and its checksums. torch's own defaults differ by backend (gloo 30 min, nccl 10
min), so bahe passes one value everywhere: ``--pg-timeout SECONDS`` on bahe-train, bahe-evaluate,
bahe-predict and bahe-encode build (default :data:`DEFAULT_TIMEOUT_S`, 30 minutes).

Example::

    init_process_group("gloo", timeout_s=600)          # or set_timeout(600) once, then init_process_group("gloo")
    ...
    close_process_group()                                # the last line of a rank's main
"""

from __future__ import annotations

import datetime
import gc
import os

DEFAULT_TIMEOUT_S = 1800.0
_timeout_s = DEFAULT_TIMEOUT_S  # the launch's (set_timeout), used where no timeout is passed


def add_timeout_flag(parser) -> None:
    """``--pg-timeout SECONDS`` on ``parser`` (or an argument group): the one definition every launcher that
    creates a process group uses (bahe-train, bahe-evaluate through bahe-train's parser, bahe-predict,
    bahe-encode build)."""
    parser.add_argument("--pg-timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                        help="the process group's timeout: how long a rank waits for the others at start-up "
                             "(rendezvous, the store's load and checksums) and in any collective before failing "
                             f"instead of hanging (default {DEFAULT_TIMEOUT_S:.0f} s)")


def check_timeout(seconds: float) -> float:
    seconds = float(seconds)
    if not seconds > 0:
        raise ValueError(f"the process-group timeout must be > 0 seconds, got {seconds} (--pg-timeout; default "
                         f"{DEFAULT_TIMEOUT_S:.0f})")
    return seconds


def set_timeout(seconds: float) -> None:
    """This process's timeout for groups created without one (a launcher's ``--pg-timeout``)."""
    global _timeout_s
    _timeout_s = check_timeout(seconds)


def timeout(seconds: float | None = None) -> datetime.timedelta:
    """``seconds`` (None: the launch's, :func:`set_timeout`) as the timedelta torch takes."""
    return datetime.timedelta(seconds=check_timeout(_timeout_s if seconds is None else seconds))


def init_process_group(backend: str, *, timeout_s: float | None = None, **kwargs) -> None:
    """``torch.distributed.init_process_group`` with the timeout set explicitly."""
    import torch.distributed as dist  # here: a launcher's --help imports this module without torch

    dist.init_process_group(backend, timeout=timeout(timeout_s), **kwargs)


def rendezvous(url: str, *, timeout_s: float | None = None):
    """``torch.distributed.rendezvous`` waiting at most the timeout for every rank."""
    import torch.distributed as dist

    return dist.rendezvous(url, timeout=timeout(timeout_s))


def close_process_group() -> None:
    """End this rank's process group now: ``destroy_process_group`` and then collect the reference cycles
    (DistributedModelParallel, sharded modules, the train pipeline) that still hold its backend.

    ``destroy_process_group`` only unregisters the group; a gloo backend lives, with its worker and transport
    threads, until the last reference goes, and DMP's graph holds it in cycles that only the garbage collector
    frees. Left to interpreter finalization, that destructor runs while Python is being torn down, and a rank
    that finished its work could abort there ("terminate called without an active exception", exit -6): the
    intermittent failure of 2-rank runs this prevents. Collected here, the backend's threads are joined while
    everything they touch still exists (:func:`backend_threads` is empty afterwards)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


def backend_threads() -> dict[int, str]:
    """This process's live native threads that belong to a gloo backend (``gloo_tcp_loop``, ``pt_gloo_runloop``),
    thread id -> name: none once no group's backend is alive. Linux only (``/proc``); {} elsewhere."""
    threads = {}
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return threads
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/comm") as comm:
                name = comm.read().strip()
        except OSError:  # the thread ended meanwhile
            continue
        if "gloo" in name:
            threads[int(task)] = name
    return threads
