"""Quality per segment and per protocol (issue 31, item 4): BAHE, DLRM-only and the non-learned floor on
MovieLens-100K's time split and its item-cold split (``bahe-data movielens --split item_cold``: 20% of the items
held out of train entirely), overall and per item-popularity segment (cold = no train row, tail <= 20, torso
<= 200, head), over several seeds.

Every arm trains with the `make demo` preset's flags (bench/quality_bench.py ``train``: 2 gloo ranks, the same
steps, batch and head), differing only in ``--arm`` and in the cell's levers. The levers swept here are the
cold-item simulation (bahe-train --cold-item-dropout, training/cold_items.py): a share of the training rows
shown as never-seen items (item ID bag emptied, item history 0, item prior the value the data gives a
never-seen item), so the model learns to score an item from its title and attributes; M; and how BAHE's user
side meets the item (--user-aggregation: pooled, or the item title attending over the behaviours, which can match
a new title to similar titles the user liked). Each arm's cell is
chosen on VALID (mean over seeds of the overall valid AUC) and only then read on test. Runs are reused: the
time split's under WORK/ (the quality bench's), the item-cold split's under WORK/item_cold/.

  python -m bench.segment_quality_bench                              # 2 splits x 2 cells x 3 seeds x 2 arms
  python -m bench.segment_quality_bench --splits item_cold --seeds 0 --cold-item-dropout 0 --out /tmp/s.json
  python -m bench.segment_quality_bench --splits item_cold --cold-item-dropout 0.3 --user-aggregation pooled target_attention \
      --out docs/bench/segment_quality_tattn.json

Writes docs/bench/segment_quality.json (every run's valid and test segments), a markdown page beside it and,
with matplotlib, a PNG of test AUC per segment.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import numpy as np

from bench.quality_bench import DEFAULT_LEVERS, ROOT, cell_suffix, lever_flags, prepare, run_name, train

SEGMENTS = ("cold", "tail", "torso", "head")
ARMS = ("dlrm", "token_level", "bahe")
T90 = {2: 6.314, 3: 2.920, 4: 2.353, 5: 2.132}  # Student t, 90% two-sided, by the number of seeds
TARGETS = {"item_cold": {"cold": 0.02, "tail": 0.01, "all": 0.01}}  # BAHE - DLRM-only, test AUC


def item_cold_data(work: Path, preset: dict, share: float, seed: int, store: Path) -> Path:
    """MovieLens-100K's item-cold split (made once); its texts must be in ``store`` (the same titles)."""
    from bahe.ctr_data.movielens import MovieLensConfig, write_movielens
    from bahe.embeddings.build import build_store
    from bahe.embeddings.encoder import EncoderConfig
    from bahe.embeddings.store import BehaviourStore
    from bahe.embeddings.vocabulary import count_texts

    m = preset["max_history"]
    data = work / ("data-item_cold" + ("" if (share, seed) == (0.2, 0) else f"-c{share}-s{seed}") + history_part(m))
    if not (data / "test.parquet").is_file():
        write_movielens(MovieLensConfig(max_history=preset["max_history"], protocol="item_cold", cold_share=share,
                                        seed=seed), data)
    files = [data / f"{s}.parquet" for s in ("train", "valid", "test")]
    known = BehaviourStore.open(store).vocabulary
    if any(text not in known for text in count_texts(files)):
        build_store(store, files, EncoderConfig(k=preset["k"], device="cpu"), show_progress=False)
    return data


def never_seen_values(data: Path) -> list[str]:
    """--cold-item-dense for a split: a new item has 0 earlier ratings, and the prior the data gives such a
    row (the mean over train rows with no earlier rating of the item: 0.5 on the time split, the running
    global rate on the item-cold split)."""
    from bahe.ctr_data.parquet_io import SampleReader

    table = SampleReader(data / "train.parquet").read_all()
    first = table.column("dense_item_history").to_numpy() == 0
    prior = float(table.column("dense_item_prior_positive_rate").to_numpy()[first].mean())
    return ["dense_item_history=0", f"dense_item_prior_positive_rate={prior:.4f}"]


def floor_segments(data: Path) -> dict:
    """The non-learned floor (chosen on valid over training/baselines.py's candidates) per segment."""
    from bahe.ctr_data.parquet_io import SampleReader
    from bahe.training.baselines import candidate_scores, non_learned_baseline
    from bahe.training.segments import SegmentSpec, SegmentTagger, count_items

    chosen = non_learned_baseline(data)["chosen"]
    scores, labels, splits = candidate_scores(data)
    tagger = SegmentTagger(SegmentSpec(), count_items(data / "train.parquet"))
    out = {"chosen": chosen}
    for split in ("valid", "test"):
        items, history = tagger(SampleReader(data / f"{split}.parquet").read_all())
        mask = splits == split
        out[split] = tagger.report(scores[chosen][mask], labels[mask], items, history)
    return out


def aucs(segments: dict) -> dict:
    """{'all': AUC, 'cold': ..., 'tail': ..., ...} of one report (None where undefined)."""
    return {"all": segments["all"]["auc"], **{s: segments["item_popularity"][s]["auc"] for s in SEGMENTS}}


def half_widths(segments: dict) -> dict:
    """Half the bootstrap interval of each segment's AUC (one run's sampling noise on these rows)."""
    entries = {"all": segments["all"], **segments["item_popularity"]}
    return {name: (e["auc_interval"][1] - e["auc_interval"][0]) / 2 if e.get("auc_interval") else None
            for name, e in entries.items()}


def mean_std(values: list[float | None]) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def gap(a: list[dict], b: list[dict], key: str) -> dict | None:
    """BAHE minus DLRM-only on ``key`` over seed-paired runs: the mean and its 90% t-interval over seeds."""
    pairs = [x[key] - y[key] for x, y in zip(a, b) if x[key] is not None and y[key] is not None]
    if not pairs:
        return None
    mean = statistics.fmean(pairs)
    half = T90.get(len(pairs), 2.0) * statistics.stdev(pairs) / len(pairs) ** 0.5 if len(pairs) > 1 else None
    return {"mean": mean, "interval": [mean - half, mean + half] if half is not None else None, "values": pairs}


def history_part(m: int) -> str:
    """'' for the demo's M, else '-m<M>' (the quality bench's naming of data folders and text runs)."""
    from bahe.launchers.demo import PRESETS

    return "" if m == PRESETS["cpu"]["max_history"] else f"-m{m}"


def cell_label(dropout: float, m: int, aggregation: str = DEFAULT_LEVERS["user_aggregation"]) -> str:
    lever = "" if aggregation == DEFAULT_LEVERS["user_aggregation"] else f", {aggregation.replace('_', ' ')}"
    return f"dropout {dropout:g}, M {m}{lever}"


def plots_paths(work: Path, split: str, preset: dict) -> tuple[Path, Path, Path, tuple[str, ...]]:
    """MovieLens with plot summaries (bahe-data movielens-plots): its data folder (made beforehand: the command
    needs --accept-terms), a store of its texts encoded up to 256 tokens (made once), the runs' folder and
    the trainer's extra flags (an item table as large as its ids: ml-latest-small's ids reach 163,949, and a
    hashed table would give a held-out item a trained item's row)."""
    import pyarrow.parquet as pq

    from bahe.embeddings.build import build_store
    from bahe.embeddings.encoder import EncoderConfig
    from bahe.embeddings.store import BehaviourStore
    from bahe.embeddings.vocabulary import count_texts

    data = work / ("data-plots" + ("-item_cold" if split == "item_cold" else "") + history_part(preset["max_history"]))
    if not (data / "test.parquet").is_file():
        raise SystemExit(f"{data} is missing: make it with bahe-data movielens-plots --accept-terms --max-history "
                         f"{preset['max_history']}{' --split item_cold' if split == 'item_cold' else ''} --out {data} "
                         "(docs/data.md)")
    store = work / "store-plots"
    files = [data / f"{s}.parquet" for s in ("train", "valid", "test")]
    known = BehaviourStore.open(store).vocabulary if (store / "LATEST").is_file() else None
    if known is None or any(text not in known for text in count_texts(files)):
        build_store(store, files, EncoderConfig(k=preset["k"], device="cpu", max_tokens=256, batch_tokens=256),
                    show_progress=False)
    top = max(int(pq.read_table(f, columns=["item_id"]).column("item_id").to_numpy().max()) for f in files)
    return data, store, work / ("plots" + ("-item_cold" if split == "item_cold" else "")), \
        ("--table-rows-for", f"item_id={top + 1}")


def run_split(split: str, args, base: dict) -> dict:
    from bahe.launchers.demo import PRESETS

    cells, data_of = {}, {}
    for m in args.max_history:
        preset, extra = dict(base, max_history=m), ()
        if args.dataset == "movielens-plots":
            data, store, where, extra = plots_paths(args.work, split, preset)
        else:
            data, store = prepare(args.work, preset, PRESETS["cpu"]["max_history"])
            where = args.work
        if split == "item_cold" and args.dataset == "movielens":
            data, where = item_cold_data(args.work, preset, args.cold_share, args.cold_seed, store), args.work / "item_cold"
        data_of[m] = data, never_seen_values(data)
        for dropout in args.cold_item_dropout:
            lever = ("--cold-item-dropout", str(dropout), "--cold-item-dense", *data_of[m][1]) if dropout else ()
            for aggregation in args.user_aggregation:
                cells[cell_label(dropout, m, aggregation)] = train_cell(split, args, preset, data, store, where, dropout,
                                                                        extra + lever, aggregation)
    first, never_seen = data_of[args.max_history[0]]
    floor = floor_segments(first)
    return {"data": str(first), "never_seen": never_seen, "cells": cells,
            "floor": {"chosen": floor["chosen"], "valid": aucs(floor["valid"]), "test": aucs(floor["test"]),
                      "test_half_width": half_widths(floor["test"])}}


def arm_lever(arm: str, aggregation: str) -> tuple[str, tuple[str, ...]]:
    """An arm's run-folder part and bahe-train flags for a cell's user aggregation, named as the quality bench
    names its lever cells: BAHE's alone ('-tattn', --user-aggregation target_attention); none for the default or
    for the other arms, whose runs it shares."""
    levers, same = {"user_aggregation": aggregation}, {"k": None, "deep_layers": None}  # k, deep layers: no part
    return cell_suffix(arm, same, {}, same, levers), lever_flags(arm, levers)


def train_cell(split: str, args, preset: dict, data: Path, store: Path, where: Path, dropout: float,
               flags: tuple[str, ...] = (), aggregation: str = DEFAULT_LEVERS["user_aggregation"]) -> dict:
    """Every seed and arm of one cell (cold-item dropout, M, the BAHE arm's user aggregation; ``flags``: its extra
    bahe-train flags); finished runs are reused. The DLRM arm reads no text: its runs (no M in their names) serve
    every M; the aggregation is BAHE's alone (its runs end in -tattn for target attention)."""
    runs = {arm: [] for arm in args.arms}
    for seed in args.seeds:
        for arm in args.arms:
            history = history_part(preset["max_history"])
            cell, lever = arm_lever(arm, aggregation)
            run = where / (run_name(arm, seed, args.steps, args.llm_precision, history, cell=cell) +
                           ("" if dropout == 0 else f"-cold{dropout:g}"))
            metrics = train(arm, seed, args.steps, data, store, run, preset, args.llm_precision,
                            extra_flags=flags + lever)
            runs[arm].append({"run": str(run.relative_to(ROOT)) if run.is_relative_to(ROOT) else str(run),
                              "valid": aucs(metrics["valid"]["segments"]), "test": aucs(metrics["test"]["segments"]),
                              "test_half_width": half_widths(metrics["test"]["segments"]),
                              "test_rows": {s: metrics["test"]["segments"]["item_popularity"][s]["rows"]
                                            for s in SEGMENTS} | {"all": metrics["test"]["samples"]}})
            print(f"[{split}, {cell_label(dropout, preset['max_history'], aggregation)}] {arm:5s} seed {seed}: test "
                  + ", ".join(f"{k} {v:.4f}" for k, v in runs[arm][-1]["test"].items() if v is not None), flush=True)
    return runs


def select(result: dict, arms: list[str]) -> dict:
    """Per arm, the cell with the best mean VALID overall AUC."""
    chosen = {}
    for arm in arms:
        chosen[arm] = max(result["cells"], key=lambda c: statistics.fmean(r["valid"]["all"]
                                                                          for r in result["cells"][c][arm]))
    return chosen


def summarise(result: dict, arms: list[str]) -> dict:
    chosen = select(result, arms)
    keys = ("all", *SEGMENTS)
    summary = {"chosen_cell": chosen, "arms": {}, "cells": {}}
    for cell, runs in result["cells"].items():
        summary["cells"][cell] = {arm: {split: {k: mean_std([r[split][k] for r in runs[arm]]) for k in keys}
                                        for split in ("valid", "test")} for arm in arms}
    for arm in arms:
        summary["arms"][arm] = summary["cells"][chosen[arm]][arm]
    if "bahe" in arms and "dlrm" in arms:
        bahe, dlrm = result["cells"][chosen["bahe"]]["bahe"], result["cells"][chosen["dlrm"]]["dlrm"]
        summary["bahe_minus_dlrm"] = {k: gap([r["test"] for r in bahe], [r["test"] for r in dlrm], k) for k in keys}
        summary["bahe_minus_dlrm_same_cell"] = {
            cell: {k: gap([r["test"] for r in runs["bahe"]], [r["test"] for r in runs["dlrm"]], k) for k in keys}
            for cell, runs in result["cells"].items()}
    return summary


def page(report: dict) -> str:
    lines = []
    for split, result in report["splits"].items():
        s = result["summary"]
        first = next(iter(result["cells"].values()))
        rows = {k: first[next(iter(first))][0]["test_rows"][k] for k in ("all", *SEGMENTS)}
        lines += [f"## {split} split", "", "test rows: " + ", ".join(f"{k} {v}" for k, v in rows.items()), "",
                  "| arm | cell | valid AUC | test AUC | cold | tail | torso | head |",
                  "|---|---|---|---|---|---|---|---|"]
        for cell, arms in s["cells"].items():
            for arm, splits in arms.items():
                mark = " (chosen on valid)" if s["chosen_cell"][arm] == cell else ""
                cells = [f"{v['mean']:.4f} +- {v['std']:.4f}" if v else "-" for v in
                         [splits["valid"]["all"], *(splits["test"][k] for k in ("all", *SEGMENTS))]]
                lines.append(f"| {arm}{mark} | {cell} | " + " | ".join(cells) + " |")
        f = result["floor"]
        lines.append(f"| floor ({f['chosen']}, chosen on valid) | - | {f['valid']['all']:.4f} | "
                     + " | ".join(f"{f['test'][k]:.4f}" if f["test"][k] is not None else "-" for k in ("all", *SEGMENTS))
                     + " |")
        if "bahe_minus_dlrm" in s:
            lines += ["", "BAHE - DLRM-only, test AUC, each arm's cell chosen on valid (mean over seed-paired runs, "
                          "90% t-interval over seeds; one run's bootstrap half-width on these rows in brackets):", ""]
            widths = result["cells"][s["chosen_cell"]["bahe"]]["bahe"][0]["test_half_width"]
            targets = TARGETS.get(split, {})
            for k in ("all", *SEGMENTS):
                g = s["bahe_minus_dlrm"][k]
                if g is None:
                    continue
                interval = f"[{g['interval'][0]:+.4f}, {g['interval'][1]:+.4f}]" if g["interval"] else "-"
                verdict = f"; target >= +{targets[k]:.2f}: {'met' if g['mean'] >= targets[k] else 'NOT met, short by '}" \
                    + ("" if g["mean"] >= targets[k] else f"{targets[k] - g['mean']:.4f}") if k in targets else ""
                width = f" (+-{widths[k]:.4f})" if widths.get(k) else ""
                lines.append(f"* {k}: {g['mean']:+.4f} {interval}{width}{verdict}")
        lines.append("")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG")
        return
    splits = list(report["splits"])
    fig, axes = plt.subplots(1, len(splits), figsize=(5 * len(splits), 3.4), squeeze=False)
    keys = ("all", *SEGMENTS)
    for ax, split in zip(axes[0], splits):
        result = report["splits"][split]
        for arm, stats in result["summary"]["arms"].items():
            means = [stats["test"][k]["mean"] if stats["test"][k] else np.nan for k in keys]
            stds = [stats["test"][k]["std"] if stats["test"][k] else 0 for k in keys]
            ax.errorbar(keys, means, yerr=stds, marker="o", capsize=3,
                        label=f"{arm} ({result['summary']['chosen_cell'][arm]})")
        ax.plot(keys, [result["floor"]["test"][k] or np.nan for k in keys], "k--", label="non-learned floor")
        name = "MovieLens-100K" if report["config"].get("dataset", "movielens") == "movielens" else "ML with plots"
        ax.set_title(f"{name}, {split} split")
        ax.set_ylabel("test AUC")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    from bahe.launchers.demo import PRESETS

    p = argparse.ArgumentParser(prog="python -m bench.segment_quality_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=("movielens", "movielens-plots"), default="movielens",
                   help="MovieLens-100K (titles), or ml-latest-small with plot summaries (bahe-data movielens-plots, "
                        "made beforehand; runs under WORK/plots[-item_cold])")
    p.add_argument("--splits", nargs="+", choices=("time", "item_cold"), default=["time", "item_cold"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", choices=ARMS, default=["dlrm", "bahe"],
                   help="the token-level arm costs ~1 h per run on 2 CPU cores (docs/bench/quality.md)")
    p.add_argument("--cold-item-dropout", type=float, nargs="+", default=[0.0, 0.3],
                   help="cells: bahe-train --cold-item-dropout values (0: off); each arm's cell is chosen on valid")
    p.add_argument("--max-history", type=int, nargs="+", default=[PRESETS["cpu"]["max_history"]],
                   help="cells: M, the titles per behaviour sequence (the DLRM arm reads none: its runs serve every M)")
    p.add_argument("--user-aggregation", nargs="+", choices=("pooled", "target_attention"),
                   default=[DEFAULT_LEVERS["user_aggregation"]],
                   help="cells: how BAHE's user side meets the item (bahe-train --user-aggregation): pooled, or "
                        "target_attention (the item title's vector attends over the behaviour vectors); BAHE only")
    p.add_argument("--steps", type=int, default=PRESETS["cpu"]["steps"])
    p.add_argument("--llm-precision", choices=("auto", "bf16", "fp32"), default="auto")
    p.add_argument("--cold-share", type=float, default=0.2, help="the item-cold split's held-out share of items")
    p.add_argument("--cold-seed", type=int, default=0, help="the item-cold split's draw of items")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "quality", help="data, store and runs (reused)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "bench" / "segment_quality.json")
    args = p.parse_args(argv)
    base = dict(PRESETS["cpu"])
    report = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "splits": {}}
    for split in args.splits:
        result = run_split(split, args, base)
        result["summary"] = summarise(result, args.arms)
        report["splits"][split] = result
    from bench.machine import machine, versions

    report.update(machine=machine(), versions=versions())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    command = " ".join(["python -m bench.segment_quality_bench", *(argv if argv is not None else sys.argv[1:])])
    text = page(report)
    plot(report, args.out.with_suffix(".png"))
    args.out.with_suffix(".md").write_text(
        f"# Quality per segment on {'MovieLens-100K' if args.dataset == 'movielens' else 'MovieLens with plot summaries'}"
        f"\n\nProduced by `{command}` ({platform.platform()}, "
        f"{os.cpu_count()} CPUs); {args.steps} steps x 2 ranks, the demo preset, seeds {args.seeds} (mean +- std).\n\n"
        f"{text}\n![test AUC per segment]({args.out.with_suffix('.png').name})\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
