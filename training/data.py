"""Per-rank batches from sample files: streaming, deterministic, resumable, equal-sized -- and each rank
reads only the row groups that hold its own rows.

The stream. Each epoch is one sequence of the train split's rows: the row groups in a seeded random
order, the rows of each permuted (or, unshuffled, the file's order) -- a time-ordered stream would feed
whole sessions of one user per batch. The split stays entirely earlier than valid and test. The
sequence is dealt into ``lanes`` equal parts (lane l: its rows ``[l M, (l + 1) M)``, ``M = rows //
lanes``; the last ``rows % lanes`` rows of an epoch's sequence sit that epoch out), each lane an
endless stream, epoch after epoch. A global batch of ``G = batch_size * world`` rows takes the next
``G / lanes`` rows of every lane, lane 0's first; rank r trains on rows ``[r * batch_size, (r + 1) *
batch_size)`` of it. With one lane (the default) this is one stream cut into global batches.

What it depends on: the seed, the lanes and the global batch -- not on how the global batch is split
into ranks, so a data position is a row count (``lanes`` rows apart): a resumed run skips the rows
already trained on (``skip_rows / lanes`` of every lane), with the same number of ranks or another.

Reading. A rank reads only the row groups that hold rows of its own slices, whole (the Parquet unit
of reading), and keeps only its rows. Its batches are the same rows, in the same order, as slicing
the full global batch. What that saves depends on where a rank's rows are: with one lane, every
global batch is a stretch of one permuted row group, so with row groups much larger than a global
batch every rank still reads every group; with ``lanes`` a multiple of the world size, rank r's rows
come from lanes ``[r L / W, (r + 1) L / W)`` only, and it reads about 1/W of the file
(docs/bench/read.md). Evaluation reads each split once in file order, likewise only the row groups
that hold the rank's slices.

Every rank gets a batch of exactly ``batch_size`` rows at every step -- the sharded tables'
collectives run in lockstep, and gloo's all-to-all needs equal sizes -- so training never pads, and
evaluation pads the last global batch with repeated rows that are masked out of the metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from bahe.ctr_data.parquet_io import SampleReader


def _epoch_groups(reader: SampleReader, seed: int, epoch: int, shuffle: bool) -> Iterator[tuple[int, np.ndarray]]:
    """(row group, the order of its rows) in the epoch's order: groups in a seeded random order, each
    permuted, drawn one after another from one generator (or the file's order)."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(reader.num_row_groups) if shuffle else range(reader.num_row_groups)
    for index in order:
        rows = reader.row_group_rows(int(index))
        yield int(index), (rng.permutation(rows) if shuffle else np.arange(rows))


def _lane_segments(reader: SampleReader, seed: int, shuffle: bool, lane: int, lanes: int
                   ) -> Iterator[tuple[int, np.ndarray]]:
    """Lane ``lane``'s endless stream, as (row group, rows of that group in stream order) pieces: its
    share ``[lane M, (lane + 1) M)`` of every epoch's sequence, ``M = rows // lanes``."""
    share = reader.num_rows // lanes
    first, last = lane * share, (lane + 1) * share
    epoch = 0
    while True:
        start = 0  # of the group in the epoch's sequence
        for index, order in _epoch_groups(reader, seed, epoch, shuffle):  # every group's draw, in order
            lo, hi = max(first, start), min(last, start + order.size)
            if lo < hi:
                yield index, order[lo - start:hi - start]
            start += order.size
        epoch += 1


def _needed_rows(reader: SampleReader, segments: Iterator[tuple[int, np.ndarray]], start: int, unit: int,
                 window: tuple[int, int]) -> Iterator[pa.Table]:
    """This rank's rows of one lane, in order: from lane position ``start`` on, the rows at positions
    ``window`` of every ``unit`` rows (a global batch takes ``unit`` rows of the lane). Row groups
    holding none of them are not read."""
    position = 0  # lane position of the segment's first row
    for index, rows in segments:
        positions = np.arange(position, position + rows.size) - start
        position += rows.size
        if positions[-1] < 0:
            continue
        within = positions % unit
        keep = (positions >= 0) & (within >= window[0]) & (within < window[1])
        if keep.any():
            yield reader.read_row_group(index, rows[keep])


def recut(tables: Iterator[pa.Table], size: int) -> Iterator[pa.Table]:
    """Re-cut a stream of tables into tables of exactly ``size`` rows (a last shorter one at the end)."""
    pending: list[pa.Table] = []
    count = 0
    for table in tables:
        pending.append(table)
        count += table.num_rows
        while count >= size:
            joined = pa.concat_tables(pending)
            yield joined.slice(0, size)
            rest = joined.slice(size)
            pending, count = [rest], rest.num_rows
    if count:
        yield pa.concat_tables(pending)


def _training_batches(reader: SampleReader, batch_size: int, rank: int, world: int, *, seed: int, shuffle: bool,
                      skip_rows: int, lanes: int) -> Iterator[pa.Table]:
    """This rank's training tables, endless (see the module doc)."""
    unit = batch_size * world // lanes  # rows of each lane in a global batch
    lo, hi = rank * batch_size, (rank + 1) * batch_size  # this rank's slice of a global batch
    streams = []
    for lane in range(lanes):
        window = (max(lo, lane * unit) - lane * unit, min(hi, (lane + 1) * unit) - lane * unit)
        if window[0] < window[1]:
            segments = _lane_segments(reader, seed, shuffle, lane, lanes)
            rows = _needed_rows(reader, segments, skip_rows // lanes, unit, window)
            streams.append(recut(rows, window[1] - window[0]))
    while True:
        parts = [next(stream) for stream in streams]
        yield parts[0] if len(parts) == 1 else pa.concat_tables(parts)


def _evaluation_batches(reader: SampleReader, batch_size: int, rank: int, world: int
                        ) -> Iterator[tuple[pa.Table, int]]:
    """One pass in file order: global batch k is the file's rows ``[k G, (k + 1) G)``; the last one is
    padded by repeating its rows from its start. Row groups are kept while a global batch needs them."""
    size = batch_size * world
    cache: dict[int, pa.Table] = {}
    offsets = reader.row_group_offsets
    for begin in range(0, reader.num_rows, size):
        real = min(size, reader.num_rows - begin)
        rows = begin + np.arange(rank * batch_size, (rank + 1) * batch_size) % real
        groups = np.searchsorted(offsets, rows, side="right") - 1
        for index in [g for g in cache if offsets[g + 1] <= begin]:  # no later batch reads before ``begin``
            del cache[index]
        for index in np.unique(groups):
            if int(index) not in cache:
                cache[int(index)] = reader.read_row_group(int(index))
        needed = np.unique(groups)
        joined = pa.concat_tables([cache[int(g)] for g in needed])
        starts = np.concatenate([[0], np.cumsum([cache[int(g)].num_rows for g in needed])])
        local = rows - offsets[groups] + starts[np.searchsorted(needed, groups)]
        yield joined.take(pa.array(local, type=pa.int64())), int(np.clip(real - rank * batch_size, 0, batch_size))


def rank_tables(path: Path, batch_size: int, rank: int, world: int, *, train: bool, skip_rows: int = 0,
                seed: int = 0, shuffle: bool = True, id_columns: tuple[str, ...] = (), lanes: int = 1,
                reader: SampleReader | None = None) -> Iterator[tuple[pa.Table, int]]:
    """Yield (table of exactly ``batch_size`` rows, number of real rows in it) for this rank.

    Args:
        train: endless, shuffled unless ``shuffle`` is False (see the module doc); otherwise one pass
            in file order, the last global batch padded with repeated rows (real rows first).
        skip_rows: training rows to skip first (resuming at a data position: steps x batch x ranks
            of the run that saved it, whatever the world size now); a multiple of ``lanes``.
        seed: the training order's seed (the same on every rank).
        id_columns: ID columns whose ids must be >= 0 (the batcher's): a negative one anywhere in the
            file is refused naming the file and its row, on every rank, before the first batch.
        lanes: parts each epoch's sequence is dealt into (see the module doc); ``batch_size * world``
            must be a multiple of it. 1: one stream. A multiple of ``world``: each rank reads ~1/world.
        reader: an open reader of ``path`` (to count its :attr:`~SampleReader.bytes_read`).
    """
    reader = reader or SampleReader(path, nonnegative_ids=id_columns)
    size = batch_size * world
    if train and reader.num_rows < size:
        raise ValueError(f"{path} has {reader.num_rows} rows, fewer than one global batch ({batch_size} x {world} "
                         "ranks); lower --batch-size")
    if train and (lanes < 1 or size % lanes):
        raise ValueError(f"a global batch of {size} rows ({batch_size} x {world} ranks) does not split into {lanes} "
                         f"lanes: use lanes >= 1 that divide it, or a batch size that makes it a multiple of {lanes}")
    if train and skip_rows % lanes:
        raise ValueError(f"cannot resume {path} at row {skip_rows} of the stream: with {lanes} lanes a data position "
                         f"is a multiple of {lanes} (the run that saved it dealt its rows into other lanes?)")
    reader.check_ids()  # on every rank, before the first batch: no rank stops alone mid-run
    if not train:
        yield from _evaluation_batches(reader, batch_size, rank, world)
        return
    for table in _training_batches(reader, batch_size, rank, world, seed=seed, shuffle=shuffle, skip_rows=skip_rows,
                                   lanes=lanes):
        yield table, batch_size


def batches(path: Path, batcher: Callable, batch_size: int, rank: int, world: int, **kw) -> Iterator:
    """Training batches (see :func:`rank_tables`)."""
    ids = tuple(getattr(batcher, "id_features", ()))
    return (batcher(table) for table, _ in rank_tables(path, batch_size, rank, world, train=True, id_columns=ids, **kw))


def eval_batches(path: Path, batcher: Callable, batch_size: int, rank: int, world: int) -> Iterator:
    """(batch, real rows) pairs covering the split once; rows past ``real`` are padding."""
    ids = tuple(getattr(batcher, "id_features", ()))
    return ((batcher(table), real) for table, real in rank_tables(path, batch_size, rank, world, train=False,
                                                                   id_columns=ids))
