"""AUC_d on MovieLens-100K: a downstream CTR model that takes a trained BAHE run's text features as input,
against the plain DLRM-only arm, over several seeds.

The paper's AUC_d asks whether BAHE's learned text features help a CTR model other than BAHE itself. The
text features a BAHE run exports (serving/features.py) are what its text arch computes from a sample's
own behaviours and item text. So the downstream model is a DLRM whose interaction also takes those N + 1
features, computed per row by the BAHE run's text arch, FROZEN (``bahe-train --frozen-text-from RUN``,
training/frozen_text.py); its ID tables, dense and over arch train from the seed, exactly as the DLRM-only
arm's. For each seed:

1. BAHE (``--arm bahe``), the quality bench's run (bench/quality_bench.py: same data, store and command);
2. DLRM-only (``--arm dlrm``), the quality bench's run too;
3. the downstream model: ``--arm bahe --frozen-text-from`` that seed's BAHE run, the same seed.

Every run takes the `make demo` preset's trainer flags (launchers/demo.py ``trainer_flags``: the same step
budget, batch, head and selection of the best checkpoint by valid AUC) on 2 local gloo ranks. A run folder
that holds metrics.json is reused, so quality-bench runs copied into the work folder count.

  python -m bench.downstream_bench                       # 3 seeds: about 35 min on 2 CPU cores
  python -m bench.downstream_bench --seeds 0 --steps 50 --out /tmp/d.json   # a quick look

Writes docs/bench/downstream.json (machine, versions, config, every run's metrics) and a markdown table
beside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("bahe", "dlrm", "downstream")
WORDS = {"bahe": "BAHE", "dlrm": "DLRM-only", "downstream": "downstream (DLRM + frozen BAHE text features)"}


def downstream_name(seed: int, steps: int) -> str:
    return f"downstream-seed{seed}-steps{steps}"


def train_downstream(seed: int, steps: int, data: Path, store: Path, source: Path, run: Path, preset: dict) -> dict:
    """The downstream model of one seed: the quality bench's BAHE command with the source run's text arch
    frozen (reused when the run folder holds metrics.json; an unfinished one resumes from its checkpoint)."""
    from bench.quality_bench import train

    finished = (run / "metrics.json").is_file()
    metrics = train("bahe", seed, steps, data, store, run, preset, extra_flags=("--frozen-text-from", str(source)))
    if not finished:  # trained now: its metrics say where the frozen text arch came from
        metrics["frozen_text_from"] = json.loads((run / "run_config.json").read_text())["frozen_text_from"]
        (run / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def trained_elsewhere(work: Path, runs: dict[str, Path]) -> dict[str, str]:
    """Runs (name -> folder) trained on another work folder's data (a quality-bench run copied in): the data
    folder their run_config.json names, when it is not this bench's."""
    found = {}
    for name, run in runs.items():
        data_dir = json.loads((run / "run_config.json").read_text()).get("defaults", {}).get("--data-dir")
        if data_dir and Path(data_dir).resolve() != (work / "data").resolve():
            found[name] = data_dir
    return found


def summarise(per_seed: list[dict]) -> dict:
    """Per arm: mean of test and valid AUC; AUC_d - DLRM-only (and BAHE - DLRM-only) per seed with mean,
    min and max. ``per_seed``: [{"seed", "bahe": metrics, "dlrm": metrics, "downstream": metrics}]."""
    def spread(values: list[float]) -> dict:
        return {"mean": statistics.fmean(values), "min": min(values), "max": max(values), "values": values}

    out = {arm: {split: spread([s[arm][split]["auc"] for s in per_seed]) for split in ("test", "valid")}
           for arm in ARMS}
    for arm in ("downstream", "bahe"):
        out[f"{arm}_minus_dlrm"] = {split: spread([s[arm][split]["auc"] - s["dlrm"][split]["auc"] for s in per_seed])
                                    for split in ("test", "valid")}
    return out


def table(per_seed: list[dict], summary: dict, steps: int) -> str:
    seeds = [s["seed"] for s in per_seed]
    lines = [f"MovieLens-100K time split, {steps} steps x 2 ranks x the demo batch per run, best checkpoint by "
             f"valid AUC, seeds {seeds}; AUC_d = test AUC of the downstream model", "",
             "| seed | BAHE test (valid) | DLRM-only test (valid) | downstream = AUC_d test (valid) | "
             "AUC_d - DLRM-only test (valid) | BAHE - DLRM-only test |", "|---|---|---|---|---|---|"]

    def pair(metrics: dict) -> str:
        return f"{metrics['test']['auc']:.4f} ({metrics['valid']['auc']:.4f})"

    for s in per_seed:
        gap = {split: s["downstream"][split]["auc"] - s["dlrm"][split]["auc"] for split in ("test", "valid")}
        lines.append(f"| {s['seed']} | {pair(s['bahe'])} | {pair(s['dlrm'])} | {pair(s['downstream'])} | "
                     f"{gap['test']:+.4f} ({gap['valid']:+.4f}) | "
                     f"{s['bahe']['test']['auc'] - s['dlrm']['test']['auc']:+.4f} |")
    mean = {arm: f"{summary[arm]['test']['mean']:.4f} ({summary[arm]['valid']['mean']:.4f})" for arm in ARMS}
    d, b = summary["downstream_minus_dlrm"], summary["bahe_minus_dlrm"]
    lines.append(f"| mean | {mean['bahe']} | {mean['dlrm']} | {mean['downstream']} | {d['test']['mean']:+.4f} "
                 f"({d['valid']['mean']:+.4f}) | {b['test']['mean']:+.4f} |")
    lines += ["", f"AUC_d - DLRM-only on test: {d['test']['mean']:+.4f} (min {d['test']['min']:+.4f}, max "
                  f"{d['test']['max']:+.4f} over seeds); BAHE - DLRM-only: {b['test']['mean']:+.4f} (min "
                  f"{b['test']['min']:+.4f}, max {b['test']['max']:+.4f})"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from bahe.launchers.demo import PRESETS
    from bench import quality_bench as quality

    p = argparse.ArgumentParser(prog="python -m bench.downstream_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None, help="the step budget of every run (default: the demo's)")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "downstream_bench",
                   help="data, store and runs (reused; the quality bench's layout, so its runs may be copied in)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "bench" / "downstream.json")
    args = p.parse_args(argv)
    default_history = PRESETS["cpu"]["max_history"]
    preset = dict(PRESETS["cpu"])
    steps = args.steps or preset["steps"]
    data, store = quality.prepare(args.work, preset, default_history)
    per_seed = []
    for seed in args.seeds:
        runs = {arm: args.work / quality.run_name(arm, seed, steps, "auto") for arm in ("bahe", "dlrm")}
        result = {"seed": seed, **{arm: quality.train(arm, seed, steps, data, store, run, preset)
                                   for arm, run in runs.items()}}
        result["downstream"] = train_downstream(seed, steps, data, store, runs["bahe"],
                                                args.work / downstream_name(seed, steps), preset)
        per_seed.append(result)
        print(f"seed {seed}: test AUC BAHE {result['bahe']['test']['auc']:.4f}, DLRM-only "
              f"{result['dlrm']['test']['auc']:.4f}, downstream {result['downstream']['test']['auc']:.4f}", flush=True)
    summary = summarise(per_seed)
    elsewhere = trained_elsewhere(args.work, {f"{arm} seed {s['seed']}": args.work / (
        downstream_name(s["seed"], steps) if arm == "downstream" else quality.run_name(arm, s["seed"], steps, "auto"))
        for s in per_seed for arm in ARMS})

    from bench.machine import machine, versions

    host = machine()
    report = {"machine": host, "versions": versions(),
              "config": {"preset": preset, "steps": steps, "seeds": args.seeds, "ranks": 2, "llm_precision": "auto",
                         "work": str(args.work)}, "trained_elsewhere": elsewhere,
              "summary": summary,
              "runs": [{"seed": s["seed"], **{arm: {key: s[arm].get(key) for key in
                                                     ("valid", "test", "selected_step", "wall_seconds",
                                                      "frozen_text_from")} for arm in ARMS}} for s in per_seed]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    text = table(per_seed, summary, steps)
    if elsewhere:
        text += ("\n\nReused runs trained by an earlier call on another work folder (the same MovieLens split and "
                 "store contents, the same command), copied in: " +
                 ", ".join(f"{name} (data {folder})" for name, folder in elsewhere.items()))
    command = " ".join(["python -m bench.downstream_bench", *(argv if argv is not None else sys.argv[1:])])
    where = (f"{host['cpu_model']}, {host['cpu_affinity']} of {host['cpu_count']} CPUs, torch {report['versions']['torch']}, "
             f"{host['platform']}, load average at start {host['loadavg_start'][0]:.1f}")
    args.out.with_suffix(".md").write_text(
        f"# AUC_d on MovieLens-100K: DLRM + BAHE's frozen text features vs DLRM-only\n\n"
        f"Produced by `{command}` ({where}).\n\n{text}\n\n"
        "The downstream model is a DLRM (the DLRM-only arm's ID tables, dense and over arch, trained from the "
        "seed) whose pairwise interaction also takes the N + 1 text features of that seed's BAHE run, computed "
        "per row by the run's text arch loaded and frozen (`bahe-train --arm bahe --frozen-text-from RUN`, "
        "training/frozen_text.py): the features bahe-export writes for the run. LLM layers in fp32.\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
