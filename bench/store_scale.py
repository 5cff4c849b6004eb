"""Peak resident memory per rank while a behaviour store loads into its sharded table (issue 28, item 6:
the memory part; the lookup, start-up CPU and checksum parts are not measured here).

  python -m bench.store_scale --loaders new legacy              # 250k and 1M rows x 576, W = 1 and 2, RW, CW, auto
  python -m bench.store_scale --rows 10000 --worlds 1 2 --out /tmp/scale   # a quick look

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
* the shard's bytes, the load's wall and CPU seconds.

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
def write_random_store(root: Path, rows: int, dim: int = 576, *, seed: int = 0, chunk_rows: int = 65_536,
                       non_finite_row: int | None = None, huge_row: int | None = None):
    """BENCH AND TEST ONLY: a one-version store at ``root`` whose ``rows`` rows (the two reserved rows, zero,
    then ``rows - 2`` distinct texts ``"bench text N"``) hold standard-normal float32 vectors of ``dim``, not
    an LLM's. Everything else is the real writer's (bahe.embeddings.build: the chunk files, vectors.npy,
    vocab.parquet, the text index, checksums, the manifest and its digest, the atomic publish). Its manifest
    names the model ``bench-random-rows`` (no LLM was run), so no trainer accepts it as an LLM's store.
    ``non_finite_row``: that row holds a NaN (with the checksums matching: a store *built* with it);
    ``huge_row``: that row holds 3e38 in every column (finite; its float32 sum is not).
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
    texts = [f"bench text {i}" for i in range(rows - len(RESERVED))]
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
                "dim": dim, "rows": rows, "store_dtype": "float32",
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


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn

    from bahe.launchers.train import quiet_library_deprecations

    quiet_library_deprecations()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    from bahe.embeddings.store import BehaviourStore
    from bahe.model.behaviour_lookup import BEHAVIOUR_TABLE, BehaviourLookup, load_store_rows
    from bahe.model.sharding import shard_model

    store = BehaviourStore.open(args.store)

    class Table(nn.Module):  # the table alone, with one dense weight for DistributedModelParallel's DDP part
        def __init__(self):
            super().__init__()
            self.lookup = BehaviourLookup(store.rows_count, store.dim, ["item_text"], {"item_text": 1},
                                          device=torch.device("meta"))
            self.dense = nn.Linear(1, 1)

    base = status()
    reset_peak()
    begin = time.perf_counter()
    if args.loader == "legacy":  # torchrec's own sharder: random init of every shard, as before issue 28
        from torchrec.distributed.embedding import EmbeddingCollectionSharder
        from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder

        import bahe.model.sharding as sharding

        sharding.sharders = lambda: [EmbeddingBagCollectionSharder(), EmbeddingCollectionSharder()]
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
    cpu0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    with Sampler() as sampled:
        rows = (legacy_load_store_rows if args.loader == "legacy" else load_store_rows)(dmp, store)
    wall = time.perf_counter() - wall0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    after = status()
    result = {"rank": rank, "world": world, "sharding": args.sharding, "loader": args.loader,
              "rows": store.rows_count, "dim": store.dim, "store_bytes": store.rows_count * store.dim * 4,
              "shard_bytes": shard_bytes, "rows_loaded": rows, "base_rss": base["VmRSS"],
              "table_rss": table["VmRSS"], "shard_peak_rss": table["VmHWM"], "load_peak_rss": after["VmHWM"],
              "peak_rss": max(table["VmHWM"], after["VmHWM"]), "peak_anon": sampled.anon,
              "peak_file": sampled.file, "shard_s": round(shard_s, 3), "load_s": round(wall, 3),
              "load_cpu_s": round(cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime, 3)}
    Path(args.result).with_suffix(f".rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------------
# the driver
# --------------------------------------------------------------------------------------------------------
def run_case(store_root: Path, world: int, sharding: str, loader: str, result: Path) -> tuple[list[dict], str]:
    """One case on ``world`` ranks: (the ranks' results, the plan line rank 0 printed)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
           str(Path(__file__).resolve()), "--worker", "--store", str(store_root), "--sharding", sharding,
           "--loader", loader, "--result", str(result)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    plan = next((line for line in done.stdout.splitlines() if line.startswith("behaviour table")), "")
    return [json.loads(result.with_suffix(f".rank{r}.json").read_text()) for r in range(world)], plan


def bound(shard_bytes: int) -> float:
    return BOUND_CONSTANT + BOUND_FACTOR * shard_bytes


def table_md(results: list[dict]) -> str:
    head = ("| rows | W | sharding | loader | rank | shard GiB | RSS before | RSS with table | sharding peak | "
            "load peak | load peak anon | load peak file | peak | bound | within | shard s | load s | load CPU s |\n|"
            + "---|" * 18)
    lines = [head]
    for r in results:
        gib = lambda b: f"{b / GIB:.2f}"  # noqa: E731
        lines.append(f"| {r['rows']:,} | {r['world']} | {r['sharding']} | {r['loader']} | {r['rank']} | "
                     f"{gib(r['shard_bytes'])} | {gib(r['base_rss'])} | {gib(r['table_rss'])} | "
                     f"{gib(r['shard_peak_rss'])} | {gib(r['load_peak_rss'])} | {gib(r['peak_anon'])} | "
                     f"{gib(r['peak_file'])} | {gib(r['peak_rss'])} | "
                     f"{gib(bound(r['shard_bytes']))} | {'yes' if r['peak_rss'] <= bound(r['shard_bytes']) else 'NO'} | "
                     f"{r['shard_s']:.2f} | {r['load_s']:.2f} | {r['load_cpu_s']:.2f} |")
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
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_store_scale")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "bench" / "store_scale")
    # the worker (one rank of one case; run by the driver through torch.distributed.run)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    p.add_argument("--sharding", help=argparse.SUPPRESS)
    p.add_argument("--loader", default="new", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    results, plans = [], {}
    for rows in args.rows:
        root = args.work / f"store-{rows}x{args.dim}"
        if not (root / "LATEST").is_file():
            begin = time.perf_counter()
            write_random_store(root, rows, args.dim)
            print(f"wrote {root} ({rows:,} x {args.dim}) in {time.perf_counter() - begin:.1f}s", flush=True)
        for loader in args.loaders:
            if loader == "legacy" and rows > args.legacy_max_rows:
                continue
            for world in args.worlds:
                for sharding in args.shardings:
                    case, plan = run_case(root, world, sharding, loader,
                                          args.work / f"result-{rows}-{world}-{sharding}-{loader}.json")
                    plans[f"{rows} W={world} {sharding} {loader}"] = plan
                    results += case
                    for r in case:
                        print(f"{rows:,} rows W={world} {sharding} {loader} rank {r['rank']}: shard "
                              f"{r['shard_bytes'] / GIB:.2f} GiB, peak {r['peak_rss'] / GIB:.2f} GiB (bound "
                              f"{bound(r['shard_bytes']) / GIB:.2f}), load {r['load_s']:.2f}s", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"results": results, "plans": plans}, indent=2))
    args.out.with_suffix(".table.md").write_text(table_md(results) + "\n\nplans (rank 0's line):\n\n" +
                                           "\n".join(f"- {k}: `{v}`" for k, v in plans.items()) + "\n")
    print(table_md(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
