"""The non-learned floor on several MovieLens-100K time splits: every candidate's valid and test AUC, the
one chosen on valid (training/baselines.py), and the floor this project printed before.

    python -m bench.floor_bench [--out docs/bench/floor.json]

Writes the JSON and a markdown table beside it (docs/bench/floor.md). No training: seconds per split.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

SPLITS = {"8:1:1 (the demo's)": (0.8, 0.1, 0.1), "7:1.5:1.5": (0.7, 0.15, 0.15), "6:2:2": (0.6, 0.2, 0.2),
          "9:0.5:0.5": (0.9, 0.05, 0.05)}


def measure() -> dict:
    from bahe.ctr_data.movielens import MovieLensConfig, write_movielens
    from bahe.training.baselines import non_learned_baseline

    results = {}
    for name, fractions in SPLITS.items():
        with tempfile.TemporaryDirectory() as folder:
            write_movielens(MovieLensConfig(max_history=1, split=fractions), Path(folder))
            results[name] = non_learned_baseline(Path(folder))
        print(f"{name}: floor {results[name]['chosen']} test {results[name]['test']:.4f} "
              f"(old floor {results[name]['old_floor']['test']:.4f})", flush=True)
    return results


def markdown(results: dict) -> str:
    names = list(next(iter(results.values()))["candidates"])
    lines = ["# Non-learned floor on MovieLens-100K time splits", "",
             "Command: `python -m bench.floor_bench`. Each cell: valid AUC / test AUC. **Bold**: the candidate with "
             "the best valid AUC, which is the floor (its test AUC is what the learned arms are compared with). "
             "`item_laplace+user_last20` is the floor printed before.", "",
             "| candidate | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
    for name in names:
        cells = []
        for result in results.values():
            cell = f"{result['candidates'][name]['valid']:.4f} / {result['candidates'][name]['test']:.4f}"
            cells.append(f"**{cell}**" if result["chosen"] == name else cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| split | floor (chosen on valid) | its test AUC | old floor's test AUC | new - old |", "|---|---|---|---|---|"]
    for split, result in results.items():
        lines.append(f"| {split} | {result['chosen']} | {result['test']:.4f} | {result['old_floor']['test']:.4f} | "
                     f"{result['test'] - result['old_floor']['test']:+.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/bench/floor.json"))
    args = parser.parse_args(argv)
    results = measure()
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(results))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
