"""`bahe-predict`: score sample files with a trained run's model, streaming, on any number of ranks.

  bahe-predict --run-dir runs/demo/bahe --data day1.parquet day2.parquet --out scores.parquet
  bahe-predict --run-dir runs/demo/bahe --features serving/demo --data day1.parquet --out scores.parquet
  torchrun --nproc_per_node 2 -m bahe.launchers.predict --run-dir runs/demo/bahe --data day1.parquet --out scores.parquet
  python -m bahe.launchers.submit --profile local predict -- --run runs/demo/bahe --data day1.parquet --out scores.parquet
  (the TorchX predict component: its --run becomes bahe-predict's --run-dir)

--run-dir names the run; --run is the same on one process, but torchrun refuses it: torchrun reads every
--option on its command line, also those after the module, and --run could be its own --run-path.

Writes one row per input row, in input order (the files concatenated in the order given): user_id,
item_id, timestamp and label of the input, the model's score (sigmoid probability, float32) and logit.
The scores are the numbers bahe-evaluate computes for the same rows. The run's BEST checkpoint (selected on
valid) is used by default, --which latest takes the last; the file's Parquet metadata (key bahe.predict)
records the run, the checkpoint, its step and which. The model is rebuilt from the run's run_config.json,
which also records the dense statistics the weights were trained with and the training data folder (its
train split gives the feature schema; --data-dir when it has moved).

--features EXPORT takes the text features from a bahe-export folder (its LATEST version, or a version
folder vNNNNNN) instead of running the LLM's deep layers: the item feature by the title's store id, the
user features by user id (a user the export lacks: those of a user without behaviours), then the model's
interaction part. The export must come from the checkpoint bahe-predict selects (its SHA-256) of a BAHE
run; its checksums are verified. The metadata's text_features records the export version and the counts.
A row scores as the full model scores it when it is its user's sample in the export (as_of).

Memory stays bounded: rows are read a batch at a time and the output is written as it goes. Each rank
scores a contiguous share of the rows into a part file beside --out (so --out's folder must be shared by
all ranks); rank 0 joins the parts into --out, atomically. On an error nothing is left at or beside --out.

The summary (and the metadata) also holds ``segments``: AUC and log loss of the scored rows against their labels,
per item popularity (the run's recorded training rows per item) and history length segment, with row counts and
bootstrap intervals (--segment-thresholds, --history-thresholds, --bootstrap, --confidence, --segment-seed, as
bahe-train's and bahe-evaluate's: docs/segments.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from bahe.embeddings.process_group import add_timeout_flag, set_timeout
from bahe.launchers.segment_flags import add_segment_flags, segment_spec

PRECISIONS = ("auto", "bf16", "fp32")  # bahe.model.deep_layers.PRECISIONS (checked by ScoringConfig)
BEHAVIOUR_SHARDINGS = ("auto", "row_wise", "column_wise", "table_wise")  # bahe.model.config's (no torch import here)
# Option strings kept for one process only: under torchrun they are refused (ambiguous with a torchrun option),
# never taken by it; tests/test_doc_commands.py checks both.
SINGLE_PROCESS_ALIASES = ("--run",)
RUN_ALIAS_HELP = ("the same as --run-dir, on one process only: torchrun refuses --run (it reads every --option on "
                  "its command line, and --run could be its own --run-path)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bahe-predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    run = p.add_mutually_exclusive_group(required=True)
    run.add_argument("--run-dir", dest="run", type=Path, metavar="RUN",
                     help="the training run folder (its bahe-train --out)")
    run.add_argument("--run", dest="run", type=Path, metavar="RUN", default=argparse.SUPPRESS,
                     help=RUN_ALIAS_HELP)
    p.add_argument("--data", type=Path, nargs="+", required=True, metavar="FILE",
                   help="sample .parquet files to score (bahe-data's schema; extra columns are ignored)")
    p.add_argument("--out", type=Path, required=True,
                   help="the score file to write (.parquet) in an existing folder; an older file there is replaced")
    p.add_argument("--which", choices=("best", "latest"), default="best",
                   help="best: the checkpoint the run selected on valid (its BEST.json; the latest when it made no "
                        "selection); latest: the last checkpoint")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="the run's training data folder (bahe-train --data-dir): its train.parquet gives the feature "
                        "schema and the dense statistics the model was trained with (default: the one the run records)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="rows per rank per forward call (default: the run's training batch size)")
    p.add_argument("--store", default=None, help="the behaviour store (default: the run's); e.g. a refreshed copy")
    p.add_argument("--llm", default=None, help="the LLM folder or alias (default: the run's)")
    p.add_argument("--llm-precision", choices=PRECISIONS, default="auto",
                   help="compute precision of the LLM layers: auto = bf16 on CUDA, fp32 on CPU")
    p.add_argument("--features", type=Path, default=None, metavar="EXPORT",
                   help="score with the cached text features of a bahe-export folder (its LATEST version) or of one "
                        "version folder, instead of the LLM's deep layers; it must come from the checkpoint selected "
                        "here (--which)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--behaviour-sharding", choices=BEHAVIOUR_SHARDINGS, default="auto",
                   help="how the frozen behaviour table is sharded over the ranks (as bahe-train's; it need not be "
                        "the training run's): row_wise, column_wise, table_wise, or auto (default: row_wise for a "
                        "table of 1 GiB or more, else the planner's choice); rank 0 prints the plan in one line")
    add_timeout_flag(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_segment_flags(p)  # the summary's segment metrics (the scored rows against their labels)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from bahe.serving.scoring_io import check_out

    try:
        segments = segment_spec(args)  # bad thresholds: one line, before any work
        check_out(args.out)  # before torch is imported: a wrong --out costs no start-up
        set_timeout(args.pg_timeout)  # the scorer's process group (training/loop.py setup_distributed)
    except ValueError as err:
        print(f"bahe-predict: error: {err}", file=sys.stderr)
        return 2
    from bahe.launchers.train import quiet_library_deprecations

    quiet_library_deprecations()
    from bahe.model.sharding import use_behaviour_sharding
    from bahe.serving.scoring import score_files

    try:
        with use_behaviour_sharding(args.behaviour_sharding):  # what the scorer's shard_model takes
            summary = score_files(args.run, args.data, args.out, which=args.which, batch_size=args.batch_size,
                                  data_dir=args.data_dir, store=args.store, llm=args.llm,
                                  llm_precision=args.llm_precision, device=args.device, show_progress=not args.quiet,
                                  features=args.features, segments=segments)
    except (ValueError, FileNotFoundError) as err:  # bad input, a damaged run, a failed write: one line
        if os.environ.get("BAHE_TRACEBACK"):
            raise
        print(f"bahe-predict: error: {err} (BAHE_TRACEBACK=1 shows where)", file=sys.stderr)
        _leave_group()
        return 2
    import torch.distributed as dist

    if dist.get_rank() == 0:
        print(f"bahe-predict: {summary['rows']:,} rows of {len(summary['files'])} file(s) -> {summary['out']} with "
              f"{summary['run']} {summary['checkpoint']} ({summary['chosen']}), {summary['world_size']} rank(s), "
              f"{summary['rows_per_s']:,.0f} rows/s{_text_source(summary)}")
        print(json.dumps(summary))
    _leave_group()
    return 0


def _text_source(summary: dict) -> str:
    text = summary.get("text_features") or {}
    if text.get("from") != "export":
        return ""
    return (f", text features of {text['export']} ({text['users_not_in_export']:,} row(s) of users it lacks, "
            f"{text['titles_not_in_store']:,} title(s) not in its store)")


def _leave_group() -> None:
    from bahe.embeddings.process_group import close_process_group

    close_process_group()  # joins gloo's threads now, not at interpreter exit


if __name__ == "__main__":
    sys.exit(main())
