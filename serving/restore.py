"""A trained run's model restored for inference: which checkpoint, the model its record describes, the
train split it learned its schema and dense statistics from, and the weights loaded.

Used by ``bahe-predict`` (serving/scoring.py) and ``bahe-export`` (serving/export.py, through
:func:`restore_run`), so both restore a run the same way. ``which="best"`` takes the checkpoint the run selected on valid (``checkpoints/BEST.json``;
the latest when it made no selection), ``"latest"`` the last one. :func:`plan_restore` makes every check
that needs no model (deterministic: every rank raises the same one line); :func:`restore_model` builds the
model, sharded as the trainer shards it or plain, and loads one checkpoint through the restricted loaders
(``training/safe_load.py``) -- the model only, no optimiser, no trainer. :func:`restore_run` is the
export's form: unsharded on the CPU without DistributedModelParallel (DCP reshards the run's sharded tables
into plain tensors), so torchrec's inference path (``quantize_inference_model``) and TorchScript can take its
modules as they are.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from bahe.ctr_data.parquet_io import SampleReader
from bahe.ctr_data.schema import SampleSchema
from bahe.embeddings.pretrained import DEFAULT_MODEL
from bahe.model.config import ArchConfig, BaheModelConfig, TablesConfig, TextConfig
from bahe.training.checkpoint import Checkpointer, load_into
from bahe.training.run_record import (
    RECORD,
    RunConfigError,
    check_run_store,
    read_record,
    recorded_dense_statistics,
    recorded_flag,
)
from bahe.training.selection import Selection, recorded_metric

if TYPE_CHECKING:
    from bahe.embeddings.store import BehaviourStore
    from bahe.model.bahe import BAHE
    from bahe.model.batch import SampleBatcher
    from bahe.model.dense_features import DenseNormalizer


def select_checkpoint(run: Path, which: str) -> tuple[Path, str]:
    """(checkpoint folder, why it was chosen). Raises FileNotFoundError for a run without a checkpoint."""
    directory = Path(run) / "checkpoints"
    latest = Checkpointer(directory).latest()  # a damaged LATEST raises its own one line
    if latest is None:
        raise FileNotFoundError(f"{run} holds no checkpoint (no checkpoints/LATEST): pass a training run's folder "
                                "(its bahe-train --out) that has finished at least one checkpoint")
    if which == "latest":
        return latest, "latest"
    metric = recorded_metric(directory)
    step = Selection.load(directory, metric, 0).step if metric else None
    if step is None:
        return latest, "best: the run made no selection on valid (no BEST.json), so its latest"
    best = directory / f"step-{step:07d}"
    if not best.is_dir():
        raise FileNotFoundError(f"{directory / 'BEST.json'} names step-{step:07d}, which is not in {directory}: "
                                "restore that folder, or score the latest checkpoint (--which latest)")
    return best, f"best by valid {metric}"


def run_model_config(run: Path, *, store: str | None, llm: str | None, llm_precision: str
                     ) -> tuple[BaheModelConfig, bool, int, dict]:
    """(model config, standardize dense, the run's batch size, the record) from ``run/run_config.json``."""
    record = read_record(run)
    if record is None:
        raise FileNotFoundError(f"{Path(run) / RECORD} is missing: the checkpoint's architecture is unknown; pass a "
                                "run folder written by bahe-train")
    flags, defaults = record["model"], record.get("defaults", {})
    try:
        text = None
        if flags["--arm"] != "dlrm":
            store = store or defaults.get("--store")
            if not store:
                raise RunConfigError(f"{Path(run) / RECORD} records no behaviour store: pass --store")
            text = TextConfig(store=str(store), llm=str(llm or defaults.get("--llm") or DEFAULT_MODEL), k=flags["--k"],
                              deep_layers=flags["--deep-layers"], pooling=flags["--pooling"],
                              attention=flags["--attention"], max_behaviours=flags["--max-behaviours"],
                              arm=flags["--arm"], max_user_tokens=flags["--max-user-tokens"],
                              llm_precision=llm_precision,  # flags a record predates read as their defaults
                              user_projection=recorded_flag(flags, "--user-projection"),
                              user_aggregation=recorded_flag(flags, "--user-aggregation"))
        rows = dict(pair.split("=", 1) for pair in flags["--table-rows-for"])
        tables = TablesConfig(embedding_dim=flags["--embedding-dim"], default_rows=flags["--table-rows"],
                              rows={name: int(value) for name, value in rows.items()},
                              drop=tuple(flags["--drop-id-features"]))
        model = BaheModelConfig(tables=tables, arch=ArchConfig(tuple(flags["--dense-arch"]), tuple(flags["--over-arch"])),
                                text=text)
        return model, not flags["--no-dense-standardize"], int(defaults.get("--batch-size") or 128), record
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, RunConfigError):
            raise
        raise RunConfigError(f"{Path(run) / RECORD} is not a complete run record ({type(err).__name__}: {err}); "
                             "restore it from the run") from None


def training_split(run: Path, data_dir: Path | None, record: dict) -> Path:
    """The train.parquet the run was trained on (its schema and dense statistics)."""
    data_dir = data_dir or record.get("defaults", {}).get("--data-dir")
    if data_dir is None:
        raise ValueError(f"pass --data-dir: the folder of the train.parquet {run} was trained on (the model's feature "
                         f"schema and dense statistics come from it; {RECORD} does not record it)")
    train = Path(data_dir) / "train.parquet"
    if not train.is_file():
        raise FileNotFoundError(f"{train} is missing: --data-dir must be the folder the run was trained on "
                                "(bahe-train --data-dir), holding its train.parquet")
    return train


@dataclass(frozen=True)
class RestorePlan:
    """What restoring a run needs, found by cheap checks (no model built yet): the checkpoint and why it was
    chosen, the model config, whether the run standardised its dense features, its batch size, the train split
    it was trained on and that split's schema."""

    run: Path
    checkpoint: Path
    chosen: str
    model: BaheModelConfig
    standardize_dense: bool
    run_batch_size: int
    train: Path
    schema: SampleSchema

    @property
    def arm(self) -> str:
        return self.model.text.arm if self.model.text else "dlrm"


def plan_restore(run: Path, which: str, *, data_dir: Path | None = None, store: str | None = None,
                 llm: str | None = None, llm_precision: str = "auto") -> RestorePlan:
    """How bahe-predict and bahe-export find what to restore: the run's checkpoint
    (:func:`select_checkpoint`), its record (:func:`run_model_config`), its train split
    (:func:`training_split`) and that split's schema. Deterministic, so every rank raises the same one line."""
    run = Path(run)
    checkpoint, chosen = select_checkpoint(run, which)
    model, standardize, run_batch, record = run_model_config(run, store=store, llm=llm, llm_precision=llm_precision)
    train = training_split(run, data_dir, record)
    return RestorePlan(run, checkpoint, chosen, model, standardize, run_batch, train, SampleReader(train).schema)


def run_dense_statistics(run: Path, train: Path):
    """The dense statistics ``run``'s weights were trained with: those it recorded, else (a run recorded
    before runs kept them) refitted on its train split as the trainer fitted them."""
    from bahe.model.dense_features import DenseNormalizer

    return recorded_dense_statistics(run) or DenseNormalizer.fit(SampleReader(train))


def table_bytes(plan: RestorePlan) -> tuple[dict[str, int], int]:
    """({ID feature: table rows}, bytes of those fp32 tables) of ``plan``'s model."""
    from bahe.model.batch import id_feature_names

    tables = plan.model.tables
    rows = {name: tables.rows_for(name) for name in tables.features(id_feature_names(plan.schema))}
    return rows, sum(rows.values()) * tables.embedding_dim * 4


def describe_tables(plan: RestorePlan) -> str:
    rows, size = table_bytes(plan)
    return (f"the model's ID tables ({sum(rows.values()):,} rows of D = {plan.model.tables.embedding_dim}, "
            f"{size / 2**30:,.1f} GiB in fp32; largest {max(rows, key=rows.get)} with {max(rows.values()):,} rows)")


def available_memory() -> int:
    """Bytes of memory this machine can give now (MemAvailable; else its physical memory)."""
    import os

    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_tables_fit(plan: RestorePlan) -> None:
    """An unsharded restore (bahe-export) builds every ID table in this process's memory: refuse, in one line
    naming the run's record, tables larger than the memory available now."""
    try:
        _, size = table_bytes(plan)
    except ValueError:  # features the data lacks: build_model names them
        return
    available = available_memory()
    if size > available:
        raise RunConfigError(f"{Path(plan.run) / RECORD}: {describe_tables(plan)} do not fit this machine's "
                             f"{available / 2**30:,.1f} GiB of available memory; export it on a machine with more "
                             "memory, or check the record's --table-rows / --table-rows-for / --embedding-dim")


@dataclass
class RestoredModel:
    """A run's model with its weights, in eval mode.

    Attributes:
        module: what runs a batch: ``DistributedModelParallel(BAHETrain(model))`` when sharded, else
            ``BAHETrain(model)``; ``module(batch) -> (loss, (loss, B logits, labels))``.
        model: the BAHE model inside it (its sharded tables when sharded), e.g. for
            ``forward_from_text_features``.
        batcher: sample rows -> the model's inputs, with the dense statistics the weights learned on.
        store: the behaviour store of its text arch (None: the DLRM arm).
        normalizer: those dense statistics (None: a run trained without standardising).
        step: the checkpoint's step.
    """

    module: torch.nn.Module
    model: BAHE
    batcher: SampleBatcher
    store: BehaviourStore | None
    normalizer: DenseNormalizer | None
    step: int


def restore_model(plan: RestorePlan, device: torch.device, *, sharded: bool = True,
                  store_rows: bool = True) -> RestoredModel:
    """Build ``plan``'s model and load its checkpoint (the model only, through the restricted loaders; no
    optimiser state).

    Args:
        sharded: shard it as the trainer shards it (DistributedModelParallel on ``device``; every rank calls
            this) -- else one plain unsharded model built on ``device`` (DCP reshards the saved tables).
        store_rows: load the behaviour store's rows into the frozen table (checked against the run's store
            first). False only where the text arch never runs (scoring from cached text features).
    """
    from bahe.model.bahe import BAHETrain
    from bahe.model.behaviour_lookup import load_store_rows
    from bahe.model.factory import build_model

    normalizer = run_dense_statistics(plan.run, plan.train) if plan.standardize_dense else None  # those the weights learned on
    if not sharded:
        check_tables_fit(plan)  # one line, not the allocator's traceback (or the OOM killer)
    build_on = torch.device("meta") if sharded else torch.device(device)
    model, batcher, store = build_model(plan.model, plan.schema, device=build_on, dense_normalizer=normalizer)
    module = BAHETrain(model)
    if sharded:
        from torchrec.distributed.planner.types import PlannerError

        from bahe.model.sharding import shard_model
        from bahe.training.config import OptimConfig
        from bahe.training.optimizers import attach_sparse_optimizer

        attach_sparse_optimizer(model, OptimConfig())  # as in training: the same sharding plan and state-dict layout
        try:
            module = shard_model(module, torch.device(device), batch_size=plan.run_batch_size)
        except PlannerError as err:  # tables the launch's devices cannot hold: one line, not the planner's report
            last = [line.strip() for line in str(err).splitlines() if line.strip()][-1]
            raise RunConfigError(f"{Path(plan.run) / RECORD}: {describe_tables(plan)} do not fit the devices of this "
                                 f"launch (torchrec's planner: {last}); run it on more ranks or devices, or check the "
                                 "record's --table-rows / --table-rows-for / --embedding-dim") from None
    if store is not None and store_rows:
        check_run_store(plan.run, store)  # a store that does not hold the run's rows unchanged is refused
        load_store_rows(module, store)
    progress = {"step": torch.tensor(0)}
    load_into(plan.checkpoint, module, progress=progress)  # the model only (restricted loaders); no optimiser state
    module.eval()
    unwrapped = module.module.model if sharded else module.model
    return RestoredModel(module, unwrapped, batcher, store, normalizer, int(progress["step"]))


@dataclass
class RestoredRun:
    """A run's model in eval mode on the CPU, with what serving needs around it.

    Attributes:
        model: the BAHE model (plain torchrec modules, weights of ``checkpoint``).
        batcher: the run's batcher (sample rows -> the model's inputs), dense statistics included.
        store: the behaviour store loaded into the model's frozen table.
        schema: the run's sample schema (from its train split).
        normalizer: the dense statistics the run's weights were trained with (None: without standardising).
        config: the run's model config.
        run, checkpoint, chosen, step: the run folder, the checkpoint folder, why it was chosen, its step.
    """

    model: BAHE
    batcher: SampleBatcher
    store: BehaviourStore
    schema: SampleSchema
    normalizer: DenseNormalizer | None
    config: BaheModelConfig
    run: Path
    checkpoint: Path
    chosen: str
    step: int

    def identity(self) -> dict:
        """What produced a feature: the run, its checkpoint (name, step, SHA-256 over its files), the store."""
        return {"run": str(self.run.resolve()), "checkpoint": self.checkpoint.name, "step": self.step,
                "checkpoint_sha256": checkpoint_digest(self.checkpoint), "chosen": self.chosen,
                "store": str(self.store.path.parent.resolve()), "store_version": self.store.version,
                "store_rows": self.store.rows_count}


def checkpoint_digest(folder: Path) -> str:
    """SHA-256 over a checkpoint folder's files (names and bytes, in name order): two exports come from the
    same weights exactly when their digests agree."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def restore_run(run: Path, *, which: str = "best", data_dir: Path | None = None, store: str | None = None,
                llm: str | None = None, llm_precision: str = "fp32") -> RestoredRun:
    """Restore ``run``'s checkpoint (``best`` or ``latest``, as bahe-predict) unsharded on the CPU, through
    bahe-predict's own steps (:func:`plan_restore`, :func:`restore_model`).

    Raises FileNotFoundError / ValueError (one line) for a run without a checkpoint or record, a missing
    train split, a store that does not hold the run's rows, or a damaged checkpoint.
    """
    plan = plan_restore(run, which, data_dir=data_dir, store=store, llm=llm, llm_precision=llm_precision)
    if plan.arm != "bahe":
        raise ValueError(f"{run} trained the {plan.arm} arm: only a BAHE run (--arm bahe) has text features to cache; "
                         "a DLRM-only run serves as it is (torchrec's inference path)")
    from bahe.model.text_levers import refuse_item_dependent

    refuse_item_dependent(plan.model.text.user_aggregation, str(run),
                          "its serving parts (cached text features, predictor) cannot be exported; score it with "
                          "the full model (bahe-predict or bahe-evaluate, without --features)")
    restored = restore_model(plan, torch.device("cpu"), sharded=False)
    return RestoredRun(restored.model, restored.batcher, restored.store, plan.schema, restored.normalizer, plan.model,
                       plan.run, plan.checkpoint, plan.chosen, restored.step)
