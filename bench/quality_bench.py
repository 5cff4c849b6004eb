"""Quality on MovieLens-100K (time-ordered 8:1:1 split): the DLRM-only arm, the token-level LLM
baseline and BAHE, over several seeds, against the non-learned floor.

Every arm trains with the SAME command, data, head, step budget and batch -- the `make demo`
preset's trainer flags (launchers/demo.py ``trainer_flags``) -- on 2 local gloo ranks (torchrun),
differing only in ``--arm``. The token-level arm runs the same LLM layers 0..k+deep over the
tokens of the same M titles per sequence (``--max-user-tokens`` covers them all: nothing is cut),
so BAHE and it see the same text. The floor is the item's train positive rate plus the user's
recent positive rate (training/baselines.py). Seeds change the model initialisation and the
training order; the data split is fixed.

  python -m bench.quality_bench --llm-precision bf16  # 3 seeds x 3 arms, about 2 h on 2 AMX CPU cores
  python -m bench.quality_bench                       # fp32 on CPU: the token-level arm alone ~4 h
  python -m bench.quality_bench --seeds 0 --steps 50 --out /tmp/q.json   # a quick look
  python -m bench.quality_bench --arms bahe --llm gemma3-270m --out docs/bench/quality_gemma.json  # another LLM
  python -m bench.quality_bench --arms dlrm bahe --k 4 8 --pooling mean mean_skip_first --post-transform none whiten
  python -m bench.quality_bench --arms dlrm bahe --user-projection shared per_type --user-aggregation pooled target_attention

The encoding sweep (issue 17, item 3): every combination of --k, --deep-layers, --pooling and
--post-transform is a cell. A cell's store is WORK/store[-<llm>][-k<K>][-<pooling>][-<post-transform>]
(a part only where it is not the default: the demo's k, mean, none), e.g. store-k8-mean_skip_first-whiten,
and its runs' folders carry the same parts (plus -d<D> for the deep layers): the token-level arm reads
only k and the deep layers from a cell, the DLRM arm nothing, so their runs are shared between cells.
A finished run is reused, never retrained. The text arch's model levers (--user-projection,
--user-aggregation: model/text_levers.py) are cells too; they change the BAHE arm only (its bahe-train
flags, and its run folders' parts -pertype / -tattn where not the default), never a store.

Writes docs/bench/quality.json (machine, versions, config, every run's metrics), a markdown table
beside it and, when matplotlib is installed, a PNG of test AUC per arm.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("dlrm", "token_level", "bahe")
DEFAULT_ENCODING = {"pooling": "mean", "post_transform": "none", "store_dtype": "float32"}  # store_dtype: --store-dtype
# the BAHE text arch's model levers (bahe-train --user-projection / --user-aggregation), their defaults and the
# run-folder part of each other value
DEFAULT_LEVERS = {"user_projection": "shared", "user_aggregation": "pooled"}
LEVER_PARTS = {"per_type": "pertype", "target_attention": "tattn"}
PRECISION_WORDS = {"auto": "fp32 (CPU)", "fp32": "fp32", "bf16": "bf16 autocast"}


def store_suffix(k: int, pooling: str, post_transform: str, default_k: int, store_dtype: str = "float32") -> str:
    """'-k8-mean_skip_first-whiten-bfloat16': the store's encoding choices that are not the defaults."""
    parts = ([f"k{k}"] if k != default_k else []) + ([pooling] if pooling != DEFAULT_ENCODING["pooling"] else []) \
        + ([post_transform] if post_transform != DEFAULT_ENCODING["post_transform"] else []) \
        + ([store_dtype] if store_dtype != DEFAULT_ENCODING["store_dtype"] else [])
    return "".join(f"-{part}" for part in parts)


def _levers(levers: dict | None) -> dict:
    """``levers`` (any dict holding some of :data:`DEFAULT_LEVERS`' keys, e.g. a cell) with the defaults filled in."""
    return {key: (levers or {}).get(key, default) for key, default in DEFAULT_LEVERS.items()}


def cell_suffix(arm: str, preset: dict, encoding: dict, defaults: dict, levers: dict | None = None) -> str:
    """A run folder's part for a sweep cell, where not the default (``defaults``: the demo's k and deep
    layers; mean; none; ``levers``: the text arch's, shared / pooled when None):
    '-k8-d2-mean_skip_first-whiten-pertype-tattn' for BAHE; the token-level arm reads only k and the deep layers
    from the cell (not the store's rows, not the levers); the DLRM arm nothing."""
    if arm == "dlrm":
        return ""
    parts = [f"k{preset['k']}"] if preset["k"] != defaults["k"] else []
    parts += [f"d{preset['deep_layers']}"] if preset["deep_layers"] != defaults["deep_layers"] else []
    if arm == "bahe":
        parts += [encoding.get(key, default) for key, default in DEFAULT_ENCODING.items()
                  if encoding.get(key, default) != default]
        parts += [LEVER_PARTS[value] for key, value in _levers(levers).items() if value != DEFAULT_LEVERS[key]]
    return "".join(f"-{part}" for part in parts)


def lever_flags(arm: str, levers: dict | None) -> tuple[str, ...]:
    """The bahe-train flags of a cell's text-arch levers that are not the defaults (the BAHE arm only; none
    for the defaults, so a default cell's command is the one the bench always ran)."""
    if arm != "bahe":
        return ()
    return tuple(part for key, value in _levers(levers).items() if value != DEFAULT_LEVERS[key]
                 for part in (f"--{key.replace('_', '-')}", value))


def describe_cell(preset: dict, encoding: dict, levers: dict | None = None) -> str:
    changed = [f"{key.replace('_', ' ')} {value}" for key, value in _levers(levers).items()
               if value != DEFAULT_LEVERS[key]]
    dtype = encoding.get("store_dtype", DEFAULT_ENCODING["store_dtype"])
    changed = ([f"store {dtype}"] if dtype != DEFAULT_ENCODING["store_dtype"] else []) + changed
    return (f"k = {preset['k']}, {preset['deep_layers']} deep layer(s), pooling {encoding['pooling']}, "
            f"post-transform {encoding['post_transform']}" + "".join(f", {part}" for part in changed))


def prepare(work: Path, preset: dict, default_history: int, llm: str | None = None,
            encoding: dict | None = None, default_k: int | None = None) -> tuple[Path, Path]:
    """MovieLens splits (``data``, or ``data-m<M>`` for another history cap M) and ONE k-layer
    behaviour store of ``llm`` (``store``; ``store-<llm>`` for another than the default; then the
    :func:`store_suffix` of its k, pooling and post-transform against ``default_k``, the demo's, and mean /
    none) for all of them, made once and reused. A split with texts the store lacks
    refreshes it (only those are encoded); MovieLens histories are titles of rated movies, which are
    all item titles already, so another M normally adds none."""
    from bahe.ctr_data.movielens import MovieLensConfig, write_movielens
    from bahe.embeddings.build import build_store
    from bahe.embeddings.encoder import EncoderConfig
    from bahe.embeddings.pretrained import DEFAULT_MODEL
    from bahe.embeddings.store import BehaviourStore
    from bahe.embeddings.vocabulary import count_texts
    from bahe.launchers.demo import PRESETS

    m, llm, encoding = preset["max_history"], llm or DEFAULT_MODEL, {**DEFAULT_ENCODING, **(encoding or {})}
    data = work / ("data" if m == default_history else f"data-m{m}")
    suffix = store_suffix(preset["k"], encoding["pooling"], encoding["post_transform"],
                          default_k or PRESETS["cpu"]["k"], encoding["store_dtype"])
    store = work / (("store" if llm == DEFAULT_MODEL else f"store-{Path(llm).name}") + suffix)
    if not (data / "test.parquet").is_file():
        write_movielens(MovieLensConfig(max_history=m), data)
    files = [data / f"{s}.parquet" for s in ("train", "valid", "test")]
    known = BehaviourStore.open(store).vocabulary if (store / "LATEST").is_file() else None
    if known is None or any(text not in known for text in count_texts(files)):
        encoder = {key: value for key, value in encoding.items() if key != "store_dtype"}
        build_store(store, files, EncoderConfig(model=llm, k=preset["k"], device="cpu", **encoder), show_progress=False,
                    store_dtype=encoding["store_dtype"])
    return data, store


def run_name(arm: str, seed: int, steps: int, precision: str, history: str = "", llm: str = "", cell: str = "") -> str:
    """The run folder. The DLRM arm reads no text, so its runs serve every precision, history cap M,
    LLM and sweep cell; ``history`` is "" for the preset's M, else e.g. "-m20"; ``llm`` is "" for the
    default LLM, else e.g. "-gemma3-270m"; ``cell`` the arm's :func:`cell_suffix` ("" for the defaults)."""
    if arm == "dlrm":
        return f"dlrm-seed{seed}-steps{steps}"
    return f"{arm}-seed{seed}-steps{steps}{history}{llm}{cell}{'' if precision == 'auto' else '-' + precision}"


def user_token_cap(max_history: int) -> int:
    """The token-level arm's --max-user-tokens, which never cuts a user: at worst 2 sequences x M
    titles x 32 tokens (the longest title is 30 tokens, plus a 2-token separator) + 16 for the two
    prefixes. At the demo's M = 5 the runs use 256, above the longest user in the data (189 tokens)."""
    return 256 if max_history == 5 else 64 * max_history + 16


def train(arm: str, seed: int, steps: int, data: Path, store: Path, run: Path, preset: dict,
          precision: str = "auto", llm: str | None = None, extra_flags: tuple[str, ...] = ()) -> dict:
    """Train one run with the demo preset's flags (reused when ``run`` holds metrics.json; an unfinished one
    resumes from its checkpoint); ``extra_flags`` go to bahe-train after the arm's own."""
    from bahe.launchers.demo import trainer_flags

    if (run / "metrics.json").is_file():  # a finished run is reused; an unfinished one resumes from its checkpoint
        return json.loads((run / "metrics.json").read_text())
    extra = ["--max-user-tokens", str(user_token_cap(preset["max_history"]))] if arm == "token_level" else []
    extra += ["--llm-precision", precision] if arm != "dlrm" else []
    extra += ["--llm", llm] if arm != "dlrm" and llm else []
    extra += list(extra_flags)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--standalone",  # a free port each time: two benches on one machine never join each other's job
           "-m", "bahe.launchers.train", "--data-dir", str(data), "--store",
           str(store), "--out", str(run), "--arm", arm, "--steps", str(steps), "--seed", str(seed),
           "--checkpoint-every", "50",  # a stopped bench resumes a long run (token-level) where it was
           *trainer_flags(preset), *extra]
    latest = run / "checkpoints" / "LATEST"  # the step this run resumes from: its wall time covers only the rest
    resumed_from = int(latest.read_text().strip().removeprefix("step-")) if latest.is_file() else 0
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{arm} seed {seed} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["wall_seconds"] = time.perf_counter() - start
    metrics["resumed_from_step"] = resumed_from
    (run / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def summarise(runs: dict[str, list[dict]], floor: dict) -> dict:
    def stats(values: list[float]) -> dict:
        return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "values": values}

    out = {arm: {key: stats([r["test"][key] for r in results]) for key in ("auc", "logloss")}
           for arm, results in runs.items()}
    for arm, results in runs.items():  # valid AUC, where the runs report it: a winner is chosen on valid
        if all("valid" in r for r in results):
            out[arm]["valid_auc"] = stats([r["valid"]["auc"] for r in results])
    for arm, results in runs.items():  # wall time: the runs that trained from step 0 (a resumed one did less)
        fresh = [r for r in results if not r.get("resumed_from_step")] or results
        out[arm]["wall_seconds"] = stats([r.get("wall_seconds", float("nan")) for r in fresh])
        out[arm]["resumed_from_step"] = [r.get("resumed_from_step", 0) for r in results]
    out["floor"] = {"auc": floor["test"], "chosen": floor.get("chosen")}  # the heuristic best on valid
    return out


def table(summary: dict, steps: int, seeds: list[int], precision: str = "auto", history: int = 5,
          llm: str | None = None, cell: str = "") -> str:
    lines = [f"test split, {steps} steps x 2 ranks x the demo batch per arm, seeds {seeds} (mean +- std), "
             f"LLM layers in {PRECISION_WORDS[precision]}, M = {history} titles per sequence"
             + (f", LLM {llm}" if llm else "") + (f", {cell}" if cell else ""), "",
             "| arm | test AUC | test log loss | train wall s |", "|---|---|---|---|"]
    for arm in ARMS:
        if arm in summary:
            s = summary[arm]
            lines.append(f"| {arm} | {s['auc']['mean']:.4f} +- {s['auc']['std']:.4f} | "
                         f"{s['logloss']['mean']:.4f} +- {s['logloss']['std']:.4f} | {s['wall_seconds']['mean']:.0f} |")
    lines += [f"| {arm} | not run | - | - |" for arm in ARMS if arm not in summary]
    chosen = summary["floor"].get("chosen")
    lines.append(f"| non-learned floor{f' ({chosen}, chosen on valid)' if chosen else ''} | "
                 f"{summary['floor']['auc']:.4f} | - | - |")
    for arm in ARMS:
        resumed = [(seed, step) for seed, step in zip(seeds, summary.get(arm, {}).get("resumed_from_step", [])) if step]
        if resumed:  # a resumed run trained fewer steps in this call: its wall time says less
            left_out = len(resumed) < len(seeds)
            lines += ["", f"{arm}: " + ", ".join(f"seed {seed} resumed from its step-{step} checkpoint"
                                                 for seed, step in resumed)
                      + ("; its wall time is left out of the mean" if left_out else
                         "; the wall time counts only the steps after the checkpoint")]
    if "bahe" in summary:
        bahe = summary["bahe"]["auc"]["mean"]
        lines += ["", "targets: BAHE >= token-level - 0.002, and >= DLRM-only + 0.01"]
        for arm, margin in (("token_level", -0.002), ("dlrm", 0.01)):
            if arm in summary:
                gap = bahe - summary[arm]["auc"]["mean"]
                lines.append(f"  BAHE - {arm}: {gap:+.4f} ({'met' if gap >= margin else 'NOT met'}, needs {margin:+.3f})")
    return "\n".join(lines)


def sweep_table(cells: list[dict]) -> str:
    """One line per sweep cell: each arm's test AUC (valid AUC), BAHE minus DLRM-only, and the cell best
    on valid for BAHE (a winner is chosen on valid, never on test)."""
    arms = [arm for arm in ARMS if any(arm in c["summary"] for c in cells)]
    levers = [key for key in DEFAULT_LEVERS if any(_levers(c)[key] != DEFAULT_LEVERS[key] for c in cells)]
    lines = ["| k | deep layers | pooling | post-transform | store dtype | " + "".join(f"{key.replace('_', ' ')} | " for key in levers)
             + " | ".join(f"{a} test (valid) AUC" for a in arms)
             + " | BAHE - DLRM test |", "|---|---|---|---|---|" + "---|" * (len(levers) + len(arms) + 1)]

    def auc(summary: dict, arm: str) -> str:
        if arm not in summary:
            return "-"
        valid = summary[arm].get("valid_auc")
        return f"{summary[arm]['auc']['mean']:.4f}" + (f" ({valid['mean']:.4f})" if valid else "")

    for c in cells:
        s = c["summary"]
        gap = f"{s['bahe']['auc']['mean'] - s['dlrm']['auc']['mean']:+.4f}" if "bahe" in s and "dlrm" in s else "-"
        lines.append(f"| {c['k']} | {c['deep_layers']} | {c['pooling']} | {c['post_transform']} | "
                     f"{c.get('store_dtype', DEFAULT_ENCODING['store_dtype'])} | "
                     + "".join(f"{_levers(c)[key]} | " for key in levers)
                     + " | ".join(auc(s, arm) for arm in arms) + f" | {gap} |")
    judged = [c for c in cells if "valid_auc" in c["summary"].get("bahe", {})]
    if judged:
        best = max(judged, key=lambda c: c["summary"]["bahe"]["valid_auc"]["mean"])
        lines += ["", f"best BAHE cell on valid: {describe_cell(best, best, best)} (valid AUC "
                      f"{best['summary']['bahe']['valid_auc']['mean']:.4f}, test "
                      f"{best['summary']['bahe']['auc']['mean']:.4f})"]
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no PNG"
    arms = [a for a in ARMS if a in summary]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar(arms, [summary[a]["auc"]["mean"] for a in arms], yerr=[summary[a]["auc"]["std"] for a in arms],
           color=["#999999", "#cc7744", "#3377bb"][: len(arms)], capsize=4)
    ax.axhline(summary["floor"]["auc"], color="black", linestyle="--", linewidth=1, label="non-learned floor")
    low = min(summary["floor"]["auc"], *(summary[a]["auc"]["mean"] for a in arms)) - 0.01
    ax.set_ylim(low, max(summary[a]["auc"]["mean"] for a in arms) + 0.01)
    ax.set_ylabel("test AUC (MovieLens-100K)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return None


def main(argv: list[str] | None = None) -> int:
    from bahe.launchers.demo import PRESETS

    p = argparse.ArgumentParser(prog="python -m bench.quality_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    p.add_argument("--steps", type=int, default=None, help="the step budget of every arm (default: the demo's)")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "quality", help="data, store and runs (reused)")
    p.add_argument("--llm-precision", choices=sorted(PRECISION_WORDS), default="auto",
                   help="the LLM arms' --llm-precision (bf16 runs the token-level arm ~2x faster on AMX CPUs)")
    p.add_argument("--max-history", type=int, default=None,
                   help="M, the titles per behaviour sequence (default: the demo's); the DLRM arm's runs serve every M")
    p.add_argument("--llm", default=None,
                   help="the text arms' LLM (an alias, e.g. gemma3-270m, or a local Hugging Face folder); its store "
                        "is WORK/store-<name> and its runs' folders end in -<name> (default: the encoder's "
                        "default, WORK/store)")
    from bahe.embeddings.encoding import POOLINGS
    from bahe.embeddings.post_transform import POST_TRANSFORMS

    defaults = {key: PRESETS["cpu"][key] for key in ("k", "deep_layers")}
    p.add_argument("--k", type=int, nargs="+", default=[defaults["k"]],
                   help=f"the stores' shallow layers k to sweep (default {defaults['k']}, the demo's)")
    p.add_argument("--deep-layers", type=int, nargs="+", default=[defaults["deep_layers"]],
                   help=f"the text arms' deep layers to sweep (default {defaults['deep_layers']}, the demo's)")
    p.add_argument("--pooling", nargs="+", choices=POOLINGS, default=[DEFAULT_ENCODING["pooling"]],
                   help="the stores' token poolings to sweep (bahe-encode build --pooling; default mean)")
    p.add_argument("--post-transform", nargs="+", choices=POST_TRANSFORMS, default=[DEFAULT_ENCODING["post_transform"]],
                   help="the stores' frozen post-transforms to sweep (bahe-encode build --post-transform; default none)")
    p.add_argument("--store-dtype", nargs="+", choices=("float32", "float16", "bfloat16"), default=["float32"],
                   help="the stores' row dtypes to sweep (bahe-encode build --store-dtype; default float32; the BAHE "
                        "arm's runs of another end in -<dtype>)")
    from bahe.model.text_levers import USER_AGGREGATIONS, USER_PROJECTIONS

    p.add_argument("--user-projection", nargs="+", choices=USER_PROJECTIONS, default=[DEFAULT_LEVERS["user_projection"]],
                   help="the BAHE arm's user projections to sweep (bahe-train --user-projection; default shared; "
                        "per_type runs end in -pertype)")
    p.add_argument("--user-aggregation", nargs="+", choices=USER_AGGREGATIONS,
                   default=[DEFAULT_LEVERS["user_aggregation"]],
                   help="the BAHE arm's user aggregations to sweep (bahe-train --user-aggregation; default pooled; "
                        "target_attention runs end in -tattn)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "bench" / "quality.json")
    args = p.parse_args(argv)
    from bahe.embeddings.pretrained import DEFAULT_MODEL
    from bahe.training.baselines import non_learned_baseline

    llm = None if args.llm in (None, DEFAULT_MODEL) else args.llm
    llm_part = f"-{Path(llm).name}" if llm else ""
    default_history = PRESETS["cpu"]["max_history"]
    base = dict(PRESETS["cpu"], max_history=args.max_history or default_history)
    history = "" if base["max_history"] == default_history else f"-m{base['max_history']}"
    steps = args.steps or base["steps"]
    cells, floor = [], None
    for k, deep, pooling, post, dtype, projection, aggregation in itertools.product(
            args.k, args.deep_layers, args.pooling, args.post_transform, args.store_dtype, args.user_projection,
            args.user_aggregation):
        start = time.perf_counter()
        preset = dict(base, k=k, deep_layers=deep)
        encoding = {"pooling": pooling, "post_transform": post, "store_dtype": dtype}
        levers = {"user_projection": projection, "user_aggregation": aggregation}
        data, store = prepare(args.work, preset, default_history, llm, encoding, defaults["k"])
        floor = floor or non_learned_baseline(data)
        runs: dict[str, list[dict]] = {arm: [] for arm in args.arms}
        for seed in args.seeds:  # arms interleaved per seed: a slow spell of the machine hits every arm
            for arm in args.arms:
                run = args.work / run_name(arm, seed, steps, args.llm_precision, history, llm_part,
                                           cell_suffix(arm, preset, encoding, defaults, levers))
                result = train(arm, seed, steps, data, store, run, preset, args.llm_precision, llm,
                               extra_flags=lever_flags(arm, levers))
                runs[arm].append(result)
                print(f"[{describe_cell(preset, encoding, levers)}] {arm:12s} seed {seed}: test AUC "
                      f"{result['test']['auc']:.4f}, log loss {result['test']['logloss']:.4f} ({run.name})", flush=True)
        cells.append({"k": k, "deep_layers": deep, **encoding, **levers, "store": str(store), "preset": preset,
                      "summary": summarise(runs, floor), "seconds": time.perf_counter() - start,
                      "runs": {arm: [r["test"] for r in results] for arm, results in runs.items()},
                      "valid": {arm: [r.get("valid") for r in results] for arm, results in runs.items()}})

    from bench.machine import machine, versions

    first = cells[0]  # the report's summary and runs: the first cell (the only one without a sweep)
    report = {"machine": machine(), "versions": versions(),
              "config": {"preset": first["preset"], "steps": steps, "seeds": args.seeds, "ranks": 2,
                         "token_level_max_user_tokens": user_token_cap(base["max_history"]),
                         "llm_precision": args.llm_precision, "llm": llm or DEFAULT_MODEL,
                         "sweep": {"k": args.k, "deep_layers": args.deep_layers, "pooling": args.pooling,
                                   "post_transform": args.post_transform, "store_dtype": args.store_dtype, "user_projection": args.user_projection,
                                   "user_aggregation": args.user_aggregation}},
              "summary": first["summary"], "runs": first["runs"], "cells": cells}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    only_defaults = len(cells) == 1 and cell_suffix("bahe", first["preset"], first, defaults, first) == ""
    text = "\n\n".join(table(c["summary"], steps, args.seeds, args.llm_precision, base["max_history"], llm,
                              "" if only_defaults else describe_cell(c["preset"], c, c)) for c in cells)
    if len(cells) > 1:
        text = f"{sweep_table(cells)}\n\n{text}"
    note = plot(first["summary"], args.out.with_suffix(".png")) if len(cells) == 1 else \
        "a sweep: no PNG (the table above compares the cells)"
    command = " ".join(["python -m bench.quality_bench", *(argv if argv is not None else sys.argv[1:])])
    picture = f"![test AUC per arm]({args.out.with_suffix('.png').name})\n" if len(cells) == 1 else ""
    args.out.with_suffix(".md").write_text(f"# Quality on MovieLens-100K\n\nProduced by `{command}`"
                                           f" ({platform.platform()}, {os.cpu_count()} CPUs).\n\n{text}\n\n{picture}")
    print(text)
    if note:
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
