"""Issue 28, items 2 and 5: the behaviour store loads shard-locally, in bounded chunks, into a table that is
never filled with random values; ``--behaviour-sharding`` chooses the table's sharding, and the plan is one
line on rank 0.

On 2 gloo ranks (tests/dist/shard_load_worker.py), stores of random rows written by the real writer
(bench/store_scale.py's bench-only helper): every sharding's local shards equal the store bit for bit; each
rank's reader hands out exactly the blocks (rows AND columns) of its own shards and no other byte; the shards
are zeros before the load (no random init); loading a 205 MB store adds about one chunk, not a copy of the
shard, to a rank's peak resident memory; a NaN row is refused on both ranks naming the file, the row and
the chunk's row and column range. Through the programs: bahe-train --behaviour-sharding row_wise plans and
logs row-wise, bahe-evaluate restores that run under column_wise (the checkpoint leaves the frozen table
out; DCP reshards the rest) to the same metrics, a bad value is refused in one line.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bahe.embeddings.shard_reader import ShardReader
from bahe.embeddings.store import StoreError
from bench.store_scale import write_random_store
from tests.torchrun import torchrun

ROOT = Path(__file__).resolve().parents[1]
SMALL, DIM = 3001, 64  # rows x columns of the exactness store: 3001 rows split unevenly
BIG_ROWS, BIG_DIM = 200_000, 256  # 205 MB: the memory store
NAN_ROW = 2345
MIB = 1 << 20
CHUNK = 4 * MIB  # the memory test's chunk


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("shard_load")
    return {"small": write_random_store(root / "small", SMALL, DIM, seed=1),
            "big": write_random_store(root / "big", BIG_ROWS, BIG_DIM, seed=2),
            "nan": write_random_store(root / "nan", SMALL, DIM, seed=3, non_finite_row=NAN_ROW),
            "root": root}


@pytest.fixture(scope="module")
def ranks(stores):
    out = stores["root"] / "out"
    out.mkdir()
    done = torchrun(ROOT / "tests" / "dist" / "shard_load_worker.py", stores["small"].path.parent,
                    stores["big"].path.parent, stores["nan"].path.parent, out, timeout=900)
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    return results, [line for line in done.stdout.splitlines() if line.startswith("behaviour table ")]


pytestmark = pytest.mark.integration


@pytest.mark.parametrize("sharding", ["row_wise", "column_wise", "table_wise", "auto_large"])
def test_every_sharding_holds_the_store_bit_for_bit_and_each_rank_read_only_its_blocks(ranks, sharding):
    results, _ = ranks
    mine = [r["exact"][sharding] for r in results]
    assert all(m["exact"] for m in mine)  # float32 bits equal, shard by shard
    # no random init: torchrec's uniform_ pass over the shards skipped, fbgemm's zeros until the store is copied in
    assert all(m["random_inits"] == 0 and m["zeros_before"] for m in mine)
    for m in mine:
        assert m["delivered"] == m["shards"], "a rank read blocks (rows x columns) other than its own shards"
        assert m["delivered_bytes"] == m["shard_bytes"]
    blocks = [b for m in mine for b in m["shards"]]
    assert sum(m["delivered_bytes"] for m in mine) == SMALL * DIM * 4  # the ranks' blocks tile the table once
    covered = np.zeros((SMALL, DIM), np.int8)
    for r0, r1, c0, c1 in blocks:
        covered[r0:r1, c0:c1] += 1
    assert (covered == 1).all()
    if sharding in ("row_wise", "auto_large"):
        assert [len(m["shards"]) for m in mine] == [1, 1] and all(b[2:] == [0, DIM] for b in blocks)
    elif sharding == "column_wise":
        assert all(b[:2] == [0, SMALL] for b in blocks) and {b[2] for b in blocks} == {0, DIM // 2}
    else:
        assert sorted(len(m["shards"]) for m in mine) == [0, 1]
    assert all(m["chunks"] >= m["shard_bytes"] // 4096 for m in mine)  # 4096-byte chunks: many of them


def test_the_plan_is_one_line_on_rank_0_naming_the_table_the_type_and_each_ranks_shards(ranks):
    _, lines = ranks
    # exactness x 4, memory x 2, refusal x 2: one line each, printed by rank 0 only
    assert len(lines) == 8, lines
    row, column, table, auto = lines[:4]
    assert row == (f"behaviour table behaviours ({SMALL:,} x {DIM} float32, 750 KiB): row_wise (--behaviour-sharding "
                   f"row_wise); shards per rank: rank 0: 1 x (1,501 x {DIM}); rank 1: 1 x (1,500 x {DIM})")
    assert column.endswith(f"column_wise (--behaviour-sharding column_wise); shards per rank: rank 0: 1 x "
                           f"({SMALL:,} x {DIM // 2}); rank 1: 1 x ({SMALL:,} x {DIM // 2})")
    assert re.search(r"table_wise \(--behaviour-sharding table_wise\); shards per rank: rank 0: (0|1 x \(3,001 x 64\)); "
                     r"rank 1: (0|1 x \(3,001 x 64\))$", table), table
    assert "row_wise (auto: row_wise from 1 B); shards per rank: rank 0: 1 x (1,501 x 64)" in auto


@pytest.mark.parametrize("sharding", ["row_wise", "column_wise"])
def test_loading_adds_about_one_chunk_to_a_ranks_peak_memory_not_a_copy_of_its_shard(ranks, sharding):
    """Peak RSS during load_store_rows over the RSS just before it (the shard itself already allocated):
    one 4 MiB chunk of mapped file pages (the finiteness check sums the chunk: no mask) and, on rank 0, the
    checksum's 16 MiB read buffer. Before issue 28 this was about 2.5 x the shard (a copy of its rows with every column, the
    mapped pages, two full-size masks): 250 MB and more here."""
    results, _ = ranks
    for rank, r in enumerate(results):
        m = r["memory"][sharding]
        assert m["shard_bytes"] == BIG_ROWS * BIG_DIM * 4 // 2
        assert m["growth"] <= 2 * CHUNK + 16 * MIB + 24 * MIB, (rank, m["growth"] / MIB)


@pytest.mark.parametrize("sharding", ["row_wise", "column_wise"])
def test_a_nan_row_is_refused_on_every_rank_naming_the_file_the_row_and_the_chunks_range(ranks, stores, sharding):
    results, _ = ranks
    messages = {r["refusal"][sharding] for r in results}
    assert len(messages) == 1  # the same one line on both ranks
    message = messages.pop()
    assert message.startswith(f"{stores['nan'].path / 'vectors.npy'}: row {NAN_ROW} holds a non-finite value (nan): "
                              "the store is corrupt")
    found = re.search(r"rows \[(\d+), (\d+)\) x columns \[(\d+), (\d+)\)", message)
    r0, r1, c0, c1 = map(int, found.groups())
    assert r0 <= NAN_ROW < r1 and r1 - r0 <= 4096 // (DIM * 4) and c0 <= DIM // 2 < c1
    assert (c0, c1) == ((0, DIM) if sharding == "row_wise" else (DIM // 2, DIM))


def test_the_reader_walks_a_block_in_chunks_of_its_rows_and_columns_only(stores):
    """One process: every chunk is a view of the block's rows and columns (and no more), in order."""
    store = stores["small"]
    reference = np.load(store.path / "vectors.npy")
    with ShardReader(store, chunk_bytes=1000) as reader:  # 3 rows of 256 bytes per chunk
        got = [(first, chunk.copy()) for first, chunk in reader.chunks((10, 30), (8, 40))]
        assert reader.delivered.blocks == [(10, 30, 8, 40)] and reader.delivered.bytes == 20 * 32 * 4
    assert [first for first, _ in got] == list(range(10, 30, 3))
    assert all(chunk.shape == (min(3, 30 - first), 32) for first, chunk in got)
    assert np.array_equal(np.concatenate([c for _, c in got]), reference[10:30, 8:40])
    with ShardReader(store) as reader, pytest.raises(StoreError, match=r"outside the store"):
        next(reader.chunks((0, SMALL + 1)))


def test_a_plain_table_loads_in_chunks_bit_for_bit_and_a_nan_in_a_later_chunk_names_its_row(stores, monkeypatch):
    from bahe.model.behaviour_lookup import BehaviourLookup, load_store_rows

    initialised = []  # nn.Embedding's own init (normal_ over the table) runs only on meta, where it costs nothing
    reset = torch.nn.Embedding.reset_parameters
    monkeypatch.setattr(torch.nn.Embedding, "reset_parameters",
                        lambda self: (initialised.append(self.weight.device.type), reset(self))[1])
    store = stores["small"]
    lookup = BehaviourLookup(store.rows_count, store.dim, ["item_text"], {"item_text": 1})
    weight = lookup.embedding_collection.embeddings["behaviours"].weight
    assert set(initialised) == {"meta"} and weight.device.type == "cpu"
    assert not weight.detach().any()  # zeros: never filled with random values
    assert load_store_rows(lookup, store, chunk_bytes=5000) == SMALL
    assert torch.equal(weight.detach().view(torch.int32), torch.from_numpy(np.load(store.path / "vectors.npy")).view(torch.int32))
    nan = stores["nan"]
    lookup = BehaviourLookup(nan.rows_count, nan.dim, ["item_text"], {"item_text": 1})
    first = NAN_ROW // 19 * 19  # 5000-byte chunks hold 19 rows of 256 bytes: the NaN's chunk starts at 2337
    with pytest.raises(StoreError, match=rf"vectors.npy: row {NAN_ROW} holds a non-finite value \(nan\): the store is "
                                         rf"corrupt \(in rows \[{first}, {first + 19}\) x columns \[0, {DIM}\)"):
        load_store_rows(lookup, nan, chunk_bytes=5000)


def test_a_bad_behaviour_sharding_is_refused_with_a_clear_message(tmp_path):
    from bahe.model.sharding import choose_behaviour_sharding, use_behaviour_sharding
    from bahe.training.config import TrainConfig

    for name in ("train", "valid", "test"):
        (tmp_path / f"{name}.parquet").touch()
    with pytest.raises(ValueError, match=r"TrainConfig.behaviour_sharding='diagonal': give one of auto, row_wise, "
                                         r"column_wise, table_wise \(--behaviour-sharding"):
        TrainConfig(data_dir=tmp_path, out_dir=tmp_path / "run", behaviour_sharding="diagonal")
    with pytest.raises(ValueError, match="data_parallel is not available for the behaviour table"), \
            use_behaviour_sharding("data_parallel"):
        pass
    with pytest.raises(ValueError, match=r"--behaviour-sharding 'rows' is not one of auto, row_wise"):
        choose_behaviour_sharding("rows", 1)
    for program in ("bahe.launchers.train", "bahe.launchers.evaluate", "bahe.launchers.predict"):
        done = subprocess.run([sys.executable, "-m", program, "--behaviour-sharding", "diagonal"], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and re.search(r"argument --behaviour-sharding: invalid choice: 'diagonal' \(choose "
                                                  r"from '?auto'?, '?row_wise'?, '?column_wise'?, '?table_wise'?\)",
                                                  done.stderr), (program, done.stderr)


def test_auto_takes_row_wise_from_1_gib_and_leaves_smaller_tables_to_the_planner():
    from bahe.model.sharding import ROW_WISE_FROM_BYTES, behaviour_table_constraints, choose_behaviour_sharding

    assert ROW_WISE_FROM_BYTES == 1 << 30
    assert choose_behaviour_sharding("auto", 1 << 30) == (["row_wise"], "auto: row_wise from 1 GiB")
    assert choose_behaviour_sharding("auto", (1 << 30) - 1)[0] == ["table_wise", "row_wise", "column_wise"]
    assert choose_behaviour_sharding("column_wise", 1 << 40) == (["column_wise"], "--behaviour-sharding column_wise")
    constraints, _ = behaviour_table_constraints("auto", 1_000_000, 576, 8)  # 2.15 GiB
    assert constraints["behaviours"].sharding_types == ["row_wise"]
    constraints, _ = behaviour_table_constraints("column_wise", 1_000, 576, 2)
    assert constraints["behaviours"].min_partition == 288  # one column block per rank


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    """bahe-train with --behaviour-sharding row_wise, then bahe-evaluate of that run under column_wise and
    bahe-predict under table_wise, each on 2 ranks: (their summaries, the plan lines each printed)."""
    from tests.model_fixtures import make_tiny_pipeline, split_by_time

    root = tmp_path_factory.mktemp("sharding_flag")
    pipeline = make_tiny_pipeline(root / "pipeline")
    data = split_by_time(pipeline, root / "data")
    run = root / "run"
    plans, summaries = {}, {}
    common = ["--data-dir", str(data), "--store", str(pipeline.store), "--llm", str(pipeline.llm), "--batch-size",
              "16", "--embedding-dim", "8", "--dense-arch", "16", "8", "--over-arch", "16", "1", "--table-rows", "200",
              "--max-behaviours", "6", "--no-shuffle"]
    steps = [("train", ["-m", "bahe.launchers.train", *common, "--out", str(run), "--steps", "4",
                        "--behaviour-sharding", "row_wise"]),
             ("evaluate", ["-m", "bahe.launchers.evaluate", *common, "--checkpoint", str(run), "--which", "latest",
                           "--out", str(root / "evaluation"), "--behaviour-sharding", "column_wise"]),
             ("predict", ["-m", "bahe.launchers.predict", "--run-dir", str(run), "--which", "latest", "--data",
                          str(data / "test.parquet"), "--out", str(root / "scores.parquet"), "--quiet",
                          "--behaviour-sharding", "table_wise"])]
    for name, command in steps:
        done = torchrun(*command, timeout=900)
        plans[name] = [line for line in done.stdout.splitlines() if line.startswith("behaviour table ")]
        summaries[name] = json.loads(done.stdout.strip().splitlines()[-1])
    return summaries, plans


def test_the_flag_reaches_the_plan_of_train_evaluate_and_predict_and_a_restore_may_use_another(programs):
    summaries, plans = programs
    for name, sharding in (("train", "row_wise"), ("evaluate", "column_wise"), ("predict", "table_wise")):
        assert len(plans[name]) == 1, plans[name]  # one line, rank 0's
        assert f": {sharding} (--behaviour-sharding {sharding}); shards per rank: rank 0: " in plans[name][0]
    assert "rank 0: 1 x (" in plans["train"][0] and "; rank 1: 1 x (" in plans["train"][0]
    # the checkpoint leaves the frozen table out (the store supplies it), DCP reshards the rest: the run
    # restored under another sharding scores what it scored at the end of training
    for split in ("valid", "test"):
        assert summaries["evaluate"][split]["auc"] == pytest.approx(summaries["train"][split]["auc"], abs=1e-6)
    assert summaries["predict"]["rows"] > 0


def test_finite_values_whose_sum_overflows_load_and_are_not_taken_for_a_corrupt_store(tmp_path):
    """The per-chunk check sums the chunk (no chunk-sized masks); a row of 3e38s sums to inf in float32, so
    the exact check decides: every value is finite, the store loads."""
    from bahe.model.behaviour_lookup import BehaviourLookup, load_store_rows

    store = write_random_store(tmp_path / "huge", 300, DIM, huge_row=100)
    lookup = BehaviourLookup(store.rows_count, store.dim, ["item_text"], {"item_text": 1})
    assert load_store_rows(lookup, store, chunk_bytes=4096) == 300
    weight = lookup.embedding_collection.embeddings["behaviours"].weight.detach()
    assert float(weight[100].sum()) == float("inf") and bool(weight[100].eq(3e38).all())
