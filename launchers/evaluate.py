"""`bahe-evaluate`: score a trained run's latest checkpoint on valid and test; one process per rank.

  torchrun --nproc_per_node 2 -m bahe.launchers.evaluate --checkpoint runs/demo/bahe \\
      --data-dir runs/demo/data --store runs/demo/store [the model flags the run was trained with]

The model flags (arm, dims, layers, ...) must be those of the training run: the checkpoint holds
weights, not the architecture. The run is restored exactly as a resumed training would be, nothing
is trained, and the metrics go to <out>/evaluation.json (default: <run>/evaluation/; the run's own
metrics.json and TensorBoard logs are left as they are).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from bahe.launchers.train import build_parser, config_from_args, quiet_library_deprecations


def main(argv: list[str] | None = None) -> int:
    quiet_library_deprecations()
    parser = build_parser()
    parser.prog, parser.description = "bahe-evaluate", __doc__
    parser.add_argument("--checkpoint", type=Path, required=True, help="the training run folder (its --out)")
    for action in parser._actions:  # --out is optional here: the metrics default to the run folder
        if action.dest == "out":
            action.required = False
    args = parser.parse_args(argv)
    run = args.checkpoint
    latest = run / "checkpoints" / "LATEST"
    if not latest.is_file():
        print(f"bahe-evaluate: error: {run} holds no checkpoint (no checkpoints/LATEST); pass a training run's --out",
              file=sys.stderr)
        return 2
    step = int(latest.read_text().strip().split("-")[-1])
    target = args.out or run / "evaluation"
    args.out = target
    try:
        config = dataclasses.replace(config_from_args(args), steps=step, eval_every=0, checkpoint_every=0,
                                     checkpoint_dir=run / "checkpoints")
    except (ValueError, FileNotFoundError) as err:
        print(f"bahe-evaluate: error: {err}", file=sys.stderr)
        return 2
    from bahe.training.loop import run_training

    summary = run_training(config)  # restores step `step` of `step`: evaluation only
    import torch.distributed as dist

    if dist.get_rank() == 0:
        result = {"checkpoint": str(run), "step": step, "valid": summary["valid"], "test": summary["test"]}
        target.mkdir(parents=True, exist_ok=True)
        (target / "evaluation.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
