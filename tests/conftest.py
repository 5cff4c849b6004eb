"""Shared fixtures: small real sample tables built with the project's own schema."""

from __future__ import annotations

import os

# Small test models run best on one thread, and two processes spinning two OpenMP threads each on
# a 2-core machine slow each other down a hundredfold; torchrun children get 1 thread anyway.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from bahe.ctr_data.schema import SampleSchema  # noqa: E402

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CRITEO_SAMPLE = FIXTURES / "criteo" / "sample.tsv"  # 115 real Criteo rows (see its SOURCE.md)


@pytest.fixture
def tiny_schema() -> SampleSchema:
    return SampleSchema(categorical=("genre",), dense=("age",), sequences=("liked", "disliked"), dataset="tiny")


def tiny_rows(n: int = 4) -> dict[str, list]:
    """n valid rows for ``tiny_schema`` (column -> values)."""
    return {
        "label": [i % 2 for i in range(n)],
        "timestamp": list(range(n)),
        "user_id": [10 + i for i in range(n)],
        "item_id": [100 + i for i in range(n)],
        "cat_genre": [[i, i + 1] if i % 2 else [] for i in range(n)],
        "dense_age": [20.0 + i for i in range(n)],
        "item_text": [f"Movie {i}" for i in range(n)],
        "seq_liked": [[f"Movie {j}" for j in range(i)] for i in range(n)],
        "seq_disliked": [[] for _ in range(n)],
    }


@pytest.fixture
def one_rank(monkeypatch):
    """A CLI's main() in this process as a 1-rank gloo group on a free port (its environment restored, its
    group destroyed afterwards)."""
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    monkeypatch.delenv("BAHE_TRACEBACK", raising=False)
    yield
    if dist.is_initialized():
        from bahe.embeddings.process_group import close_process_group

        close_process_group()


@pytest.fixture
def keep_signal_handlers():
    """TorchX's local scheduler takes over SIGINT/SIGTERM when created; give them back to pytest afterwards."""
    import signal

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)
