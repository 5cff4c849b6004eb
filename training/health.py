"""Run health while training: stop at the first non-finite loss, before a checkpoint of NaN weights.

A NaN or infinite loss means the weights just updated from it are garbage too; training on would end
with NaN metrics, exit 0 and a NaN checkpoint as LATEST. :func:`check_loss` sums the step's loss over
the ranks (one scalar all-reduce; the sum is non-finite when any rank's loss is), so every rank
raises together and none waits in a collective.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


class NonFiniteLossError(ValueError):
    """The training loss became NaN or infinite; the message says which step and what to check."""


def check_loss(loss: torch.Tensor, step: int, checkpoints) -> None:
    """Raise :class:`NonFiniteLossError` when ``loss`` (this rank's) is not finite on some rank.

    Args:
        loss: this rank's loss of the step (a scalar tensor on the training device).
        step: the step just taken (1-based).
        checkpoints: the run's ``Checkpointer`` (its LATEST is named in the message).
    """
    total = loss.detach().reshape(1).to(torch.float64)
    world = 1
    if dist.is_initialized():
        dist.all_reduce(total)
        world = dist.get_world_size()
    value = float(total) / world
    if math.isfinite(value):
        return
    try:
        latest = checkpoints.latest()
    except (ValueError, OSError):
        latest = None
    kept = (f"the last good checkpoint {latest.name} stays LATEST in {checkpoints.directory} (a rerun resumes there once the cause is fixed)"
            if latest is not None else "there is no checkpoint of this run yet")
    raise NonFiniteLossError(
        f"step {step}: the training loss is {value} (mean over {world} rank(s)); stopped without saving this "
        f"state, {kept}. Check the behaviour store (bahe-encode verify STORE), the data (bahe-data "
        "summary FILE) and the learning rates (lower --dense-lr / --llm-lr / --sparse-lr, keep --grad-clip on)")
