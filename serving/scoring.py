"""Batch scoring of a trained run (``bahe-predict``): the run's model restored for inference, files scored.

The model is rebuilt from the run's record (``run_config.json``: arm, tables, head, text flags, store,
LLM), its feature schema and dense statistics from the train split it was trained on, sharded as the
trainer shards it, the behaviour store loaded into its frozen table, and the weights of one checkpoint
restored through the restricted loaders (``training/safe_load.py``) -- the model only, no optimiser, no
trainer. ``which="best"`` takes the checkpoint the run selected on valid (``checkpoints/BEST.json``; the
latest when it made no selection), ``"latest"`` the last one. The restore itself is serving/restore.py
(:func:`plan_restore`, :func:`restore_model`), which bahe-export uses too, unsharded (serving/restore.py).

Scores are the model's forward in eval mode under ``no_grad``, exactly what ``bahe-evaluate`` runs
(``training/loop.py`` ``evaluate``): ``score = sigmoid(logit)`` in float32. The rows, their split over
ranks and the output file: ``serving/scoring_io.py``. With ``features`` (``--features EXPORT``) the text
features come from a bahe-export folder instead of the LLM's deep layers (serving/cached_scoring.py).

The summary also holds ``segments`` (None: ``segments=None``): AUC and log loss of the scored rows against
their labels, overall and per item popularity and history length segment, with row counts and bootstrap
intervals (training/segments.py, docs/segments.md); the item popularity is the run's own, recorded at its
train start (``<run>/item_counts.parquet``; a run without one: its train split counted now).
"""

from __future__ import annotations

import secrets
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist

from bahe.model.deep_layers import PRECISIONS
from bahe.serving.restore import RestorePlan, plan_restore, restore_model
from bahe.serving.scoring_io import (
    ScoreFiles,
    ScoreInput,
    check_out,
    forward_calls,
    open_inputs,
    padded_batches,
    rank_share,
    read_rows,
    remove_stale_parts,
)
from bahe.training.segments import DEFAULT_SPEC, SegmentSpec

WHICH = ("best", "latest")


class ScoringError(ValueError):
    """Scoring failed on some rank (bad rows, a failed write); raised on every rank, one line."""


@dataclass(frozen=True)
class ScoringConfig:
    """Args:
        run: the training run folder (bahe-train --out): checkpoints/ and run_config.json.
        files: sample Parquet files to score, in output order.
        out: the score file (Parquet) to write; its folder must exist.
        which: ``best`` (the run's selection on valid; its latest when it made none) or ``latest``.
        batch_size: rows per rank per forward call (None: the run's training batch size).
        data_dir: the folder of the train.parquet the run was trained on: the model's feature schema and
            dense statistics (None: the folder run_config.json records, if it records one).
        store, llm: the behaviour store and the LLM folder (None: the run's).
        llm_precision: compute precision of the LLM layers (``auto``: bf16 on CUDA, fp32 on CPU).
        device: ``auto``, ``cpu`` or ``cuda``.
        show_progress: a progress bar on rank 0 (stderr).
        features: a bahe-export folder (its LATEST version) or version folder whose cached text features
            replace the LLM's deep layers (serving/cached_scoring.py); None: the full model runs.
        segments: the segment metrics of the summary (training/segments.py); None: none.
    """

    run: Path
    files: tuple[Path, ...]
    out: Path
    which: str = "best"
    batch_size: int | None = None
    data_dir: Path | None = None
    store: str | None = None
    llm: str | None = None
    llm_precision: str = "auto"
    device: str = "auto"
    show_progress: bool = True
    features: Path | None = None
    segments: SegmentSpec | None = DEFAULT_SPEC

    def __post_init__(self) -> None:
        object.__setattr__(self, "run", Path(self.run))
        if self.features is not None:
            object.__setattr__(self, "features", Path(self.features))
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "files", tuple(Path(f) for f in self.files))
        if not self.files:
            raise ValueError("ScoringConfig.files is empty: give at least one sample .parquet file (--data FILE ...)")
        if self.which not in WHICH:
            raise ValueError(f"ScoringConfig.which={self.which!r}: choose best or latest (--which)")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"ScoringConfig.batch_size={self.batch_size}: give rows per forward call >= 1 (--batch-size)")
        if self.llm_precision not in PRECISIONS:
            raise ValueError(f"ScoringConfig.llm_precision={self.llm_precision!r}: choose one of {PRECISIONS}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"ScoringConfig.device={self.device!r}: choose auto, cpu or cuda")


@dataclass(frozen=True)
class ScoringPlan(RestorePlan):
    """A restore plan plus the checked input files."""

    inputs: list[ScoreInput]


def plan_scoring(config: ScoringConfig) -> ScoringPlan:
    """Every check that needs no model: the restore plan, each input file against the run's schema, the
    output folder. Deterministic, so every rank raises the same one line."""
    plan = plan_restore(config.run, config.which, data_dir=config.data_dir, store=config.store, llm=config.llm,
                        llm_precision=config.llm_precision)
    inputs = open_inputs(config.files, plan.schema)
    check_out(config.out)
    return ScoringPlan(**{f.name: getattr(plan, f.name) for f in fields(plan)}, inputs=inputs)


def _agree(error: str | None, rank: int, world: int, device: torch.device) -> None:
    """Raise ScoringError on every rank if any rank has an ``error`` (one small all-reduce per call)."""
    if world > 1:
        flag = torch.tensor([0 if error is None else 1], device=device)
        dist.all_reduce(flag)
        if int(flag) == 0:
            return
        errors = [None] * world
        dist.all_gather_object(errors, error)
        where, error = next((r, e) for r, e in enumerate(errors) if e is not None)
        error = error if where == rank else f"rank {where}: {error}"
    if error is not None:
        raise ScoringError(error)


def _token(rank: int, world: int, out: Path) -> str:
    """The job's part-file name, chosen on rank 0 (which first removes what a killed job left)."""
    box = [secrets.token_hex(4) if rank == 0 else None]
    if rank == 0:
        remove_stale_parts(out)
    if world > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def score_files(run, files, out, *, which: str = "best", batch_size: int | None = None, data_dir=None,
                store: str | None = None, llm: str | None = None, llm_precision: str = "auto", device: str = "auto",
                show_progress: bool = True, features=None, segments: SegmentSpec | None = DEFAULT_SPEC) -> dict:
    """Score sample files with a trained run; every rank of the process group calls it (see the module doc).
    ``features``: a bahe-export folder whose cached text features replace the LLM's deep layers.
    ``segments``: the spec of the summary's segment metrics (None: none).

    Returns the summary (on every rank): rows, out, checkpoint, step, which, world_size, rows_per_s,
    text_features (where they came from), segments (AUC and log loss per segment), ...
    Raises ValueError / FileNotFoundError (one line) for bad input; nothing is left at or beside ``out``.
    """
    from tqdm import tqdm

    from bahe.ctr_data.schema import LABEL
    from bahe.training.loop import peak_memory_mb, setup_distributed
    from bahe.training.metrics import SegmentRows, segment_tagger

    config = ScoringConfig(run=run, files=tuple(files), out=out, which=which, batch_size=batch_size,
                           data_dir=data_dir, store=store, llm=llm, llm_precision=llm_precision, device=device,
                           show_progress=show_progress, features=features, segments=segments)
    rank, world, dev = setup_distributed(config.device)
    began = time.perf_counter()
    plan = plan_scoring(config)
    cached = None
    if config.features is not None:
        from bahe.serving.cached_scoring import CachedTextFeatures, id_batcher

        cached = CachedTextFeatures.for_run(config.features, plan)  # before the model: a wrong export costs no build
    restored = restore_model(plan, dev, store_rows=cached is None)  # cached: the text arch never runs
    batcher, step = restored.batcher, restored.step
    if cached is not None:
        cached.check_model(restored.model)
        batcher = id_batcher(batcher)  # dense and ID features only: the texts are looked up in the export
    schema, inputs = plan.schema, plan.inputs
    batch = config.batch_size or plan.run_batch_size
    total = sum(source.rows for source in inputs)
    calls = forward_calls(total, world, batch)
    start, stop = rank_share(total, rank, world)
    ids = tuple(batcher.id_features)
    parts = ScoreFiles(config.out, _token(rank, world, config.out), rank, world)
    tagger = segment_tagger(config.segments, config.run, plan.train, rank, record=False)
    rows = SegmentRows(tagger) if tagger is not None else None
    summary = {"run": str(config.run), "checkpoint": plan.checkpoint.name, "step": step, "which": config.which,
               "chosen": plan.chosen, "arm": plan.arm, "files": [str(f) for f in config.files], "rows": total,
               "world_size": world, "batch_size": batch,
               "text_features": None if plan.arm == "dlrm" else {"from": "model"}}
    scoring_began = time.perf_counter()
    try:
        filler = next(read_rows(inputs, 0, 1, schema, ids, 1)) if total else None
        stream = padded_batches(read_rows(inputs, start, stop, schema, ids, batch), batch, calls, filler)
        desc = f"score {world} rank(s)" + (f", text features of {cached.export.version}" if cached is not None else "")
        bar = tqdm(total=calls, unit="batch", desc=desc, file=sys.stderr,
                   disable=not config.show_progress or rank != 0)
        done, broken = 0, None  # real rows scored by this rank; the first non-finite score (agreed at the next call)
        with torch.no_grad(), bar:
            for _ in range(calls):
                error = broken
                try:
                    if error is None:
                        table, real = next(stream)
                        features = batcher(table).to(dev)
                        text = cached(table, real).to(dev) if cached is not None else None  # B x (N + 1) x D
                except Exception as err:  # a bad row (DataError names file, row, field), a read error, ...
                    error = str(err) if isinstance(err, (ValueError, OSError)) else f"{type(err).__name__}: {err}"
                _agree(error, rank, world, dev)
                if cached is None:
                    _, (_, logits, _) = restored.module(features)
                else:  # the interaction part only, as the exported predictor runs it
                    logits = restored.model.forward_from_text_features(
                        features.dense_features, features.sparse_features, text).squeeze(-1)
                if real:
                    values = logits[:real].float().cpu().numpy()
                    broken = nonfinite_score(values, inputs, start + done, cached)
                    if broken is None:  # never a NaN or infinite score in the output
                        parts.write(table.slice(0, real), values)
                        if rows is not None:
                            scored = table.slice(0, real)
                            rows.update(torch.sigmoid(torch.from_numpy(values)),
                                        scored.column(LABEL).to_numpy(zero_copy_only=False), *tagger(scored))
                    done += real
                bar.update(1)
        if cached is not None:
            summary["text_features"] = cached.record(_summed(cached.counts, world))
        error = broken
        try:
            if error is None:
                parts.close_part()
        except OSError as err:
            error = f"cannot write {parts.part} ({err.strerror or err}): free space or choose another --out folder"
        _agree(error, rank, world, dev)
        summary["segments"] = rows.compute() if rows is not None else None  # over every rank's rows
        error = None
        if rank == 0:
            try:
                parts.assemble(summary)
            except OSError as err:
                error = f"cannot write {config.out} ({err.strerror or err}): free space or choose another --out"
        _agree(error, rank, world, dev)
    except BaseException:
        parts.discard(everything=rank == 0)
        raise
    seconds = time.perf_counter() - scoring_began
    summary.update(out=str(config.out), seconds=round(time.perf_counter() - began, 3),
                   rows_per_s=round(total / max(seconds, 1e-9), 1), peak_memory_mb=round(peak_memory_mb(dev), 1),
                   batcher_counters=_summed_counters(batcher, world))
    return summary


def locate(inputs: list[ScoreInput], index: int) -> tuple[Path, int]:
    """(file, row in that file) of row ``index`` of the concatenated inputs."""
    for source in inputs:
        if index < source.rows:
            return source.path, index
        index -= source.rows
    raise IndexError(f"row {index} beyond the inputs")


def nonfinite_score(logits, inputs: list[ScoreInput], first: int, cached=None) -> str | None:
    """The one-line error for the first NaN or infinite logit of a batch whose rows start at row ``first`` of the
    concatenated inputs (None: every one is finite). A scoring run never writes such a score and exits 0."""
    import numpy as np

    bad = np.flatnonzero(~np.isfinite(logits))
    if not len(bad):
        return None
    path, row = locate(inputs, first + int(bad[0]))
    source = (f"the text features of {cached.export.path} (re-export it: bahe-export --full)" if cached is not None
              else "the run's checkpoint and behaviour store (bahe-encode verify STORE)")
    return (f"file {path}, row {row}: the model's logit is {float(logits[bad[0]])}, not a finite number "
            f"({len(bad)} row(s) of this batch so); nothing is written: check this row's dense values and {source}")


def _summed_counters(batcher, world: int) -> dict[str, int]:
    """The batchers' counters summed over ranks (unknown texts, ids folded into a table, ...); padding rows
    are counted too."""
    counters = getattr(batcher, "counters", None)
    return _summed(counters.as_dict() if counters is not None else {}, world)


def _summed(mine: dict[str, int], world: int) -> dict[str, int]:
    """Counters summed over ranks (every rank calls it)."""
    if world == 1:
        return mine
    every = [None] * world
    dist.all_gather_object(every, mine)
    return {key: sum(c.get(key, 0) for c in every) for key in mine}
