"""`make demo`: the main job end to end on the embedded default (MovieLens-100K + SmolLM2-135M).

1. data   -- MovieLens-100K from the installed wheel -> train/valid/test Parquet (time-ordered 8:1:1);
2. store  -- every distinct title encoded ONCE by SmolLM2's first k layers (TorchX, 2 local ranks);
3. train  -- BAHE on 2 local gloo ranks through TorchX: DMP-sharded frozen behaviour table + ID
             tables, SmolLM2's next layer(s) trained over the title sequences, DLRM head;
4. evaluate -- test AUC / NE / log loss / calibration (the trainer's final evaluation), per segment of
             item popularity in the training split (cold / tail / the rest: training/segments.py), and the
             non-learned floor (the strongest standard heuristic on valid, training/baselines.py);
5. report.

The defaults fit about 10 minutes on 2 CPU cores; --preset full is a larger run for real machines.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

PRESETS = {
    # k shallow layers, deep layers, history cap, steps, per-rank batch. cpu k = 8: best on valid of k 4 / 8 / 15
    # in the issue-17 sweep (docs/decisions.md "The sweep")
    "cpu": {"k": 8, "deep_layers": 1, "max_history": 5, "steps": 600, "batch_size": 64},
    "full": {"k": 8, "deep_layers": 22, "max_history": 50, "steps": 5000, "batch_size": 256},
}


def trainer_flags(preset: dict) -> list[str]:
    """The bahe-train flags of a preset (besides data, store, output, arm and steps); the quality
    bench (bench/quality_bench.py) trains every arm with these too."""
    return ["--batch-size", str(preset["batch_size"]), "--deep-layers", str(preset["deep_layers"]),
            "--max-behaviours", str(preset["max_history"]), "--embedding-dim", "32",
            "--dense-arch", "64", "32", "--over-arch", "128", "32", "1", "--table-rows", "2000",
            "--dense-lr", "3e-3", "--llm-lr", "1e-3", "--log-every", "25",
            # validate every 100 steps and end with the best checkpoint by valid AUC (training/selection.py)
            "--eval-every", "100",
            # most test-period users are new: a per-user row would only memorise the train period
            "--drop-id-features", "user_id"]


def refuse_an_earlier_store(out: Path, preset: dict) -> None:
    """An earlier demo's store in ``out`` encoded with another k (e.g. k = 4, before the cpu preset took
    k = 8) cannot be refreshed into this preset's, nor its run resumed: say so in one line before any
    work, and touch nothing (the earlier outputs are the user's to keep or delete)."""
    from bahe.embeddings.store import BehaviourStore, latest_version

    store = out / "store"
    if not (store.is_dir() and latest_version(store)):
        return
    k = BehaviourStore.open(store).manifest["encoder"]["k"]
    if k != preset["k"]:
        raise SystemExit(f"demo: {store} holds an earlier demo's store, encoded with k = {k}; this preset encodes "
                         f"with k = {preset['k']}. Move or delete {out} (or pass --out NEW_FOLDER) and run again")


def _launch(component: str, args: list[str], profile_name: str) -> None:
    from torchx.runner import get_runner

    from bahe.launchers.profiles import get_profile, render
    from bahe.launchers.submit import submit

    profile = get_profile(profile_name)
    app, cfg = render(profile, component, args)
    with get_runner() as runner:
        code = submit(runner, app, profile.scheduler, cfg, wait=True, stream=sys.stdout)
    if code != 0:
        raise SystemExit(f"demo: the {component} job failed (see its log above)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bahe.launchers.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="where every output goes (runs/demo)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="cpu (about 6 min on 2 cores) or full")
    parser.add_argument("--profile", default="local", help="launch profile of torchx.yaml (default local: 1x2 CPU)")
    parser.add_argument("--steps", type=int, default=None, help="override the preset's training steps")
    args = parser.parse_args(argv)
    preset = dict(PRESETS[args.preset], **({"steps": args.steps} if args.steps else {}))
    out = args.out.resolve()
    refuse_an_earlier_store(out, preset)
    start = time.perf_counter()
    timings = {}

    from bahe.ctr_data.movielens import MovieLensConfig, write_movielens
    from bahe.ctr_data.summary import format_summary, summarize

    print(f"[1/5] data: MovieLens-100K -> {out / 'data'}", flush=True)
    paths = write_movielens(MovieLensConfig(max_history=preset["max_history"]), out / "data")
    print(format_summary(summarize(list(paths.values()))), flush=True)
    timings["data"] = time.perf_counter() - start

    print(f"\n[2/5] store: SmolLM2-135M layers 0..{preset['k'] - 1} encode each distinct text once -> {out / 'store'}",
          flush=True)
    from bahe.embeddings.pretrained import resolve_model_dir

    resolve_model_dir("smollm2-135m")  # the one-time GGUF conversion, before the ranks start
    _launch("encode", ["--store", str(out / "store"), "--data", ",".join(str(p) for p in paths.values()),
                       "-k", str(preset["k"]), "--quiet", "True"], args.profile)
    timings["store"] = time.perf_counter() - start - sum(timings.values())

    run = out / "bahe"
    print(f"\n[3/5] train: BAHE, {preset['steps']} steps on 2 ranks through TorchX -> {run}", flush=True)
    _launch("train", ["--data_dir", str(out / "data"), "--out", str(run), "--arm", "bahe", "--store",
                      str(out / "store"), "--steps", str(preset["steps"]), "--", *trainer_flags(preset)],
            args.profile)
    timings["train"] = time.perf_counter() - start - sum(timings.values())

    print("\n[4/5] evaluate: test split, and the non-learned floor", flush=True)
    from bahe.training.baselines import non_learned_baseline

    metrics = json.loads((run / "metrics.json").read_text())
    floor = non_learned_baseline(out / "data")
    timings["evaluate"] = time.perf_counter() - start - sum(timings.values())

    test = metrics["test"]
    samples_per_s = _samples_per_s(run)
    report = {
        "test": test, "selected_step": metrics.get("selected_step"), "non_learned_floor_test_auc": floor["test"],
        "non_learned_floor": floor["chosen"],
        "auc_gain_over_floor": test["auc"] - floor["test"],
        "train_samples_per_s": samples_per_s, "tensorboard": str(run / "tensorboard"),
        "checkpoints": str(run / "checkpoints"), "store": str(out / "store"), "preset": preset,
        "seconds": {k: round(v, 1) for k, v in timings.items()}, "total_seconds": round(time.perf_counter() - start, 1),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print("\n[5/5] report")
    print(f"  test AUC {test['auc']:.4f} (checkpoint of step {metrics.get('selected_step')}, the best by valid AUC)")
    print(f"  non-learned floor {floor['test']:.4f} ({floor['chosen']}, the heuristic best on valid), "
          f"gain {report['auc_gain_over_floor']:+.4f}")
    print(f"  test NE {test['ne']:.4f}, log loss {test['logloss']:.4f}, calibration {test['calibration']:.3f}")
    if test.get("segments"):
        print(f"  {segment_line(test['segments'])}")
    print(f"  training throughput {samples_per_s:,.0f} samples/s across 2 ranks")
    print(f"  TensorBoard: tensorboard --logdir {run / 'tensorboard'}")
    print(f"  checkpoints: {run / 'checkpoints'}   report: {out / 'report.json'}")
    print(f"  wall time {report['total_seconds']:.0f}s ({', '.join(f'{k} {v:.0f}s' for k, v in timings.items())})")
    return 0


def segment_line(segments: dict) -> str:
    """The demo's per-segment line: test rows and AUC (90% bootstrap interval) of cold, tail and the rest
    (torso and head) of the items by their training rows (training/segments.py)."""
    from bahe.training.segments import format_line

    spec = segments["spec"]
    return (f"test by item popularity in train (rows, AUC [{spec['confidence']:.0%} interval]): "
            f"{format_line(segments, 'item_popularity')}")


def _samples_per_s(run: Path) -> float:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points = EventAccumulator(str(run / "tensorboard")).Reload().Scalars("perf/samples_per_s")
    return sum(p.value for p in points) / max(len(points), 1)


if __name__ == "__main__":
    sys.exit(main())
