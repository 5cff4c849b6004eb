"""`bahe-train`: train BAHE, the token-level baseline or the DLRM-only arm; one process per rank.

  torchrun --nproc_per_node 2 -m bahe.launchers.train --data-dir runs/demo/data --store runs/demo/store \\
      --out runs/demo/bahe --steps 200
  (or through TorchX: python -m bahe.launchers.submit --profile local train -- ...)

The same command trains every arm (--arm bahe | token_level | dlrm) from the same tables and head.
A run folder that holds a checkpoint resumes from it.

Warm start (the daily update): yesterday's model continues on today's data and refreshed store,
  bahe-train --init-from runs/day1 --store stores/ml --data-dir data/day2 --out runs/day2 --steps 200
(model flags left out default to those of the --init-from run; --store to its store, whose LATEST is the
refresh; step, data position and schedules start at 0).

The downstream model of the paper's AUC_d (training/frozen_text.py): DLRM + a trained BAHE run's text
features, its text arch loaded and frozen, everything else trained from the seed,
  bahe-train --arm bahe --frozen-text-from runs/demo/bahe --store runs/demo/store --data-dir ... --out ...

The valid / test reports and TensorBoard give AUC and log loss per item popularity and history length segment
(--segment-thresholds, --history-thresholds, --bootstrap, --confidence, --segment-seed: docs/segments.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from bahe.embeddings.pretrained import DEFAULT_MODEL
from bahe.embeddings.process_group import add_timeout_flag
from bahe.launchers.segment_flags import add_segment_flags, segment_spec
from bahe.model.config import BEHAVIOUR_SHARDINGS
from bahe.model.deep_layers import ATTENTIONS, POOLINGS, PRECISIONS
from bahe.model.text_levers import USER_AGGREGATIONS, USER_PROJECTIONS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bahe-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data and run")
    g.add_argument("--data-dir", type=Path, default=None,
                   help="folder with train/valid/test.parquet (bahe-data); with --criteo-tsv, where they are "
                        "converted to (default OUT/data)")
    g.add_argument("--criteo-tsv", type=Path, nargs="+", default=[], metavar="DAY_FILE",
                   help="train on Criteo TSV day files (DLRM's layout), oldest first: all but the last day train, "
                        "the last day's halves validate and test (one file: 80/10/10 by row order)")
    g.add_argument("--random-data", action="store_true",
                   help="train on torchrec's RandomRecDataset (Criteo-shaped random batches; speed checks)")
    g.add_argument("--out", type=Path, required=True, help="run folder: tensorboard/, checkpoints/, metrics.json")
    g.add_argument("--arm", choices=("bahe", "token_level", "dlrm"), default="bahe",
                   help="bahe (default), the token-level LLM baseline, or DLRM without text")
    g.add_argument("--steps", type=int, default=None, help="optimisation steps (default 100; or give --epochs)")
    g.add_argument("--epochs", type=float, default=None,
                   help="passes over the train split instead of --steps (e.g. 1 or 2.5; Parquet data)")
    g.add_argument("--batch-size", type=int, default=128, help="samples per rank per step (default 128)")
    g.add_argument("--eval-every", type=int, default=0,
                   help="evaluate on valid every N steps and at the end; the run keeps the best checkpoint and "
                        "reports its valid / test metrics (default 0: only the last step, at the end)")
    g.add_argument("--select-by", choices=("auc", "logloss"), default="auc",
                   help="valid metric that picks the best checkpoint (default auc)")
    g.add_argument("--patience", type=int, default=0,
                   help="stop after P evaluations without improvement (default 0: never stop early)")
    g.add_argument("--eval-batches", type=int, default=None, help="cap on valid batches per periodic evaluation")
    g.add_argument("--checkpoint-every", type=int, default=0, help="checkpoint every N steps (always at the end)")
    g.add_argument("--stop-at", type=int, default=None,
                   help="end this invocation after step N with a checkpoint (e.g. a time limit); rerun to resume")
    g.add_argument("--log-every", type=int, default=10, help="steps between TensorBoard points (default 10)")
    g.add_argument("--seed", type=int, default=0, help="model initialisation and training order")
    g.add_argument("--no-shuffle", action="store_true", help="train in file (time) order instead of shuffled")
    g.add_argument("--data-lanes", type=int, default=1,
                   help="deal each epoch's training order into L lanes so that each rank reads only ~1/ranks of the "
                        "train split (L a multiple of the ranks, e.g. 8; batch x ranks a multiple of L); default 1")
    g.add_argument("--no-dense-standardize", action="store_true",
                   help="feed log1p(dense) as it is, without z-scoring it with the train split's statistics")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    g.add_argument("--behaviour-sharding", choices=BEHAVIOUR_SHARDINGS, default="auto",
                   help="how the frozen behaviour table is sharded over the ranks: row_wise (each rank 1/W of the "
                        "rows), column_wise (1/W of the columns), table_wise (one rank holds it all), or auto "
                        "(default): row_wise for a table of 1 GiB or more, else the planner's choice. Rank 0 prints "
                        "the plan in one line. Not a model flag: a resume or evaluation may use another")
    add_timeout_flag(g)
    g.add_argument("--init-from", type=Path, default=None, metavar="RUN_OR_CHECKPOINT",
                   help="warm start: every trainable weight from a previous run's selected checkpoint (best by "
                        "valid, else latest) or from RUN/checkpoints/step-NNNNNNN; the behaviour table from --store "
                        "(that run's store or a refresh of it: new texts are new rows); step, data position and "
                        "schedules start at 0. Model flags left out default to that run's; different ones, or a "
                        "store whose shared rows differ, are refused. Not applied when --out holds its own "
                        "checkpoint (that resumes)")
    g.add_argument("--frozen-text-from", type=Path, default=None, metavar="RUN_OR_CHECKPOINT",
                   help="the downstream model of the paper's AUC_d (--arm bahe): the text arch (deep LLM layers, "
                        "norms, projections) of a BAHE run's selected checkpoint (best by valid, else latest; or "
                        "RUN/checkpoints/step-NNNNNNN), loaded and frozen (no gradients, eval mode), so the text "
                        "features are the ones that run exports; ID tables, dense and over arch train from the "
                        "seed. The text flags (k, deep layers, D, M, pooling, attention) and the store must be "
                        "that run's (or a refresh of it); others are refused. Not with --init-from")
    g.add_argument("--init-optimizer", action="store_true",
                   help="with --init-from: also load its optimizer state (row-wise Adagrad of the ID tables, "
                        "AdamW moments; default: fresh)")
    t = p.add_argument_group("text (ignored by --arm dlrm)")
    t.add_argument("--store", help="behaviour store folder (bahe-encode build --store ...)")
    t.add_argument("--llm", default=DEFAULT_MODEL, help=f"the model the store was encoded with (default {DEFAULT_MODEL})")
    t.add_argument("--k", type=int, default=None, help="shallow layers (default: the store's)")
    t.add_argument("--deep-layers", type=int, default=None, help="trainable deep layers (default: all the rest)")
    t.add_argument("--max-behaviours", type=int, default=50, help="M: most recent behaviours per sequence")
    t.add_argument("--max-unknown-rate", type=float, default=0.05,
                   help="refuse to start when more than this share of the train split's first texts is not in the "
                        "store, i.e. the store was built for other data (default 0.05)")
    t.add_argument("--max-user-tokens", type=int, default=2048, help="token budget per user of the token-level arm")
    t.add_argument("--pooling", choices=POOLINGS, default="mean")
    t.add_argument("--attention", choices=ATTENTIONS, default="causal")
    t.add_argument("--user-projection", choices=USER_PROJECTIONS, default="shared",
                   help="the user side's H -> D projection (--arm bahe): shared (default) by the N behaviour sequence "
                        "types, or per_type: each type its own")
    t.add_argument("--user-aggregation", choices=USER_AGGREGATIONS, default="pooled",
                   help="how a user's behaviour positions become one feature per type (--arm bahe): pooled (default: "
                        "the deep layers' --pooling, then norm and projection) or target_attention (each position "
                        "normed and projected, then attended with the item text feature as query, DIN-style); "
                        "target_attention makes user features depend on the item, so bahe-export, bahe-predict "
                        "--features and --frozen-text-from refuse the run")
    t.add_argument("--gradient-checkpointing", action="store_true")
    t.add_argument("--llm-precision", choices=PRECISIONS, default="auto",
                   help="compute precision of the LLM layers: auto = bf16 autocast on CUDA, fp32 on CPU; "
                        "bf16 also on CPU (fast with AMX); weights stay fp32")
    m = p.add_argument_group("tables, head and optimisers")
    m.add_argument("--embedding-dim", type=int, default=64, help="D of every ID table and text feature")
    m.add_argument("--table-rows", type=int, default=100_000, help="hash size of each ID table")
    m.add_argument("--table-rows-for", nargs="+", default=[], metavar="FEATURE=ROWS",
                   help="per-feature hash sizes, e.g. item_id=2000 cat_genres=32 (others: --table-rows)")
    m.add_argument("--drop-id-features", nargs="+", default=[], metavar="FEATURE",
                   help="ID features left out of the model, e.g. user_id when test users are mostly new")
    m.add_argument("--cold-item-dropout", type=float, default=0.0, metavar="SHARE",
                   help="cold-item simulation (training/cold_items.py): show this share of the training rows as "
                        "never-seen items, their --cold-item-features bags emptied and --cold-item-dense columns "
                        "reset, so the model learns to score new items from their title and attributes (default 0: off)")
    m.add_argument("--cold-item-features", nargs="+", default=["item_id"], metavar="FEATURE",
                   help="the ID features a simulated cold row loses (default item_id)")
    m.add_argument("--cold-item-dense", nargs="+", default=[], metavar="COLUMN=VALUE",
                   help="a simulated cold row's dense values, raw (before log1p) or 'mean' (the train mean), e.g. "
                        "dense_item_history=0 dense_item_prior_positive_rate=0.55")
    m.add_argument("--dense-arch", type=int, nargs="+", default=[128, 64], help="DenseArch sizes, ending in D")
    m.add_argument("--over-arch", type=int, nargs="+", default=[256, 64, 1], help="OverArch sizes, ending in 1")
    m.add_argument("--sparse-lr", type=float, default=0.05, help="row-wise Adagrad for the ID tables")
    m.add_argument("--dense-lr", type=float, default=1e-3, help="AdamW for the MLPs and projections")
    m.add_argument("--llm-lr", type=float, default=1e-4, help="AdamW for the LLM's deep layers")
    m.add_argument("--warmup-steps", type=int, default=20)
    m.add_argument("--decay", choices=("cosine", "linear", "none"), default="cosine")
    m.add_argument("--grad-clip", type=float, default=1.0, help="L2 norm clip of the dense gradients, per group (0: off)")
    add_segment_flags(p)  # the valid / test reports' and TensorBoard's segment metrics
    return p


def config_from_args(args: argparse.Namespace):
    from bahe.model.config import ArchConfig, BaheModelConfig, TablesConfig, TextConfig
    from bahe.training.cold_items import ColdItemSimulation
    from bahe.training.config import OptimConfig, TrainConfig

    text = None
    if args.arm != "dlrm":
        if not args.store:
            raise ValueError(f"--arm {args.arm} needs --store (the behaviour store; it also fixes k)")
        text = TextConfig(store=args.store, llm=args.llm, k=args.k, deep_layers=args.deep_layers,
                          pooling=args.pooling, attention=args.attention, max_behaviours=args.max_behaviours,
                          gradient_checkpointing=args.gradient_checkpointing, arm=args.arm,
                          max_user_tokens=args.max_user_tokens, llm_precision=args.llm_precision,
                          user_projection=args.user_projection, user_aggregation=args.user_aggregation)
    tables = TablesConfig(embedding_dim=args.embedding_dim, default_rows=args.table_rows,
                          rows=_feature_rows(args.table_rows_for), drop=tuple(args.drop_id_features))
    model = BaheModelConfig(tables=tables,
                            arch=ArchConfig(tuple(args.dense_arch), tuple(args.over_arch)), text=text)
    optim = OptimConfig(sparse_lr=args.sparse_lr, dense_lr=args.dense_lr, llm_lr=args.llm_lr,
                        warmup_steps=args.warmup_steps, decay=args.decay, grad_clip=args.grad_clip)
    if sum([args.data_dir is not None and not args.criteo_tsv, bool(args.criteo_tsv), args.random_data]) != 1:
        raise ValueError("give exactly one data input: --data-dir, --criteo-tsv or --random-data")
    data = "criteo_tsv" if args.criteo_tsv else "random" if args.random_data else "parquet"
    data_dir = args.data_dir or args.out / "data"
    return TrainConfig(data_dir=data_dir, data=data, criteo_tsv=tuple(args.criteo_tsv), out_dir=args.out, model=model,
                       optim=optim, batch_size=args.batch_size,
                       steps=_steps(args), epochs=args.epochs, select_by=args.select_by, patience=args.patience,
                       eval_every=args.eval_every, eval_batches=args.eval_batches,
                       checkpoint_every=args.checkpoint_every, log_every=args.log_every, stop_at=args.stop_at,
                       max_unknown_text_rate=args.max_unknown_rate,
                       shuffle=not args.no_shuffle, data_lanes=args.data_lanes, standardize_dense=not args.no_dense_standardize, seed=args.seed,
                       init_from=args.init_from, init_optimizer=args.init_optimizer,
                       frozen_text_from=args.frozen_text_from, device=args.device,
                       behaviour_sharding=args.behaviour_sharding, pg_timeout_s=args.pg_timeout,
                       cold_items=ColdItemSimulation.from_flags(args.cold_item_dropout, args.cold_item_features,
                                                                args.cold_item_dense))


def _steps(args: argparse.Namespace) -> int:
    if args.steps is not None and args.epochs is not None:
        raise ValueError(f"give --steps or --epochs, not both (--steps {args.steps}, --epochs {args.epochs})")
    return 100 if args.steps is None else args.steps


def _feature_rows(pairs: list[str]) -> dict[str, int]:
    rows = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if not name or not value.isdigit():
            raise ValueError(f"--table-rows-for takes FEATURE=ROWS (e.g. item_id=2000), got {pair!r}")
        rows[name] = int(value)
    return rows


def _init_from_defaults(args: argparse.Namespace, argv: list[str]) -> None:
    """With --init-from: model flags (and --store, --llm, --batch-size) left out take the recorded values of
    this run's own record when --out holds a checkpoint (a rerun resumes), else of the --init-from run."""
    if args.init_from is None:
        return
    from bahe.training.init_from import resolve
    from bahe.training.run_record import apply_record, has_checkpoint

    apply_record(args, argv, args.out if has_checkpoint(args.out) else resolve(args.init_from).run)


def _check_init_from(config) -> None:
    """--init-from's checkpoint and model flags (its store lineage is checked by the trainer)."""
    from bahe.training.init_from import check_model, resolve
    from bahe.training.run_record import has_checkpoint

    if config.init_from is not None and not has_checkpoint(config.out_dir):
        check_model(resolve(config.init_from), config)


def _check_frozen_text(config) -> None:
    """--frozen-text-from's checkpoint, text settings and store lineage (the trainer checks them again)."""
    from bahe.training.run_record import has_checkpoint

    if config.frozen_text_from is None or has_checkpoint(config.out_dir):
        return
    from bahe.ctr_data.parquet_io import SampleReader
    from bahe.embeddings.store import BehaviourStore
    from bahe.training import frozen_text

    schema = SampleReader(config.data_dir / "train.parquet").schema
    frozen_text.check(frozen_text.resolve(config.frozen_text_from), config,
                      BehaviourStore.open(config.model.text.store),
                      tuple(config.model.text.sequences or schema.sequences))


def quiet_library_deprecations() -> None:
    """torch / torchrec deprecation notices (ShardedTensor, fx tracing, DDP arguments) are not the
    user's to act on; every other warning still shows."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*is_fx_tracing.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # torchmetrics' own indexing inside its all-gather (a torch deprecation it must fix, not the user)
    warnings.filterwarnings("ignore", message="Using a non-tuple sequence for multidimensional indexing")
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)  # the is_fx_tracing notice


def main(argv: list[str] | None = None) -> int:
    quiet_library_deprecations()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    from bahe.training.run_record import check_out_folder, check_resume

    try:
        segments = segment_spec(args)  # bad thresholds: one line, before anything is written
        check_out_folder(args.out)  # before anything is written under it
        _init_from_defaults(args, argv)
        config = config_from_args(args)
        check_resume(config)  # a resume with other model flags than its checkpoint's is refused
        _check_init_from(config)  # the same refusals the trainer makes, before any process group or file
        _check_frozen_text(config)
    except (ValueError, FileNotFoundError) as err:
        print(f"bahe-train: error: {err}", file=sys.stderr)
        return 2
    from bahe.training.checkpoint import CheckpointWriteError
    from bahe.training.loop import run_training

    try:
        summary = run_training(config, segments=segments)  # its shard_model takes config.behaviour_sharding
    except (CheckpointWriteError, FileNotFoundError, ValueError) as err:  # what the user can fix: one line
        if os.environ.get("BAHE_TRACEBACK"):
            raise
        print(f"bahe-train: error: {err} (BAHE_TRACEBACK=1 shows where)", file=sys.stderr)
        return 2
    import torch.distributed as dist

    if dist.get_rank() == 0:
        shown = ("steps", "stopped_at", "resumed_from_step", "steps_run", "initialized_from", "selected_step",
                 "early_stopped_at", "valid", "test")
        print(json.dumps({k: summary[k] for k in shown if k in summary}))
    from bahe.embeddings.process_group import close_process_group

    close_process_group()  # joins gloo's threads now, not at interpreter exit
    return 0


if __name__ == "__main__":
    sys.exit(main())
