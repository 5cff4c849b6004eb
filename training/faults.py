"""Fault injection for chaos tests: kill a rank with SIGKILL at a chosen point of a run.

``BAHE_FAULT_KILL_RANK_AT_STEP=<rank>:<step>`` kills that rank right after training step ``step``;
``<rank>:<step>:checkpoint`` kills it in the middle of saving the step-``step`` checkpoint (its
shards written, the checkpoint not yet published). Only on the launch's first attempt
(torchrun's ``TORCHELASTIC_RESTART_COUNT`` is 0), so a restart can be seen to recover. Unset --
always, outside tests -- nothing happens.
"""

from __future__ import annotations

import os
import signal

FAULT_ENV = "BAHE_FAULT_KILL_RANK_AT_STEP"


def inject_fault(rank: int, step: int, phase: str = "step") -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    victim, at, *where = spec.split(":")
    if int(victim) == rank and int(at) == step and (where[0] if where else "step") == phase:
        print(f"{FAULT_ENV}: rank {rank} kills itself with SIGKILL at {phase} {step}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
