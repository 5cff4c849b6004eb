"""BAHE vs the token-level baseline: one training step each, same LLM, head, data and batch, side by side.

A user has N behaviour sequence types of M behaviours of K tokens: N*M*K text tokens. The token-level
arm runs those N*M*K tokens (plus the item title's) through the LLM's layers 0..k+deep-1 (0..k-1
frozen, forward only); BAHE looks up N*M behaviour vectors (+ the item's) in the store, encoded
offline, and runs them through the trainable layers k..k+deep-1 only. The lengths sweep varies M at
fixed K; the K sweep varies K (and M) at one length. How the arms are built: below (the
docstring of bench/efficiency_arms.py).

Data: bahe.ctr_data.synthetic with exactly M behaviours per sequence and exactly K words per behaviour; the
bench's random-weight Llama (``--model-config``) has a word-level tokenizer, so K words = K tokens.
The token arm's user text is padded/truncated to N*M*K tokens: TokenBatcher's "name:" prefixes and
";" separators (one token each) make the text slightly longer, and the most recent N*M*K are kept.

What each figure means:

* step ms: wall time of one training step (forward, backward, Adam step; batches already on the
  device; CUDA synchronised), median over --steps timed steps per arm. Per configuration both arms
  are built in one process and, after the FLOP step, the memory step and --warmup steps each,
  alternate step by step (token bahe bahe token ...), so other load hits both.
* samples/s: batch size / median step time.
* GFLOP/step: torch.utils.flop_counter.FlopCounterMode over one whole step (matmuls and attention;
  elementwise ops, norms and the optimizer are not counted). Attention: FlopCounterMode has no formula
  for the CPU SDPA kernel (it would count 0) and older torch rejects grouped kv heads, so the bench
  supplies one for every SDPA kernel, at torch's own convention (all query x key pairs, causal or not:
  a causal kernel skips about half of them). "attn" is the attention share.
* peak MiB: parameters + buffers + optimizer state (each storage once) + the step's own high-water
  mark of torch allocations (CUDA: max_memory_allocated - memory_allocated before the step; CPU:
  torch.profiler profile_memory, running sum of the allocator's records). Not counted: the CUDA
  context, the allocator's cached-but-free blocks, the batches.
* matmul rate: one large square matmul (CPU fp32 2048^3; CUDA bf16 8192^3), median of 5, measured
  before the sweep and after every configuration; "% of matmul" = counted FLOPs / median step time /
  median matmul rate.
* encoding (offline, BAHE only): the store of each K is built by bahe.embeddings.build.build_store from
  the data of that K (every DISTINCT behaviour text and item title once through layers 0..k-1);
  seconds per text = build encode seconds / texts encoded, FLOPs per text from FlopCounterMode on one
  micro-batch per text length. Amortised per sample = distinct texts in the configuration's data x
  cost per text / samples in that data (--samples): it shrinks as the same data set grows, because the
  distinct texts saturate (N x --distinct + --items at most). "x+enc" compares token ms/sample with
  BAHE ms/sample + amortised encode ms/sample.
* CPU runs use 1 torch thread by default: on a shared machine a descheduled OpenMP thread stalls
  every small op, which would hit the small-op-heavy BAHE step far more than the token arm.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import shlex
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench import efficiency_arms
from bench import efficiency_report as report
from bench.efficiency_arms import ARMS, batch_tokens, build_arm, torchrec_problem
from bench.efficiency_setup import (
    ATTENTION_FORMULAS,
    MIB,
    SEQUENCE_TYPES,
    build_store_for,
    data_stats,
    deadline,
    encoder_config,
    llama_params,
    matmul_rate,
    model_config,
    shape_for,
    split_flops,
    state_bytes,
    step_peak_bytes,
    sync,
    words_of,
    write_data,
    write_model,
)
from bench.machine import machine, versions

DEFAULTS = {  # per device; --quick overrides
    "cpu": {"model_config": "cpu-small", "dtype": "fp32", "batch_size": 4, "samples": 1024, "distinct": 128,
            "items": 128, "steps": 5, "warmup": 1, "config_timeout": 240, "k_sweep_length": 512, "threads": 1},
    "cuda": {"model_config": "gpu-0.5b", "dtype": "bf16", "batch_size": 16, "samples": 4096, "distinct": 2000,
             "items": 1000, "steps": 10, "warmup": 3, "config_timeout": 120, "k_sweep_length": 2048,
             "threads": min(8, os.cpu_count() or 1)},
}
DOC = __doc__.split("\n\n", 1)[1] + "\n## How the arms are built\n\n" + efficiency_arms.__doc__.split("\n\n", 1)[1]
QUICK = {"model_config": "tiny", "lengths": [64, 128], "k_sweep": [8], "k_sweep_length": 128, "batch_size": 2,
         "samples": 32, "distinct": 40, "items": 30, "steps": 2, "warmup": 0, "batches": 2}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.efficiency_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), help="fp32, or bf16 autocast (default: cpu fp32, cuda bf16)")
    p.add_argument("--model-config", help="preset (tiny, cpu-small, gpu-0.5b) or a JSON object of hidden_size, "
                   "num_hidden_layers, num_attention_heads, num_key_value_heads, intermediate_size, vocab_size, k, "
                   "deep_layers (default: cpu cpu-small, cuda gpu-0.5b)")
    p.add_argument("--lengths", type=int, nargs="+", help="text tokens per user N*M*K (default 256 512 1024 2048)")
    p.add_argument("--tokens-per-behaviour", type=int, default=16, help="K of the lengths sweep (default 16)")
    p.add_argument("--sequence-types", type=int, default=4, help="N (default 4)")
    p.add_argument("--k-sweep", type=int, nargs="*", help="K values at --k-sweep-length (default 8 16 32 64; "
                   "none: no K sweep)")
    p.add_argument("--k-sweep-length", type=int, help="text length of the K sweep (default: cpu 512, cuda 2048)")
    p.add_argument("--batch-size", type=int, help="samples per step (default: cpu 4, cuda 16)")
    p.add_argument("--steps", type=int, help="timed steps per arm (default: cpu 5, cuda 10)")
    p.add_argument("--warmup", type=int, help="untimed steps per arm after the FLOP and memory steps (cpu 1, cuda 3)")
    p.add_argument("--batches", type=int, default=4, help="distinct batches, cycled (default 4)")
    p.add_argument("--samples", type=int, help="samples in each configuration's data (default: cpu 1024, cuda 4096)")
    p.add_argument("--distinct", type=int, help="distinct behaviour texts per type (default: cpu 128, cuda 2000)")
    p.add_argument("--items", type=int, help="items (distinct titles) (default: cpu 128, cuda 1000)")
    p.add_argument("--pipeline", choices=("auto", "full", "core"), default="auto",
                   help="full: the repo's factory + torchrec; core: torchrec-free fallback; auto: full where it runs")
    p.add_argument("--config-timeout", type=int, help="seconds per configuration, 0 = none (cpu 240, cuda 120)")
    p.add_argument("--threads", type=int, help="torch threads (default: cpu 1 -- on a shared machine a descheduled "
                   "OpenMP thread stalls every small op --, cuda min(8, cores))")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", type=Path, help="where data, model and stores go (default: a temporary folder)")
    p.add_argument("--out", type=Path, help="JSON results; .md and the PNG plots beside it "
                   "(default docs/bench/efficiency.json; --quick: none)")
    p.add_argument("--quick", action="store_true", help=f"tiny smoke test (< 30 s): {QUICK}")
    args = p.parse_args(argv)
    values = {"lengths": [256, 512, 1024, 2048], "k_sweep": [8, 16, 32, 64],
              **DEFAULTS[args.device], **(QUICK if args.quick else {})}
    for name, value in values.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    return args


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def timed_step(arm, batch, bf16: bool, device: torch.device) -> tuple[float, float]:
    sync(device)
    start = time.perf_counter()
    loss = arm.step(batch, bf16, device)
    sync(device)
    return (time.perf_counter() - start) * 1e3, float(loss)


def run_shape(shape, args, mc, paths, device, bf16: bool, pipeline: str) -> dict:
    """Both arms of one configuration: FLOPs, memory, then interleaved timed steps."""
    arms, out = {}, {}
    for name in ARMS:
        start = time.perf_counter()
        arms[name] = build_arm(name, pipeline, shape, mc, paths["data"][shape], paths["stores"][shape.k],
                               paths["model"], args.batch_size, args.batches, device)
        out[name] = {"build_s": time.perf_counter() - start, "params": arms[name].params,
                     "positions_per_sample": batch_tokens(arms[name], pipeline)}
    cursor = {name: 0 for name in ARMS}

    def next_batch(name):
        cursor[name] += 1
        return arms[name].batches[cursor[name] % len(arms[name].batches)]

    for name, arm in arms.items():  # step 1: counted; step 2: memory; then warm-up
        with FlopCounterMode(display=False, custom_mapping=ATTENTION_FORMULAS) as counter:
            arm.step(next_batch(name), bf16, device)
        out[name]["flops"] = split_flops(counter)
        transient = step_peak_bytes(lambda arm=arm, name=name: arm.step(next_batch(name), bf16, device), device)
        state = state_bytes(arm.module, arm.optimizer)
        out[name]["memory_mib"] = {"state": {k: v / MIB for k, v in state.items()}, "step_peak": transient / MIB,
                                   "peak": (state["total"] + transient) / MIB}
        for _ in range(args.warmup):
            arm.step(next_batch(name), bf16, device)
    times, losses = {name: [] for name in ARMS}, {name: [] for name in ARMS}
    for i in range(args.steps):
        for name in ARMS if i % 2 == 0 else ARMS[::-1]:
            ms, loss = timed_step(arms[name], next_batch(name), bf16, device)
            times[name].append(ms)
            losses[name].append(loss)
    for name in ARMS:
        median = statistics.median(times[name])
        out[name].update(step_ms=times[name], median_ms=median, samples_per_s=args.batch_size / median * 1e3,
                         achieved_gflops=out[name]["flops"]["total"] / median / 1e6, losses=losses[name])
    arms.clear()
    return out


def encoding_cost(shape, stats: dict, store: dict, batch_size: int) -> dict:
    per_sample_s = stats["distinct_texts"] * store["seconds_per_text"] / stats["samples"]
    return {**{k: v for k, v in stats.items() if not k.startswith("_")},
            "amortised_ms_per_sample": per_sample_s * 1e3,
            "amortised_gflop_per_sample": stats["distinct_texts"] * store["flops_per_text"] / stats["samples"] / 1e9,
            "amortised_ms_per_batch": per_sample_s * 1e3 * batch_size}


def summarise(entry: dict, matmul: float, batch_size: int) -> None:
    token, bahe = entry["arms"]["token"], entry["arms"]["bahe"]
    for arm in (token, bahe):
        arm["of_matmul"] = arm["achieved_gflops"] / matmul
    enc = entry["encoding"]["amortised_ms_per_sample"]
    entry["ratios"] = {"step_time": token["median_ms"] / bahe["median_ms"],
                       "peak_memory": token["memory_mib"]["peak"] / bahe["memory_mib"]["peak"],
                       "flops": token["flops"]["total"] / bahe["flops"]["total"],
                       "samples_per_s": bahe["samples_per_s"] / token["samples_per_s"],
                       "time_incl_encoding": (token["median_ms"] / batch_size) / (bahe["median_ms"] / batch_size + enc)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: this torch sees no CUDA device (torch.cuda.is_available() is False)")
    bf16 = args.dtype == "bf16"
    mc = model_config(args.model_config)
    problem = torchrec_problem(device) if args.pipeline != "core" else "not tried (--pipeline core)"
    if args.pipeline == "full" and problem:
        raise SystemExit(f"--pipeline full: torchrec/fbgemm cannot run here: {problem}")
    pipeline = "full" if args.pipeline == "full" or (args.pipeline == "auto" and problem is None) else "core"
    log(f"pipeline: {pipeline}" + (f" (torchrec/fbgemm: {problem})" if problem and pipeline == "core" else ""))
    n, k = args.sequence_types, args.tokens_per_behaviour
    shapes = [shape_for(length, k, n) for length in args.lengths]
    sweep = [shape_for(args.k_sweep_length, kk, n) for kk in args.k_sweep]
    ordered = list(dict.fromkeys(shapes + sweep))
    out_path = args.out or (None if args.quick else Path(__file__).resolve().parents[1] / "docs" / "bench" / "efficiency.json")
    command = "python -m bench.efficiency_bench " + shlex.join(argv if argv is not None else sys.argv[1:])
    result = {"command": command.strip(), "machine": machine(device), "versions": versions(), "pipeline": pipeline,
              "torchrec_problem": problem,
              "config": {**{key: (str(v) if isinstance(v, Path) else v) for key, v in vars(args).items()},
                         "model": mc, "model_params": llama_params(mc), "sequence_types_n": n},
              "matmul_gflops": [], "configs": []}
    with contextlib.ExitStack() as stack:
        work = args.work_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bahe-eff-")))
        work.mkdir(parents=True, exist_ok=True)
        paths = {"data": {}, "stores": {}, "model": work / "llm"}
        stats, words = {}, set()
        for shape in ordered:
            log(f"data {shape.name}: N={shape.n} M={shape.m} K={shape.k}, {args.samples} samples")
            paths["data"][shape] = write_data(shape, work, args.samples, args.distinct, args.items, args.seed)
            stats[shape] = data_stats(paths["data"][shape], args.samples)
            words |= words_of(stats[shape].pop("_counts"))
        log(f"random-weight model {mc['preset']} ({llama_params(mc)['total'] / 1e6:.1f}M parameters)")
        result["config"]["model_written"] = write_model(paths["model"], mc, words | {";"} | {f"{t}:" for t in SEQUENCE_TYPES},
            args.seed, torch.bfloat16 if bf16 else torch.float32)
        stores, encoder_cache = {}, {}
        for kk in dict.fromkeys(s.k for s in ordered):
            log(f"store K={kk}: build_store over {sum(s.k == kk for s in ordered)} data file(s)")
            stores[kk] = build_store_for(work / f"store_K{kk}", [paths["data"][s] for s in ordered if s.k == kk],
                                         encoder_config(paths["model"], mc, kk, device, bf16), encoder_cache)
            paths["stores"][kk] = work / f"store_K{kk}"
        encoder_cache.clear()
        result["stores"] = {str(kk): v for kk, v in stores.items()}
        result["matmul_gflops"].append(matmul_rate(device, torch.bfloat16 if device.type == "cuda" else torch.float32))
        for shape in ordered:
            entry = {"name": shape.name, "tokens": shape.tokens, "target_length": shape.target, "n": shape.n,
                     "m": shape.m, "k": shape.k, "sweep": ("length" if shape in shapes else "") +
                     ("+k" if shape in sweep and shape in shapes else "k" if shape in sweep else ""),
                     "batch_size": args.batch_size, "status": "ok"}
            log(f"measuring {shape.name} (M={shape.m})")
            start = time.perf_counter()
            try:
                with deadline(args.config_timeout):
                    entry["arms"] = run_shape(shape, args, mc, paths, device, bf16, pipeline)
                entry["encoding"] = encoding_cost(shape, stats[shape], stores[shape.k], args.batch_size)
            except Exception as err:  # noqa: BLE001 -- a timeout or OOM costs one configuration, not the run
                entry["status"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
                entry.pop("arms", None)
                log(f"{shape.name} failed: {entry['status']}\n{traceback.format_exc(limit=3)}")
            entry["seconds"] = time.perf_counter() - start
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            result["matmul_gflops"].append(matmul_rate(device, torch.bfloat16 if device.type == "cuda" else torch.float32))
            matmul = statistics.median(result["matmul_gflops"])
            if entry["status"] == "ok":
                summarise(entry, matmul, args.batch_size)
            result["configs"].append(entry)
            result["matmul_gflops_median"] = matmul
            result["seconds"] = time.perf_counter() - started
            result["machine"]["loadavg_end"] = os.getloadavg()
            if out_path is not None:  # after every configuration, so a killed run leaves what it measured
                report.write(result, out_path, DOC, plots=False)
    table = report.table(result)
    if out_path is not None:
        result["plots"] = report.write(result, out_path, DOC, plots=True)
    log(f"done in {time.perf_counter() - started:.0f} s" + (f"; wrote {out_path} and {out_path.with_suffix('.md')}"
                                                             if out_path else ""))
    print(table)
    return 0 if all(c["status"] == "ok" for c in result["configs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
