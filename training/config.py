"""What a training run does: data, steps, optimisers, evaluation, logging, checkpoints."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from bahe.embeddings.process_group import DEFAULT_TIMEOUT_S, check_timeout
from bahe.model.config import BEHAVIOUR_SHARDINGS, BaheModelConfig
from bahe.training.cold_items import ColdItemSimulation
from bahe.training.selection import Selection


@dataclass(frozen=True)
class OptimConfig:
    """Args:
        sparse_lr: row-wise Adagrad (fused, in backward) for the trainable ID tables.
        dense_lr: AdamW for the MLPs, projections and norms.
        llm_lr: AdamW for the LLM's deep layers (usually lower than dense_lr).
        weight_decay: AdamW weight decay (both dense groups).
        warmup_steps: linear warm-up of the dense learning rates from 10% to 100%.
        decay: ``cosine`` or ``linear`` decay to 10% over the remaining steps, or ``none``.
        grad_clip: L2 norm clip of the dense gradients, per group (dense, llm); 0 = off.
    """

    sparse_lr: float = 0.05
    dense_lr: float = 1e-3
    llm_lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 20
    decay: str = "cosine"
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        for name in ("sparse_lr", "dense_lr", "llm_lr"):
            if getattr(self, name) <= 0:
                raise ValueError(f"OptimConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.warmup_steps < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("OptimConfig: warmup_steps, grad_clip and weight_decay must be >= 0")
        if self.decay not in ("cosine", "linear", "none"):
            raise ValueError(f"OptimConfig.decay must be cosine, linear or none, got {self.decay!r}")


@dataclass(frozen=True)
class TrainConfig:
    """Args:
        data_dir: folder with train.parquet, valid.parquet, test.parquet (bahe-data writes them;
            with ``criteo_tsv`` the trainer converts the TSV days into it).
        data: ``parquet`` (data_dir), ``criteo_tsv`` (the ``criteo_tsv`` day files) or ``random``
            (torchrec's RandomRecDataset, Criteo-shaped; for speed and plumbing checks).
        criteo_tsv: Criteo TSV day files, oldest first (``data="criteo_tsv"``).
        out_dir: run folder: tensorboard/, checkpoints/, metrics.json.
        checkpoint_dir: where checkpoints are saved and resumed from (default ``out_dir/checkpoints``);
            bahe-evaluate points it at a training run's checkpoints and ``out_dir`` elsewhere.
        model: the model (text None = the DLRM-only arm).
        optim: optimisers and schedules.
        batch_size: samples per rank per step.
        steps: optimisation steps (the data repeats in epochs if needed).
        eval_every: evaluate on valid every this many steps and at the last one (0: only at the end); each
            evaluation is a candidate, and the run ends with the best checkpoint (training/selection.py).
        eval_batches: cap on valid batches per evaluation, >= 1 (None: the whole split).
        checkpoint_every: save a checkpoint every this many steps (0: only at the end).
        log_every: steps between TensorBoard points.
        stop_at: end THIS invocation after this step (with a checkpoint), e.g. to fit a cluster's
            time limit; the next invocation resumes there. The schedule still spans ``steps``. >= 1
            (None: run to ``steps``).
        epochs: train this many passes over the train split instead of ``steps`` (steps = epochs x
            train rows / (batch_size x ranks)); Parquet data only.
        select_by: ``auc`` (default) or ``logloss`` on valid: which evaluation is the best.
        patience: stop after this many evaluations without improvement (0: never stop early); needs
            ``eval_every``.
        use_best: end with (and report) the best checkpoint the run's selection recorded (BEST.json);
            False: the last step (bahe-evaluate --which latest).
        max_unknown_text_rate: refuse to start (training/preflight.py) when more than this fraction of
            the texts (behaviours and item texts) in the first rows of the train split are not in the
            behaviour store: a store built for other data (BAHE arm only; 0..1).
        standardize_dense: z-score the log1p'd dense features with train statistics (model/dense_features.py).
        shuffle: shuffle the train split (seeded; default). False trains in file (time) order.
        data_lanes: deal each epoch's training order into this many lanes (training/data.py): with lanes a
            multiple of the ranks, each rank reads only ~1/ranks of the train split. 1 (default) = the plain
            order; batch_size x ranks must be a multiple of it. A resume keeps the run's value.
        seed: model initialisation and data order.
        init_from: warm start: a previous run folder (its selected checkpoint: BEST.json's, else LATEST)
            or one of its checkpoints (``RUN/checkpoints/step-NNNNNNN``); every trainable weight starts
            from it, step and data position from 0, the frozen behaviour table from this run's store (a
            refresh of that run's store). Its model flags and store lineage are checked before step 1
            (training/init_from.py). Ignored when ``checkpoint_dir`` holds this run's own checkpoint (a
            resume wins). None: initialise from the seed.
        init_optimizer: with ``init_from``, also load its optimizer state (row-wise Adagrad of the ID
            tables, AdamW moments); the learning-rate schedules start fresh either way.
        frozen_text_from: the downstream model of the paper's AUC_d (training/frozen_text.py): a previous
            BAHE run folder (its selected checkpoint) or one of its checkpoints, whose text arch (deep LLM
            layers, norms, projections) is loaded and frozen (no gradients, eval mode); the ID tables, dense
            and over arch train from the seed. Its text settings and store lineage must be this run's.
            BAHE arm only; not with ``init_from``. None: the text arch trains as usual.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        behaviour_sharding: how DistributedModelParallel shards the frozen behaviour table: ``row_wise``,
            ``column_wise``, ``table_wise``, or ``auto`` (default: row-wise for a table of 1 GiB or more, so that
            every rank holds and reads 1/W of the store; the planner's choice below that; model/sharding.py).
            A launch property, not the model's: not recorded in run_config.json, and a resume, an evaluation
            or a warm start may use another (checkpoints leave the frozen table out, the store supplies it).
        pg_timeout_s: the process group's timeout in seconds (``--pg-timeout``; default 1800): how long a rank
            waits for the others at the rendezvous and in any collective, start-up (the store's load and
            checksums) included, before failing instead of hanging (bahe.embeddings.process_group).
        cold_items: cold-item simulation: a share of the training rows shown as never-seen items (their item ID
            bags emptied, item statistics reset), so the model learns to score new items from their text and
            attributes (training/cold_items.py; default off). Parquet data only.
    """

    data_dir: Path
    out_dir: Path
    checkpoint_dir: Path | None = None
    model: BaheModelConfig = field(default_factory=BaheModelConfig)
    data: str = "parquet"
    criteo_tsv: tuple[Path, ...] = ()
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch_size: int = 128
    steps: int = 100
    eval_every: int = 0
    eval_batches: int | None = None
    checkpoint_every: int = 0
    log_every: int = 10
    stop_at: int | None = None
    epochs: float | None = None
    select_by: str = "auc"
    patience: int = 0
    use_best: bool = True
    max_unknown_text_rate: float = 0.05
    standardize_dense: bool = True
    shuffle: bool = True
    data_lanes: int = 1
    seed: int = 0
    init_from: Path | None = None
    init_optimizer: bool = False
    frozen_text_from: Path | None = None
    device: str = "auto"
    behaviour_sharding: str = "auto"
    pg_timeout_s: float = DEFAULT_TIMEOUT_S
    cold_items: ColdItemSimulation = field(default_factory=ColdItemSimulation)

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        object.__setattr__(self, "checkpoint_dir", Path(self.checkpoint_dir or self.out_dir / "checkpoints"))
        if self.init_from is not None:
            object.__setattr__(self, "init_from", Path(self.init_from))
        if self.frozen_text_from is not None:
            object.__setattr__(self, "frozen_text_from", Path(self.frozen_text_from))
            if self.init_from is not None:
                raise ValueError(f"give --frozen-text-from or --init-from, not both (--frozen-text-from "
                                 f"{self.frozen_text_from}, --init-from {self.init_from}): --init-from starts every "
                                 "weight from a run, --frozen-text-from only the text arch, frozen")
            if self.model.text is None or self.model.text.arm != "bahe":
                arm = "dlrm" if self.model.text is None else self.model.text.arm
                raise ValueError(f"--frozen-text-from {self.frozen_text_from} freezes a BAHE text arch, and --arm "
                                 f"{arm} builds none: give --arm bahe (with --store)")
        if self.init_optimizer and self.init_from is None:
            raise ValueError("TrainConfig.init_optimizer loads the optimizer state of the run given by init_from: "
                             "add --init-from RUN_OR_CHECKPOINT, or leave out --init-optimizer")
        if self.batch_size < 1 or self.steps < 1:
            raise ValueError(f"TrainConfig: batch_size and steps must be >= 1, got {self.batch_size}, {self.steps}")
        if min(self.eval_every, self.checkpoint_every) < 0 or self.log_every < 1:
            raise ValueError("TrainConfig: eval_every and checkpoint_every must be >= 0, log_every >= 1")
        if self.eval_batches is not None and self.eval_batches < 1:
            raise ValueError(f"TrainConfig.eval_batches={self.eval_batches}: evaluation needs at least 1 batch; "
                             "give --eval-batches N >= 1, or leave it out to evaluate the whole valid split")
        if self.epochs is not None and not (math.isfinite(self.epochs) and self.epochs > 0):
            raise ValueError(f"TrainConfig.epochs={self.epochs}: give a number of passes over the train split > 0 "
                             "(e.g. --epochs 1), or leave it out and give --steps")
        if self.epochs is not None and self.data == "random":
            raise ValueError("TrainConfig.epochs: the random dataset has no epochs; give --steps")
        Selection(self.select_by, self.patience)  # checks both
        if self.patience and not self.eval_every:
            raise ValueError(f"TrainConfig.patience={self.patience} needs periodic validation: add --eval-every N "
                             "(patience counts those evaluations)")
        if self.stop_at is not None and self.stop_at < 1:
            raise ValueError(f"TrainConfig.stop_at={self.stop_at}: --stop-at N ends this invocation after step N, "
                             "so N must be >= 1; leave it out to train all --steps")
        if not 0.0 <= self.max_unknown_text_rate <= 1.0:
            raise ValueError(f"TrainConfig.max_unknown_text_rate={self.max_unknown_text_rate}: give a fraction in "
                             "[0, 1] (--max-unknown-rate 0.05 refuses a store missing over 5% of the data's texts)")
        if self.data_lanes < 1:
            raise ValueError(f"TrainConfig.data_lanes={self.data_lanes}: give >= 1 (1: the plain training order; "
                             "a multiple of the ranks, e.g. 8, to read ~1/ranks of the train split per rank)")
        if self.cold_items.share and self.data != "parquet":
            raise ValueError(f"TrainConfig.cold_items (--cold-item-dropout {self.cold_items.share}) shows rows of a "
                             "sample table as new items: give Parquet data (--data-dir), or leave it out")
        if self.data_lanes > 1 and self.data != "parquet":
            raise ValueError("TrainConfig.data_lanes: lanes deal a Parquet train split; leave --data-lanes at 1")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"TrainConfig.device must be auto, cpu or cuda, got {self.device!r}")
        check_timeout(self.pg_timeout_s)
        if self.behaviour_sharding not in BEHAVIOUR_SHARDINGS:
            raise ValueError(f"TrainConfig.behaviour_sharding={self.behaviour_sharding!r}: give one of "
                             f"{', '.join(BEHAVIOUR_SHARDINGS)} (--behaviour-sharding; data_parallel is not available "
                             "for the behaviour table)")
        object.__setattr__(self, "criteo_tsv", tuple(Path(p) for p in self.criteo_tsv))
        if self.data not in ("parquet", "criteo_tsv", "random"):
            raise ValueError(f"TrainConfig.data must be parquet, criteo_tsv or random, got {self.data!r}")
        if (self.data == "criteo_tsv") != bool(self.criteo_tsv):
            raise ValueError("TrainConfig: give criteo_tsv files exactly when data is 'criteo_tsv'")
        missing = [str(p) for p in self.criteo_tsv if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"Criteo TSV file(s) not found: {missing}")
        if self.data != "parquet" and self.model.text is not None:
            raise ValueError(f"TrainConfig.data={self.data!r} has no behaviour texts: train the DLRM-only arm "
                             "(no text config / --arm dlrm), or convert text data with bahe-data")
        for split in ("train", "valid", "test") if self.data == "parquet" else ():
            if not (self.data_dir / f"{split}.parquet").is_file():
                raise FileNotFoundError(f"{self.data_dir / (split + '.parquet')} is missing: write the data with "
                                        "`bahe-data movielens --out DIR` (or synthetic / criteo)")
