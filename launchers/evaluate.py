"""`bahe-evaluate`: score a trained run's best checkpoint (by valid; or its latest) on valid and test.

  torchrun --nproc_per_node 2 -m bahe.launchers.evaluate --checkpoint runs/demo/bahe \\
      --data-dir runs/demo/data --store runs/demo/store [the model flags the run was trained with]

The model flags (arm, dims, layers, ...) must be those of the training run: the checkpoint holds
weights, not the architecture. Those left out default to the run's record (<run>/run_config.json);
one given that differs is refused, naming it. The run is restored exactly as a resumed training would be, nothing
is trained, and the metrics go to <out>/evaluation.json (default: <run>/evaluation/; the run's own
metrics.json and TensorBoard logs are left as they are).

Each split's metrics also hold ``segments``: AUC and log loss per item popularity segment (training rows of
the item in the run's train split, as the run recorded them in <run>/item_counts.parquet; cold = 0, tail
<= 20, torso <= 200, head: --segment-thresholds) and per history length segment (behaviours in the row's
sequences: --history-thresholds), each with its rows and a bootstrap interval (docs/segments.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

from bahe.launchers.segment_flags import segment_spec
from bahe.launchers.train import build_parser as train_parser
from bahe.launchers.train import config_from_args, quiet_library_deprecations


def build_parser() -> argparse.ArgumentParser:
    """bahe-train's parser (its segment flags included) with --checkpoint and --which; --out optional, the
    training-only flags hidden."""
    parser = train_parser()
    parser.prog, parser.description = "bahe-evaluate", __doc__
    parser.add_argument("--checkpoint", type=Path, required=True, help="the training run folder (its --out)")
    parser.add_argument("--which", choices=("best", "latest"), default="best",
                        help="best: the checkpoint the run selected on valid (its BEST.json; the latest when it "
                             "made no selection); latest: the last checkpoint")
    for action in parser._actions:  # --out is optional here: the metrics default to the run folder
        if action.dest == "out":
            action.required = False
        if action.dest in ("init_from", "init_optimizer", "frozen_text_from", "data_lanes"):  # training only
            action.help = argparse.SUPPRESS
    return parser


def main(argv: list[str] | None = None) -> int:
    quiet_library_deprecations()
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.init_from is not None or args.init_optimizer or args.frozen_text_from is not None:
        parser.error("--init-from / --init-optimizer / --frozen-text-from start a training run (bahe-train); "
                     "bahe-evaluate scores the --checkpoint run as it is")
    run = args.checkpoint
    from bahe.training.checkpoint import Checkpointer
    from bahe.training.run_record import apply_record, check_resume
    from bahe.training.selection import recorded_metric

    try:
        segments = segment_spec(args)  # bad thresholds: one line, before any work
        latest = Checkpointer(run / "checkpoints").latest()  # a damaged LATEST: one line, below
        if latest is None:
            raise FileNotFoundError(f"{run} holds no checkpoint (no checkpoints/LATEST); pass a training run's --out")
        apply_record(args, argv, run)  # model flags left out default to the run's run_config.json
        args.out = args.out or run / "evaluation"
        metric = recorded_metric(run / "checkpoints")  # the run's own selection metric, if it selected
        config = dataclasses.replace(config_from_args(args), steps=int(latest.name.split("-")[-1]), eval_every=0,
                                     checkpoint_every=0, checkpoint_dir=run / "checkpoints",
                                     use_best=args.which == "best", select_by=metric or args.select_by)
        check_resume(config)  # model flags given that differ from the run's: refused
    except (ValueError, FileNotFoundError) as err:
        print(f"bahe-evaluate: error: {err}", file=sys.stderr)
        return 2
    from bahe.training.loop import run_training

    fresh = not args.out.exists()
    try:
        summary = run_training(config, segments=segments)  # restores step `step` of `step`: evaluation only
    except (ValueError, FileNotFoundError) as err:  # a damaged or foreign checkpoint: one line on every rank
        if fresh and os.environ.get("RANK", "0") == "0":  # the folder the run's lock made: nothing left behind
            _remove_if_only_a_lock(args.out)
        if os.environ.get("BAHE_TRACEBACK"):
            raise
        print(f"bahe-evaluate: error: {err} (BAHE_TRACEBACK=1 shows where)", file=sys.stderr)
        return 2
    import torch.distributed as dist

    if dist.get_rank() == 0:
        result = {"checkpoint": str(run), "step": summary["selected_step"], "which": args.which,
                  "valid": summary["valid"], "test": summary["test"]}
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "evaluation.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result))
    from bahe.embeddings.process_group import close_process_group

    close_process_group()  # joins gloo's threads now, not at interpreter exit
    return 0


def _remove_if_only_a_lock(folder: Path) -> None:
    try:
        if {p.name for p in folder.iterdir()} <= {".lock"}:
            shutil.rmtree(folder)
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(main())
