"""Per-rank batches from sample files: streaming, deterministic, resumable, equal-sized.

The file is read in global batches of ``batch_size * world`` rows (row groups stream; the file is
never loaded whole); rank r takes rows [r * batch_size, (r + 1) * batch_size) of each. Every rank
gets a batch of exactly ``batch_size`` rows at every step -- the sharded tables' collectives run in
lockstep, and gloo's all-to-all needs equal sizes -- so training drops a final partial global
batch, and evaluation pads it with repeated rows that are masked out of the metrics. Batch n of a
run is fully determined by n, which is what a resumed run skips to.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from ctr_data.parquet_io import SampleReader


def rank_tables(path: Path, batch_size: int, rank: int, world: int, *, train: bool, skip: int = 0
                ) -> Iterator[tuple[pa.Table, int]]:
    """Yield (table of exactly ``batch_size`` rows, number of real rows in it) for this rank.

    Args:
        train: repeat the file forever and drop a final partial global batch; otherwise one pass,
            the last global batch padded with repeated rows (real rows first).
        skip: global batches to skip first (resuming at a data position).
    """
    reader = SampleReader(path)
    size = batch_size * world
    if train and reader.num_rows < size:
        raise ValueError(f"{path} has {reader.num_rows} rows, fewer than one global batch ({batch_size} x {world} "
                         "ranks); lower --batch-size")
    produced = 0
    while True:
        for table in reader.iter_batches(size):
            if table.num_rows < size:
                if train:
                    continue
                real = table.num_rows
                table = table.take(pa.array(np.arange(size) % real))
            else:
                real = size
            produced += 1
            if produced <= skip:
                continue
            yield table.slice(rank * batch_size, batch_size), int(np.clip(real - rank * batch_size, 0, batch_size))
        if not train:
            return


def batches(path: Path, batcher: Callable, batch_size: int, rank: int, world: int, **kw) -> Iterator:
    """Training batches (see :func:`rank_tables`)."""
    return (batcher(table) for table, _ in rank_tables(path, batch_size, rank, world, train=True, **kw))


def eval_batches(path: Path, batcher: Callable, batch_size: int, rank: int, world: int) -> Iterator:
    """(batch, real rows) pairs covering the split once; rows past ``real`` are padding."""
    return ((batcher(table), real) for table, real in rank_tables(path, batch_size, rank, world, train=False))
