"""Serving a trained BAHE run: parity of the exported predictor, and its latency against torchrec's DLRM.

  python bench/serving_bench.py --run RUN --data-dir DATA --export EXPORT [--out docs/bench/serving]

1. Export: ``bahe-export`` of the run (best checkpoint) over train + valid + test, fp32 and int8 predictors
   (reused when --export already holds one of this checkpoint).
2. Parity, every row of the test split: the run's full model (its own forward: lookup, deep layers,
   interaction) against the EXPORTED predictor file (TorchScript, loaded as a server loads it) fed the
   text features the exporter computes -- per row, from that row's own behaviours; and, for the rows
   that are their user's newest sample, the features read back from the export's users.parquet.
   Max |logit difference| (target <= 1e-5), and the test AUC of the fp32 and int8-table predictors.
3. Latency, one process, CPU, one call at a time: (a) the cached-BAHE predictor file given the request's
   cached text features, (g) gathering those features from the export held in memory (timed on its own:
   a feature-store lookup), (a8) the predictor with int8 ID tables, (b) torchrec's DLRM with the same ID tables (the run's weights), dense arch and over-arch sizes
   behind the same request transforms, quantized, traced and scripted the same way, (c) the full BAHE
   model's eager forward without caches (deep LLM layers over the request's behaviours). Request batches
   of 1, 64 and 512 test rows drawn at random; every call times one arm, and the arms alternate call by
   call (in a fresh random order each turn), so load from other processes falls on all of them; (c)
   alternates with (a) in turns of its own (its large activations would evict the light arms' weights).
   (bl) is (b)'s modules through (a)'s lean interaction code: (a)/(bl) is the cost of the text features alone.
   p50 / p99 of per-call latency and throughput (rows / mean latency). (b)'s logits are not a trained model's: only its cost
   counts.
"""

from __future__ import annotations

import argparse
import io
import json
import shlex
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.machine import machine, versions  # noqa: E402

ARMS = {"a": "cached BAHE predictor (exported, fp32 tables)", "g": "gather the request's cached features",
        "a8": "cached BAHE predictor (exported, int8 tables)", "b": "torchrec DLRM (exported, fp32 tables)",
        "bl": "torchrec DLRM's modules through (a)'s lean interaction (exported, fp32 tables)",
        "c": "full BAHE forward, no caches (eager)", "a_beside_c": "(a) timed alternating with (c)"}


RECIPE = ("bahe-data movielens --out ml/data --max-history 5; bahe-encode build --store ml/store --data "
          "ml/data/*.parquet --k 4; bahe-train --data-dir ml/data --store ml/store --out ml/bahe --arm bahe --steps 300 "
          "followed by launchers/demo.py's trainer_flags(PRESETS['cpu']) (batch 64, 1 deep layer of SmolLM2-135M, "
          "M = 5, D = 32, valid every 100 steps, best kept)")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="a trained BAHE run (bahe-train --out)")
    p.add_argument("--data-dir", type=Path, required=True, help="its data folder (train/valid/test.parquet)")
    p.add_argument("--export", type=Path, required=True, help="the export folder (written here if empty)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64, 512], help="request batch sizes")
    p.add_argument("--rounds", type=int, default=5, help="rounds; each times every arm at every batch size")
    p.add_argument("--calls", type=int, nargs="+", default=[100, 40, 30],
                   help="calls per light arm (a, g, a8, b) per round, per batch size")
    p.add_argument("--heavy-calls", type=int, nargs="+", default=[20, 6, 2],
                   help="calls of (c) and of (a) beside it per round, per batch size")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (one request per core)")
    p.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    return p.parse_args(argv)


def ensure_export(args):
    from bahe.serving.export import ExportConfig, export
    from bahe.serving.export_store import ExportVersion, latest_version
    from bahe.serving.restore import checkpoint_digest, restore_run, select_checkpoint

    files = tuple(args.data_dir / f"{s}.parquet" for s in ("train", "valid", "test"))
    if latest_version(args.export):
        version = ExportVersion.open(args.export)
        if version.manifest["producer"]["checkpoint_sha256"] == checkpoint_digest(select_checkpoint(args.run, "best")[0]) \
                and "predictor_int8.pt" in version.manifest["files"]:
            return version, restore_run(args.run, data_dir=args.data_dir), None
    summary = export(ExportConfig(run=args.run, files=files, out=args.export, data_dir=args.data_dir,
                                  predictor_tables=("fp32", "int8"), show_progress=False))
    return ExportVersion.open(args.export), restore_run(args.run, data_dir=args.data_dir), summary


def dlrm_arm(restored, lean: bool = False):
    """torchrec's DLRM with the run's ID tables and dense arch, over-arch sizes as the run's, exported as (a);
    ``lean``: its modules through (a)'s interaction code (serving/predictor.py ``lean_interaction_logits``)."""
    from torchrec import EmbeddingBagCollection
    from torchrec.models.dlrm import DLRM

    from bahe.serving.predictor import dlrm_predictor, predictor_bytes, script

    model, arch = restored.model, restored.config.arch
    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(tables=model.sparse_arch.embedding_bag_collection.embedding_bag_configs())
    dlrm = DLRM(ebc, len(restored.schema.dense_columns), list(arch.dense_arch_layer_sizes),
                list(arch.over_arch_layer_sizes))
    dlrm.sparse_arch.load_state_dict(model.sparse_arch.state_dict())
    dlrm.dense_arch.load_state_dict(model.dense_arch.state_dict())
    data = predictor_bytes(script(dlrm_predictor(dlrm.eval(), restored.batcher, restored.normalizer, lean=lean)), {})
    import fbgemm_gpu  # noqa: F401

    return torch.jit.load(io.BytesIO(data))


def auc(logits: torch.Tensor, labels: np.ndarray) -> float:
    from torchmetrics.functional.classification import binary_auroc

    return float(binary_auroc(torch.sigmoid(logits), torch.from_numpy(labels.astype(np.int64))))


@torch.no_grad()
def parity(restored, version, predictors, test, batch: int = 512) -> dict:
    from bahe.serving.features import user_features
    from bahe.serving.requests import FeatureCache, request_tensors

    cache = FeatureCache(version)
    full, per_row, per_row8, cached, cached_rows = [], [], [], [], []
    user_ids, stamps = test.column("user_id").to_numpy(), test.column("timestamp").to_numpy()
    cache_rows = cache.user_rows(user_ids)
    newest = (cache_rows >= 0) & (version.table("users.parquet").column("as_of").to_numpy()[cache_rows] == stamps)
    for start in range(0, test.num_rows, batch):
        part = test.slice(start, batch)
        features = restored.batcher(part)
        full.append(restored.model(features.dense_features, features.sparse_features,
                                   features.behaviour_features).squeeze(-1))
        inputs = request_tensors(part, version.manifest)
        users = torch.from_numpy(user_features(restored.model.text_arch, restored.batcher, part))
        items = cache.item_text(cache.store_ids(part.column("item_text")))
        per_row.append(predictors["a"](*inputs, users, items))
        per_row8.append(predictors["a8"](*inputs, users, items))
        cached.append(predictors["a"](*inputs, *cache.for_rows(part)))
        cached_rows.append(torch.from_numpy(newest[start:start + batch]))
    full, per_row, per_row8 = torch.cat(full), torch.cat(per_row), torch.cat(per_row8)
    cached, cached_rows = torch.cat(cached), torch.cat(cached_rows)
    labels = test.column("label").to_numpy()
    return {"rows": test.num_rows, "max_abs_diff": float((per_row - full).abs().max()),
            "cached_rows": int(cached_rows.sum()),
            "cached_max_abs_diff": float((cached - full)[cached_rows].abs().max()) if cached_rows.any() else None,
            "auc_full_model": auc(full, labels), "auc_fp32_tables": auc(per_row, labels),
            "auc_int8_tables": auc(per_row8, labels), "int8_max_abs_diff": float((per_row8 - full).abs().max())}


def prepared_requests(restored, version, cache, test, size: int, count: int, rng) -> list[dict]:
    """``count`` requests of ``size`` random test rows: the predictor's input tensors, user ids, item store ids,
    and the batch the full model takes."""
    from bahe.serving.requests import request_tensors

    out = []
    for _ in range(count):
        part = test.take(rng.choice(test.num_rows, size, replace=size > test.num_rows))
        out.append({"inputs": request_tensors(part, version.manifest), "users": part.column("user_id").to_numpy(),
                    "items": cache.store_ids(part.column("item_text")), "batch": restored.batcher(part)})
    return out


def timed_arms(restored, predictors, cache) -> dict:
    """arm -> f(request) running it as a server would (for (a): the cache gather included)."""

    def gather(r):  # the request's cached features out of the export held in memory
        r["text"] = (cache.user_text(cache.user_rows(r["users"])), cache.item_text(r["items"]))
        return r["text"]

    def cached(module):
        return lambda r: module(*r["inputs"], *r["text"])

    def full(r):
        b = r["batch"]
        return restored.model(b.dense_features, b.sparse_features, b.behaviour_features)

    return {"a": cached(predictors["a"]), "g": gather, "a8": cached(predictors["a8"]),
            "b": lambda r: predictors["b"](*r["inputs"]), "bl": lambda r: predictors["bl"](*r["inputs"]), "c": full}


def _stats(samples: list[float], size: int) -> dict:
    ms = np.asarray(samples) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()),
            "rows_per_s": float(size / (ms.mean() / 1e3)), "calls": len(ms)}


@torch.no_grad()
def latency(arms: dict, requests: dict[int, list[dict]], rounds: int, calls: dict[int, int],
            heavy_calls: dict[int, int]) -> dict:
    """Per batch size and arm: p50 / p99 / mean per-call latency and rows/s.

    Every round, for each batch size in turn: ``calls`` turns of the light arms (a, g, a8, b), each turn in a
    fresh random order (no arm always follows another); then ``heavy_calls`` turns of (c) and (a) in random
    order -- (c) apart, so that its large activations do not evict the light arms' weights between their
    calls. (c)/(a) compares (c) with the (a) calls made beside it.
    """
    light = [name for name in arms if name != "c"]
    for pool in requests.values():  # (a) runs on the features the request's ids gather (arm g)
        for r in pool:
            arms["g"](r)
    for size in requests:  # warm-up: TorchScript's profiling executor specialises on the first calls
        for name in arms:
            for r in requests[size][:3]:
                arms[name](r)
    times = {size: {name: [] for name in [*light, "c", "a_beside_c"]} for size in requests}
    order = np.random.default_rng(1)
    for round_ in range(rounds):
        for size, pool in requests.items():
            for phase, names, count in (("light", light, calls[size]), ("heavy", ["c", "a"], heavy_calls[size])):
                for call in range(count):
                    request = pool[(round_ * count + call) % len(pool)]
                    for name in order.permutation(names):
                        began = time.perf_counter()
                        arms[name](request)
                        key = "a_beside_c" if phase == "heavy" and name == "a" else name
                        times[size][key].append(time.perf_counter() - began)
    out = {}
    for size, per_arm in times.items():
        row = {name: _stats(samples, size) for name, samples in per_arm.items()}
        row["a_over_b_p50"] = row["a"]["p50_ms"] / row["b"]["p50_ms"]
        row["a_over_lean_b_p50"] = row["a"]["p50_ms"] / row["bl"]["p50_ms"]
        row["a_over_b_p99"] = row["a"]["p99_ms"] / row["b"]["p99_ms"]
        row["a_over_b_throughput"] = row["b"]["rows_per_s"] / row["a"]["rows_per_s"]
        row["a_plus_gather_over_b_p50"] = (row["a"]["p50_ms"] + row["g"]["p50_ms"]) / row["b"]["p50_ms"]
        row["c_over_a_p50"] = row["c"]["p50_ms"] / row["a_beside_c"]["p50_ms"]
        row["c_over_a_throughput"] = row["a_beside_c"]["rows_per_s"] / row["c"]["rows_per_s"]
        out[str(size)] = row
    return out


def markdown(result: dict) -> str:
    p, lines = result["parity"], []
    lines += ["# Serving: cached-BAHE predictor vs torchrec's DLRM (CPU)", "",
              f"Command: `{result['command']}`", "",
              f"Machine: {result['machine']['cpu_model']}, {result['machine']['cpu_count']} cores SHARED with other "
              f"jobs during the run (load average {result['machine']['loadavg_start'][0]:.1f} at the start), "
              f"{result['threads']} torch thread(s); torch {result['versions']['torch']}, torchrec "
              f"{result['versions'].get('torchrec')}. Run: `{result['run']}` ({result['checkpoint']}, the best by "
              f"valid), made with: `{RECIPE}`.", "",
              "## Parity (every row of the MovieLens test split)", "",
              "| check | rows | max abs logit difference |", "|---|---|---|",
              f"| exported predictor (fp32 tables) + exporter's text features vs the full model | {p['rows']:,} | "
              f"{p['max_abs_diff']:.2e} |",
              f"| the same, user features read from the export (rows that are their user's newest sample) | "
              f"{p['cached_rows']:,} | {p['cached_max_abs_diff']:.2e} |",
              f"| int8 ID tables vs the full model | {p['rows']:,} | {p['int8_max_abs_diff']:.2e} |", "",
              f"Test AUC: full model {p['auc_full_model']:.6f}, exported fp32 {p['auc_fp32_tables']:.6f}, "
              f"exported int8 tables {p['auc_int8_tables']:.6f} (change {p['auc_int8_tables'] - p['auc_fp32_tables']:+.6f}).",
              "", "## Latency per call and throughput", "",
              "| batch | arm | p50 ms | p99 ms | rows/s | calls |", "|---|---|---|---|---|---|"]
    for size, row in result["latency"].items():
        for arm, label in ARMS.items():
            r = row[arm]
            lines.append(f"| {size} | ({arm}) {label} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['rows_per_s']:,.0f} | "
                         f"{r['calls']} |")
    lines += ["", "| batch | (a)/(b) p50 | (a)/(b) p99 | (b)/(a) throughput | (a)/(bl) p50 | ((a)+(g))/(b) p50 | "
              "(c)/(a) p50 | (a)/(c) throughput |", "|---|---|---|---|---|---|---|---|"]
    for size, row in result["latency"].items():
        lines.append(f"| {size} | {row['a_over_b_p50']:.2f}x | {row['a_over_b_p99']:.2f}x | {row['a_over_b_throughput']:.2f}x "
                     f"| {row['a_over_lean_b_p50']:.2f}x "
                     f"| {row['a_plus_gather_over_b_p50']:.2f}x | {row['c_over_a_p50']:.1f}x | {row['c_over_a_throughput']:.1f}x |")
    lines += ["", "Target: (a) <= 1.2x (b) at every batch size. (a) is the exported predictor given the request's "
              "cached text features, as (b) is given its ID features; (g) is gathering those features from the export "
              "held in memory (user id -> row by binary search, store id -> row), a feature-store lookup timed on its "
              "own; (bl) is torchrec's DLRM modules run through (a)'s leaner interaction code (one concatenation, one "
              "index_select, identical logits), so (a)/(bl) is the cost of BAHE's N + 1 extra features alone. "
              "(a) and (b) include the dense transform and id hashing inside the exported graph; (c) gets its "
              "inputs already batched by the run's batcher. In one process: the light arms (a), (g), (a8), (b) alternate "
              "call by call in a fresh random order each turn; (c) alternates with (a) in turns of its own, and (c)/(a) "
              "uses those (a) calls. The machine is shared: at batch 512, where a call takes milliseconds and is often "
              "preempted, the p50 ratio moves from run to run (docs/serving.md gives the spread seen).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not len(args.calls) == len(args.heavy_calls) == len(args.batches):
        raise SystemExit("--calls and --heavy-calls need one count per --batches size")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    from bahe.ctr_data.parquet_io import SampleReader
    from bahe.serving.predictor import load_predictor

    began = time.perf_counter()
    version, restored, summary = ensure_export(args)
    predictors = {"a": load_predictor(version.path / "predictor.pt")[0],
                  "a8": load_predictor(version.path / "predictor_int8.pt")[0], "b": dlrm_arm(restored),
                  "bl": dlrm_arm(restored, lean=True)}
    test = SampleReader(args.data_dir / "test.parquet").read_all()
    result = {"command": "python " + shlex.join(["bench/serving_bench.py", *(argv or sys.argv[1:])]),
              "machine": machine(), "versions": versions(), "threads": args.threads, "run": str(args.run),
              "checkpoint": version.manifest["producer"]["checkpoint"], "export": str(version.path),
              "export_summary": summary}
    print("parity ...", file=sys.stderr, flush=True)
    result["parity"] = parity(restored, version, predictors, test)
    print(json.dumps(result["parity"]), file=sys.stderr, flush=True)
    rng = np.random.default_rng(0)
    from bahe.serving.requests import FeatureCache

    cache = FeatureCache(version)
    requests = {size: prepared_requests(restored, version, cache, test, size, 8, rng) for size in args.batches}
    print("latency ...", file=sys.stderr, flush=True)
    result["latency"] = latency(timed_arms(restored, predictors, cache), requests, args.rounds,
                                dict(zip(args.batches, args.calls)), dict(zip(args.batches, args.heavy_calls)))
    result["seconds"] = round(time.perf_counter() - began, 1)
    text = markdown(result)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
