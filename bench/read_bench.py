"""Bytes and time each rank spends reading its rows, at 1, 2 and 4 gloo ranks, measured side by side.

  python -m bench.read_bench                      # ~300k synthetic rows, written once under runs/bench_read
  python -m bench.read_bench --rows 20000 --worlds 1 2

Every rank reads with :func:`bahe.training.data.rank_tables` (only the row groups that hold its rows)
and counts what it read through :class:`~bahe.ctr_data.parquet_io.SampleReader` (bytes the file served,
footer apart; row groups). A fixed global batch (``--global-batch`` rows, ``global / W`` per rank), so
every world size trains on the same rows per step; one epoch of training (or one evaluation pass):

* ``old``: one lane, the stream as it was (every global batch a stretch of one permuted row group);
* ``lanes``: the same file dealt into ``--lanes`` lanes (each rank reads its own lanes' row groups);
* ``small_groups``: one lane, a file written with row groups of ``--small-row-groups`` rows;
* ``eval``: an evaluation pass in file order (the trainer's, every row once, the last batch padded).

Timing: wall and CPU seconds of each rank's pass, page cache warm (the file is read once before), the
ranks started together after a barrier. On a machine with fewer cores than ranks the wall seconds of
4 ranks include waiting for a core; the CPU seconds do not. Writes ``--out``.json and .md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Case:
    name: str
    title: str
    small_groups: bool  # read the file with small row groups
    lanes: int  # 0: an evaluation pass


def cases(lanes: int, small: int) -> list[Case]:
    return [Case("old", "one lane (the old stream)", False, 1), Case("lanes", f"{lanes} lanes", False, lanes),
            Case("small_groups", f"one lane, row groups of {small:,}", True, 1),
            Case("eval", "evaluation pass (file order)", False, 0)]


def write_data(cache: Path, rows: int, row_group: int) -> Path:
    """Synthetic samples (3 behaviour sequences of up to 10 texts) in row groups of ``row_group`` rows,
    written once into ``cache`` and reused."""
    from tqdm import tqdm

    from bahe.ctr_data.parquet_io import SampleReader, SampleWriter
    from bahe.ctr_data.synthetic import SyntheticConfig, generate, synthetic_schema

    path = cache / f"synthetic-{rows}-rg{row_group}.parquet"
    if path.is_file() and SampleReader(path).num_rows == rows:
        return path
    config = SyntheticConfig(num_samples=rows, behaviours_per_sequence=10, seed=0, chunk_rows=min(rows, 65_536))
    with SampleWriter(path, synthetic_schema(config), row_group_size=row_group) as writer, \
            tqdm(total=rows, desc=f"writing {path.name}", unit="row", file=sys.stderr) as bar:
        for table in generate(config):
            writer.write(table)
            bar.update(table.num_rows)
    return path


def measure(path: Path, case: Case, rank: int, world: int, global_batch: int) -> dict:
    """One rank's epoch (or evaluation pass): bytes, row groups, wall and CPU seconds, rows, and the most
    Arrow memory held between two batches (the rows the rank keeps for its next batches)."""
    import pyarrow as pa

    from bahe.ctr_data.parquet_io import SampleReader
    from bahe.training.data import rank_tables

    reader = SampleReader(path)
    footer = reader.bytes_read
    batch = global_batch // world
    steps = reader.num_rows // global_batch if case.lanes else None
    base = peak = pa.total_allocated_bytes()
    wall, cpu = time.perf_counter(), time.process_time()
    tables = rank_tables(path, batch, rank, world, train=bool(case.lanes), lanes=max(case.lanes, 1), seed=0,
                         reader=reader)
    rows = 0
    for _, real in itertools.islice(tables, steps):
        rows += real
        peak = max(peak, pa.total_allocated_bytes())
    return {"rank": rank, "bytes": reader.bytes_read - footer, "footer_bytes": footer,
            "row_groups": reader.row_groups_read, "seconds": time.perf_counter() - wall,
            "cpu_seconds": time.process_time() - cpu, "rows": rows, "held_bytes": peak - base}


def _worker(rank: int, world: int, store: str, jobs: list, out: str) -> None:
    """A gloo rank: every case after a barrier (the ranks read at the same time); rank 0 writes them all."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    results = {}
    for case, path, global_batch in jobs:
        dist.barrier()
        gathered = [None] * world
        dist.all_gather_object(gathered, measure(Path(path), Case(**case), rank, world, global_batch))
        results[case["name"]] = gathered
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    from bahe.embeddings.process_group import close_process_group

    close_process_group()


def run_world(world: int, jobs: list, in_process: bool) -> dict:
    """{case: [per-rank result]} for ``world`` ranks: gloo processes, or (``in_process``) one rank after
    another in this process (for tests: the same reads without the start-up of processes)."""
    if in_process:
        return {case["name"]: [measure(Path(path), Case(**case), rank, world, batch) for rank in range(world)]
                for case, path, batch in jobs}
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.json"
        mp.start_processes(_worker, args=(world, str(Path(tmp) / "store"), jobs, str(out)), nprocs=world,
                           start_method="spawn")
        return json.loads(out.read_text())


def summarize(results: dict, worlds: list[int], names: list[str]) -> list[dict]:
    """One row per (case, world): means over ranks and the ratio of bytes per rank to one rank's."""
    rows = []
    for name in names:
        one = sum(r["bytes"] for r in results[str(worlds[0])][name]) / worlds[0]  # per rank at the base world
        for world in worlds:
            ranks = results[str(world)][name]
            mean = sum(r["bytes"] for r in ranks) / world
            rows.append({"case": name, "world": world, "bytes_per_rank": mean,
                         "max_bytes_per_rank": max(r["bytes"] for r in ranks), "vs_one_rank": mean / one,
                         "ideal": worlds[0] / world, "row_groups_per_rank": sum(r["row_groups"] for r in ranks) / world,
                         "seconds_per_rank": sum(r["seconds"] for r in ranks) / world,
                         "cpu_seconds_per_rank": sum(r["cpu_seconds"] for r in ranks) / world,
                         "held_bytes_per_rank": max(r["held_bytes"] for r in ranks),
                         "footer_bytes": ranks[0]["footer_bytes"], "rows_per_rank": ranks[0]["rows"]})
    return rows


def table(rows: list[dict], titles: dict[str, str]) -> list[str]:
    lines = ["| case | ranks | MB read per rank | vs 1 rank | 1/W | row groups per rank | read s per rank (wall) "
             "| CPU s per rank | MB held | footer KB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {titles[r['case']]} | {r['world']} | {r['bytes_per_rank'] / 1e6:.2f} | "
                     f"{r['vs_one_rank']:.3f} | {r['ideal']:.3f} | {r['row_groups_per_rank']:.1f} | "
                     f"{r['seconds_per_rank']:.2f} | {r['cpu_seconds_per_rank']:.2f} | "
                     f"{r['held_bytes_per_rank'] / 1e6:.1f} | {r['footer_bytes'] / 1e3:.0f} |")
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.read_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=300_000, help="synthetic rows in the file (default 300,000)")
    parser.add_argument("--row-groups", type=int, default=8192, help="rows per row group of the main file")
    parser.add_argument("--small-row-groups", type=int, default=256,
                        help="rows per row group of the small_groups file (default 256: a rank's slice at 4 ranks)")
    parser.add_argument("--global-batch", type=int, default=1024, help="rows per step over all ranks")
    parser.add_argument("--lanes", type=int, default=4, help="lanes of the lanes case (a multiple of the worlds)")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4], help="numbers of ranks (first: the base)")
    parser.add_argument("--cache", type=Path, default=ROOT / "runs" / "bench_read", help="where the data is kept")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench" / "read", help="writes OUT.json and OUT.md")
    parser.add_argument("--in-process", action="store_true",
                        help="run the ranks one after another in this process, not as gloo processes (tests)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for world in args.worlds:
        if args.global_batch % world or args.global_batch % args.lanes:
            parser_error = f"--global-batch {args.global_batch} must be a multiple of every world and of --lanes"
            print(f"read_bench: error: {parser_error}", file=sys.stderr)
            return 2
    from tqdm import tqdm

    from bench.machine import machine, versions

    started = time.perf_counter()
    args.cache.mkdir(parents=True, exist_ok=True)
    files = {False: write_data(args.cache, args.rows, args.row_groups),
             True: write_data(args.cache, args.rows, args.small_row_groups)}
    for path in files.values():  # warm the page cache: every case reads from memory alike
        path.read_bytes()
    all_cases = cases(args.lanes, args.small_row_groups)
    jobs = [(asdict(c), str(files[c.small_groups]), args.global_batch) for c in all_cases]
    info = machine()
    results = {str(w): run_world(w, jobs, args.in_process) for w in tqdm(args.worlds, desc="world sizes",
                                                                          file=sys.stderr)}
    rows = summarize(results, args.worlds, [c.name for c in all_cases])
    titles = {c.name: c.title for c in all_cases}
    record = {"command": "python -m bench.read_bench " + " ".join(argv if argv is not None else sys.argv[1:]),
              "seconds": time.perf_counter() - started, "machine": info, "loadavg_end": os.getloadavg(),
              "versions": versions(), "args": {k: str(v) for k, v in vars(args).items()},
              "files": {("small" if k else "main"): {"path": str(p.relative_to(ROOT)) if p.is_relative_to(ROOT)
                                                     else str(p), "bytes": p.stat().st_size}
                        for k, p in files.items()},
              "cases": [asdict(c) for c in all_cases], "summary": rows, "per_rank": results,
              "table": table(rows, titles)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(report(record, args))
    print("\n".join(record["table"]))
    return 0


def report(record: dict, args: argparse.Namespace) -> str:
    m = record["machine"]
    main_file, small_file = record["files"]["main"], record["files"]["small"]
    return "\n".join([
        "# Reading per rank: bytes and time at 1, 2 and 4 ranks", "",
        f"Produced by `{record['command'].strip()}` in {record['seconds']:.0f} s on {m['cpu_model']} "
        f"({m['cpu_count']} CPUs; load average {m['loadavg_start'][0]:.2f} at start, {record['loadavg_end'][0]:.2f} "
        f"at end), pyarrow {record['versions'].get('pyarrow')}. Every figure per rank in `{args.out.name}.json`.", "",
        f"{args.rows:,} synthetic rows (3 behaviour sequences of up to 10 texts), "
        f"{main_file['bytes'] / 1e6:.1f} MB in row groups of {args.row_groups:,} rows; the same rows in row groups of "
        f"{args.small_row_groups:,}: {small_file['bytes'] / 1e6:.1f} MB. A global batch of {args.global_batch:,} rows "
        "(split over the ranks), one epoch of shuffled training (seed 0), or one evaluation pass. "
        "MB read: row groups only (every rank also reads the footer once, last column). MB held: the most live "
        "Arrow memory (pyarrow's pool, sampled at each batch) of any rank: the rows it keeps for its next batches "
        "and what the reader holds; a coarse figure. Wall seconds: 4 ranks share 2 cores here.", "",
        *record["table"], "",
        "Reading: `bahe.training.data.rank_tables` reads only the row groups that hold a rank's rows, and its "
        "batches equal those of the stream as it was (tests/test_per_rank_reading.py). With one lane a global "
        "batch is a stretch of one permuted row group, so when row groups are larger than a global batch every "
        "rank reads every group (old, eval). Row groups no larger than a rank's slice make it 1/W, but the footer "
        "grows with the number of groups and compression drops (small_groups). Lanes (a multiple of the world "
        "size) give each rank its own row groups: 1/W, plus a group where two lanes meet. Why: "
        "docs/decisions.md, \"Each rank reads its own rows\".", ""])


if __name__ == "__main__":
    sys.exit(main())
