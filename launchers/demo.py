"""`make demo`: the main job end to end on the embedded default (MovieLens-100K + SmolLM2-135M).

Steps run in order; each prints what it did and where its output lies:

1. data   -- MovieLens-100K from the installed wheel -> train/valid/test Parquet + summary.

(The behaviour store, training through TorchX and evaluation join this list as they land.)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ctr_data.movielens import MovieLensConfig, write_movielens
from ctr_data.summary import format_summary, summarize


def prepare_data(out: Path, max_history: int) -> dict[str, Path]:
    paths = write_movielens(MovieLensConfig(max_history=max_history), out / "data")
    print(format_summary(summarize(list(paths.values()))))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launchers.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="where every output goes")
    parser.add_argument("--max-history", type=int, default=20, help="titles kept per behaviour sequence")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    print(f"[1/1] data: MovieLens-100K -> {args.out / 'data'}")
    paths = prepare_data(args.out, args.max_history)
    print(f"\ndemo finished in {time.perf_counter() - start:.1f}s; data: {', '.join(str(p) for p in paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
