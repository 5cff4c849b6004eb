"""The upstream-shaped text trainer (examples/dlrm_main_upstream_text.py) under dlrm_main's own optimizer
and LR policy on MovieLens-100K: text on vs text off, per learning rate and seed (docs/migration.md).

  python -m bench.dlrm_main_text_bench                               # Adagrad at 0.05, 1.0, 15.0; seed 0
  python -m bench.dlrm_main_text_bench --lrs 0.05 --seeds 0 1 2      # the seed spread at 0.05
  python -m bench.dlrm_main_text_bench --optimizer sgd --lrs 1.0 15.0

Each run is ``torchrun --nproc_per_node 2 tests/dist/dlrm_main_upstream_worker.py upstream_text ...``: the
example's ``main`` unchanged, on 2 gloo ranks, with dlrm_main's warm-up / decay policy (10 warm-up steps,
quadratic decay over steps 50-100), ``--limit_train_batches`` steps of ``--batch_size`` rows per rank
(plus dlrm_main's 2 filler batches), then a validation over valid.parquet. Text on adds ``--store`` (the
recipe: text arch on its own AdamW at ``--text_learning_rate``, outside the policy; its projections start
at zero); text off is the same file without it. Recorded per run: the first and the highest training
loss (and their ratio), the valid AUROC, the median step time from step 6 on (wall time of one step,
the ranks in parallel; and rank 0's CPU time in that step, which other work on a shared machine
inflates far less than the wall time: one thread per rank), whether the frozen table equals the store.

The data (``bahe-data movielens --max-history 5``) and the store (``bahe-encode build --k K``, SmolLM2)
are built once under ``--work``. Writes ``--out``.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist" / "dlrm_main_upstream_worker.py"

# dlrm_main flags of every run (the model is the demo's size: D 32, dense 64-32, over 128-32-1)
COMMON = ["--batch_size", "32", "--embedding_dim", "32", "--dense_arch_layer_sizes", "64,32",
          "--over_arch_layer_sizes", "128,32,1", "--num_embeddings", "2000", "--max_behaviours", "5",
          "--lr_warmup_steps", "10", "--lr_decay_start", "50", "--lr_decay_steps", "50"]


def prepare(work: Path, k: int) -> tuple[Path, Path]:
    """(data folder, store) under ``work``, built once: MovieLens-100K with 5 titles per sequence, and its
    store encoded by SmolLM2-135M's first ``k`` layers."""
    data, store = work / "ml-100k-m5", work / f"store-k{k}"
    if not (data / "valid.parquet").is_file():
        subprocess.run([sys.executable, "-m", "bahe.ctr_data.cli", "movielens", "--out", str(data),
                        "--max-history", "5"], check=True, cwd=ROOT, capture_output=True)
    if not (store / "CURRENT").exists() and not any(store.glob("v*")):
        subprocess.run([sys.executable, "-m", "bahe.embeddings.cli", "build", "--store", str(store), "--data",
                        *map(str, sorted(data.glob("*.parquet"))), "--k", str(k), "--quiet"],
                       check=True, cwd=ROOT, capture_output=True)
    return data, store


def run(out_dir: Path, data: Path, store: Path | None, lr: float, seed: int, *, optimizer: str = "adagrad",
        steps: int = 100, text_lr: float | None = None, extra: tuple[str, ...] = ()) -> dict:
    """One run on 2 gloo ranks; rank 0's record with the derived figures."""
    arm = "on" if store is not None else "off"
    name = f"{arm}-{optimizer}-lr{lr:g}-seed{seed}"
    argv = ["--bahe_data_dir", str(data), *COMMON, "--learning_rate", str(lr), "--limit_train_batches", str(steps),
            "--limit_test_batches", "1", *(["--adagrad"] if optimizer == "adagrad" else []), *extra]
    if store is not None:
        argv += ["--store", str(store)] + (["--text_learning_rate", str(text_lr)] if text_lr is not None else [])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(WORKER),
           "upstream_text", str(out_dir / f"{name}.json"), str(seed), "--", *argv]
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**_env(), "PYTHONPATH": str(ROOT)})
    if done.returncode:
        raise RuntimeError(f"{name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    record = json.loads((out_dir / f"{name}-rank0.json").read_text())
    losses = record["losses"]
    return {"name": name, "text": arm, "optimizer": optimizer, "lr": lr, "seed": seed, "steps": len(losses),
            "first_loss": losses[0], "peak_loss": max(losses), "peak_over_first": max(losses) / losses[0],
            "val_auroc": record["val_aurocs"][-1], "median_step_s": statistics.median(record["step_seconds"][5:]),
            "median_step_cpu_s": statistics.median(record["step_cpu_seconds"][5:]),
            "table_equals_store": record.get("table_equals_store"), "final_lrs": record["final_lrs"],
            "run_s": time.perf_counter() - started}


def _env() -> dict:
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1"}


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# The upstream-shaped text trainer under dlrm_main's policy ({meta['command']})", "",
             f"{meta['machine']}; MovieLens-100K, store k = {meta['k']}, SmolLM2-135M, {meta['deep_layers']} deep layer(s); "
             f"{meta['steps']} steps of {meta['batch_size']} rows x 2 gloo ranks; warm-up 10, decay 50-100; "
             f"load average at the start {meta['machine_record']['loadavg_start'][0]:.1f}.", "",
             "| text | optimizer | lr | seed | first loss | peak loss | peak / first | valid AUROC | median step (s) "
             "| median step, rank 0 CPU (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['text']} | {r['optimizer']} | {r['lr']:g} | {r['seed']} | {r['first_loss']:.3f} | "
                     f"{r['peak_loss']:.4g} | {r['peak_over_first']:.3g} | {r['val_auroc']:.4f} | "
                     f"{r['median_step_s']:.3f} | {r['median_step_cpu_s']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_dlrm_main_text")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench" / "dlrm_main_text")
    parser.add_argument("--k", type=int, default=2, help="the store's shallow layers (default 2: a quick build)")
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.05, 1.0, 15.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--optimizer", choices=["adagrad", "sgd"], default="adagrad")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--text-lr", type=float, default=None, help="--text_learning_rate (default: the example's)")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per rank per step")
    parser.add_argument("--deep-layers", type=int, default=None, help="--deep_layers (default: the example's)")
    parser.add_argument("--limit-val-batches", type=int, default=None, help="validate on this many batches per rank")
    args = parser.parse_args(argv)
    extra = ["--batch_size", str(args.batch_size)]
    extra += ["--deep_layers", str(args.deep_layers)] if args.deep_layers is not None else []
    extra += ["--limit_val_batches", str(args.limit_val_batches)] if args.limit_val_batches is not None else []
    args.work.mkdir(parents=True, exist_ok=True)
    data, store = prepare(args.work, args.k)
    rows = []
    for lr in args.lrs:
        for seed in args.seeds:
            for arm_store in (None, store):
                rows.append(run(args.work, data, arm_store, lr, seed, optimizer=args.optimizer, steps=args.steps,
                                text_lr=args.text_lr, extra=tuple(extra)))
                print(json.dumps(rows[-1]), flush=True)
    from bench.machine import machine, versions

    info = machine()
    meta = {"command": "python -m bench.dlrm_main_text_bench " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": f"{info['cpu_model']}, {info['cpu_affinity']} CPU cores (shared), 1 thread per rank",
            "machine_record": info, "versions": versions(), "k": args.k, "steps": args.steps,
            "batch_size": args.batch_size, "deep_layers": args.deep_layers or 1}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "runs": rows}, indent=1))
    args.out.with_suffix(".md").write_text(markdown(rows, meta))
    return rows


if __name__ == "__main__":
    main()
