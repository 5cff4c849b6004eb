"""The daily loop on real data: MovieLens-100K cut into periods, warm-started updates vs from-scratch retrains.

After a warm-up (the first ``--warmup`` of the ratings by time), the ratings are cut into periods of
``--period`` (``bahe-data slices``). For every seed and every period p:

(a) the daily chain: ``bahe-daily run`` on period p alone -- refresh the store with the period's new
    texts, warm-start from the previous period's published model, train on the period's rows;
(b) a retrain from scratch on every row so far (``upto-PP``), with the same flags and the same store
    version, run right after (a) so both see the same texts.

Both select their checkpoint on the period's held-out valid rows and are tested on the NEXT period. The
update's cost is the chain's refresh + train seconds; the retrain's is its bahe-train's wall time.
Period 0 is the warm-up, trained from scratch by both (it is not compared).

(c) a DLRM-only retrain (``--arm dlrm``, no text; same rows and flags) beside (b), and on the rows of the
    tested period whose item is NEW (in no training row so far: not in ``upto-PP/train``) the AUC of the
    update, the retrain and the DLRM-only model, with rows, a 90% bootstrap interval each
    (training/segments.py) and paired bootstraps of update - retrain and update - DLRM-only.

  python -m bench.daily_bench                  # 3 seeds x 4 periods of 14 days: about 2 h on 2 CPU cores
  python -m bench.daily_bench --seeds 0 --max-slices 1 --epochs 0.2 --out /tmp/daily.json   # a quick look

Writes docs/bench/daily.json (every cell), docs/bench/daily.md's table (between its markers) and docs/bench/daily.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# A warm-started update continues a trained model: a third of the from-scratch learning rates, chosen on the
# VALID rows of one period (seed 0, period 2: valid AUC 0.6427 against 0.6364 with the from-scratch rates and
# 0.6380 with --init-optimizer); the retrain keeps the from-scratch rates.
UPDATE_FLAGS = ["--dense-lr", "1e-3", "--llm-lr", "3e-4", "--sparse-lr", "0.015"]
# The store's shallow layers: the figures in docs/daily.md were measured with k = 4, before the demo's k became 8.
STORE_K = 4


def train_flags(epochs: float) -> list[str]:
    """The demo preset's trainer flags (launchers/demo.py), by epochs instead of steps: the same every day."""
    from bahe.launchers.demo import PRESETS, trainer_flags

    return ["--epochs", str(epochs), *trainer_flags(PRESETS["cpu"])]


def _run(command: list[str], log: Path) -> float:
    """Run ``command`` with its output in ``log``; returns its wall seconds; raises with the log's tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if done.returncode not in (0, 3):  # 3: the regression guard kept the day's model unpublished
        raise RuntimeError(f"{' '.join(command[:4])} ... failed; the end of {log}:\n{log.read_text()[-3000:]}")
    return seconds


def prepare(work: Path, args: argparse.Namespace) -> tuple[Path, list[str]]:
    from bahe.ctr_data.movielens import MovieLensConfig, write_movielens
    from bahe.ctr_data.time_slices import SliceConfig, parse_period, write_time_slices

    data, days = work / "data", work / "days"
    if not (data / "test.parquet").is_file():
        write_movielens(MovieLensConfig(), data)
    if not (days / "slices.json").is_file():
        write_time_slices([data / f"{s}.parquet" for s in ("train", "valid", "test")], days,
                          SliceConfig(period_s=parse_period(args.period), warmup=args.warmup,
                                      max_slices=args.max_slices))
    slices = json.loads((days / "slices.json").read_text())["slices"]
    return days, slices[:args.max_slices + 1]  # the warm-up and the first --max-slices periods


def run_seed(work: Path, days: Path, slices: list[str], seed: int, args: argparse.Namespace) -> list[dict]:
    home, cells = work / f"seed-{seed}", []
    flags = [*train_flags(args.epochs), "--seed", str(seed)]
    for p, day in enumerate(slices):
        day_flags = flags + (UPDATE_FLAGS if p else [])  # the warm-up trains from scratch like the retrain
        wall = _run([sys.executable, "-m", "bahe.launchers.daily", "run", "--home", str(home), "--day", day,
                     "--data", str(days / day), "--nproc", str(args.nproc), "--k", str(STORE_K), "--", *day_flags],
                    home / "logs" / f"{day}.log")
        report = json.loads((home / "reports" / f"{day}.json").read_text())
        done = json.loads((home / "runs" / day / "day.json").read_text())["done"]
        published = report["status"] == "published"
        cell = {"seed": seed, "period": p, "day": day, "status": report["status"],
                # what serves after the day: today's model, or yesterday's when the guard kept today's
                "served": report["new"] if published or not report.get("yesterday") else report["yesterday"],
                "daily": {"valid": report["new"]["valid"], "test": report["new"]["test"],
                          "update_seconds": round(done["refresh"]["seconds"] + done["train"]["seconds"], 1),
                          "chain_seconds": round(wall, 1), "new_texts": report["refresh"]["new_texts"],
                          "new_occurrence_share": report["refresh"]["new_occurrence_share"],
                          "train_rows": report["rows"]["train"]}}
        if p:  # the warm-up is trained from scratch by both: compared from period 1 on
            run = work / f"seed-{seed}" / "retrain" / day
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                       str(args.nproc), "-m", "bahe.launchers.train", "--data-dir", str(days / day.replace("slice", "upto")),
                       "--out", str(run), "--store", str(home / "store"), *flags]
            if not (run / "metrics.json").is_file():
                seconds = _run(command, run.with_suffix(".log"))
                (run / "wall_seconds").write_text(f"{seconds:.1f}")
            metrics = json.loads((run / "metrics.json").read_text())
            cell["retrain"] = {"valid": metrics["valid"], "test": metrics["test"],
                               "seconds": float((run / "wall_seconds").read_text()),
                               "train_rows": _rows(days / day.replace("slice", "upto"))}
            dlrm = work / f"seed-{seed}" / "dlrm" / day  # (c): no text, the retrain's rows and flags
            if not (dlrm / "metrics.json").is_file():
                dlrm_command = [*command[:command.index("--out")], "--out", str(dlrm), "--arm", "dlrm", *flags]
                seconds = _run(dlrm_command, dlrm.with_suffix(".log"))
                (dlrm / "wall_seconds").write_text(f"{seconds:.1f}")
            metrics = json.loads((dlrm / "metrics.json").read_text())
            cell["dlrm"] = {"valid": metrics["valid"], "test": metrics["test"],
                            "seconds": float((dlrm / "wall_seconds").read_text())}
        cells.append(cell)
        print(json.dumps({k: cell[k] for k in ("seed", "day", "status")} | {
            "daily_test_auc": round(cell["daily"]["test"]["auc"], 4),
            "retrain_test_auc": cell.get("retrain") and round(cell["retrain"]["test"]["auc"], 4),
            "update_s": cell["daily"]["update_seconds"], "retrain_s": cell.get("retrain", {}).get("seconds")}),
            flush=True)
    return cells


def _rows(folder: Path) -> int:
    from bahe.ctr_data.parquet_io import SampleReader

    return SampleReader(folder / "train.parquet").num_rows


def summarize(cells: list[dict]) -> dict:
    """Per period: mean test AUC of both, mean difference, mean time ratio; the targets at the last period."""
    periods = sorted({c["period"] for c in cells if "retrain" in c})
    rows = []
    for p in periods:
        here = [c for c in cells if c["period"] == p]
        diff = [c["daily"]["test"]["auc"] - c["retrain"]["test"]["auc"] for c in here]
        ratio = [c["daily"]["update_seconds"] / c["retrain"]["seconds"] for c in here]
        rows.append({"period": p, "day": here[0]["day"], "seeds": len(here),
                     "daily_test_auc": statistics.mean(c["daily"]["test"]["auc"] for c in here),
                     "served_test_auc": statistics.mean(c["served"]["test"]["auc"] for c in here),
                     "served_difference": statistics.mean(c["served"]["test"]["auc"] - c["retrain"]["test"]["auc"]
                                                          for c in here),
                     "retrain_test_auc": statistics.mean(c["retrain"]["test"]["auc"] for c in here),
                     "auc_difference": statistics.mean(diff), "auc_difference_min": min(diff),
                     "update_seconds": statistics.mean(c["daily"]["update_seconds"] for c in here),
                     "retrain_seconds": statistics.mean(c["retrain"]["seconds"] for c in here),
                     "time_ratio": statistics.mean(ratio),
                     "new_texts": statistics.mean(c["daily"]["new_texts"] for c in here),
                     "new_occurrence_share": statistics.mean(c["daily"]["new_occurrence_share"] for c in here),
                     "published": sum(c["status"] == "published" for c in here)})
    last = rows[-1] if rows else None
    targets = last and {"time_ratio_at_most_0.2": last["time_ratio"] <= 0.2,
                        "auc_within_0.002_or_better": last["auc_difference"] >= -0.002,
                        "served_auc_within_0.002_or_better": last["served_difference"] >= -0.002}
    return {"periods": rows, "last": last, "targets_met": targets}


def rank_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC by the rank-sum formula (ties share their mean rank): the number torchmetrics' AUROC gives."""
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], len(scores)]
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)  # 1-based mean rank of each tie group
    positives = labels.astype(bool)
    n_pos, n_neg = positives.sum(), (~positives).sum()
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def paired_bootstrap(scores: dict[str, list[np.ndarray]], labels: np.ndarray, resamples: int = 2000,
                     seed: int = 0) -> dict:
    """How sure the last period's AUC difference is: test rows resampled with replacement (the same resample for
    every seed and both models), the mean over seeds of AUC(a) - AUC(b) per resample -> its 5th/95th percentiles.

    ``scores``: {"a": [per-seed scores], "b": [...]} on the same test rows, ``labels`` their labels."""
    rng = np.random.default_rng(seed)
    n, diffs = len(labels), []
    for _ in range(resamples):
        rows = rng.integers(0, n, n)
        diffs.append(np.mean([rank_auc(a[rows], labels[rows]) - rank_auc(b[rows], labels[rows])
                              for a, b in zip(scores["a"], scores["b"])]))
    point = float(np.mean([rank_auc(a, labels) - rank_auc(b, labels) for a, b in zip(scores["a"], scores["b"])]))
    low, high = np.percentile(diffs, [5, 95])
    return {"difference": point, "ci90": [float(low), float(high)], "resamples": resamples, "rows": int(n),
            "seeds": len(scores["a"])}


def score_file(run: Path, data: Path, out: Path, column: str = "logit") -> np.ndarray:
    """The run's test scores (``bahe-predict``, best checkpoint; ``column`` logit or score), cached in ``out``."""
    import pyarrow.parquet as pq

    if not out.is_file():
        _run([sys.executable, "-m", "bahe.launchers.predict", "--run", str(run), "--data", str(data / "test.parquet"),
              "--out", str(out), "--bootstrap", "0"], out.with_suffix(".log"))
    return pq.read_table(out, columns=[column]).column(column).to_numpy()


MODELS = {"daily": "update", "retrain": "retrain", "dlrm": "DLRM-only"}


def new_item_rows(items: np.ndarray, earlier: np.ndarray) -> np.ndarray:
    """Which rows' item is new: in none of the ``earlier`` training rows' items (a bool mask over ``items``)."""
    return ~np.isin(np.asarray(items, dtype=np.int64), np.asarray(earlier, dtype=np.int64))


def new_item_cells(work: Path, days: Path, cells: list[dict]) -> None:
    """(c) per compared cell: ``cell["new_items"]`` -- the next period's test rows whose item is in no row of
    ``upto-PP/train`` (every row before the period's valid rows: all that the retrain, and more than the
    chain, trained on); rows, items, and each model's AUC / log loss with a 90% bootstrap interval
    (training/segments.py's segment_entry, 200 resamples); the scores are kept for the paired bootstraps."""
    import pyarrow.parquet as pq

    from bahe.training.segments import segment_entry

    for c in cells:
        if "retrain" not in c:
            continue
        day, home = c["day"], work / f"seed-{c['seed']}"
        test = pq.read_table(days / day / "test.parquet", columns=["item_id", "label"])
        earlier = pq.read_table(days / day.replace("slice", "upto") / "train.parquet", columns=["item_id"])
        new = new_item_rows(test.column("item_id").to_numpy(), earlier.column("item_id").to_numpy())
        labels = test.column("label").to_numpy()
        cache = work / "scores" / f"seed-{c['seed']}"
        cache.mkdir(parents=True, exist_ok=True)
        runs = {"daily": home / "runs" / day / "train", "retrain": home / "retrain" / day, "dlrm": home / "dlrm" / day}
        scores = {m: score_file(run, days / day, cache / f"{day}-{m}.parquet", "score") for m, run in runs.items()}
        c["new_items"] = {"rows": int(new.sum()), "share": float(new.mean()),
                          "items": len(np.unique(test.column("item_id").to_numpy()[new])),
                          "positives": int(labels[new].sum()),
                          **{m: segment_entry(scores[m][new], labels[new], bootstrap=200, confidence=0.9,
                                              rng=np.random.default_rng(c["seed"])) for m in MODELS}}
        retrain_cold = c["retrain"]["test"].get("segments", {}).get("item_popularity", {}).get("cold")
        if retrain_cold is not None and retrain_cold["rows"] != c["new_items"]["rows"]:
            raise RuntimeError(f"{day}: {c['new_items']['rows']} new-item rows, but the retrain's cold segment (the "
                               f"same train split) has {retrain_cold['rows']}")
        c["_new_scores"] = {m: v[new] for m, v in scores.items()} | {"labels": labels[new]}


def new_item_summary(cells: list[dict]) -> list[dict]:
    """Per period: the new-item rows, each model's mean AUC over the seeds (and its interval bounds, averaged),
    and paired bootstraps (the same resampled rows for every seed and model) of update - retrain and
    update - DLRM-only."""
    rows = []
    for p in sorted({c["period"] for c in cells if "new_items" in c}):
        here = sorted((c for c in cells if c["period"] == p and "new_items" in c), key=lambda c: c["seed"])
        first = here[0]["new_items"]
        row = {"period": p, "day": here[0]["day"], "seeds": len(here), "rows": first["rows"], "items": first["items"],
               "share": first["share"], "positives": first["positives"]}
        for m in MODELS:
            entries = [c["new_items"][m] for c in here]
            row[f"{m}_auc"] = None if any(e["auc"] is None for e in entries) else \
                statistics.mean(e["auc"] for e in entries)
            intervals = [e["auc_interval"] for e in entries]
            row[f"{m}_auc_interval"] = None if None in intervals else [statistics.mean(i[k] for i in intervals)
                                                                          for k in (0, 1)]
        labels = here[0]["_new_scores"]["labels"]
        if first["rows"] and 0 < first["positives"] < first["rows"]:
            for other in ("retrain", "dlrm"):
                row[f"daily_minus_{other}"] = paired_bootstrap(
                    {"a": [c["_new_scores"]["daily"] for c in here], "b": [c["_new_scores"][other] for c in here]},
                    labels, resamples=1000)
        rows.append(row)
    return rows


def last_period_uncertainty(work: Path, days: Path, cells: list[dict]) -> dict:
    """Paired bootstrap of update - retrain and served - retrain on the last period's test rows, over the seeds."""
    import pyarrow.parquet as pq

    last = max(c["period"] for c in cells)
    here = sorted((c for c in cells if c["period"] == last), key=lambda c: c["seed"])
    day = here[0]["day"]
    labels = pq.read_table(days / day / "test.parquet", columns=["label"]).column("label").to_numpy()
    scores: dict[str, list[np.ndarray]] = {"daily": [], "retrain": [], "served": []}
    for c in here:
        home = work / f"seed-{c['seed']}"
        cache = work / "scores" / f"seed-{c['seed']}"
        cache.mkdir(parents=True, exist_ok=True)
        scores["daily"].append(score_file(home / "runs" / day / "train", days / day, cache / f"{day}-daily.parquet"))
        scores["retrain"].append(score_file(home / "retrain" / day, days / day, cache / f"{day}-retrain.parquet"))
        if c["status"] == "published":
            scores["served"].append(scores["daily"][-1])
        else:  # the guard kept yesterday's model serving
            previous = json.loads((home / "runs" / day / "day.json").read_text())["previous"]
            scores["served"].append(score_file(home / previous["run"], days / day, cache / f"{day}-served.parquet"))
    return {"day": day,
            "daily_minus_retrain": paired_bootstrap({"a": scores["daily"], "b": scores["retrain"]}, labels),
            "served_minus_retrain": paired_bootstrap({"a": scores["served"], "b": scores["retrain"]}, labels)}


def markdown(summary: dict) -> str:
    lines = ["| period (test = next) | daily AUC | retrain AUC | daily - retrain | served - retrain | update s | "
             "retrain s | ratio | new texts (share of occurrences) | published |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["periods"]:
        lines.append(f"| {r['day']} | {r['daily_test_auc']:.4f} | {r['retrain_test_auc']:.4f} | "
                     f"{r['auc_difference']:+.4f} (min {r['auc_difference_min']:+.4f}) | "
                     f"{r['served_difference']:+.4f} | {r['update_seconds']:.0f} | "
                     f"{r['retrain_seconds']:.0f} | {r['time_ratio']:.2f} | {r['new_texts']:.0f} "
                     f"({r['new_occurrence_share']:.2%}) | {r['published']}/{r['seeds']} |")
    return "\n".join(lines)


def new_item_markdown(rows: list[dict]) -> str:
    def auc(r, m):
        interval = r[f"{m}_auc_interval"]
        return "-" if r[f"{m}_auc"] is None else f"{r[f'{m}_auc']:.4f}" + (
            f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")

    def diff(r, other):
        d = r.get(f"daily_minus_{other}")
        return "-" if d is None else f"{d['difference']:+.4f} [{d['ci90'][0]:+.4f}, {d['ci90'][1]:+.4f}]"

    lines = ["| period (test = next) | new-item rows (items, share of the test rows) | update AUC [90%] | "
             "retrain AUC [90%] | DLRM-only AUC [90%] | update - retrain [90%] | update - DLRM-only [90%] |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['day']} | {r['rows']:,} ({r['items']:,}, {r['share']:.1%}) | {auc(r, 'daily')} | "
                     f"{auc(r, 'retrain')} | {auc(r, 'dlrm')} | {diff(r, 'retrain')} | {diff(r, 'dlrm')} |")
    return "\n".join(lines)


def uncertainty_line(u: dict) -> str:
    d, s = u["daily_minus_retrain"], u["served_minus_retrain"]
    return (f"Paired bootstrap on {u['day']}'s test rows ({d['rows']:,} rows resampled {d['resamples']} times, the "
            f"same rows for every seed and model; mean over {d['seeds']} seeds): update - retrain {d['difference']:+.4f}, "
            f"90% interval [{d['ci90'][0]:+.4f}, {d['ci90'][1]:+.4f}]; served - retrain {s['difference']:+.4f}, "
            f"[{s['ci90'][0]:+.4f}, {s['ci90'][1]:+.4f}].")


def plot(summary: dict, cells: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = summary["periods"]
    x = [r["period"] for r in rows]
    fig, (auc, secs) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, label in (("daily", "daily update (warm start, new period only)"), ("retrain", "retrain from scratch")):
        auc.plot(x, [r[f"{key}_test_auc"] for r in rows], marker="o", label=label)
        points = [(c["period"], c[key]["test"]["auc"]) for c in cells if "retrain" in c]
        auc.scatter(*zip(*points), s=8, alpha=0.4)
    secs.plot(x, [r["update_seconds"] for r in rows], marker="o", label="daily update (refresh + train)")
    secs.plot(x, [r["retrain_seconds"] for r in rows], marker="o", label="retrain from scratch")
    auc.set(xlabel="period (tested on the next one)", ylabel="test AUC", title="AUC on the next period")
    secs.set(xlabel="period", ylabel="wall seconds", title="cost of one update")
    auc.legend(fontsize=8)
    secs.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.daily_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "daily_bench", help="data, homes, runs (reused)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench" / "daily.json")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--period", default="14d")
    parser.add_argument("--warmup", type=float, default=0.7)
    parser.add_argument("--max-slices", type=int, default=4, help="periods after the warm-up (default 4)")
    parser.add_argument("--epochs", type=float, default=1.0, help="passes over each day's (or all) train rows")
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args(argv)
    days, slices = prepare(args.work, args)
    cells = [cell for seed in args.seeds for cell in run_seed(args.work, days, slices, seed, args)]
    summary = summarize(cells)
    summary["uncertainty"] = last_period_uncertainty(args.work, days, cells)
    new_item_cells(args.work, days, cells)
    summary["new_items"] = new_item_summary(cells)
    for c in cells:
        c.pop("_new_scores", None)
    result = {"command": " ".join(["python -m bench.daily_bench", *(argv if argv is not None else sys.argv[1:])]),
              "config": {k: v for k, v in vars(args).items() if k not in ("work", "out")}
              | {"flags": train_flags(args.epochs), "update_flags": UPDATE_FLAGS},
              "summary": summary, "cells": cells}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    table = markdown(summary)
    new_table = new_item_markdown(summary["new_items"])
    args.out.with_suffix(".table.md").write_text(table + "\n")
    plot(summary, cells, args.out.with_suffix(".png"))
    page = args.out.parent / "daily.md"
    if page.is_file() and "<!-- daily-bench -->" in page.read_text():  # the docs page shows the latest figures
        text = page.read_text()
        head, rest = text.split("<!-- daily-bench -->", 1)
        tail = rest.split("<!-- /daily-bench -->", 1)[1]
        block = (f"\n`{result['command']}` ({len(args.seeds)} seeds; every cell in [daily.json](daily.json)):\n\n"
                 f"{table}\n\n{uncertainty_line(summary['uncertainty'])}\n\n"
                 f"The test rows whose item is new (in no training row so far), per model:\n\n{new_table}\n\n"
                 f"![AUC and cost per period]({args.out.with_suffix('.png').name})\n")
        page.write_text(head + "<!-- daily-bench -->" + block + "<!-- /daily-bench -->" + tail)
    print(table)
    print(uncertainty_line(summary["uncertainty"]))
    print(new_table)
    print(json.dumps(summary["targets_met"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
