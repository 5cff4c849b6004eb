"""A behaviour store loading into its sharded table, per rank (issue 28, item 6): peak resident memory (anon and
file), start-up CPU seconds by phase (the checksum among them), lookup seconds per batch.

  python -m bench.store_scale --loaders new legacy              # 250k and 1M rows x 576, W = 1 and 2, RW, CW, auto
  python -m bench.store_scale --rows 10000 --worlds 1 2 --out /tmp/scale   # a quick look
  python -m bench.store_scale --rows 1000000 --store-dtype bfloat16 --shardings row_wise --out /tmp/scale_bf16

For each size a store of random rows is written once under ``--work`` (:func:`write_random_store`: BENCH
ONLY, random rows instead of an LLM's, through the store's real writer). Each case then runs on W gloo
ranks (``torch.distributed.run --standalone``, this file as the worker): every rank builds the behaviour
table on ``meta`` (:class:`~bahe.model.behaviour_lookup.BehaviourLookup`), shards it with
:func:`bahe.model.sharding.shard_model` and the sharding asked for (its one plan line is kept), then loads
the store with :func:`~bahe.model.behaviour_lookup.load_store_rows` (rank 0 also recomputes the file
checksums, as the trainer does). Per rank:

* ``base``: resident memory (RSS) before the table exists (Python, torch, torchrec);
* ``table``: RSS once the table is sharded (its shards allocated), the peak while sharding (planner,
  DistributedModelParallel) and the seconds it took;
* ``load peak``: the high-water mark of RSS during the load (VmHWM, reset through /proc/self/clear_refs
  just before it), with the maxima of its anonymous and file-backed parts sampled every 2 ms (file-backed
  includes the mapped libraries: torch's alone are ~0.15 GiB);
* ``peak``: the larger of the two peaks, the rank's peak from before the table existed to the end;
* the shard's bytes, the load's wall and CPU seconds;
* ``phases``: start-up wall and CPU seconds by phase -- ``interpreter`` (process start to the worker's first line:
  its age from /proc), ``imports`` (torch, torchrec, bahe), ``init_process_group``, ``store_open`` (manifest,
  checks), ``text_index_open`` (the memory-mapped text index and the batcher), ``shard`` (the table on meta,
  the planner, DistributedModelParallel), then the load's own phases from ``load_store_rows(timings=...)``:
  ``verify`` (SHA-256 of this rank's digest chunks: the checksum seconds), ``copy`` (chunks into the shard,
  NaN / inf check included) and ``agree`` (the ranks' all-gather); CPU of the load's phases is the loading
  thread's (the memory sampler's thread runs beside it), of the others the process's;
* ``lookup``: per batch (``--batches`` after one warm-up; the batches of bench/text_lookup_bench.py's
  ``write_batches``: ``--batch-size`` rows of 2 sequences of ``--seq-len`` texts and an item text, drawn from
  5,000 store texts spread over the whole store), the median wall and CPU seconds of text -> store row
  (``SampleBatcher._behaviour_features`` through the text index) and of the sharded table's lookup of those
  rows (its forward; on W ranks a collective).

``--store-dtype`` writes the store's rows as float16 or bfloat16 (half the file, half the hashing); the
table is the store's dtype where CPU has the kernel (float16) and float32 for bfloat16 (upcast chunk by chunk;
``table_dtype``).

Item 2's bound: ``peak <= 1 GiB + 1.25 x shard bytes``. ``--loader legacy`` measures the loader as it was
before issue 28 (rows copied out of the map, full-size finiteness masks, one copy; torchrec's random init),
kept here for the comparison only. The page cache is warm (the store was just written or read). Writes
``--out``.json and ``--out``.table.md (docs/bench/store_scale.md quotes the table).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 1 << 30
BOUND_CONSTANT, BOUND_FACTOR = GIB, 1.25  # item 2: peak <= 1 GiB + 1.25 x the shard's bytes


# --------------------------------------------------------------------------------------------------------
# BENCH ONLY: a store of random rows, through the store's real writer
# --------------------------------------------------------------------------------------------------------
def bench_text(i: int) -> str:
    """The i-th text of a :func:`write_random_store` store (store row ``i + 2``, after the reserved rows)."""
    return f"bench text {i}"


def write_random_store(root: Path, rows: int, dim: int = 576, *, seed: int = 0, chunk_rows: int = 65_536,
                       non_finite_row: int | None = None, huge_row: int | None = None, store_dtype: str = "float32"):
    """BENCH AND TEST ONLY: a one-version store at ``root`` whose ``rows`` rows (the two reserved rows, zero,
    then ``rows - 2`` distinct texts ``"bench text N"``) hold standard-normal float32 vectors of ``dim``, not
    an LLM's. Everything else is the real writer's (bahe.embeddings.build: the chunk files, vectors.npy,
    vocab.parquet, the text index, checksums, the manifest and its digest, the atomic publish). Its manifest
    names the model ``bench-random-rows`` (no LLM was run), so no trainer accepts it as an LLM's store.
    ``non_finite_row``: that row holds a NaN (with the checksums matching: a store *built* with it);
    ``huge_row``: that row holds 3e38 in every column (finite; its float32 sum is not).
    ``store_dtype``: the rows as stored (the writer converts the float32 vectors).
    Returns the opened :class:`~bahe.embeddings.store.BehaviourStore`."""
    import numpy as np

    from bahe.embeddings import build
    from bahe.embeddings.store import FORMAT, BehaviourStore, version_name
    from bahe.embeddings.vocabulary import RESERVED, BehaviourVocabulary

    if rows <= len(RESERVED):
        raise ValueError(f"a random store needs more than the {len(RESERVED)} reserved rows, got {rows}")
    root = Path(root)
    version = version_name(1)
    work = root / build.WORK / version
    work.mkdir(parents=True, exist_ok=True)
    texts = [bench_text(i) for i in range(rows - len(RESERVED))]
    vocab = BehaviourVocabulary([*RESERVED, *texts], [0] * len(RESERVED) + [1] * len(texts))
    rng = np.random.default_rng(seed)
    n_chunks = 0
    for start in range(0, len(texts), chunk_rows):
        block = rng.standard_normal((min(chunk_rows, len(texts) - start), dim), dtype=np.float32)
        if non_finite_row is not None and start <= non_finite_row - len(RESERVED) < start + len(block):
            block[non_finite_row - len(RESERVED) - start, dim // 2] = np.nan
        if huge_row is not None and start <= huge_row - len(RESERVED) < start + len(block):
            block[huge_row - len(RESERVED) - start] = 3e38
        np.save(work / f"chunk-{n_chunks:06d}.npy", block)
        n_chunks += 1
    manifest = {"format": FORMAT, "version": version, "parent": None, "created_utc": None,
                "model": {"name": "bench-random-rows", "dir": None, "sha256": "0" * 64, "architecture": None,
                          "num_layers": None, "hidden_size": dim},
                "encoder": {"k": 1, "pooling": "mean", "post_transform": "none", "post_transform_sha256": None},
                "dim": dim, "rows": rows, "store_dtype": store_dtype,
                "stats": {"new_texts": len(texts), "bench_random_rows": True}}
    build._assemble(root, work, version, None, vocab, n_chunks, dim, manifest, None)
    return BehaviourStore.open(root)


# --------------------------------------------------------------------------------------------------------
# memory of this process
# --------------------------------------------------------------------------------------------------------
def status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak() -> None:
    """Start VmHWM again from the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


class Sampler:
    """The maxima of RssAnon and RssFile, sampled every ``every`` seconds in a thread (torch and NumPy copy
    without the GIL)."""

    def __init__(self, every: float = 0.002):
        self.every, self.anon, self.file = every, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            now = status()
            self.anon, self.file = max(self.anon, now["RssAnon"]), max(self.file, now["RssFile"])
            time.sleep(self.every)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------------------------------------
# the worker: one rank of one case
# --------------------------------------------------------------------------------------------------------
def legacy_load_store_rows(model, store) -> int:
    """The loader as it was before issue 28 (for the comparison only): per local shard, the shard's rows
    with EVERY column copied out of the memory map, full-size finiteness masks, one copy_."""
    import numpy as np
    import torch
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    from bahe.model.behaviour_lookup import BEHAVIOUR_TABLE, _checksum_problem

    suffix = f"embeddings.{BEHAVIOUR_TABLE}.weight"
    _checksum_problem(store) if int(os.environ.get("RANK", 0)) == 0 else None
    rows = 0
    for _name, tensor in [(n, t) for n, t in model.state_dict().items() if n.endswith(suffix)]:
        pieces = [(s.tensor, *s.metadata.shard_offsets, *s.metadata.shard_sizes) for s in tensor.local_shards()] \
            if isinstance(tensor, ShardedTensor) else [(tensor, 0, 0, store.rows_count, store.dim)]
        for target, row, col, n_rows, n_cols in pieces:
            block = store.rows(row, row + n_rows)[:, col:col + n_cols]
            bad = ~np.isfinite(block)
            assert not bad.any()
            with torch.no_grad():
                target.copy_(torch.from_numpy(block))
            rows += n_rows
    return rows


def process_age_s(stat_line: str, uptime_s: float, ticks_per_s: int) -> float:
    """Seconds since a process started, from its /proc/PID/stat line (field 22, ``starttime``: clock ticks after
    boot; the command name in parentheses may hold spaces) and the system's uptime."""
    fields = stat_line[stat_line.rindex(")") + 2:].split()
    return uptime_s - int(fields[19]) / ticks_per_s  # fields[0] is the stat line's field 3


def _process_age() -> float:
    with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
        return process_age_s(stat.read(), float(uptime.read().split()[0]), os.sysconf("SC_CLK_TCK"))


class Phases:
    """``with phases("name"):`` records the block's wall and process-CPU seconds under ``name``."""

    def __init__(self):
        self.seconds: dict[str, dict[str, float]] = {}

    def __call__(self, name: str):
        phases = self

        class _Block:
            def __enter__(self):
                self.wall, self.cpu = time.perf_counter(), time.process_time()

            def __exit__(self, *exc):
                phases.seconds[name] = {"wall_s": round(time.perf_counter() - self.wall, 4),
                                        "cpu_s": round(time.process_time() - self.cpu, 4)}

        return _Block()


LOAD_PHASES = ("verify", "copy", "agree")
STARTUP_PHASES = ("interpreter", "imports", "init_process_group", "store_open", "text_index_open", "shard",
                  *LOAD_PHASES)


def startup_cpu_s(phases: dict) -> float:
    """A rank's start-up CPU seconds: the sum over :data:`STARTUP_PHASES` it has."""
    return sum(phases[p]["cpu_s"] for p in STARTUP_PHASES if p in phases)


def worker(args: argparse.Namespace) -> None:
    phases = Phases()
    phases.seconds["interpreter"] = {"wall_s": round(_process_age(), 4), "cpu_s": round(time.process_time(), 4)}
    with phases("imports"):
        import statistics

        import pyarrow.parquet as pq
        import torch
        import torch.distributed as dist
        from torch import nn

        from bahe.launchers.train import quiet_library_deprecations

        quiet_library_deprecations()
        from torch.distributed._shard.sharded_tensor import ShardedTensor

        from bahe.ctr_data.schema import SampleSchema
        from bahe.embeddings.store import BehaviourStore, stored_dtype
        from bahe.model.batch import SampleBatcher
        from bahe.model.behaviour_lookup import BEHAVIOUR_TABLE, BehaviourLookup, load_store_rows, table_dtype
        from bahe.model.sharding import shard_model
        from bench.text_lookup_bench import SEQUENCES
    with phases("init_process_group"):
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    with phases("store_open"):
        store = BehaviourStore.open(args.store)
    with phases("text_index_open"):
        batcher = SampleBatcher(SampleSchema(sequences=SEQUENCES), {"user_id": 1}, store.text_index,
                                max_behaviours=args.seq_len)
    keys = batcher.behaviour_keys
    dtype = table_dtype(store.store_dtype, "cpu")

    class Table(nn.Module):  # the table alone, with one dense weight for DistributedModelParallel's DDP part
        def __init__(self):
            super().__init__()
            self.lookup = BehaviourLookup(store.rows_count, store.dim, keys,
                                          {k: 1 if k == "item_text" else args.seq_len for k in keys},
                                          device=torch.device("meta"), dtype=dtype)
            self.dense = nn.Linear(1, 1)

    base = status()
    reset_peak()
    begin = time.perf_counter()
    if args.loader == "legacy":  # torchrec's own sharder: random init of every shard, as before issue 28
        from torchrec.distributed.embedding import EmbeddingCollectionSharder
        from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder

        import bahe.model.sharding as sharding

        sharding.sharders = lambda: [EmbeddingBagCollectionSharder(), EmbeddingCollectionSharder()]
    with phases("shard"):
        dmp = shard_model(Table(), torch.device("cpu"), behaviour_sharding=args.sharding, batch_size=512)
    shard_s = time.perf_counter() - begin
    table = status()  # VmHWM: the peak while sharding
    shard_bytes = 0
    for name, tensor in dmp.state_dict().items():
        if name.endswith(f"{BEHAVIOUR_TABLE}.weight"):
            local = [s.tensor for s in tensor.local_shards()] if isinstance(tensor, ShardedTensor) else [tensor]
            shard_bytes += sum(t.numel() * t.element_size() for t in local)
    dist.barrier()
    reset_peak()  # the load's own peak from here
    load_timings: dict = {}
    cpu0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    with Sampler() as sampled:
        rows = legacy_load_store_rows(dmp, store) if args.loader == "legacy" else \
            load_store_rows(dmp, store, timings=load_timings)
    wall = time.perf_counter() - wall0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    after = status()
    for name in LOAD_PHASES:  # the loading thread's CPU (the sampler's thread ran beside it)
        if name in load_timings:
            t = load_timings[name]
            phases.seconds[name] = {"wall_s": round(t["wall_s"], 4), "cpu_s": round(t["thread_cpu_s"], 4),
                                    "process_cpu_s": round(t["cpu_s"], 4)}
    # lookup per batch: text -> row, then the sharded table's forward (a collective: every rank runs each batch)
    file = pq.ParquetFile(args.batches_file)
    batches = [file.read_row_group(i) for i in range(file.num_row_groups)]
    times: dict[str, list[float]] = {"text_wall_s": [], "text_cpu_s": [], "table_wall_s": [], "table_cpu_s": []}
    values = 0
    dist.barrier()
    for i, batch in enumerate(batches):
        w, c = time.perf_counter(), time.process_time()
        features = batcher._behaviour_features(batch)
        w1, c1 = time.perf_counter(), time.process_time()
        out = dmp.module.lookup(features)
        float(sum(v[0].sum() for v in out.values()))  # every vector read
        w2, c2 = time.perf_counter(), time.process_time()
        if i:  # the first batch warms up
            times["text_wall_s"].append(w1 - w), times["text_cpu_s"].append(c1 - c)
            times["table_wall_s"].append(w2 - w1), times["table_cpu_s"].append(c2 - c1)
            values = int(features.values().numel())
    lookup = {f"median_{k}": round(statistics.median(v), 6) for k, v in times.items() if v} | {
        "batches": len(batches) - 1, "values_per_batch": values, "per_batch": times}
    itemsize = stored_dtype(store.store_dtype).itemsize
    result = {"rank": rank, "world": world, "sharding": args.sharding, "loader": args.loader,
              "rows": store.rows_count, "dim": store.dim, "store_dtype": store.store_dtype,
              "table_dtype": str(dtype).removeprefix("torch."), "store_bytes": store.rows_count * store.dim * itemsize,
              "shard_bytes": shard_bytes, "rows_loaded": rows, "base_rss": base["VmRSS"],
              "table_rss": table["VmRSS"], "shard_peak_rss": table["VmHWM"], "load_peak_rss": after["VmHWM"],
              "peak_rss": max(table["VmHWM"], after["VmHWM"]), "peak_anon": sampled.anon,
              "peak_file": sampled.file, "shard_s": round(shard_s, 3), "load_s": round(wall, 3),
              "load_cpu_s": round(cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime, 3),
              "phases": phases.seconds, "startup_cpu_s": round(startup_cpu_s(phases.seconds), 3),
              "verified_bytes": load_timings.get("verified_bytes"), "copied_bytes": load_timings.get("copied_bytes"),
              "lookup": lookup}
    Path(args.result).with_suffix(f".rank{rank}.json").write_text(json.dumps(result))
    from bahe.embeddings.process_group import close_process_group

    close_process_group()


# --------------------------------------------------------------------------------------------------------
# the driver
# --------------------------------------------------------------------------------------------------------
def run_case(store_root: Path, world: int, sharding: str, loader: str, result: Path, batches: Path,
             seq_len: int) -> tuple[list[dict], str]:
    """One case on ``world`` ranks: (the ranks' results, the plan line rank 0 printed)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
           str(Path(__file__).resolve()), "--worker", "--store", str(store_root), "--sharding", sharding,
           "--loader", loader, "--result", str(result), "--batches-file", str(batches), "--seq-len", str(seq_len)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    plan = next((line for line in done.stdout.splitlines() if line.startswith("behaviour table")), "")
    return [json.loads(result.with_suffix(f".rank{r}.json").read_text()) for r in range(world)], plan


def bound(shard_bytes: int) -> float:
    return BOUND_CONSTANT + BOUND_FACTOR * shard_bytes


def table_md(results: list[dict]) -> str:
    head = ("| rows | dtype | W | sharding | loader | rank | shard GiB | RSS before | RSS with table | sharding peak | "
            "load peak | load peak anon | load peak file | peak | bound | within | shard s | load s | load CPU s |\n|"
            + "---|" * 19)
    lines = [head]
    for r in results:
        gib = lambda b: f"{b / GIB:.2f}"  # noqa: E731
        lines.append(f"| {r['rows']:,} | {r.get('store_dtype', 'float32')} | {r['world']} | {r['sharding']} | "
                     f"{r['loader']} | {r['rank']} | "
                     f"{gib(r['shard_bytes'])} | {gib(r['base_rss'])} | {gib(r['table_rss'])} | "
                     f"{gib(r['shard_peak_rss'])} | {gib(r['load_peak_rss'])} | {gib(r['peak_anon'])} | "
                     f"{gib(r['peak_file'])} | {gib(r['peak_rss'])} | "
                     f"{gib(bound(r['shard_bytes']))} | {'yes' if r['peak_rss'] <= bound(r['shard_bytes']) else 'NO'} | "
                     f"{r['shard_s']:.2f} | {r['load_s']:.2f} | {r['load_cpu_s']:.2f} |")
    return "\n".join(lines)


PHASE_COLUMNS = (("interpreter", "interp."), ("imports", "imports"), ("init_process_group", "init PG"),
                 ("store_open", "store open"), ("text_index_open", "text index"), ("shard", "plan + shard"),
                 ("verify", "checksum"), ("copy", "copy"), ("agree", "agree"))


def phases_md(results: list[dict]) -> str:
    """Per rank: start-up CPU seconds by phase (wall in the JSON), their sum, the bytes hashed and copied,
    lookup milliseconds per batch (median; text -> row, table)."""
    head = ("| rows | dtype | W | sharding | rank | " + " | ".join(label for _, label in PHASE_COLUMNS) +
            " | start-up CPU s | checksum GiB | copy GiB | text -> row ms | table lookup ms |\n|" +
            "---|" * (5 + len(PHASE_COLUMNS) + 5))
    lines = [head]
    for r in results:
        ph = r.get("phases", {})
        cells = [f"{ph[k]['cpu_s']:.2f}" if k in ph else "-" for k, _ in PHASE_COLUMNS]
        look = r.get("lookup", {})
        ms = lambda key, look=look: f"{look[key] * 1e3:.1f}" if key in look else "-"  # noqa: E731
        gib = lambda b: "-" if b is None else f"{b / GIB:.2f}"  # noqa: E731
        lines.append(f"| {r['rows']:,} | {r.get('store_dtype', 'float32')} | {r['world']} | {r['sharding']} | "
                     f"{r['rank']} | " + " | ".join(cells) + f" | {r.get('startup_cpu_s', 0):.2f} | "
                     f"{gib(r.get('verified_bytes'))} | {gib(r.get('copied_bytes'))} | {ms('median_text_cpu_s')} | "
                     f"{ms('median_table_cpu_s')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[250_000, 1_000_000])
    p.add_argument("--dim", type=int, default=576)
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--shardings", nargs="+", default=["row_wise", "column_wise", "auto"],
                   choices=("row_wise", "column_wise", "table_wise", "auto"))
    p.add_argument("--loaders", nargs="+", default=["new"], choices=("new", "legacy"))
    p.add_argument("--legacy-max-rows", type=int, default=250_000,
                   help="run the legacy loader only up to this many rows (it needs ~3.25x the shard)")
    p.add_argument("--store-dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="the stores' row dtype (bahe-encode build --store-dtype)")
    p.add_argument("--batches", type=int, default=10, help="lookup batches timed per rank, after one warm-up")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=50)
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_store_scale")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "bench" / "store_scale")
    # the worker (one rank of one case; run by the driver through torch.distributed.run)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    p.add_argument("--sharding", help=argparse.SUPPRESS)
    p.add_argument("--loader", default="new", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--batches-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    results, plans = [], {}
    for rows in args.rows:
        suffix = "" if args.store_dtype == "float32" else f"-{args.store_dtype}"
        root = args.work / f"store-{rows}x{args.dim}{suffix}"
        if not (root / "LATEST").is_file():
            begin = time.perf_counter()
            write_random_store(root, rows, args.dim, store_dtype=args.store_dtype)
            print(f"wrote {root} ({rows:,} x {args.dim} {args.store_dtype}) in {time.perf_counter() - begin:.1f}s",
                  flush=True)
        batches = args.work / f"batches-{rows}-{args.batches}-{args.batch_size}-{args.seq_len}.parquet"
        if not batches.is_file():
            from bench.text_lookup_bench import write_batches

            write_batches(batches, rows - 2, args.batches + 1, args.batch_size, args.seq_len, 5000, seed=1,
                          text=bench_text)
        for loader in args.loaders:
            if loader == "legacy" and rows > args.legacy_max_rows:
                continue
            for world in args.worlds:
                for sharding in args.shardings:
                    case, plan = run_case(root, world, sharding, loader,
                                          args.work / f"result-{rows}-{world}-{sharding}-{loader}{suffix}.json",
                                          batches, args.seq_len)
                    plans[f"{rows} {args.store_dtype} W={world} {sharding} {loader}"] = plan
                    results += case
                    for r in case:
                        print(f"{rows:,} rows W={world} {sharding} {loader} rank {r['rank']}: shard "
                              f"{r['shard_bytes'] / GIB:.2f} GiB, peak {r['peak_rss'] / GIB:.2f} GiB (bound "
                              f"{bound(r['shard_bytes']) / GIB:.2f}), load {r['load_s']:.2f}s, start-up CPU "
                              f"{r.get('startup_cpu_s', 0):.2f}s", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from bench.machine import machine

    config = {k: str(v) for k, v in vars(args).items() if k not in ("worker", "store", "sharding", "loader", "result",
                                                                     "batches_file")}
    args.out.with_suffix(".json").write_text(json.dumps({"results": results, "plans": plans, "config": config,
                                                         "machine": machine(), "loadavg_end": os.getloadavg()},
                                                        indent=2))
    args.out.with_suffix(".table.md").write_text(table_md(results) + "\n\nstart-up CPU seconds by phase, lookup per "
                                                 "batch:\n\n" + phases_md(results) + "\n\nplans (rank 0's line):\n\n" +
                                                 "\n".join(f"- {k}: `{v}`" for k, v in plans.items()) + "\n")
    print(table_md(results))
    print(phases_md(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
