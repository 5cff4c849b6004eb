"""`bahe-export`: a trained BAHE run's serving parts -- cached text features and an exported predictor.

  bahe-export --run-dir runs/demo/bahe --data-dir runs/demo/data --data runs/demo/data/*.parquet --out serving/demo
  bahe-export --run-dir runs/demo/bahe --data-dir runs/demo/data --data day2.parquet --out serving/demo   # refresh

Writes the next version of --out (LATEST names it; docs/serving.md):
  items.parquet  every text of the behaviour store: store_id, text, feature (D floats: the item side after the
                 LLM's deep layers, norm and projection);
  users.parquet  every user of --data: user_id, as_of (the timestamp of the sample the behaviours come from),
                 behaviours_<name> (the store ids the model read), features (N x D floats), computed_in;
  predictor.pt   TorchScript: (raw dense features, raw ids, user features, item feature) -> the run's logits
                 (torchrec's quantized ID tables, fp32 = exact; --predictor-tables int8 adds predictor_int8.pt);
  manifest.json  the run, checkpoint (and its SHA-256), store, cut-off, data files, counts, file checksums.

The run's BEST checkpoint (selected on valid) is used by default, as bahe-evaluate and bahe-predict do. A
user's behaviours are those of the user's most recent sample at or before --as-of. Run it again on the same
--out with new data: only users whose behaviours changed and texts new to the store are computed, the other
rows are copied byte for byte (a new checkpoint recomputes everything). Runs on one process, on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

TABLES = ("fp32", "fp16", "int8")  # bahe.serving.predictor.TABLE_DTYPES
SINGLE_PROCESS_ALIASES = ("--run",)  # the older name of --run-dir; bahe-export runs on one process


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bahe-export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run = p.add_mutually_exclusive_group(required=True)
    run.add_argument("--run-dir", dest="run", type=Path, metavar="RUN",
                     help="the training run folder (its bahe-train --out)")
    run.add_argument("--run", dest="run", type=Path, metavar="RUN", default=argparse.SUPPRESS,
                     help="the same as --run-dir (its older name)")
    p.add_argument("--data", type=Path, nargs="+", required=True, metavar="FILE",
                   help="sample .parquet files holding the users' behaviours (bahe-data's schema)")
    p.add_argument("--out", type=Path, required=True,
                   help="the export folder; created if missing, refreshed (a new version) if it holds an export")
    p.add_argument("--as-of", type=int, default=None, metavar="TIMESTAMP",
                   help="cut-off (the data's timestamp unit): each user's behaviours come from the user's most "
                        "recent sample with timestamp <= TIMESTAMP (default: the most recent sample of all)")
    p.add_argument("--which", choices=("best", "latest"), default="best",
                   help="best: the checkpoint the run selected on valid (its BEST.json; the latest when it made no "
                        "selection); latest: the last checkpoint")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="the run's training data folder (bahe-train --data-dir): its train.parquet gives the feature "
                        "schema and dense statistics (default: the one the run records)")
    p.add_argument("--store", default=None, help="the behaviour store (default: the run's); e.g. a refreshed copy")
    p.add_argument("--llm", default=None, help="the LLM folder or alias (default: the run's)")
    p.add_argument("--predictor-tables", nargs="+", choices=TABLES, default=["fp32"],
                   help="ID-table precisions to export predictors with: fp32 (always; exact), int8 and fp16 "
                        "(torchrec's row-wise quantized tables, smaller)")
    p.add_argument("--full", action="store_true", help="recompute every row, even those an earlier export of the "
                                                       "same checkpoint holds")
    p.add_argument("--batch-size", type=int, default=256, help="rows per forward call of the LLM's deep layers")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tables = tuple(dict.fromkeys(["fp32", *args.predictor_tables]))
    from bahe.launchers.train import quiet_library_deprecations

    quiet_library_deprecations()
    import warnings

    warnings.filterwarnings("ignore", module=r"torch\.distributed\.checkpoint")  # DCP into plain tensors: noise
    from bahe.serving.export import ExportConfig, export

    try:
        config = ExportConfig(run=args.run, files=tuple(args.data), out=args.out, which=args.which, as_of=args.as_of,
                              data_dir=args.data_dir, store=args.store, llm=args.llm, predictor_tables=tables,
                              full=args.full, batch_size=args.batch_size, show_progress=not args.quiet)
        summary = export(config)
    except (ValueError, FileNotFoundError) as err:  # bad input, a damaged run or export, a busy folder: one line
        if os.environ.get("BAHE_TRACEBACK"):
            raise
        print(f"bahe-export: error: {err} (BAHE_TRACEBACK=1 shows where)", file=sys.stderr)
        return 2
    items, users = summary["items"], summary["users"]
    print(f"bahe-export: {summary['out']} ({summary['refresh']}) from {args.run} {summary['checkpoint']} "
          f"({summary['chosen']}): items {items['computed']:,} computed, {items['kept']:,} kept; users "
          f"{users['computed']:,} computed, {users['total'] - users['computed']:,} kept; {summary['seconds']:.1f}s")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
