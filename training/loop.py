"""The trainer: DistributedModelParallel + TrainPipelineSparseDist, evaluation, TensorBoard, checkpoints.

One process per rank (torchrun / TorchX). gloo on CPU, nccl on CUDA. Rank 0 writes TensorBoard
(train loss and NE, eval AUC / NE / log loss / calibration, AUC and log loss per segment (item popularity
in the training split, history length: training/segments.py), samples/s across ranks, step time,
data wait, peak memory, learning rates, and the final hparams) and ``metrics.json``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import resource
import sys
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.utils.tensorboard import SummaryWriter
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from bahe.embeddings import process_group
from bahe.model.bahe import BAHETrain
from bahe.model.behaviour_lookup import load_store_rows
from bahe.model.dense_features import DenseNormalizer
from bahe.model.factory import build_model
from bahe.model.sharding import shard_model
from bahe.training import frozen_text, init_from
from bahe.training.checkpoint import Checkpointer
from bahe.training.cold_items import ColdItemBatcher
from bahe.training.config import TrainConfig
from bahe.training.faults import inject_fault
from bahe.training.health import check_loss
from bahe.training.metrics import CtrMetrics, SegmentRows, segment_tagger
from bahe.training.optimizers import attach_sparse_optimizer, build_optimizer
from bahe.training.preflight import preflight
from bahe.training.run_record import (
    RECORD,
    check_run_store,
    read_record,
    recorded_dense_statistics,
    store_record,
    write_record,
)
from bahe.training.segments import DEFAULT_SPEC, KINDS, SegmentSpec, TaggingBatcher
from bahe.training.selection import Selection, epochs_to_steps, passes_warning
from bahe.training.sources import ParquetData, RandomData, criteo_data


def setup_distributed(preference: str, timeout_s: float | None = None) -> tuple[int, int, torch.device]:
    """Init the process group from torchrun's environment (a single process works too), with the timeout
    ``timeout_s`` (None: the launch's, bahe.embeddings.process_group), start-up included."""
    cuda = torch.cuda.is_available() and preference in ("auto", "cuda")
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("TrainConfig.device is cuda but CUDA is not available here")
    if not dist.is_initialized():
        backend = "nccl" if cuda else "gloo"
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if "RANK" not in os.environ:  # a plain single process: a 1-rank group over an in-memory store (no port)
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
            process_group.init_process_group(backend, timeout_s=timeout_s, store=dist.HashStore(), rank=0, world_size=1)
        elif attempt is None:
            process_group.init_process_group(backend, timeout_s=timeout_s)
        else:  # under torchrun: keys of this attempt only (a restart would read the dead attempt's addresses)
            store, rank, world = next(process_group.rendezvous("env://", timeout_s=timeout_s))
            process_group.init_process_group(backend, timeout_s=timeout_s, rank=rank, world_size=world,
                                             store=dist.PrefixStore(f"bahe-attempt-{attempt}/", store))
    rank = dist.get_rank()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return rank, dist.get_world_size(), device


class TimedIterator:
    """Wraps an iterator and accumulates the seconds spent waiting for it (the data wait)."""

    def __init__(self, inner: Iterator):
        self.inner, self.wait = inner, 0.0

    def __iter__(self) -> TimedIterator:
        return self

    def __next__(self):
        start = time.perf_counter()
        try:
            return next(self.inner)
        finally:
            self.wait += time.perf_counter() - start


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def evaluate(model, source, split: str, batcher, config: TrainConfig, rank: int, world: int, device,
             max_batches: int | None, segments=None) -> dict[str, float]:
    """Metrics of the model on a split, every rank scoring its own rows (no train pipeline attached).
    With a ``segments`` tagger (training/segments.py) the result also holds ``segments``: AUC and log loss
    per item popularity and history length segment, over every rank's rows."""
    model.eval()
    metrics = CtrMetrics(device)
    rows = SegmentRows(segments) if segments is not None else None
    feed = TaggingBatcher(batcher, segments) if segments is not None else batcher
    with torch.no_grad():
        for n, (batch, real) in enumerate(source.evaluate(split, feed, config.batch_size, rank, world)):
            if max_batches is not None and n >= max_batches:
                break  # every rank holds the same number of batches, so all stop together
            _, (_, logits, labels) = model(batch.to(device))
            probabilities = torch.sigmoid(logits[:real])
            metrics.update(probabilities, labels[:real])
            if rows is not None:
                rows.update(probabilities, labels[:real], *feed.pop(real))
    model.train()
    result = metrics.compute()
    if rows is not None:
        result["segments"] = rows.compute()
    return result


def open_source(config: TrainConfig, rank: int):
    """The run's batches: Parquet splits, Criteo TSV days (converted into data_dir once) or random."""
    if config.data == "random":
        return RandomData(config.eval_batches or 8)
    if config.data == "criteo_tsv":
        return criteo_data(config.criteo_tsv, config.data_dir, rank)
    return ParquetData(config.data_dir, lanes=config.data_lanes)


def segment_ends(config: TrainConfig, start: int) -> list[int]:
    """Steps after which training pauses (evaluation, checkpoint, the end), in order."""
    last = min(config.steps, config.stop_at or config.steps)
    ends = {last}
    for every in (config.eval_every, config.checkpoint_every):
        if every:
            ends.update(range(every, last, every))
    return sorted(e for e in ends if e > start)


RUN_BUSY = ("run folder {folder} is being written by {holder}: another bahe-train is training into it; wait for "
            "it or pass another --out")


def run_training(config: TrainConfig, *, segments: SegmentSpec | None = DEFAULT_SPEC) -> dict:
    """:func:`_train` holding the run folder's lock (rank 0; every rank fails together if another process
    holds it). A restarted torchrun attempt waits up to 30 s for the dead attempt's rank 0 to let go."""
    from bahe.embeddings.folder_lock import rank0_folder_lock

    setup_distributed(config.device, config.pg_timeout_s)
    restarted = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0"
    with rank0_folder_lock(config.out_dir, RUN_BUSY, wait_s=30.0 if restarted else 0.0):
        return _train(config, segments)


@dataclasses.dataclass
class Started:
    """The sharded model ready for step ``start + 1``, with its batcher, optimizer, schedules and
    checkpointer; ``initialized`` is the run's ``initialized_from`` record (None: from the seed)."""

    dmp: DistributedModelParallel
    batcher: object
    optimizer: torch.optim.Optimizer
    schedulers: list
    groups: dict
    checkpointer: Checkpointer
    start: int
    initialized: dict | None


def dense_statistics(config: TrainConfig, source, resuming: bool) -> DenseNormalizer | None:
    """The dense features' z-score statistics the model's weights were trained with: a resumed run's (or the
    evaluated run's) own, recorded in run_config.json; at a warm start the --init-from run's, so the weights
    keep seeing the inputs they learned on; else fitted on this train split."""
    if not config.standardize_dense:
        return None
    run = config.checkpoint_dir.parent if resuming else init_from.resolve(config.init_from).run \
        if config.init_from is not None else None
    normalizer = recorded_dense_statistics(run) if run is not None else None
    if normalizer is not None:
        if list(normalizer.columns) != list(source.schema.dense_columns):
            raise ValueError(f"{run / RECORD} records dense statistics of the columns {list(normalizer.columns)}, "
                             f"but {config.data_dir} has {list(source.schema.dense_columns)}: the data must have "
                             "the dense features the run was trained on")
        return normalizer
    return source.dense_normalizer()  # a new run (or one recorded before runs kept their statistics)


def start_model(config: TrainConfig, source, rank: int, device: torch.device) -> Started:
    """Build and shard the model, load the store's rows, then restore the run's own checkpoint (a resume)
    or, at step 0, the ``--init-from`` checkpoint; its refusals come before the model is sharded. When
    training follows, rank 0 records the store and the start in run_config.json."""
    checkpointer = Checkpointer(config.checkpoint_dir, run_config=config)  # records the model flags too
    own = checkpointer.latest()
    normalizer = dense_statistics(config, source, own is not None)
    model, batcher, store = build_model(config.model, source.schema, device=torch.device("meta"),
                                        dense_normalizer=normalizer)
    text_store = store if store is not None else _text_store(config)
    if own is not None:  # a resume (or bahe-evaluate): the run's store lineage; --init-from does not apply
        check_run_store(config.checkpoint_dir.parent, text_store)
    init = init_from.prepare(config, text_store, rank=rank) if own is None else None  # refusals: before step 1
    frozen = frozen_text.prepare(config, store, getattr(batcher, "sequence_names", ()),
                                 resuming=own is not None, rank=rank)
    if frozen is not None:  # before sharding: DDP and the optimizer groups leave the frozen weights out
        frozen_text.freeze(model)
    attach_sparse_optimizer(model, config.optim)
    dmp = shard_model(BAHETrain(model), device, behaviour_sharding=config.behaviour_sharding,
                      batch_size=config.batch_size)
    if store is not None:
        load_store_rows(dmp, store)
    optimizer, schedulers, groups = build_optimizer(dmp, dmp.fused_optimizer, config.optim, config.steps)
    start = checkpointer.restore(dmp, optimizer, schedulers)
    if init is not None:
        init_from.load(init, dmp, optimizer if config.init_optimizer else None)
    if frozen is not None and frozen.source is not None:
        frozen_text.load(frozen.source, dmp)
    initialized = init.as_record(config.init_optimizer) if init is not None else \
        (read_record(config.checkpoint_dir.parent) or {}).get("initialized_from") if start else None
    if rank == 0:
        _say_where_it_starts(config, start, checkpointer, init, own, text_store)
        if frozen is not None and start < config.steps:
            frozen_text.say_where_it_starts(frozen, start)
    if start < config.steps:  # training: record the store and the start now (and beside each checkpoint)
        checkpointer.record_extra = {"store": store_record(text_store) if text_store is not None else None,
                                     "initialized_from": initialized,
                                     "dense_statistics": dataclasses.asdict(normalizer) if normalizer else None,
                                     **({"frozen_text_from": frozen.record} if frozen is not None else {})}
        checkpointer.on_rank0(lambda: write_record(config.checkpoint_dir.parent, config, checkpointer.record_extra),
                              f"write {config.checkpoint_dir.parent / RECORD}")
    return Started(dmp, batcher, optimizer, schedulers, groups, checkpointer, start, initialized)


def _train(config: TrainConfig, segment_spec: SegmentSpec | None = DEFAULT_SPEC) -> dict:
    """Train, evaluate and checkpoint; returns the final metrics (on every rank), with segment metrics
    (training/segments.py) per ``segment_spec`` (None: none)."""
    rank, world, device = setup_distributed(config.device, config.pg_timeout_s)
    torch.manual_seed(config.seed)
    source = open_source(config, rank)
    preflight(config, source, world)  # every split, texts vs store: before the model or any file
    config, warning = _with_epochs(config, source, world)
    started = start_model(config, source, rank, device)
    if warning and rank == 0 and started.start < config.steps:  # not when there is nothing left to train
        print(warning, file=sys.stderr, flush=True)
    dmp, batcher, optimizer, schedulers, groups = (started.dmp, started.batcher, started.optimizer,
                                                   started.schedulers, started.groups)
    checkpointer, start, initialized = started.checkpointer, started.start, started.initialized
    selection = Selection.load(config.checkpoint_dir, config.select_by, config.patience)
    # the item popularity of the run's training split: recorded once (a run that trains), read by evaluations
    segments = segment_tagger(segment_spec, config.checkpoint_dir.parent, getattr(source, "paths", {}).get("train"),
                              rank, record=start < config.steps, on_rank0=checkpointer.on_rank0)
    writer = SummaryWriter(str(config.out_dir / "tensorboard"), flush_secs=10) if rank == 0 else None
    feed = ColdItemBatcher(batcher, config.cold_items, seed=config.seed, rank=rank, first_step=start) \
        if config.cold_items.share else batcher  # a share of the train rows shown as new items (default: none)
    data = TimedIterator(source.train(feed, config.batch_size, rank, world, skip_rows=checkpointer.rows_seen,
                                      seed=config.seed, shuffle=config.shuffle))
    window = {"loss": 0.0, "steps": 0, "time": 0.0, "wait": 0.0, "pos": 0.0, "n": 0.0}
    history = []
    dmp.train()
    step = start
    for end in segment_ends(config, start) if selection.stopped_at is None else []:
        # One train pipeline per segment, fed exactly end - step batches: it drains completely, so
        # evaluation and checkpoints never race the batches it prefetches (in-flight collectives).
        pipeline = TrainPipelineSparseDist(dmp, optimizer, device)
        segment = itertools.islice(data, end - step)
        while step < end:
            begin, wait_before = time.perf_counter(), data.wait
            loss, logits, labels = pipeline.progress(segment)
            step += 1
            check_loss(loss, step, checkpointer)  # NaN / inf: stop before it is saved
            inject_fault(rank, step)
            for scheduler in schedulers:
                scheduler.step()
            window["loss"] += float(loss) * len(labels)
            window["n"] += len(labels)
            window["pos"] += float(labels.sum())
            window["steps"] += 1
            window["time"] += time.perf_counter() - begin
            window["wait"] += data.wait - wait_before
            if step % config.log_every == 0 or step == config.steps:
                _log_train(writer, window, step, world, device, groups)
                _log_counters(writer, batcher, step)
                window = dict.fromkeys(window, 0.0)
        pipeline.detach()
        evaluated = bool(config.eval_every) and (step % config.eval_every == 0 or step == config.steps)
        best = False
        if evaluated:
            result = evaluate(dmp, source, "valid", batcher, config, rank, world, device, config.eval_batches,
                              segments)
            history.append({"step": step, **result})
            _log_eval(writer, "eval", result, step)
            best = selection.update(step, result)
        if best or (config.checkpoint_every and step % config.checkpoint_every == 0) or \
                step in (config.steps, config.stop_at) or selection.stopped_at == step:
            checkpointer.save(step, dmp, optimizer, schedulers, rows_seen=checkpointer.rows_seen
                              + (step - start) * config.batch_size * world)
        if evaluated and rank == 0:
            selection.save(config.checkpoint_dir)  # after the checkpoint it may name
        if selection.stopped_at is not None:
            if rank == 0:
                print(f"early stop at step {step}: valid {selection.metric} has not improved for "
                      f"{selection.patience} evaluations; the best is step {selection.step} ({selection.value:.4f})",
                      flush=True)
            break
    if step < config.steps and selection.stopped_at is None:  # paused on purpose (stop_at): a rerun resumes
        if writer is not None:
            writer.close()
        return {"steps": step, "stopped_at": step, "resumed_from_step": start, "steps_run": step - start,
                "initialized_from": initialized}
    selected = selection.step if config.use_best and selection.step is not None else step
    if selected != step:  # the best checkpoint by valid, not the last step
        checkpointer.restore(dmp, optimizer, schedulers, name=f"step-{selected:07d}")
    final = {split: evaluate(dmp, source, split, batcher, config, rank, world, device, None, segments)
             for split in ("valid", "test")}
    if not history or history[-1]["step"] != step:  # no periodic evaluation logged it
        _log_eval(writer, "eval", final["valid"], step)
    _log_eval(writer, "test", final["test"], step)
    summary = {"steps": step, "resumed_from_step": start, "steps_run": step - start, "world_size": world,
               "initialized_from": initialized,
               "selected_step": selected, "select_by": config.select_by if config.eval_every else None,
               "early_stopped_at": selection.stopped_at, "valid": final["valid"], "test": final["test"],
               "history": history, "peak_memory_mb": peak_memory_mb(device),
               "rank0_data_counters": _counters(batcher), "cold_items": config.cold_items.as_dict()}
    if writer is not None:
        writer.add_hparams({"arm": _arm(config), "batch_size": config.batch_size, "steps": config.steps,
                            "world_size": world, "dense_lr": config.optim.dense_lr, "llm_lr": config.optim.llm_lr},
                           {f"hparam/test_{k}": v for k, v in final["test"].items() if k not in ("samples", "segments")},
                           run_name="hparams")
        writer.close()
        (config.out_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    return summary


def _text_store(config: TrainConfig):
    """The store of a text arm built without a behaviour table (token-level: it fixes k), else None."""
    from bahe.embeddings.store import BehaviourStore

    return BehaviourStore.open(config.model.text.store) if config.model.text is not None else None


def _say_where_it_starts(config: TrainConfig, start: int, checkpointer: Checkpointer, init, own, store) -> None:
    """Rank 0: one line on a resume or a warm start (or an --init-from that a resume overrides)."""
    last = config.stop_at or config.steps
    if start and start >= config.steps:  # bahe-evaluate, or a finished run run again
        print(f"restored checkpoint step-{start:07d} in {config.checkpoint_dir}: nothing left to train", flush=True)
    elif start:
        print(f"resumed from checkpoint step-{start:07d} in {config.checkpoint_dir}: {checkpointer.rows_seen:,} "
              f"training rows already seen; this run trains steps {start + 1}..{last}", flush=True)
    if own is not None and config.init_from is not None:
        print(f"--init-from {config.init_from} not applied: {config.checkpoint_dir} holds this run's own checkpoint "
              f"{own.name}, which wins (a resume; --init-from applies at step 0 only)", flush=True)
    if init is not None:
        table = "" if store is None else f"; the behaviour table from store {store.path} ({store.rows_count:,} rows)"
        print(f"initialized from {init.checkpoint} (step {init.step} of {init.run}): every trainable weight; "
              f"optimizer state {'loaded' if config.init_optimizer else 'fresh'}{table}; this run trains steps "
              f"1..{last} from data position 0", flush=True)


def _with_epochs(config: TrainConfig, source, world: int) -> tuple[TrainConfig, str | None]:
    """``config`` with ``steps`` from ``epochs`` (Parquet data), and the warning for a run that passes over
    its training split more than once with nothing to select on (None if it does not)."""
    train_path = getattr(source, "paths", {}).get("train")
    if train_path is None:  # the random dataset: no epochs
        return config, None
    from bahe.ctr_data.parquet_io import SampleReader

    rows = SampleReader(train_path).num_rows
    if config.epochs is not None:
        config = dataclasses.replace(config, steps=epochs_to_steps(config.epochs, rows, config.batch_size, world))
    return config, passes_warning(config.steps, rows, config.batch_size, world, config.eval_every)


def _arm(config: TrainConfig) -> str:
    return "dlrm" if config.model.text is None else config.model.text.arm


def _log_train(writer, window, step, world, device, groups) -> None:
    """All-reduce the window's numbers so the logged throughput is across ranks."""
    stats = torch.tensor([window["loss"], window["n"], window["pos"], window["time"], window["wait"],
                          window["steps"]], dtype=torch.float64)
    dist.all_reduce(stats)
    if writer is None:
        return
    loss_sum, n, pos, seconds, wait, steps = stats.tolist()
    loss = loss_sum / max(n, 1)
    rate = min(max(pos / max(n, 1), 1e-7), 1 - 1e-7)
    entropy = -(rate * torch.log(torch.tensor(rate)) + (1 - rate) * torch.log(torch.tensor(1 - rate))).item()
    per_rank_time = seconds / world
    print(f"step {step}: train loss {loss:.4f}, NE {loss / entropy:.4f}, {n / max(per_rank_time, 1e-9):,.0f} samples/s",
          flush=True)
    writer.add_scalar("train/loss", loss, step)
    writer.add_scalar("train/ne", loss / entropy, step)
    writer.add_scalar("perf/samples_per_s", n / max(per_rank_time, 1e-9), step)
    writer.add_scalar("perf/step_time_ms", 1000 * per_rank_time / max(steps / world, 1), step)
    writer.add_scalar("perf/data_wait_ms", 1000 * wait / world / max(steps / world, 1), step)
    writer.add_scalar("perf/peak_memory_mb", peak_memory_mb(device), step)
    for name, group in groups.items():
        writer.add_scalar(f"lr/{name}", group.param_groups[0]["lr"], step)


def _counters(batcher) -> dict[str, int]:
    return batcher.counters.as_dict() if getattr(batcher, "counters", None) is not None else {}


def _log_counters(writer, batcher, step: int) -> None:
    """Rank 0's running totals of what its batcher mapped or dropped (unknown texts, ids folded into a
    table, behaviours beyond M, ...): the counted fallbacks of docs/faults.md, visible while training."""
    for name, value in _counters(batcher).items() if writer is not None else ():
        writer.add_scalar(f"data/{name}", value, step)


def _log_eval(writer, prefix: str, result: dict, step: int) -> None:
    if writer is None:
        return
    for key in ("auc", "ne", "logloss", "calibration"):
        writer.add_scalar(f"{prefix}/{key}", result[key], step)
    for kind in KINDS if "segments" in result else ():  # e.g. eval_segments/item_popularity/cold/auc
        for name, entry in result["segments"][kind].items():
            for key in ("auc", "logloss"):
                if entry[key] is not None:  # an undefined AUC (one class, no rows) is left out, not logged as 0
                    writer.add_scalar(f"{prefix}_segments/{kind}/{name}/{key}", entry[key], step)
