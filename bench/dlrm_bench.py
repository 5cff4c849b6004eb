"""BAHE without text vs torchrec's DLRM: the same training step, measured side by side in one run.

Both arms are set up as torchrec's dlrm_main sets up DLRM, through the helpers our trainer uses: ID
tables on meta; fused row-wise Adagrad in backward on ``model.sparse_arch``
(training.optimizers.attach_sparse_optimizer; dlrm_main passes torch.optim.Adagrad or SGD);
DistributedModelParallel planned by EmbeddingShardingPlanner (model.sharding.shard_model) on one rank
(gloo on CPU, nccl on CUDA); a KeyedOptimizerWrapper (Adagrad or SGD) for the dense parameters in a
CombinedOptimizer with the fused one; TrainPipelineSparseDist over torchrec.datasets.random.RandomRecDataset
batches (one id per feature and sample, as Criteo). The arms differ only in the model:

* dlrm: torchrec.models.dlrm.DLRM in DLRMTrain;
* bahe: bahe.model.bahe.BAHE(text_arch=None) in BAHETrain.

What each figure means:

* step time: wall time of one ``pipeline.progress`` (forward, backward with the fused sparse update,
  dense optimizer step, the next batch's input dist), median over every timed step of the arm. Both
  arms live in one process: after --warmup steps each, --rounds rounds of --steps steps per arm, the
  arms alternating step by step (dlrm bahe bahe dlrm ...; bahe first in odd rounds), so other load
  hits both. Also the median of the per-round ratios (bahe median / dlrm median) and their range.
* peak memory: each arm in its own process (forked from the bench before any model or process group
  exists; spawned on CUDA) running --warmup + --steps steps: its peak resident set (getrusage
  ru_maxrss) minus its resident set just before the model is built -- tables, optimizer state,
  activations, allocator caches. On CUDA also that process's torch.cuda.max_memory_allocated.
  Repeated --mem-repeats times (dlrm bahe bahe dlrm ...), one process at a time; median.
* step peak: high-water mark of torch's own allocations during one training step in the timing
  process (CPU: torch.profiler profile_memory, running sum of the allocator's alloc/free records;
  CUDA: max_memory_allocated minus memory_allocated before the step).
* same numbers: bahe gets dlrm's state dict; the logits of one batch must be equal, and the losses of
  every training step (same batches, same optimizers) are compared.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import multiprocessing as mp
import os
import resource
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.datasets.random import RandomRecDataset
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.models.dlrm import DLRM, DLRMTrain
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from bahe.model.bahe import BAHE, BAHETrain
from bahe.model.sharding import shard_model
from bahe.training.config import OptimConfig
from bahe.training.optimizers import attach_sparse_optimizer
from bench.machine import machine, versions
from bench.memory import cpu_allocation_peak

ARMS = ("dlrm", "bahe")
TARGET = 1.10
FULL = {"tables": 26, "rows": 100_000, "dim": 64, "dense_arch": "512,256,D", "over_arch": "512,512,256,1",
        "batch_size": 512, "warmup": 5, "rounds": 8, "steps": 25, "mem_repeats": 2}
QUICK = {"tables": 4, "rows": 1_000, "dim": 16, "dense_arch": "32,D", "over_arch": "32,1",
         "batch_size": 64, "warmup": 2, "rounds": 2, "steps": 3, "mem_repeats": 1}
MIB = 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.dlrm_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"tiny sizes, few steps (smoke test, < 20 s): {QUICK}")
    p.add_argument("--tables", type=int, help="ID tables, one feature each (default 26, as Criteo)")
    p.add_argument("--rows", type=int, help="rows per table (default 100000)")
    p.add_argument("--dim", type=int, help="embedding dim D (default 64)")
    p.add_argument("--dense-arch", help="dense arch sizes, D = the embedding dim (default 512,256,D)")
    p.add_argument("--over-arch", help="over arch sizes (default 512,512,256,1, dlrm_main's)")
    p.add_argument("--batch-size", type=int, help="default 512")
    p.add_argument("--num-dense", type=int, default=13, help="dense features (default 13, as Criteo)")
    p.add_argument("--ids-per-feature", type=int, default=1, help="ids per feature and sample (default 1)")
    p.add_argument("--warmup", type=int, help="untimed steps per arm first (default 5)")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 8)")
    p.add_argument("--steps", type=int, help="timed steps per arm and round (default 25)")
    p.add_argument("--mem-repeats", type=int, help="memory processes per arm (default 2)")
    p.add_argument("--dense-optimizer", choices=("adagrad", "sgd"), default="adagrad")
    p.add_argument("--lr", type=float, default=0.01, help="learning rate, sparse and dense (default 0.01)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: on a shared machine a "
                   "descheduled OpenMP thread stalls multi-thread ops)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="JSON results, the table beside it (.md); default "
                   "docs/bench/dlrm.json, --quick: none")
    args = p.parse_args(argv)
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def sizes(spec: str, dim: int) -> list[int]:
    return [dim if x.strip() == "D" else int(x) for x in spec.split(",")]


def init(args: argparse.Namespace) -> torch.device:
    """Threads, warnings, and a one-rank process group."""
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1, store=dist.HashStore())
    return device


def make_batches(args: argparse.Namespace) -> list:
    """Ten RandomRecDataset batches, cycled by both arms in the same order."""
    data = RandomRecDataset(keys=[f"f{i}" for i in range(args.tables)], batch_size=args.batch_size,
                            hash_size=args.rows, ids_per_feature=args.ids_per_feature, num_dense=args.num_dense,
                            manual_seed=args.seed, num_generated_batches=10)
    return list(itertools.islice(iter(data), 10))


def build(arm: str, args: argparse.Namespace, device: torch.device):
    """dlrm_main's set-up: (DMP-wrapped train module, CombinedOptimizer)."""
    ebc = EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=args.dim, num_embeddings=args.rows, feature_names=[f"f{i}"])
        for i in range(args.tables)], device=torch.device("meta"))
    kwargs = {"embedding_bag_collection": ebc, "dense_in_features": args.num_dense, "dense_device": device,
              "dense_arch_layer_sizes": sizes(args.dense_arch, args.dim),
              "over_arch_layer_sizes": sizes(args.over_arch, args.dim)}
    train = DLRMTrain(DLRM(**kwargs)) if arm == "dlrm" else BAHETrain(BAHE(**kwargs, text_arch=None))
    attach_sparse_optimizer(train.model, OptimConfig(sparse_lr=args.lr))
    dmp = shard_model(train, device, batch_size=args.batch_size)
    opt = torch.optim.Adagrad if args.dense_optimizer == "adagrad" else torch.optim.SGD
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())),
                                  lambda params: opt(params, lr=args.lr))
    return dmp, CombinedOptimizer([dmp.fused_optimizer, dense])


def step(pipeline, batches, device: torch.device) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    loss, _, _ = pipeline.progress(batches)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, loss.detach()


def step_peak_mib(pipeline, batches, device: torch.device) -> tuple[float, torch.Tensor]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        _, loss = step(pipeline, batches, device)
        return (torch.cuda.max_memory_allocated(device) - before) / MIB, loss
    peak, (_, loss) = cpu_allocation_peak(lambda: step(pipeline, batches, device))
    return peak / MIB, loss


def rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB


def memory_child(arm: str, args: argparse.Namespace, conn) -> None:
    """One arm alone in this process, warm-up + one round of steps; peak RSS growth over the pre-build RSS."""
    device = init(args)
    batches = itertools.cycle(make_batches(args))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before, maxrss_before = rss_mib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    dmp, optimizer = build(arm, args, device)
    pipeline = TrainPipelineSparseDist(dmp, optimizer, device)
    for _ in range(args.warmup + args.steps):
        step(pipeline, batches, device)
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    out = {"rss_before_mib": before, "maxrss_before_mib": maxrss_before, "maxrss_after_mib": maxrss,
           "peak_rss_growth_mib": maxrss - before}
    if device.type == "cuda":
        out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated(device) / MIB
    conn.send(out)
    conn.close()


def measure_memory(args: argparse.Namespace) -> dict:
    """One process per arm, repeated (dlrm, bahe, bahe, dlrm, ...), one at a time; medians per arm."""
    ctx, runs = mp.get_context("spawn" if args.device == "cuda" else "fork"), {arm: [] for arm in ARMS}
    for r in range(args.mem_repeats):
        for arm in ARMS if r % 2 == 0 else ARMS[::-1]:
            receive, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=memory_child, args=(arm, args, send))
            proc.start()
            send.close()  # so that recv raises EOFError if the child dies
            runs[arm].append(receive.recv())
            proc.join()
    return {arm: {"runs": rs, **{key: statistics.median(r[key] for r in rs) for key in rs[0] if "rss_before" not in key}}
            for arm, rs in runs.items()}


def measure_time(args: argparse.Namespace, device: torch.device) -> dict:
    """Both arms in this process, the same weights and batches; interleaved rounds."""
    torch.manual_seed(args.seed)
    models = {arm: build(arm, args, device) for arm in ARMS}
    models["bahe"][0].load_state_dict(models["dlrm"][0].state_dict())
    batches = make_batches(args)
    with torch.no_grad():
        logits = {arm: dmp(batches[0].to(device))[1][1] for arm, (dmp, _) in models.items()}
    pipes = {arm: TrainPipelineSparseDist(dmp, opt, device) for arm, (dmp, opt) in models.items()}
    data = {arm: itertools.cycle(batches) for arm in ARMS}
    losses = {arm: [step(pipes[arm], data[arm], device)[1] for _ in range(args.warmup)] for arm in ARMS}
    times = {arm: [] for arm in ARMS}
    for r in range(args.rounds):
        for arm in ARMS:
            times[arm].append([])
        for i in range(args.steps):  # one step at a time, ABBA: dlrm bahe bahe dlrm ... (odd rounds: bahe first)
            for arm in ARMS if (r + i) % 2 == 0 else ARMS[::-1]:
                seconds, loss = step(pipes[arm], data[arm], device)
                times[arm][-1].append(seconds * 1e3)
                losses[arm].append(loss)
    peaks: dict = {}
    for arm in ARMS:  # one more step each, under the memory profiler
        peaks[arm], loss = step_peak_mib(pipes[arm], data[arm], device)
        losses[arm].append(loss)
    loss_a, loss_b = (torch.stack(losses[arm]).float().cpu() for arm in ARMS)
    per_round = [statistics.median(b) / statistics.median(a) for a, b in zip(*times.values())]
    return {"median_ms": {arm: statistics.median(itertools.chain(*t)) for arm, t in times.items()},
            "round_ratios": per_round, "step_ms": times, "step_peak_mib": peaks,
            "logits_equal": bool(torch.equal(logits["dlrm"], logits["bahe"])),
            "losses_equal": bool(torch.equal(loss_a, loss_b)), "loss_max_abs_diff": float((loss_a - loss_b).abs().max()),
            "losses": {arm: t.tolist() for arm, t in zip(ARMS, (loss_a, loss_b))}}


def table(t: dict, mem: dict, cuda: bool) -> list[str]:
    rows = [("step time, median (ms)", t["median_ms"]), ("peak RSS growth (MiB)", {
        arm: mem[arm]["peak_rss_growth_mib"] for arm in ARMS}), ("step peak, torch allocations (MiB)", t["step_peak_mib"])]
    if cuda:
        rows.insert(2, ("cuda max_memory_allocated (MiB)", {arm: mem[arm]["cuda_max_allocated_mib"] for arm in ARMS}))
    lines = [f"{'':36}{'dlrm':>10}{'bahe':>10}{'bahe/dlrm':>11}  target <= {TARGET:.2f}"]
    for label, v in rows:
        ratio = v["bahe"] / v["dlrm"]
        lines.append(f"{label:36}{v['dlrm']:10.1f}{v['bahe']:10.1f}{ratio:10.3f}x  {'ok' if ratio <= TARGET else 'OVER'}")
    rr = t["round_ratios"]
    lines += [f"step time, per-round ratios: median {statistics.median(rr):.3f}x, range {min(rr):.3f}-{max(rr):.3f}x "
              f"over {len(rr)} rounds", f"same logits: {t['logits_equal']}; same loss at all {len(t['losses']['dlrm'])} "
              f"steps: {t['losses_equal']} (max abs diff {t['loss_max_abs_diff']:.2e})"]
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    loadavg_start = os.getloadavg()
    mem = measure_memory(args)  # first: no model, process group, thread pool or CUDA context in the parent yet
    device = init(args)
    info = {**machine(device), "loadavg_start": loadavg_start}
    timing = measure_time(args, device)
    info["loadavg_end"] = os.getloadavg()
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config.update(dense_arch=sizes(args.dense_arch, args.dim), over_arch=sizes(args.over_arch, args.dim))
    lines = [f"## BAHE (text_arch=None) vs torchrec DLRM: {args.tables} tables x {args.rows:,} rows x D={args.dim}, "
             f"B={args.batch_size}, dense {config['dense_arch']}, over {config['over_arch']}, {args.device}, "
             f"threads={args.threads}", f"step time: {args.rounds} interleaved rounds x {args.steps} steps per arm "
             f"after {args.warmup} warm-up; memory: {args.mem_repeats} process(es) per arm, median", "",
             *table(timing, mem, args.device == "cuda")]
    seconds = time.perf_counter() - started
    print("\n".join(lines))
    out = args.out or (None if args.quick else Path(__file__).resolve().parents[1] / "docs" / "bench" / "dlrm.json")
    ok = timing["logits_equal"] and timing["losses_equal"]
    if out is not None:
        command = "python -m bench.dlrm_bench " + shlex.join(argv if argv is not None else sys.argv[1:])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"command": command.strip(), "machine": info, "versions": versions(),
                                   "config": config, "time": timing, "memory": mem, "seconds": seconds,
                                   "table": lines}, indent=1) + "\n")
        out.with_suffix(".md").write_text(
            f"# BAHE vs DLRM benchmark\n\nProduced by `{command.strip()}` in {seconds:.0f} s on {info['cpu_model']} "
            f"({info['cpu_count']} CPUs, torch {torch.__version__}, torchrec {versions().get('torchrec')}; load "
            f"average {info['loadavg_start'][0]:.2f} at start, {info['loadavg_end'][0]:.2f} at end). Every figure "
            f"in `{out.name}`.\n\n```\n" + "\n".join(lines) + "\n```\n\n## What the figures mean\n\n"
            + __doc__.split("\n\n", 1)[1])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
