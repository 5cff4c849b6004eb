"""One way for the tests to start N local ranks: ``python -m torch.distributed.run`` with a c10d
rendezvous (as TorchX launches), so a restarted attempt gets a fresh rendezvous round."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def torchrun(*command: str, port: int | None = None, ranks: int = 2, restarts: int = 0, env: dict | None = None,
             timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``command`` (a script path and its arguments, or ``-m module ...``) on ``ranks`` local ranks
    from the repository root; fails the test with the output's tail unless every rank exits 0. Without a
    ``port``, ``--standalone`` takes a free one, so two test runs on one machine never meet."""
    rendezvous = ["--standalone"] if port is None else ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), *rendezvous,
           "--max_restarts", str(restarts), *map(str, command)]
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done
