"""Each rank reads only the row groups that hold its rows (issue 19, item 4), and still gets exactly the
batches it got when every rank read every row and kept its slice: the old stream is written out below as
the reference. With lanes (a multiple of the world size) a rank reads ~1/world of the file, and the
stream stays seeded, resumable, and independent of how the global batch is split into ranks."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bahe.ctr_data.parquet_io import SampleReader, SampleWriter
from bahe.ctr_data.schema import DataError
from bahe.training.data import rank_tables
from tests.conftest import tiny_rows

ROWS = 61  # a prime: epochs never line up with global batches


def write(path, schema, rows: int = ROWS, group: int = 13, bad_row: int | None = None):
    """``rows`` rows (timestamp = file row) of about the same size each, in row groups of ``group``."""
    data = tiny_rows(rows)
    data["seq_liked"] = [[f"Movie {i % 97:02d} seen {j}" for j in range(3)] for i in range(rows)]
    data["timestamp"] = list(range(rows))
    data["label"] = np.random.default_rng(7).integers(0, 2, rows).tolist()
    if bad_row is not None:
        data["user_id"][bad_row] = -3
    with SampleWriter(path, schema, row_group_size=group) as writer:
        writer.write(data)
    return path


# The stream as it was read before (issue 19): every rank reads every row, cuts global batches, keeps its slice
def reference_stream(reader: SampleReader, seed: int, shuffle: bool, skip_rows: int):
    epoch = 0
    while True:
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(reader.num_row_groups) if shuffle else range(reader.num_row_groups)
        for index in order:
            rows = reader.row_group_rows(int(index))
            permutation = rng.permutation(rows) if shuffle else None
            if skip_rows >= rows:
                skip_rows -= rows
                continue
            group = reader.read_row_group(int(index))
            group = group.take(pa.array(permutation)) if shuffle else group
            yield group.slice(skip_rows)
            skip_rows = 0
        epoch += 1


def reference_tables(path, batch_size, rank, world, *, train, skip_rows=0, seed=0, shuffle=True):
    reader = SampleReader(path)
    size = batch_size * world
    source = reference_stream(reader, seed, shuffle, skip_rows) if train else reader.iter_batches(size)
    pending, count = [], 0
    for table in source:
        pending.append(table)
        count += table.num_rows
        while count >= size:
            joined = pa.concat_tables(pending)
            yield joined.slice(rank * batch_size, batch_size), batch_size
            pending, count = [joined.slice(size)], count - size
    if count and not train:
        joined = pa.concat_tables(pending)
        padded = joined.take(pa.array(np.arange(size) % count))
        yield padded.slice(rank * batch_size, batch_size), int(np.clip(count - rank * batch_size, 0, batch_size))


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def ts(table: pa.Table) -> list[int]:
    return table.column("timestamp").to_pylist()


@pytest.mark.parametrize(("group", "batch_size", "world", "skip_rows", "shuffle"), [
    (5, 4, 2, 0, True), (13, 3, 3, 0, True), (5, 5, 2, 40, True), (13, 4, 2, 70, True), (64, 4, 2, 0, True),
    (64, 7, 1, 10, True), (5, 4, 2, 24, False), (13, 3, 4, 0, False)])  # groups below, near and above a slice
def test_training_batches_are_those_of_the_old_stream_on_every_rank(tmp_path, tiny_schema, group, batch_size, world,
                                                                    skip_rows, shuffle):
    """Shuffled and file order, resumed mid-group and past an epoch, 1 to 4 ranks: every rank's every
    batch equals the old stream's slice, row for row and column for column (3 epochs)."""
    path = write(tmp_path / "train.parquet", tiny_schema, group=group)
    steps = 3 * ROWS // (batch_size * world) + 1
    for rank in range(world):
        kw = dict(train=True, skip_rows=skip_rows, seed=11, shuffle=shuffle)
        new = take(rank_tables(path, batch_size, rank, world, **kw), steps)
        old = take(reference_tables(path, batch_size, rank, world, **kw), steps)
        for (table, real), (expected, _) in zip(new, old):
            assert real == batch_size and table.equals(expected), (rank, ts(table), ts(expected))


@pytest.mark.parametrize(("group", "batch_size", "world"), [(5, 4, 2), (13, 8, 3), (64, 100, 2), (13, 61, 1)])
def test_evaluation_batches_are_those_of_the_old_pass_with_the_same_padding(tmp_path, tiny_schema, group,
                                                                           batch_size, world):
    path = write(tmp_path / "valid.parquet", tiny_schema, group=group)
    for rank in range(world):
        new = list(rank_tables(path, batch_size, rank, world, train=False))
        old = list(reference_tables(path, batch_size, rank, world, train=False))
        assert [real for _, real in new] == [real for _, real in old]
        assert all(a.equals(b) for (a, _), (b, _) in zip(new, old)) and len(new) == len(old)


def bytes_per_rank(path, batch_size, world, steps, **kw) -> list[int]:
    """Bytes of row groups each rank reads for ``steps`` training batches (past the footer, which every
    rank reads once when it opens the file)."""
    counts = []
    for rank in range(world):
        reader = SampleReader(path)
        footer = reader.bytes_read
        take(rank_tables(path, batch_size, rank, world, train=True, reader=reader, **kw), steps)
        counts.append(reader.bytes_read - footer)
    return counts


def test_a_rank_reads_only_the_row_groups_that_hold_its_rows(tmp_path, tiny_schema):
    """One epoch, a global batch of 64 rows, 2,048 rows of about equal size. One lane and row groups of
    16 (a rank's slice of 32 is two whole groups): 2 ranks read half the bytes each. One lane and groups
    of 1,024 (a global batch is a stretch of one permuted group): every rank reads every group, as the
    old stream did. Groups of 128 dealt into 4 lanes: 2 and 4 ranks read ~1/2 and ~1/4 each."""
    small = write(tmp_path / "small.parquet", tiny_schema, rows=2048, group=16)
    one = bytes_per_rank(small, 64, 1, 32)[0]
    assert [b / one for b in bytes_per_rank(small, 32, 2, 32)] == pytest.approx([0.5, 0.5], abs=0.02)
    big = write(tmp_path / "big.parquet", tiny_schema, rows=2048, group=1024)
    one = bytes_per_rank(big, 64, 1, 32)[0]
    assert [b / one for b in bytes_per_rank(big, 32, 2, 32)] == pytest.approx([1, 1], abs=0.01)
    lanes = write(tmp_path / "lanes.parquet", tiny_schema, rows=2048, group=128)
    one = bytes_per_rank(lanes, 64, 1, 32, lanes=4)[0]
    assert [b / one for b in bytes_per_rank(lanes, 32, 2, 32, lanes=4)] == pytest.approx([0.5] * 2, abs=0.02)
    assert [b / one for b in bytes_per_rank(lanes, 16, 4, 32, lanes=4)] == pytest.approx([0.25] * 4, abs=0.02)


def global_rows(path, global_batch, world, steps, **kw) -> list[int]:
    ranks = [rank_tables(path, global_batch // world, r, world, train=True, **kw) for r in range(world)]
    return [t for _ in range(steps) for it in ranks for t in ts(next(it)[0])]


def test_lanes_keep_the_stream_independent_of_the_world_size_and_resumable(tmp_path, tiny_schema):
    """4 lanes, a global batch of 12: 1, 2 and 4 ranks train on the same rows at every step; 2 ranks for
    3 steps then 1 rank resumed at row 36 see the uninterrupted stream; the first 15 steps (180 rows,
    three epochs of 60 = 4 lanes x 15) hold each epoch's rows once, 60 of the 61 (one sits each epoch out);
    3 ranks, which 4 lanes do not divide, train on the same rows too (reading less evenly)."""
    path = write(tmp_path / "train.parquet", tiny_schema, group=13)
    one = global_rows(path, 12, 1, 15, lanes=4, seed=3)
    assert global_rows(path, 12, 2, 15, lanes=4, seed=3) == one == global_rows(path, 12, 4, 15, lanes=4, seed=3)
    assert global_rows(path, 12, 3, 15, lanes=4, seed=3) == one
    assert global_rows(path, 12, 2, 3, lanes=4, seed=3) + global_rows(path, 12, 1, 12, lanes=4, seed=3,
                                                                      skip_rows=36) == one
    for epoch in range(3):
        rows = one[epoch * 60:(epoch + 1) * 60]
        assert len(set(rows)) == 60 and set(rows) <= set(range(ROWS))
    assert one[:60] != sorted(one[:60])
    assert global_rows(path, 12, 1, 15, lanes=1, seed=3) != one  # lanes change the order: a new stream


def test_lanes_that_do_not_fit_are_refused(tmp_path, tiny_schema):
    path = write(tmp_path / "train.parquet", tiny_schema)
    with pytest.raises(ValueError, match="global batch of 15 rows .5 x 3 ranks. does not split into 4 lanes"):
        next(rank_tables(path, 5, 0, 3, train=True, lanes=4))
    with pytest.raises(ValueError, match="at row 6 of the stream: with 4 lanes"):
        next(rank_tables(path, 4, 0, 2, train=True, lanes=4, skip_rows=6))


@pytest.mark.parametrize("statistics", [True, False])
def test_a_negative_id_in_rows_another_rank_reads_stops_every_rank_before_its_first_batch(tmp_path, tiny_schema,
                                                                                         statistics):
    """Row 50 is in lane 3 (rows of the last quarter of each epoch); rank 0 of 2 with 4 lanes never reads
    it, yet refuses the file at once, as rank 1 does: no rank trains on while another stops. A clean
    file costs no read for the check (the footer's minimum ids prove it), and a file without
    statistics is checked by reading its ID columns."""
    path = write(tmp_path / "train.parquet", tiny_schema, group=8, bad_row=50)
    if not statistics:
        table = pq.read_table(path)
        pq.write_table(table, path, row_group_size=8, write_statistics=False)
    for rank in (0, 1):
        stream = rank_tables(path, 4, rank, 2, train=True, shuffle=False, lanes=4, id_columns=("user_id",))
        with pytest.raises(DataError) as info:
            next(stream)
        assert (info.value.row, info.value.field) == (50, "user_id")
    clean = write(tmp_path / "clean.parquet", tiny_schema, group=8)
    reader = SampleReader(clean, nonnegative_ids=("user_id", "cat_genre"))
    before = reader.bytes_read
    reader.check_ids()
    assert reader.bytes_read == before


def test_read_bench_quick(tmp_path, capsys):
    """bench/read_bench.py on 2,048 rows, its ranks in this process: bytes per rank halve with 4 lanes
    at 2 ranks, not with the old stream or the evaluation pass; the JSON and the report are written."""
    import json

    from bench.read_bench import main

    out = tmp_path / "bench_read"
    assert main(["--rows", "2048", "--row-groups", "256", "--small-row-groups", "32", "--global-batch", "64",
                 "--worlds", "1", "2", "--in-process", "--cache", str(tmp_path), "--out", str(out)]) == 0
    record = json.loads(out.with_suffix(".json").read_text())
    ratio = {(r["case"], r["world"]): r["vs_one_rank"] for r in record["summary"]}
    assert ratio["lanes", 2] == pytest.approx(0.5, abs=0.01) and ratio["small_groups", 2] < 0.6
    assert ratio["old", 2] == ratio["eval", 2] == 1.0
    assert all(r["rows_per_rank"] > 0 for r in record["summary"])
    assert "| 4 lanes | 2 | " in out.with_suffix(".md").read_text() and capsys.readouterr().out.startswith("| case")
