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
