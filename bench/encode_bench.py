"""Offline atomic behaviour encoding, measured side by side in one run (embeddings/encoder.py).

Every figure is a ratio of two things measured in the same process, so a busy or slow machine
shifts both sides. What each figure means:

* matmul rate (GFLOP/s): fp32 ``torch.nn.functional.linear``, median of repeats after warm-up, at a
  large square shape (the machine's own fp32 rate for this thread count) and at the shapes one
  encoder layer runs (M = micro-batch tokens; K, N = hidden, kv, intermediate sizes), combined in
  the layer's own proportions (the "layer" rate).
* encode rate: ShallowEncoder.encode (fp32) on real texts (MovieLens titles, synthetic behaviour
  texts) in full micro-batches of >= 64 rows. FLOPs: the linear layers' FLOPs counted by
  FlopCounterMode on the real forward calls (checked against 2 * tokens * k * layer weights), plus
  the attention-score FLOPs 4 * L^2 * heads * head_dim per text and layer (analytic: FlopCounterMode
  does not see the CPU attention kernel). The achieved fraction is encode GFLOP/s over the mean of
  the matmul rates measured just before and just after that encode pass, median over the rounds;
  and "best": the fastest encode pass over the fastest matmul run. Other work on the cores slows
  the encoder's many small ops far more than one large matmul, so "best" is the closest to a quiet
  machine. Also shown: the latency of one small elementwise op (the encoder runs ~50 per layer).
* padding waste: 1 - real tokens / computed tokens, from the EncodeStats of ShallowEncoder.encode's
  own batching with the model call stubbed out (the counts do not depend on its output; checked
  against the real default run), next to a conventional pad-to-longest batching of the same batch
  size, with texts sorted by length or in vocabulary (alphabetical) order.
* dedup win: time to encode every distinct text (measured; "incl count" adds the count_texts time)
  versus every occurrence, which is EXTRAPOLATED linearly from a measured uniform random sample of N occurrences
  encoded as a list with repeats, exactly as a per-occurrence encoder would. The two are timed one
  micro-batch at a time (the micro-batches one encode() call would run), alternating, so contention
  hits both alike; each micro-batch's time is the fastest of --repeats runs.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from bahe.ctr_data.movielens import MovieLensConfig, write_movielens
from bahe.ctr_data.synthetic import SyntheticConfig, write_synthetic
from bahe.embeddings.encoder import EncoderConfig, EncodeStats, ShallowEncoder
from bahe.embeddings.vocabulary import count_texts
from bench.machine import machine as machine_record
from bench.machine import versions

MIN_ROWS = 64  # the "batch >= 64"
SQUARE = 2048


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.encode_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller samples and fewer rounds (< 2 minutes)")
    p.add_argument("--out", default="docs/bench/encode.json", help="JSON results; the table goes beside it (.md)")
    p.add_argument("--model", default="smollm2-135m", help="model alias or local Hugging Face directory")
    p.add_argument("--k", type=int, default=6, help="shallow layers")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: %(default)s)")
    p.add_argument("--rounds", type=int, help="interleaved matmul/encode rounds (default 5; quick 2)")
    p.add_argument("--tp-tokens", type=int, help="tokens per throughput pass and corpus (default 8000; quick 3000)")
    p.add_argument("--tp-batch-tokens", type=int, help="batch_tokens of the throughput passes (default: 64 x the "
                   "90th percentile token length, so rows >= 64)")
    p.add_argument("--sample", type=int, help="occurrences encoded per dataset to extrapolate (default 2500; quick 300)")
    p.add_argument("--synthetic-distinct", type=int, help="distinct texts per sequence type, and items "
                   "(default 800; quick 100)")
    p.add_argument("--synthetic-samples", type=int, default=40_000, help="synthetic rows (40k rows ~ 1.2M behaviours)")
    p.add_argument("--repeats", type=int, help="timed runs of each micro-batch in the dedup section, fastest kept "
                   "(default 2; quick 1)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name, full, quick in (("rounds", 5, 2), ("tp_tokens", 8_000, 3_000), ("sample", 2_500, 300),
                              ("synthetic_distinct", 800, 100), ("repeats", 2, 1)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    return args


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def median_seconds(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# Model shapes and FLOPs ---------------------------------------------------------------------------

def layer_linears(encoder: ShallowEncoder) -> dict[tuple[int, int], int]:
    """(K, N) -> how many linears of that shape one layer runs, read from the model's own modules."""
    shapes = Counter((m.in_features, m.out_features) for name, m in encoder.model.named_modules()
                     if isinstance(m, torch.nn.Linear) and ".0." in f".{name}.")  # layers.0.* / layer.0.*
    return dict(shapes)


def encode_flops(encoder: ShallowEncoder, stats: EncodeStats) -> tuple[int, int]:
    """(linear FLOPs, attention-score FLOPs) of an encode, analytic, filler rows included."""
    cfg, k = encoder.model.config, encoder.config.k
    width = cfg.num_attention_heads * (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    linear = stats.computed_tokens * k * sum(2 * i * o * count for (i, o), count in layer_linears(encoder).items())
    attention = 0
    for length, n in stats.length_histogram.items():  # rows the model ran, filler included
        rows = encoder.rows_per_batch(length)
        attention += 4 * (math.ceil(n / rows) * rows if encoder.config.fixed_shapes else n) * length**2 * width * k
    return linear, attention


def variant(encoder: ShallowEncoder, stub: bool = False, **changes) -> ShallowEncoder:
    """The same loaded model under other EncoderConfig settings; stub=True replaces the model call."""
    other = copy.copy(encoder)
    other.config = dataclasses.replace(encoder.config, **changes)
    if stub:
        dim = encoder.dim
        other.model = lambda input_ids: SimpleNamespace(last_hidden_state=torch.zeros(*input_ids.shape, dim))
    return other


# 1 + 2: matmul rate and encode rate, interleaved ----------------------------------------------------

def matmul_rates(shapes: dict[tuple[int, int], int], m: int, repeats: int) -> dict:
    """GFLOP/s of F.linear at every layer shape (M = m) and at SQUARE^3; 'layer' combines the shapes.

    Also the latency of one small elementwise op (m x hidden): on an oversubscribed CPU every op
    waits for all threads, which hurts the encoder's many small ops far more than one large matmul.
    """
    out, flops_sum, time_sum = {}, 0.0, 0.0
    for (k, n), count in shapes.items():
        x, w = torch.randn(m, k), torch.randn(n, k)
        seconds = median_seconds(lambda x=x, w=w: F.linear(x, w), repeats)
        out[f"{m}x{k}x{n}"] = 2 * m * k * n / seconds / 1e9
        flops_sum += count * 2 * m * k * n
        time_sum += count * seconds
    out["layer"] = flops_sum / time_sum / 1e9
    y = torch.randn(m, next(iter(shapes))[0])
    out["small_op_us"] = median_seconds(lambda: y * y, 20) * 1e6  # the encoder runs ~50 such ops per layer
    a, b = torch.randn(SQUARE, SQUARE), torch.randn(SQUARE, SQUARE)
    out["square"] = 2 * SQUARE**3 / median_seconds(lambda: F.linear(a, b), max(3, repeats // 2)) / 1e9
    return out


def by_length(encoder: ShallowEncoder, texts: list[str]) -> dict[int, list[str]]:
    """Texts grouped by token length (after truncation), as ShallowEncoder.encode groups them."""
    groups = defaultdict(list)
    for text, ids in zip(texts, encoder.tokenize(texts)[0]):
        groups[len(ids)].append(text)
    return dict(groups)


def full_batches(encoder: ShallowEncoder, texts: list[str], budget: int, rng: np.random.Generator) -> list[str]:
    """Texts in full micro-batches of >= MIN_ROWS rows, about `budget` tokens in all (random lengths).

    A length's last micro-batch is filled with repeats of that length's texts: the same work the
    encoder's filler rows do, but counted as real texts, so every computed token counts.
    """
    batches = []
    for length, group in sorted(by_length(encoder, texts).items()):
        rows = encoder.rows_per_batch(length)
        if rows >= MIN_ROWS:
            cycled = [group[i % len(group)] for i in range(math.ceil(len(group) / rows) * rows)]
            batches += [(length * rows, cycled[i : i + rows]) for i in range(0, len(cycled), rows)]
    chosen, tokens = [], 0
    for i in rng.permutation(len(batches)):
        if tokens >= budget:
            break
        chosen += batches[i][1]
        tokens += batches[i][0]
    return chosen


def bench_throughput(encoder: ShallowEncoder, corpora: dict[str, list[str]], args, rng) -> dict:
    lengths = np.concatenate([[len(x) for x in encoder.tokenize(t)[0]] for t in corpora.values()])
    batch_tokens = args.tp_batch_tokens or MIN_ROWS * int(math.ceil(np.percentile(lengths, 90)))
    enc = variant(encoder, batch_tokens=batch_tokens)
    shapes = layer_linears(enc)
    result = {"batch_tokens": batch_tokens, "corpora": {}}
    runs = {}
    for name, texts in corpora.items():
        chosen = full_batches(enc, texts, args.tp_tokens, rng)
        with FlopCounterMode(display=False) as counter:  # the warm-up pass, counted
            _, stats = enc.encode(chosen)
        linear, attention = encode_flops(enc, stats)
        counted = counter.get_total_flops()
        runs[name] = (chosen, counted + attention)
        rows = [enc.rows_per_batch(length) for length in stats.length_histogram]
        result["corpora"][name] = {
            "texts": len(chosen), "tokens": stats.tokens, "padding_waste": stats.padding_waste,
            "micro_batches": sum(n // enc.rows_per_batch(length) for length, n in stats.length_histogram.items()),
            "min_rows": min(rows), "max_rows": max(rows), "lengths": sorted(stats.length_histogram),
            "linear_flops_counted": counted, "linear_flops_analytic": linear, "attention_flops": attention,
            "flop_check_ok": counted == linear, "hidden": enc.dim, "rounds": []}
    # matmul, encode A, matmul, encode B, matmul, ...: each encode is compared with the mean of the
    # matmul rates measured just before and just after it
    result["matmul_runs"] = [matmul_rates(shapes, batch_tokens, repeats=5)]
    for r in range(args.rounds):
        log(f"throughput round {r + 1}/{args.rounds}")
        for name, (chosen, flops) in runs.items():
            start = time.perf_counter()
            enc.encode(chosen)
            seconds = time.perf_counter() - start
            result["matmul_runs"].append(matmul_rates(shapes, batch_tokens, repeats=5))
            ref = {key: (result["matmul_runs"][-2][key] + result["matmul_runs"][-1][key]) / 2
                   for key in ("square", "layer")}
            gflops = flops / seconds / 1e9
            result["corpora"][name]["rounds"].append({
                "seconds": seconds, "tokens_per_s": result["corpora"][name]["tokens"] / seconds, "gflops": gflops,
                "of_square": gflops / ref["square"], "of_layer": gflops / ref["layer"]})
    runs_mm = result["matmul_runs"]
    result["matmul"] = {key: statistics.median(m[key] for m in runs_mm) for key in runs_mm[0]}
    for entry in result["corpora"].values():
        for key in ("tokens_per_s", "gflops", "of_square", "of_layer"):
            entry[key] = statistics.median(r[key] for r in entry["rounds"])
        entry["best_gflops"] = max(r["gflops"] for r in entry["rounds"])  # the least disturbed pass ...
        for key in ("square", "layer"):  # ... over the least disturbed matmul run
            entry[f"best_of_{key}"] = entry["best_gflops"] / max(m[key] for m in runs_mm)
    return result


# 3: padding waste --------------------------------------------------------------------------------

def pad_to_longest_waste(lengths: np.ndarray, batch: int, sort: bool) -> float:
    order = np.sort(lengths) if sort else lengths
    computed = sum(int(order[i : i + batch].max()) * len(order[i : i + batch]) for i in range(0, len(order), batch))
    return 1.0 - float(order.sum()) / computed


def default_label(encoder: ShallowEncoder) -> str:
    c = encoder.config
    return f"B={c.batch_tokens} fixed" if c.fixed_shapes else f"B={c.batch_tokens} fixed_shapes=False"


def bench_padding(encoder: ShallowEncoder, texts: list[str], tp_batch_tokens: int) -> dict:
    settings = {f"B={b} fixed": {"batch_tokens": b, "fixed_shapes": True}
                for b in sorted({64, 128, 256, 512, 1024, tp_batch_tokens, encoder.config.batch_tokens})
                if b >= encoder.config.max_tokens}
    settings[f"B={encoder.config.batch_tokens} fixed_shapes=False"] = {"batch_tokens": encoder.config.batch_tokens,
                                                                     "fixed_shapes": False}
    out = {}
    for label, changes in settings.items():
        enc = variant(encoder, stub=True, **changes)
        _, stats = enc.encode(texts)
        batches = sum(math.ceil(n / enc.rows_per_batch(length)) for length, n in stats.length_histogram.items())
        out[label] = {"tokens": stats.tokens, "computed_tokens": stats.computed_tokens,
                      "padding_waste": stats.padding_waste, "micro_batches": batches,
                      "mean_rows": stats.texts / batches}
    lengths = np.array([len(x) for x in encoder.tokenize(texts)[0]])
    same = max(1, round(out[default_label(encoder)]["mean_rows"]))
    for batch, tag in ((same, "same rows as default"), (MIN_ROWS, f"b={MIN_ROWS}")):
        for sort in (True, False):
            label = f"pad-to-longest, {tag}, {'length-sorted' if sort else 'vocab order'}"
            out[label] = {"padding_waste": pad_to_longest_waste(lengths, batch, sort), "batch": batch}
    return out


# 4: dedup win ------------------------------------------------------------------------------------

def bench_dedup(encoder: ShallowEncoder, paths: list[Path], args, rng: np.random.Generator) -> dict:
    """Every distinct text and a sample of occurrences, encoded for real with the default settings.

    Both are encoded one micro-batch per call (the very micro-batches one encode() call would run:
    same length groups, same rows), alternating distinct / sample, so that contention from other work
    hits both alike. Each micro-batch's time is the fastest of `args.repeats` runs (noise only adds).
    """
    start = time.perf_counter()
    counts = count_texts(paths)
    count_s = time.perf_counter() - start
    texts = sorted(counts)  # vocabulary order
    occ = np.array([counts[t] for t in texts], dtype=np.int64)
    total, n_sample = int(occ.sum()), args.sample
    lengths = np.array([len(x) for x in encoder.tokenize(texts)[0]])
    occ_tokens = int((occ * lengths).sum())
    sample = [texts[i] for i in rng.choice(len(texts), size=n_sample, p=occ / total)]
    jobs = []  # (side, length, slice): one micro-batch each, distinct and sample alternating per length
    for side, group in enumerate((by_length(encoder, texts), by_length(encoder, sample))):
        for length, members in group.items():
            rows = encoder.rows_per_batch(length)
            jobs += [((length, i // rows, side), members[i:i + rows]) for i in range(0, len(members), rows)]
    jobs.sort(key=lambda job: job[0])
    best: dict = {}  # job -> (seconds, stats), the fastest of the repeats
    for _ in range(args.repeats):
        for key, batch in jobs:
            start = time.perf_counter()
            _, stats = encoder.encode(batch)
            seconds = time.perf_counter() - start
            if seconds < best.get(key, (math.inf,))[0]:
                best[key] = (seconds, stats)
    seconds_by_side, stats_by_side = [0.0, 0.0], [EncodeStats(), EncodeStats()]
    for (_, _, side), (seconds, stats) in best.items():
        seconds_by_side[side] += seconds
        stats_by_side[side].add(stats)
    (distinct_s, sample_s), (distinct, sampled) = seconds_by_side, stats_by_side
    occ_s = sample_s * total / n_sample
    linear, attention = encode_flops(encoder, distinct)
    return {
        "distinct_texts": len(texts), "occurrences": total, "count_seconds": count_s, "distinct_seconds": distinct_s,
        "distinct_tokens": distinct.tokens, "distinct_computed_tokens": distinct.computed_tokens,
        "distinct_padding_waste": distinct.padding_waste, "distinct_gflops": (linear + attention) / distinct_s / 1e9,
        "occurrence_tokens": occ_tokens, "sample_occurrences": n_sample, "sample_seconds": sample_s,
        "sample_tokens": sampled.tokens, "sample_computed_tokens": sampled.computed_tokens,
        "occurrence_seconds_extrapolated": occ_s,
        "occurrence_seconds_extrapolated_by_tokens": sample_s / sampled.computed_tokens * occ_tokens,
        "ratio": occ_s / distinct_s, "ratio_with_counting": occ_s / (distinct_s + count_s),
        "distinct_stats": {"tokens": distinct.tokens, "computed_tokens": distinct.computed_tokens},
        "_texts": texts}


# Report ------------------------------------------------------------------------------------------

def format_table(res: dict) -> str:
    tp, pad, dd = res["throughput"], res["padding"], res["dedup"]
    mm = tp["matmul"]
    shapes = ", ".join(f"{key} {value:.0f}" for key, value in mm.items() if key[0].isdigit())
    lines = [f"## encoding throughput (fp32, threads={res['machine']['torch_threads']}, k={res['config']['k']}, "
             f"batch_tokens={tp['batch_tokens']}: full micro-batches of >= {MIN_ROWS} rows; median of "
             f"{res['config']['rounds']} rounds, each encode bracketed by matmul runs)",
             f"fp32 matmul GFLOP/s: square {SQUARE}^3 {mm['square']:.0f}; encoder layer shapes {mm['layer']:.0f} "
             f"(MxKxN: {shapes}); one {tp['batch_tokens']}x{next(iter(tp['corpora'].values()))['hidden']} "
             f"elementwise op {mm['small_op_us']:.0f} us",
             f"{'corpus':<11}{'rows':>9}{'tok/s':>9}{'GFLOP/s':>9}{'of square':>11}{'of layer':>10}"
             f"{'best: of square':>17}{'of layer':>10}"]
    for name, c in tp["corpora"].items():
        lines.append(f"{name:<11}{c['min_rows']:>4}-{c['max_rows']:<4}{c['tokens_per_s']:>9.0f}{c['gflops']:>9.1f}"
                     f"{c['of_square']:>11.0%}{c['of_layer']:>10.0%}{c['best_of_square']:>17.0%}"
                     f"{c['best_of_layer']:>10.0%}")
    names = list(pad)
    lines += ["", "## padding waste (share of computed tokens that were filler; distinct texts)",
              f"{'setting':<50}" + "".join(f"{n:>11}" for n in names)]
    for label in pad[names[0]]:
        lines.append(f"{label:<50}" + "".join(f"{pad[n][label]['padding_waste']:>11.1%}" for n in names))
    same = ", ".join(f"{n} {p['pad-to-longest, same rows as default, length-sorted']['batch']}" for n, p in pad.items())
    enc = res["config"]["encoder"]
    lines.append(f"(B = batch_tokens; default = EncoderConfig(): B={enc['batch_tokens']} "
                 f"fixed_shapes={enc['fixed_shapes']}, mean rows per micro-batch {same})")
    lines += ["", f"## dedup win (default settings: batch_tokens={enc['batch_tokens']}, "
              f"fixed_shapes={enc['fixed_shapes']})",
              f"{'dataset':<10}{'occurrences':>12}{'distinct':>9}{'tok occ':>12}{'tok dist':>9}{'count s':>8}"
              f"{'dist s':>8}{'occ s*':>9}{'occ/dist':>9}{'incl count':>11}"]
    for name, d in dd.items():
        lines.append(f"{name:<10}{d['occurrences']:>12,}{d['distinct_texts']:>9,}{d['occurrence_tokens']:>12,}"
            f"{d['distinct_tokens']:>9,}{d['count_seconds']:>8.1f}{d['distinct_seconds']:>8.1f}"
            f"{d['occurrence_seconds_extrapolated']:>9,.0f}{d['ratio']:>8,.0f}x"
            f"{d['ratio_with_counting']:>10,.0f}x")
    lines.append("* occ s is EXTRAPOLATED linearly (x occurrences / N) from a measured uniform random sample of N "
                 "occurrences, encoded as a list with repeats; count s and dist s are measured. Per dataset:")
    for n, d in dd.items():
        lines.append(f"  {n}: N={d['sample_occurrences']:,} in {d['sample_seconds']:.1f}s; computed tok/s sample "
                     f"{d['sample_computed_tokens'] / d['sample_seconds']:,.0f}, distinct "
                     f"{d['distinct_computed_tokens'] / d['distinct_seconds']:,.0f}; scaled by tokens instead of "
                     f"occurrences {d['occurrence_seconds_extrapolated_by_tokens']:,.0f}s = "
                     f"{d['occurrence_seconds_extrapolated_by_tokens'] / d['distinct_seconds']:,.0f}x; "
                     f"token ratio {d['occurrence_tokens'] / d['distinct_tokens']:,.0f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    machine = machine_record()
    rng = np.random.default_rng(args.seed)
    encoder = ShallowEncoder(EncoderConfig(model=args.model, k=args.k, device="cpu"))
    syn_cfg = SyntheticConfig(num_samples=args.synthetic_samples, distinct_behaviours=args.synthetic_distinct,
                              num_items=args.synthetic_distinct, seed=args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        log("writing MovieLens-100K and synthetic sample files")
        paths = {"movielens": list(write_movielens(MovieLensConfig(), Path(tmp) / "ml").values()),
                 "synthetic": [Path(tmp) / "synthetic.parquet"]}
        write_synthetic(syn_cfg, paths["synthetic"][0])
        dedup = {}
        for name, files in paths.items():
            log(f"dedup: {name}")
            dedup[name] = bench_dedup(encoder, files, args, rng)
    texts = {name: d.pop("_texts") for name, d in dedup.items()}
    log("throughput (interleaved with matmul)")
    throughput = bench_throughput(encoder, texts, args, rng)
    log("padding waste")
    padding = {name: bench_padding(encoder, t, throughput["batch_tokens"]) for name, t in texts.items()}
    for name, d in dedup.items():  # the stubbed batching must count exactly what the real run did
        stub = padding[name][default_label(encoder)]
        d["stub_matches_real_run"] = d.pop("distinct_stats") == {k: stub[k] for k in ("tokens", "computed_tokens")}
    machine["loadavg_end"] = os.getloadavg()
    config = {**{k: v for k, v in vars(args).items() if k != "out"}, "encoder": dataclasses.asdict(encoder.config),
              "synthetic": dataclasses.asdict(syn_cfg)}
    result = {"machine": machine, "versions": versions(), "config": config, "throughput": throughput,
              "padding": padding, "dedup": dedup,
              "seconds": time.perf_counter() - started}
    table = format_table(result)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    command = "python -m bench.encode_bench " + shlex.join(argv if argv is not None else sys.argv[1:])
    out.with_suffix(".md").write_text(
        f"# Encoding benchmark\n\nProduced by `{command.strip()}` in {result['seconds']:.0f} s on "
        f"{machine['cpu_model']} ({machine['cpu_count']} CPUs, torch {torch.__version__}, "
        f"{machine['torch_threads']} threads; load average {machine['loadavg_start'][0]:.2f} at start, "
        f"{machine['loadavg_end'][0]:.2f} at end). Every figure in `{out.name}`.\n\n```\n{table}\n```\n\n"
        f"## What the figures mean\n\n{__doc__.split(chr(10) * 2, 2)[2]}"
    )
    log(f"done in {result['seconds']:.0f}s; wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
