"""bench/store_scale.py's pure helpers (issue 28, item 6) and load_store_rows' optional timing hook: a process's
age from its /proc stat line, start-up CPU summed over the phases, the phases table, the store texts the lookup
batches draw from, and the hook's phases and byte counts (a plain table, one process: fast)."""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import torch

from bench.store_scale import (
    STARTUP_PHASES,
    Phases,
    bench_text,
    phases_md,
    process_age_s,
    startup_cpu_s,
    write_random_store,
)


def test_process_age_reads_field_22_even_when_the_command_name_holds_spaces_and_parentheses():
    fields = ["S", *[str(i) for i in range(4, 22)], "12345", "0"]  # fields 3..21, then starttime (22), then more
    line = "4242 (py (x) thread) " + " ".join(fields)
    assert process_age_s(line, uptime_s=200.0, ticks_per_s=100) == 200.0 - 123.45


def test_startup_cpu_is_the_sum_of_the_phases_a_rank_has_and_ignores_others():
    phases = {p: {"wall_s": 9.0, "cpu_s": 1.0} for p in STARTUP_PHASES if p != "agree"}  # W = 1: no all-gather
    phases["lookup_warmup"] = {"wall_s": 5.0, "cpu_s": 5.0}
    assert startup_cpu_s(phases) == len(STARTUP_PHASES) - 1


def test_phases_records_wall_and_cpu_of_each_block():
    phases = Phases()
    with phases("busy"):
        end = time.process_time() + 0.02
        while time.process_time() < end:
            pass
    with phases("idle"):
        time.sleep(0.02)
    busy, idle = phases.seconds["busy"], phases.seconds["idle"]
    assert busy["cpu_s"] >= 0.015 and idle["wall_s"] >= 0.015 and idle["cpu_s"] < idle["wall_s"]


def test_the_phases_table_has_one_row_per_rank_and_dashes_for_what_a_rank_lacks():
    rank = {"rows": 10_000, "store_dtype": "bfloat16", "world": 2, "sharding": "row_wise", "rank": 1,
            "phases": {"imports": {"cpu_s": 5.0}, "verify": {"cpu_s": 0.25}}, "startup_cpu_s": 5.25,
            "verified_bytes": 1 << 30, "copied_bytes": None, "lookup": {"median_text_cpu_s": 0.0205}}
    legacy = {"rows": 10_000, "world": 1, "sharding": "auto", "rank": 0}  # an older result: no phases at all
    lines = phases_md([rank, legacy]).splitlines()
    assert len(lines) == 4 and lines[0].count("|") == lines[1].count("|") == lines[2].count("|") == lines[3].count("|")
    assert "| 10,000 | bfloat16 | 2 | row_wise | 1 | - | 5.00 |" in lines[2]
    assert "| 0.25 | - | - | 5.25 | 1.00 | - | 20.5 | - |" in lines[2]
    assert "| float32 |" in lines[3]


def test_random_store_texts_are_bench_text_by_row_and_a_half_precision_store_loads_with_the_timing_hook(tmp_path):
    from bahe.model.behaviour_lookup import BehaviourLookup, load_store_rows

    store = write_random_store(tmp_path / "s", 500, 32, store_dtype="bfloat16")
    assert store.store_dtype == "bfloat16"
    rows = store.text_index.lookup_array(pa.array([bench_text(0), bench_text(497), "never written"]))
    assert list(rows[:2]) == [2, 499] and rows[2] == 1  # after <pad>, <unknown>; unknown texts -> row 1
    lookup = BehaviourLookup(store.rows_count, store.dim, ["item_text"], {"item_text": 1})  # float32 on CPU
    timings: dict = {}
    assert load_store_rows(lookup, store, chunk_bytes=1000, timings=timings) == 500
    assert set(timings) == {"verify", "copy", "verified_bytes", "copied_bytes"}  # one process: no all-gather
    assert timings["verified_bytes"] == 500 * 32 * 2 and timings["copied_bytes"] == 500 * 32 * 2
    assert all(timings[p]["wall_s"] >= 0 and timings[p]["thread_cpu_s"] >= 0 for p in ("verify", "copy"))
    weight = lookup.embedding_collection.embeddings["behaviours"].weight.detach()
    bits = np.load(store.path / "vectors.npy").view(np.uint16)  # bf16 as stored; upcast exactly to float32
    assert torch.equal(weight, torch.from_numpy(bits.astype(np.int32) << 16).view(torch.float32))
    assert load_store_rows(lookup, store) == 500  # without the hook: as before
