"""How much does a title say about an item the model has never trained on? (issue 31, item 4: why the cold-item
lift is small on MovieLens-100K).

On the item-cold split, fit a ridge regression from each WARM item's features to its train positive rate
(weighted by its train rows), with the ridge strength chosen by 5-fold cross-validation over the warm items,
and read its predictions on the held-out items of VALID (never test): the row-weighted correlation with their
valid positive rate. Feature sets: the item's genres and release decade (what the DLRM-only arm has), its title
vector from each encoder (frozen, as the behaviour store holds it), and both. A title that carried a cold item's
appeal beyond its genres would raise "both" above "genres + decade".

  python -m bench.title_signal_bench                      # SmolLM2 k = 8 (the store's), k = 30 last token, MiniLM
  python -m bench.title_signal_bench --encoders smollm2-135m:8:mean --out /tmp/t.json

Writes docs/bench/title_signal.json and a markdown table beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LAMBDAS = (1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6)
DEFAULT_ENCODERS = ("smollm2-135m:8:mean", "smollm2-135m:30:last", "minilm-l6:6:mean")


def item_table(path: Path) -> dict[int, dict]:
    """item -> {positives, rows, title, genres, decade} of one split."""
    import pyarrow.parquet as pq

    columns = ["item_id", "label", "item_text", "cat_genres", "cat_release_decade"]
    t = pq.read_table(path, columns=columns).to_pydict()
    items: dict[int, dict] = defaultdict(lambda: {"positives": 0, "rows": 0})
    for item, label, title, genres, decade in zip(*(t[c] for c in columns)):
        entry = items[item]
        entry["positives"] += label
        entry["rows"] += 1
        entry.update(title=title, genres=genres, decade=decade)
    return dict(items)


def attribute_matrix(items: list[dict], width: int = 64) -> np.ndarray:
    """One-hot genres and decade (the categorical codes, hashed into ``width`` columns each)."""
    out = np.zeros((len(items), 2 * width))
    for row, item in enumerate(items):
        for code in item["genres"]:
            out[row, code % width] = 1.0
        for code in item["decade"]:
            out[row, width + code % width] = 1.0
    return out


def ridge(x: np.ndarray, y: np.ndarray, w: np.ndarray, lam: float) -> np.ndarray:
    """Weighted ridge with an unpenalised intercept; returns the coefficients (last: intercept)."""
    a = np.c_[x, np.ones(len(x))] * np.sqrt(w)[:, None]
    penalty = lam * np.eye(a.shape[1])
    penalty[-1, -1] = 0.0
    return np.linalg.solve(a.T @ a + penalty, a.T @ (y * np.sqrt(w)))


def predict(coef: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.c_[x, np.ones(len(x))] @ coef


def weighted_corr(a: np.ndarray, b: np.ndarray, w: np.ndarray) -> float:
    a, b = a - np.average(a, weights=w), b - np.average(b, weights=w)
    return float(np.average(a * b, weights=w) / np.sqrt(np.average(a * a, weights=w) * np.average(b * b, weights=w)))


def choose_lambda(x: np.ndarray, y: np.ndarray, w: np.ndarray, folds: int = 5, seed: int = 0) -> float:
    """The ridge strength with the best weighted squared error over ``folds`` folds of the warm items."""
    fold = np.random.default_rng(seed).permutation(len(x)) % folds
    errors = []
    for lam in LAMBDAS:
        error = 0.0
        for f in range(folds):
            fit, held = fold != f, fold == f
            coef = ridge(x[fit], y[fit], w[fit], lam)
            error += float(np.sum(w[held] * (predict(coef, x[held]) - y[held]) ** 2))
        errors.append(error)
    return LAMBDAS[int(np.argmin(errors))]


def fit(x_warm, y_warm, w_warm, x_cold) -> tuple[float, np.ndarray, np.ndarray]:
    """(ridge strength, predictions on the warm items, on the cold items), features standardised on warm."""
    mean, std = x_warm.mean(0), x_warm.std(0) + 1e-6
    x_warm, x_cold = (x_warm - mean) / std, (x_cold - mean) / std
    lam = choose_lambda(x_warm, y_warm, w_warm)
    coef = ridge(x_warm, y_warm, w_warm, lam)
    return lam, predict(coef, x_warm), predict(coef, x_cold)


def score(x_warm, y_warm, w_warm, x_cold, y_cold, w_cold) -> dict:
    lam, _, cold = fit(x_warm, y_warm, w_warm, x_cold)
    return {"lambda": lam, "corr": weighted_corr(cold, y_cold, w_cold)}


def stacked(a_warm, v_warm, y_warm, w_warm, a_cold, v_cold, y_cold, w_cold) -> dict:
    """Genres + decade first, then the title on what they leave (each its own ridge strength)."""
    lam_a, base_warm, base_cold = fit(a_warm, y_warm, w_warm, a_cold)
    lam_v, _, rest_cold = fit(v_warm, y_warm - base_warm, w_warm, v_cold)
    return {"lambda": [lam_a, lam_v], "corr": weighted_corr(base_cold + rest_cold, y_cold, w_cold)}


def encode(spec: str, titles: list[str]) -> np.ndarray:
    from bahe.embeddings.encoder import EncoderConfig, ShallowEncoder

    model, k, pooling = spec.split(":")
    vectors, _ = ShallowEncoder(EncoderConfig(model=model, k=int(k), pooling=pooling, device="cpu")).encode(titles)
    return np.asarray(vectors, dtype=np.float64)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.title_signal_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT / "runs" / "quality" / "data-item_cold",
                   help="an item-cold split (bahe-data movielens --split item_cold; made when missing)")
    p.add_argument("--encoders", nargs="+", default=list(DEFAULT_ENCODERS), metavar="MODEL:K:POOLING")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "bench" / "title_signal.json")
    args = p.parse_args(argv)
    if not (args.data / "valid.parquet").is_file():
        from bahe.ctr_data.movielens import MovieLensConfig, write_movielens

        write_movielens(MovieLensConfig(max_history=5, protocol="item_cold", cold_share=0.2, seed=0), args.data)
    warm = item_table(args.data / "train.parquet")
    cold = {k: v for k, v in item_table(args.data / "valid.parquet").items() if k not in warm}
    warm_items, cold_items = list(warm.values()), list(cold.values())

    def target(items):
        return (np.array([i["positives"] / i["rows"] for i in items]), np.array([i["rows"] for i in items], float))

    (y_warm, w_warm), (y_cold, w_cold) = target(warm_items), target(cold_items)
    attributes = attribute_matrix(warm_items + cold_items)
    a_warm, a_cold = attributes[:len(warm)], attributes[len(warm):]
    results = {"genres + decade": score(a_warm, y_warm, w_warm, a_cold, y_cold, w_cold)}
    for spec in args.encoders:
        start = time.perf_counter()
        vectors = encode(spec, [i["title"] for i in warm_items + cold_items])
        v_warm, v_cold = vectors[:len(warm)], vectors[len(warm):]
        results[f"title {spec}"] = score(v_warm, y_warm, w_warm, v_cold, y_cold, w_cold)
        results[f"both {spec}"] = score(np.c_[v_warm, a_warm], y_warm, w_warm, np.c_[v_cold, a_cold], y_cold, w_cold)
        results[f"genres + decade, then title on the rest {spec}"] = stacked(a_warm, v_warm, y_warm, w_warm, a_cold,
                                                                           v_cold, y_cold, w_cold)
        results[f"title {spec}"]["encode_seconds"] = time.perf_counter() - start
        print(f"{spec}: title {results[f'title {spec}']['corr']:.3f}, both {results[f'both {spec}']['corr']:.3f}",
              flush=True)
    report = {"data": str(args.data), "warm_items": len(warm), "cold_valid_items": len(cold),
              "cold_valid_rows": int(w_cold.sum()), "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    command = " ".join(["python -m bench.title_signal_bench", *(argv if argv is not None else sys.argv[1:])])
    lines = [f"# What a title says about a never-seen item\n\nProduced by `{command}` ({platform.platform()}, "
             f"{os.cpu_count()} CPUs). Ridge from {len(warm)} warm items' features to their train positive rate "
             f"(strength by 5-fold CV on the warm items), read on the {len(cold)} items of VALID that train never "
             f"saw ({int(w_cold.sum())} rows): row-weighted correlation with their valid positive rate.\n",
             "| features | correlation | ridge strength |", "|---|---|---|"]
    lines += [f"| {name} | {r['corr']:.3f} | {' / '.join(f'{x:g}' for x in np.atleast_1d(r['lambda']))} |"
              for name, r in results.items()]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
