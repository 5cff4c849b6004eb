"""History length M: what a training step costs as the behaviours per sequence type grow (issue 31, item 3).

The paper's point: the token-level arm's cost grows with the text of the history (N types x M behaviours
x K tokens through every LLM layer), BAHE's only with the N x M cached behaviour vectors through the
trainable deep layers. This bench measures one training step of each arm at M = 5, 20, 50, 100 on
MovieLens-100K, side by side in ONE process:

* dlrm: the DLRM-only arm (no text; its step does not depend on M: the reference);
* bahe: the store's k-layer vectors of the M most recent titles per type, through the deep layer(s);
* token_level: the same titles' tokens through the LLM's layers 0..k+deep-1, where it fits (below).

Every arm is the trainer's own model: ``bahe-train``'s parser and ``config_from_args`` (launchers/train.py)
over the `make demo` preset's trainer flags (launchers/demo.py ``trainer_flags``: batch 64 per rank, D = 32,
the demo's dense / over arch, one deep layer, user_id dropped) plus ``--llm-precision`` (bf16 autocast of the
LLM layers by default, as the quality runs) and the quality bench's ``--max-user-tokens`` for the token arm
(bench/quality_bench.py ``user_token_cap``: nothing is cut); ``model.factory.build_model`` builds it, unsharded,
in this one process (one rank's step: the quality runs train 2 gloo ranks of 1 thread each at this batch).
Data and store: bench/quality_bench.py ``prepare`` (MovieLens splits per M, one store of k layers). The
batches are --batches random rows of the train split (fixed seed), cycled: early rows of a time-ordered
split have short histories, so the first rows would understate M.

Measurement: bench/efficiency_bench.py's harness (bench/efficiency_arms.py ``Arm``: forward, backward,
Adam step; ``timed_step``; FlopCounterMode with the SDPA formulas of bench/efficiency_setup.py; the step's
own allocation peak + parameters / optimizer state). Per M, each arm runs one counted step, one memory
step and --warmup steps, then --steps timed steps with the arms alternating (dlrm bahe token, token bahe
dlrm, ...), so a slow spell of this shared machine hits every arm; the token arm takes part in the first
--token-steps rounds only. Reported: the median step, and the BAHE / DLRM ratio both as the ratio of the
medians and as the median of the per-round ratios (with their range).

Where the token arm stops fitting: before each M after the first, its step time and peak are projected
from the last M it ran at (time x the analytic FLOP ratio; peak x the padded-token ratio, plus the
quadratic attention mask); it runs only if the projection fits --token-budget-s for its steps and
--memory-cap-gib, else the table says what the projection was.

GPU projection (a PROJECTION, not a measurement): FLOPs per sample (counted where the arm ran, the analytic
model otherwise) / (--gpu-peak-tflops x --gpu-utilisation), as GPU-seconds per million training samples --
compute-bound only: at the demo's batch of 64 a BAHE step is a few GFLOPs, which an H100 runs in
microseconds, so a real step there is bound by kernel launches and the input pipeline, not FLOPs.

  python -m bench.history_length_bench                                # M 5 20 50 100, about 10 min on 2 cores
  python -m bench.history_length_bench --histories 5 20 --steps 2 --out /tmp/h.json   # a quick look
  python -m bench.history_length_bench --quality docs/bench/quality.json docs/bench/quality_m20.json \\
      docs/bench/quality_m50.json                                     # + the quality per M of those runs

Writes docs/bench/history_length.json, a markdown page beside it and, with matplotlib, a PNG.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("dlrm", "bahe", "token_level")
HISTORIES = (5, 20, 50, 100)
GIB = 2**30
# H100 SXM dense bf16 tensor-core peak (no sparsity), TFLOP/s; the utilisation is an assumption for these
# small shapes (hidden 576, sequences of tens to thousands of positions)
H100_BF16_TFLOPS = 989.0
GPU_UTILISATION = 0.35


# pure parts (tests/test_history_length_bench.py) ----------------------------------------------------------

def side_by_side(times: dict[str, list[float]], arm: str, reference: str) -> dict:
    """``arm`` against ``reference`` from steps timed alternately: the ratio of the medians, and the median
    (and range) of the per-round ratios (round i: arm's i-th step / reference's i-th step; rounds where
    either has no step are left out)."""
    a, r = times.get(arm) or [], times.get(reference) or []
    pairs = [x / y for x, y in zip(a, r) if y > 0]
    if not a or not r:
        return {"of_medians": None, "paired_median": None, "paired_range": None, "rounds": 0}
    return {"of_medians": statistics.median(a) / statistics.median(r),
            "paired_median": statistics.median(pairs) if pairs else None,
            "paired_range": [min(pairs), max(pairs)] if pairs else None, "rounds": len(pairs)}


def round_order(arms: list[str], i: int) -> list[str]:
    """The arms' order in timed round ``i``: as given in even rounds, reversed in odd ones."""
    return list(arms) if i % 2 == 0 else list(arms)[::-1]


def layer_linear_params(llm: dict) -> int:
    """Weights of one Llama decoder layer's matmuls (q, k, v, o, gate, up, down)."""
    h, i = llm["hidden_size"], llm["intermediate_size"]
    kv = llm.get("head_dim", h // llm["num_attention_heads"]) * llm["num_key_value_heads"]
    return 2 * h * h + 2 * h * kv + 3 * h * i


def layer_forward_flops(llm: dict, width: int) -> int:
    """Forward FLOPs of one decoder layer over ONE sequence of ``width`` positions: 2 x positions x matmul
    weights, plus attention at torch's FlopCounterMode convention (scores and weighted values over every
    query x key pair, causal or not): 2 x width^2 x heads x head_dim x 2."""
    heads_dim = llm.get("head_dim", llm["hidden_size"] // llm["num_attention_heads"]) * llm["num_attention_heads"]
    return 2 * width * layer_linear_params(llm) + 4 * width * width * heads_dim


def arm_flops_per_sample(arm: str, llm: dict, k: int, deep: int, widths: list[int]) -> int:
    """The analytic LLM FLOPs of one training sample: trainable (deep) layers count 3x their forward
    (forward + backward for inputs and weights), frozen layers (the token arm's 0..k-1) 1x. ``widths``: the
    padded positions of each sequence the arm feeds its layers per sample -- BAHE: N x [M] + [1] (the item
    title's vector); token_level: [user tokens, item tokens]. The DLRM arm (and the heads, norms, optimizer)
    count 0 here."""
    if arm == "dlrm":
        return 0
    frozen = k if arm == "token_level" else 0
    return sum((3 * deep + frozen) * layer_forward_flops(llm, w) for w in widths)


def fit_activations(points: list[tuple[float, float, float]]) -> tuple[float, float]:
    """(b, c) of step-peak bytes = b x positions + c x quadratic, through the last two measured points
    ``(positions per step, B x T^2, bytes)`` (attention scores or a B x T x T mask grow with T^2); with one
    point, or where the two give a negative coefficient, the line through the last point (c = 0)."""
    x2, z2, y2 = points[-1]
    if len(points) >= 2:
        x1, z1, y1 = points[-2]
        det = x1 * z2 - x2 * z1
        if det:
            b, c = (y1 * z2 - y2 * z1) / det, (x1 * y2 - x2 * y1) / det
            if b >= 0 and c >= 0:
                return b, c
    return y2 / x2, 0.0


def project_step(measured: list[dict], flops_to: float, positions_to: float, quadratic_to: float) -> dict:
    """An arm's step time and peak at a new M from the Ms it ran at (``measured``: dicts of median_s,
    flops (analytic, per step), positions and quadratic (B x T^2) per step, state_bytes, step_peak_bytes):
    time = the last M's x the analytic FLOP ratio; peak = the state (weights, optimizer: does not grow)
    + :func:`fit_activations` at the new shape."""
    last = measured[-1]
    b, c = fit_activations([(m["positions"], m["quadratic"], m["step_peak_bytes"]) for m in measured])
    return {"median_s": last["median_s"] * flops_to / last["flops"],
            "peak_bytes": last["state_bytes"] + b * positions_to + c * quadratic_to}


def fits(projection: dict, steps: int, budget_s: float, memory_cap_bytes: float) -> str | None:
    """None when a projected arm fits ``steps`` steps in ``budget_s`` and ``memory_cap_bytes``; else why not."""
    reasons = []
    if projection["median_s"] * steps > budget_s:
        reasons.append(f"projected {projection['median_s']:.0f} s/step x {steps} steps > {budget_s:.0f} s")
    if projection["peak_bytes"] > memory_cap_bytes:
        reasons.append(f"projected peak {projection['peak_bytes'] / GIB:.1f} GiB > {memory_cap_bytes / GIB:.1f} GiB")
    return "; ".join(reasons) or None


def gpu_seconds_per_million(flops_per_sample: float, peak_tflops: float = H100_BF16_TFLOPS,
                            utilisation: float = GPU_UTILISATION) -> float:
    """Projected GPU-seconds per 1M training samples, compute-bound: FLOPs / (peak x utilisation)."""
    return flops_per_sample * 1e6 / (peak_tflops * 1e12 * utilisation)


def quality_rows(files: list[Path]) -> list[dict]:
    """One row per quality-bench JSON (bench/quality_bench.py): M, k, steps, precision, seeds, and per arm
    the test AUC mean / std, the seed-0 value (the run comparable across M when other Ms ran one seed) and
    its valid AUC; the command from the markdown page beside it."""
    rows = []
    for path in files:
        report = json.loads(Path(path).read_text())
        config, summary = report["config"], report["summary"]
        md = Path(path).with_suffix(".md")
        command = None
        if md.is_file():
            text = md.read_text()
            if "Produced by `" in text:
                command = text.split("Produced by `", 1)[1].split("`", 1)[0]
        arms = {}
        for arm in ("dlrm", "bahe", "token_level"):
            if arm not in summary:
                continue
            seeds = config["seeds"]
            values = summary[arm]["auc"]["values"]
            valid = summary[arm].get("valid_auc", {}).get("values")
            at0 = seeds.index(0) if 0 in seeds else None
            arms[arm] = {"auc_mean": summary[arm]["auc"]["mean"], "auc_std": summary[arm]["auc"]["std"],
                         "auc_seed0": values[at0] if at0 is not None else None,
                         "valid_auc_seed0": valid[at0] if valid and at0 is not None else None,
                         "wall_s_mean": summary[arm]["wall_seconds"]["mean"]}
        rows.append({"file": str(path), "m": config["preset"]["max_history"], "k": config["preset"]["k"],
                     "steps": config["steps"], "precision": config.get("llm_precision"), "seeds": config["seeds"],
                     "cpu": report.get("machine", {}).get("cpu_model"), "arms": arms, "command": command})
    return sorted(rows, key=lambda r: (r["k"], r["m"]))


# measuring ---------------------------------------------------------------------------------------------

def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def model_config(arm: str, data: Path, store: Path, preset: dict, precision: str):
    """The model config bahe-train builds for ``arm`` from the demo preset's flags (+ the quality bench's)."""
    from bahe.launchers.demo import trainer_flags
    from bahe.launchers.train import build_parser, config_from_args
    from bench.quality_bench import user_token_cap

    argv = ["--data-dir", str(data), "--out", "/nonexistent", "--arm", arm, "--steps", "1", *trainer_flags(preset)]
    argv += ["--store", str(store), "--llm-precision", precision] if arm != "dlrm" else []
    argv += ["--max-user-tokens", str(user_token_cap(preset["max_history"]))] if arm == "token_level" else []
    return config_from_args(build_parser().parse_args(argv)).model


def sample_rows(data: Path, rows: int, seed: int):
    """``rows`` random rows of the train split (fixed seed; a time-ordered split's first rows are its
    shortest histories)."""
    import numpy as np

    from bahe.ctr_data.parquet_io import SampleReader

    table = SampleReader(data / "train.parquet").read_all()
    picks = np.random.default_rng(seed).choice(table.num_rows, size=min(rows, table.num_rows), replace=False)
    return table.take(np.sort(picks))


def build(arm: str, data: Path, store: Path, preset: dict, precision: str, table, batches: int):
    """The arm as the trainer builds it (unsharded, one process) over ``batches`` batches of the demo's size."""
    import torch

    from bahe.ctr_data.parquet_io import SampleReader
    from bahe.model.bahe import BAHETrain
    from bahe.model.behaviour_lookup import load_store_rows
    from bahe.model.factory import build_model
    from bench.efficiency_arms import Arm

    torch.manual_seed(0)
    config = model_config(arm, data, store, preset, precision)
    model, batcher, behaviour_store = build_model(config, SampleReader(data / "train.parquet").schema)
    if behaviour_store is not None:
        load_store_rows(model, behaviour_store)
        model.text_arch.lookup.requires_grad_(False)  # frozen, as the trainer's lr-0 fused table
    train = BAHETrain(model)
    size = preset["batch_size"]
    slices = [table.slice(i * size, size) for i in range(batches)]
    return Arm(arm, train, lambda batch: train(batch)[0], [batcher(t) for t in slices])


def widths(arm_obj, arm: str, preset: dict) -> dict:
    """Per sample: the real positions the arm feeds its LLM layers (efficiency_arms.batch_tokens), and the
    padded widths of its sequences (BAHE: N x M + the item's 1; token_level: the batch's longest user
    and item)."""
    from bench.efficiency_arms import batch_tokens

    if arm == "dlrm":
        return {"real": {"user": 0.0, "item": 0.0}, "widths": [], "padded_per_sample": 0}
    real = batch_tokens(arm_obj, "full")
    features = arm_obj.batches[0].behaviour_features
    if arm == "bahe":
        keys = list(features.keys())
        n = len([key for key in keys if key != "item_text"])
        shape = [preset["max_history"]] * n + [1]
    else:
        shape = [int(features[key].lengths().max()) for key in ("user_tokens", "item_tokens")]
    return {"real": real, "widths": shape, "padded_per_sample": sum(shape)}


def measure(arms: dict, args, token_rounds: int) -> dict:
    """FLOPs, memory, then alternating timed steps of the built arms (efficiency_bench's harness)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from bench.efficiency_bench import timed_step
    from bench.efficiency_setup import ATTENTION_FORMULAS, split_flops, state_bytes, step_peak_bytes

    device = torch.device("cpu")
    cursor = dict.fromkeys(arms, 0)

    def batch(name):
        cursor[name] += 1
        return arms[name].batches[cursor[name] % len(arms[name].batches)]

    out = {}
    for name, arm in arms.items():
        start = time.perf_counter()
        with FlopCounterMode(display=False, custom_mapping=ATTENTION_FORMULAS) as counter:
            arm.step(batch(name), False, device)  # the model autocasts its LLM layers itself (--llm-precision)
        flops = split_flops(counter)
        transient = step_peak_bytes(lambda arm=arm, name=name: arm.step(batch(name), False, device), device)
        state = state_bytes(arm.module, arm.optimizer)
        for _ in range(args.warmup):
            arm.step(batch(name), False, device)
        out[name] = {"flops_per_step": flops["total"], "attention_flops_per_step": flops["attention"],
                     "state_bytes": state["total"], "step_peak_bytes": transient, "peak_bytes": state["total"] + transient,
                     "params": arm.params, "setup_s": time.perf_counter() - start}
    times: dict[str, list[float]] = {name: [] for name in arms}
    for i in range(args.steps):
        for name in round_order(list(arms), i):
            if name == "token_level" and i >= token_rounds:
                continue
            ms, _ = timed_step(arms[name], batch(name), False, device)
            times[name].append(ms / 1e3)
    for name in arms:
        out[name].update(step_s=times[name], median_s=statistics.median(times[name]))
    return out


def token_point(shape: dict, batch: int) -> dict:
    """The per-step shape figures :func:`project_step` reads: analytic FLOPs, padded positions, B x T^2."""
    return {"flops": shape["analytic_flops_per_sample"] * batch, "positions": shape["padded_per_sample"] * batch,
            "quadratic": batch * shape["widths"][0] ** 2}


def measure_history(m: int, args, llm: dict, token_history: list[dict]) -> dict:
    from bahe.launchers.demo import PRESETS
    from bench.quality_bench import prepare

    default_k = PRESETS["cpu"]["k"]
    preset = dict(PRESETS["cpu"], max_history=m, k=args.k)
    data, store = prepare(args.work, preset, PRESETS["cpu"]["max_history"], default_k=default_k)
    table = sample_rows(data, preset["batch_size"] * args.batches, args.seed)
    entry = {"m": m, "data": str(data), "store": str(store), "arms": {}, "skipped": {}}
    built = {}
    for arm in args.arms:
        start = time.perf_counter()
        built[arm] = build(arm, data, store, preset, args.llm_precision, table, args.batches)
        shape = widths(built[arm], arm, preset)
        shape["analytic_flops_per_sample"] = arm_flops_per_sample(arm, llm, args.k, preset["deep_layers"],
                                                                  shape["widths"])
        entry["arms"][arm] = {"shape": shape, "build_s": time.perf_counter() - start}
    if "token_level" in built and token_history:
        point = token_point(entry["arms"]["token_level"]["shape"], preset["batch_size"])
        projection = project_step(token_history, point["flops"], point["positions"], point["quadratic"])
        entry["arms"]["token_level"]["projection"] = projection
        why = fits(projection, args.token_steps + 2 + args.warmup, args.token_budget_s, args.memory_cap_gib * GIB)
        if why:
            entry["skipped"]["token_level"] = why
            del built["token_level"]
            log(f"M={m}: token_level does not fit: {why}")
    log(f"M={m}: measuring {', '.join(built)}")
    try:
        measured = measure(built, args, args.token_steps)
    finally:
        built.clear()
        gc.collect()
    for arm, figures in measured.items():
        entry["arms"][arm]["measured"] = figures
        entry["arms"][arm]["counted_flops_per_sample"] = figures["flops_per_step"] / preset["batch_size"]
    arms = entry["arms"]
    entry["ratios"] = {"bahe_over_dlrm": side_by_side({a: arms[a].get("measured", {}).get("step_s") for a in arms},
                                                      "bahe", "dlrm"),
                       "token_over_bahe": side_by_side({a: arms[a].get("measured", {}).get("step_s") for a in arms},
                                                       "token_level", "bahe")}
    return entry


def gpu_projection(entry: dict, args) -> dict:
    out = {}
    for arm, data in entry["arms"].items():
        flops = data.get("counted_flops_per_sample") or data["shape"]["analytic_flops_per_sample"]
        source = "counted" if data.get("counted_flops_per_sample") else "analytic"
        out[arm] = {"flops_per_sample": flops, "source": source,
                    "gpu_s_per_million": gpu_seconds_per_million(flops, args.gpu_peak_tflops, args.gpu_utilisation)}
    return out


# report -------------------------------------------------------------------------------------------------

def _fmt_s(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.2f} s"


def cost_table(result: dict) -> str:
    batch = result["config"]["batch_size"]
    lines = ["| M | arm | deep-layer positions / sample (padded; real) | GFLOP / step (LLM, analytic) | "
             "step median | x DLRM (medians; paired [range]) | peak MiB (state + step) | demo run (600 steps) | "
             "H100 s / 1M samples (projection) |", "|---|---|---|---|---|---|---|---|---|"]
    for entry in result["histories"]:
        for arm in ARMS:
            if arm not in entry["arms"]:
                continue
            data, shape = entry["arms"][arm], entry["arms"][arm]["shape"]
            real = shape["real"]["user"] + shape["real"]["item"]
            positions = "-" if arm == "dlrm" else f"{shape['padded_per_sample']} ; {real:.0f}"
            measured = data.get("measured")
            gflops = (f"{measured['flops_per_step'] / 1e9:.1f}" if measured else "not run") + \
                f" ({shape['analytic_flops_per_sample'] * batch / 1e9:.1f})"
            if measured:
                ratio = side_by_side({a: entry["arms"][a].get("measured", {}).get("step_s") for a in entry["arms"]},
                                     arm, "dlrm")
                x = "1" if arm == "dlrm" else (f"{ratio['of_medians']:.0f}; {ratio['paired_median']:.0f} "
                                               f"[{ratio['paired_range'][0]:.0f}-{ratio['paired_range'][1]:.0f}]")
                peak = f"{measured['peak_bytes'] / 2**20:.0f} ({measured['state_bytes'] / 2**20:.0f} + " \
                       f"{measured['step_peak_bytes'] / 2**20:.0f})"
                step, demo = _fmt_s(measured["median_s"]), f"{measured['median_s'] * 600 / 60:.1f} min"
            else:
                projection = data.get("projection", {})
                step = f"not run (projected {_fmt_s(projection.get('median_s'))})"
                x, demo = "-", (f"~{projection['median_s'] * 600 / 3600:.0f} h (projected)" if projection else "-")
                peak = f"projected {projection['peak_bytes'] / 2**20:.0f}" if projection else "-"
            gpu = entry["gpu"][arm]
            lines.append(f"| {entry['m']} | {arm} | {positions} | {gflops} | {step} | {x} | {peak} | {demo} | "
                         f"{gpu['gpu_s_per_million']:.3g} ({gpu['source']}) |")
    return "\n".join(lines)


def _auc(arm: dict | None, seeds: list[int]) -> str:
    if not arm:
        return "-"
    text = f"{arm['auc_mean']:.4f}" + (f" +- {arm['auc_std']:.4f}" if len(seeds) > 1 else "")
    extra = ([f"seed 0 {arm['auc_seed0']:.4f}"] if len(seeds) > 1 and arm["auc_seed0"] else []) + \
        ([f"valid {arm['valid_auc_seed0']:.4f}"] if arm.get("valid_auc_seed0") else [])
    return text + (f" ({'; '.join(extra)})" if extra else "")


def quality_table(rows: list[dict]) -> str:
    lines = ["| M | k | steps | precision | seeds | BAHE test AUC (seed 0; valid) | DLRM test AUC (seed 0) | "
             "BAHE - DLRM (seed 0) | BAHE train wall s (CPU) | source |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        bahe, dlrm = r["arms"].get("bahe"), r["arms"].get("dlrm")

        gap = f"{bahe['auc_seed0'] - dlrm['auc_seed0']:+.4f}" if bahe and dlrm and bahe["auc_seed0"] and dlrm["auc_seed0"] else "-"
        wall = f"{bahe['wall_s_mean']:.0f} ({r['cpu']})" if bahe else "-"
        lines.append(f"| {r['m']} | {r['k']} | {r['steps']} | {r['precision']} | {r['seeds']} | {_auc(bahe, r['seeds'])} | "
                     f"{_auc(dlrm, r['seeds'])} | {gap} | {wall} | [{Path(r['file']).name}]({Path(r['file']).name}) |")
    commands = [f"* M = {r['m']}, k = {r['k']}: `{r['command']}`" for r in rows if r["command"]]
    return "\n".join(lines + ([""] + commands if commands else []))


def findings(result: dict, demo_steps: int = 600, fits_minutes: float = 30.0) -> list[str]:
    """The page's summary lines, from the figures: the BAHE / DLRM ratio per M, where the token arm stopped
    fitting and why, where a BAHE demo run (``demo_steps`` at the measured step) passes ``fits_minutes``, and
    the H100 projection's token / BAHE FLOP ratio at the largest M."""
    entries = [e for e in result["histories"] if "arms" in e]
    out = []
    ratios = [(e["m"], e["ratios"]["bahe_over_dlrm"]) for e in entries if e["ratios"]["bahe_over_dlrm"]["of_medians"]]
    if ratios:
        out.append("BAHE / DLRM-only step time (ratio of medians; median of paired rounds): "
                   + ", ".join(f"M = {m}: {r['of_medians']:.0f}x; {r['paired_median']:.0f}x" for m, r in ratios) + ".")
    token = [(e["m"], e["ratios"]["token_over_bahe"]) for e in entries if e["ratios"]["token_over_bahe"]["of_medians"]]
    if token:
        out.append("token-level / BAHE step time: " + ", ".join(f"M = {m}: {r['of_medians']:.0f}x" for m, r in token) + ".")
    skipped = [(e["m"], e["skipped"]["token_level"]) for e in entries if "token_level" in e.get("skipped", {})]
    if skipped:
        out.append(f"The token-level arm stops fitting at M = {skipped[0][0]}: {skipped[0][1]} (projected from the Ms "
                   "it ran at; not run from there on).")
    slow = [e["m"] for e in entries if "measured" in e["arms"].get("bahe", {})
            and e["arms"]["bahe"]["measured"]["median_s"] * demo_steps > fits_minutes * 60]
    if slow:
        out.append(f"BAHE's {demo_steps}-step demo run passes {fits_minutes:.0f} min of training on these cores from "
                   f"M = {slow[0]} (one rank's measured step x {demo_steps}; evaluation not counted).")
    last = entries[-1] if entries else None
    if last and "bahe" in last["arms"]:
        shape = last["arms"]["bahe"]["shape"]
        real = shape["real"]["user"] + shape["real"]["item"]
        out.append(f"BAHE's deep layer runs over N x M padded positions whatever a user's history: at M = {last['m']}, "
                   f"{shape['padded_per_sample']} a sample for {real:.0f} real ones in these batches (the FLOPs counted "
                   "match the padded count).")
    if last and {"bahe", "token_level"} <= set(last.get("gpu", {})):
        gpu = last["gpu"]
        batch = result["config"]["batch_size"]
        per_step = {arm: gpu[arm]["gpu_s_per_million"] * batch / 1e6 * 1e3 for arm in ("bahe", "token_level")}
        out.append(f"H100 projection at M = {last['m']}: token-level {gpu['token_level']['flops_per_sample'] / 1e9:.0f} "
                   f"GFLOP a sample ({gpu['token_level']['source']}) vs BAHE {gpu['bahe']['flops_per_sample'] / 1e9:.2f} "
                   f"({gpu['bahe']['source']}), {gpu['token_level']['flops_per_sample'] / gpu['bahe']['flops_per_sample']:.0f}x; "
                   f"a batch-{batch} step >= {per_step['token_level']:.1f} ms vs >= {per_step['bahe']:.2f} ms of compute.")
    return out


def plot(result: dict, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no PNG"
    fig, axes = plt.subplots(1, 2 if result.get("quality") else 1, figsize=(9 if result.get("quality") else 5, 3.4))
    ax = axes[0] if result.get("quality") else axes
    for arm, colour in zip(ARMS, ("#999999", "#3377bb", "#cc7744")):
        points = [(e["m"], e["arms"][arm]["measured"]["median_s"]) for e in result["histories"]
                  if "measured" in e["arms"].get(arm, {})]
        if points:
            ax.plot(*zip(*points), marker="o", color=colour, label=arm)
        projected = [(e["m"], e["arms"][arm]["projection"]["median_s"]) for e in result["histories"]
                     if arm in e.get("skipped", {}) and "projection" in e["arms"][arm]]
        if projected:
            ax.plot(*zip(*(points[-1:] + projected)), linestyle="--", marker="x", color=colour,
                    label=f"{arm} (projected)")
    ms = [e["m"] for e in result["histories"]]
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(ms, [str(m) for m in ms])
    ax.minorticks_off()
    ax.set_xlabel("M, behaviours per sequence type")
    ax.set_ylabel("train step s (batch 64, 1 CPU thread)")
    ax.legend(fontsize=7)
    if result.get("quality"):
        series = {}
        for r in result["quality"]:
            for arm in ("bahe", "dlrm"):
                if arm in r["arms"] and r["arms"][arm]["auc_seed0"] is not None:
                    series.setdefault((arm, r["k"], r["precision"], r["steps"]), []).append((r["m"], r["arms"][arm]["auc_seed0"]))
        for (arm, k, precision, steps), points in sorted(series.items()):
            words = {"auto": "fp32"}.get(precision, precision)  # these runs are CPU ones: auto = fp32
            axes[1].plot(*zip(*sorted(points)), marker="o", label=f"{arm} k={k} {words} {steps} steps",
                         linestyle="-" if arm == "bahe" else ":")
        axes[1].set_xscale("log")
        axes[1].set_xticks(ms, [str(m) for m in ms])
        axes[1].minorticks_off()
        axes[1].set_xlabel("M")
        axes[1].set_ylabel("test AUC, seed 0")
        axes[1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def write(result: dict, out: Path, plots: bool) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    note = plot(result, out.with_suffix(".png")) if plots else None
    c = result["config"]
    text = [f"# History length M: step cost and quality\n\nProduced by `{result['command']}` "
            f"({result['machine']['cpu_model']}, {result['machine']['cpu_count']} CPUs, "
            f"{c['threads']} torch thread; LLM layers {c['llm_precision']}; k = {c['k']}, "
            f"batch {c['batch_size']}, {c['steps']} timed steps per arm, the token arm {c['token_steps']}; load average "
            f"{result['machine']['loadavg_start'][0]:.1f} at the start, {result['machine'].get('loadavg_end', [0])[0]:.1f} "
            "at the end: other work shared the cores, which the alternating steps spread over every arm).\n",
            "## Step cost\n", cost_table(result), "", *[f"* {line}" for line in findings(result)], "",
            f"Projection: FLOPs a sample / ({c['gpu_peak_tflops']:g} TFLOP/s x {c['gpu_utilisation']:g}), an H100's dense "
            "bf16 peak at an assumed sustained share; compute-bound only (launches, input and the optimizer not counted), "
            "so a lower bound, and a loose one for BAHE's small steps. Counted = FlopCounterMode over the step (matmuls "
            "and attention); analytic = the bench's layer model (the arm did not run).", ""]
    if result.get("quality"):
        retabulated = f"Tabulated by `{result['quality_command']}`.\n" if result.get("quality_command") else ""
        text += ["## Quality\n", retabulated + quality_table(result["quality"]), ""]
    if plots and note is None:
        text += [f"![step cost and quality per M]({out.with_suffix('.png').name})", ""]
    out.with_suffix(".md").write_text("\n".join(text) + "\n" + result.get("notes", ""))


def retabulate(out: Path, quality: list[Path], argv: list[str]) -> int:
    """``--quality-only``: the quality table of ``out`` rebuilt from ``quality`` (a training run per M costs up to an
    hour here, the step timings ~15 min: each is redone only when its own inputs change)."""
    if not out.is_file():
        raise SystemExit(f"--quality-only: {out} does not exist; run the bench without it first")
    result = json.loads(out.read_text())
    result["quality"] = quality_rows(quality)
    result["config"]["quality"] = [str(q) for q in quality]
    result["quality_command"] = "python -m bench.history_length_bench " + shlex.join(argv)
    write(result, out, plots=True)
    print(quality_table(result["quality"]))
    return 0


def llm_config(name: str | None) -> dict:
    from bahe.embeddings.pretrained import DEFAULT_MODEL, resolve_model_dir

    return json.loads((resolve_model_dir(name or DEFAULT_MODEL) / "config.json").read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.history_length_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--histories", type=int, nargs="+", default=list(HISTORIES), help="M values (default 5 20 50 100)")
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    p.add_argument("--k", type=int, default=4, help="the store's shallow layers (default 4: the M = 5 / 20 quality "
                   "runs' k in docs/bench/quality*.json; the demo now uses 8, which only the token arm feels)")
    p.add_argument("--llm-precision", choices=("auto", "bf16", "fp32"), default="bf16")
    p.add_argument("--steps", type=int, default=7, help="timed steps per arm and M (default 7)")
    p.add_argument("--token-steps", type=int, default=3, help="timed steps of the token arm (default 3)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batches", type=int, default=4, help="distinct batches, cycled (default 4)")
    p.add_argument("--token-budget-s", type=float, default=360.0,
                   help="the token arm runs at an M only if its projected steps (counted, memory, warm-up, timed) "
                        "fit this (default 360 s)")
    p.add_argument("--memory-cap-gib", type=float, default=6.0,
                   help="... and its projected peak this (default 6 GiB: 2 ranks of it on a shared 23 GiB machine)")
    p.add_argument("--gpu-peak-tflops", type=float, default=H100_BF16_TFLOPS,
                   help=f"the projection's GPU peak (default {H100_BF16_TFLOPS}: H100 SXM dense bf16)")
    p.add_argument("--gpu-utilisation", type=float, default=GPU_UTILISATION,
                   help=f"the projection's sustained share of that peak (default {GPU_UTILISATION})")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: one rank of the quality runs)")
    p.add_argument("--seed", type=int, default=0, help="which train rows make the batches")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "history_length", help="data and stores (reused)")
    p.add_argument("--quality", type=Path, nargs="*", default=[],
                   help="bench/quality_bench.py JSON files to tabulate per M (test AUC, selected on valid)")
    p.add_argument("--quality-only", action="store_true",
                   help="time nothing: re-tabulate --quality into the existing --out (its step-cost measurements kept)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "bench" / "history_length.json")
    args = p.parse_args(argv)
    if args.quality_only:
        return retabulate(args.out, args.quality, argv if argv is not None else sys.argv[1:])

    import torch

    from bench.machine import machine, versions

    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    llm = llm_config(None)
    from bahe.launchers.demo import PRESETS

    command = "python -m bench.history_length_bench " + shlex.join(argv if argv is not None else sys.argv[1:])
    result = {"command": command.strip(), "machine": machine(), "versions": versions(),
              "config": {**{key: (str(v) if isinstance(v, Path) else v) for key, v in vars(args).items()},
                         "quality": [str(q) for q in args.quality], "batch_size": PRESETS["cpu"]["batch_size"],
                         "deep_layers": PRESETS["cpu"]["deep_layers"], "llm": {key: llm[key] for key in (
                             "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                             "num_hidden_layers")}},
              "bf16_matmul_gflops": None, "histories": []}
    from bench.efficiency_setup import matmul_rate

    result["bf16_matmul_gflops"] = matmul_rate(torch.device("cpu"), torch.bfloat16, size=1024)
    token_history: list[dict] = []  # the token arm's measured Ms, for the projection to the next
    for m in args.histories:
        start = time.perf_counter()
        try:
            entry = measure_history(m, args, llm, token_history)
        except Exception as err:  # noqa: BLE001 -- an OOM at one M costs that M, not the run
            entry = {"m": m, "status": f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"}
            log(f"M={m} failed: {entry['status']}\n{traceback.format_exc(limit=4)}")
            result.setdefault("failed", []).append(entry)
            continue
        entry["seconds"] = time.perf_counter() - start
        entry["gpu"] = gpu_projection(entry, args)
        token = entry["arms"].get("token_level", {})
        if "measured" in token:
            token_history.append({**token_point(token["shape"], result["config"]["batch_size"]),
                                  **{key: token["measured"][key] for key in ("median_s", "state_bytes", "step_peak_bytes")}})
        result["histories"].append(entry)
        for arm, data in entry["arms"].items():
            if "measured" in data:
                log(f"M={m} {arm}: {_fmt_s(data['measured']['median_s'])}/step, "
                    f"{data['measured']['flops_per_step'] / 1e9:.1f} GFLOP, peak {data['measured']['peak_bytes'] / 2**20:.0f} MiB")
        result["seconds"] = time.perf_counter() - started
        result["machine"]["loadavg_end"] = os.getloadavg()
        result["quality"] = quality_rows(args.quality)
        write(result, args.out, plots=False)  # after every M: a killed run keeps what it measured
    write(result, args.out, plots=True)
    print(cost_table(result))
    if result["quality"]:
        print(quality_table(result["quality"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
