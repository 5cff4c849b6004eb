"""Warm start from a previous run: ``bahe-train --init-from RUN_OR_CHECKPOINT [--init-optimizer]``.

The daily update: yesterday's model continues on today's data, on a store refreshed with today's
new texts (``bahe-encode build`` appends them as new rows; the old rows stay byte-identical).

* :func:`resolve`: a run folder -> its selected checkpoint (the best by valid, ``checkpoints/BEST.json``;
  else ``LATEST``); or a checkpoint folder ``RUN/checkpoints/step-NNNNNNN`` as it is.
* :func:`prepare`: before the model is sharded, refuse (one line naming both sides) a run whose model
  flags differ from the checkpoint's (``run_config.json``), or whose store does not hold the rows that
  run trained on unchanged as its first rows (another LLM, another k, a store rebuilt from scratch).
* :func:`load`: every trainable weight (ID tables, dense and over arch, the text arch with its deep LLM
  layers, norms and projections) through the restricted DCP loader, resharded to this launch's ranks;
  the optimizer state only when asked. The frozen behaviour table is not in checkpoints: it comes from
  this run's store, grown rows included. Step, data position and learning-rate schedules start at 0.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

from bahe.embeddings.store import BehaviourStore
from bahe.training.checkpoint import Checkpointer, load_into
from bahe.training.run_record import (
    RECORD,
    RunConfigError,
    describe_store,
    differences,
    lineage_problem,
    model_flags,
    read_record,
    store_identity,
)
from bahe.training.selection import Selection, recorded_metric

CHECKPOINT_NAME = re.compile(r"step-\d{7}")
WHAT_TO_GIVE = "give a bahe-train run folder (its --out) or one of its checkpoints (RUN/checkpoints/step-NNNNNNN)"


class InitFromError(ValueError):
    """``--init-from`` names no usable checkpoint, or one that does not fit this run; the message names
    both sides and what to do."""


@dataclass(frozen=True)
class InitSource:
    """The checkpoint a run starts from: its run folder, the step-NNNNNNN folder, its step and the run's
    record (run_config.json)."""

    run: Path
    checkpoint: Path
    step: int
    record: dict

    def as_record(self, optimizer: bool) -> dict:
        """run_config.json's and metrics.json's ``initialized_from``."""
        return {"run": str(self.run), "checkpoint": str(self.checkpoint), "step": self.step, "optimizer": optimizer}


def resolve(path: str | Path, flag: str = "--init-from") -> InitSource:
    """The checkpoint ``--init-from path`` names (``flag``: the option that named it, for the messages), with
    its run's record; InitFromError when there is none."""
    path = Path(path)
    given = f"{flag} {path}"
    if not path.exists():
        raise InitFromError(f"{given} does not exist: {WHAT_TO_GIVE}")
    if CHECKPOINT_NAME.fullmatch(path.name) and (path / ".metadata").is_file():
        checkpoint, run = path, path.parent.parent
    elif (path / "checkpoints").is_dir():
        run, checkpoint = path, _selected(path / "checkpoints", given)
    else:
        raise InitFromError(f"{given} is no run folder (no checkpoints/ in it) and no checkpoint (a step-NNNNNNN "
                            f"folder with its .metadata): {WHAT_TO_GIVE}")
    try:
        record = read_record(run)
    except RunConfigError as err:
        raise InitFromError(f"{given}: {err}") from None
    if record is None:
        raise InitFromError(f"{given}: {run} has no {RECORD} beside its checkpoints, so the model its weights belong "
                            f"to is unknown: {WHAT_TO_GIVE} trained by bahe-train (which records it)")
    return InitSource(run, checkpoint, int(checkpoint.name.split("-")[1]), record)


def _selected(directory: Path, given: str) -> Path:
    """The run's selected checkpoint: BEST.json's step, else LATEST."""
    checkpointer = Checkpointer(directory)
    try:
        metric = recorded_metric(directory)
        best = Selection.load(directory, metric, 0).step if metric else None
        path = checkpointer.named(f"step-{best:07d}") if best is not None else checkpointer.latest()
    except (ValueError, FileNotFoundError) as err:
        raise InitFromError(f"{given}: {err}") from None
    if path is None:
        raise InitFromError(f"{given} holds no checkpoint yet (no checkpoints/LATEST): let that run finish, or "
                            "give one of its checkpoint folders")
    return path


def check_model(source: InitSource, config) -> None:
    """Refuse a model whose flags differ from those the checkpoint was trained with, naming each."""
    found = differences(source.record["model"], model_flags(config))
    if found:
        raise InitFromError(f"--init-from {source.checkpoint} was trained with other model flags than this run's "
                            f"({'; '.join(found)}): its weights fit only the same model; give this run the flags "
                            f"of {source.run / RECORD} (flags left out default to them), or train from scratch "
                            "without --init-from")


def check_store(source: InitSource, store: BehaviourStore | None) -> str | None:
    """Refuse a store that does not hold the rows the checkpoint's run trained on unchanged as its first
    rows. Returns a warning when that run recorded no store (trained before runs recorded it)."""
    recorded = source.record.get("store")
    if store is None:  # the DLRM-only arm: no behaviour table
        return None
    if recorded is None:
        return (f"bahe-train: warning: {source.run / RECORD} records no behaviour store (the run is older than "
                f"the store record), so the lineage of {store.path} cannot be checked: make sure it is the store "
                "that run trained on, or a refresh of it")
    problem = lineage_problem(recorded, store)
    if problem:
        raise InitFromError(f"--init-from {source.checkpoint} was trained on store {describe_store(recorded)}; this "
                            f"run's store {describe_store(store_identity(store))} does not hold those rows unchanged "
                            f"as its first rows: {problem}. Train on that store or a refresh of it (bahe-encode "
                            f"build --store {recorded['root']} --data NEW_FILES appends the new texts), or train "
                            "from scratch without --init-from")
    return None


def prepare(config, store: BehaviourStore | None, *, rank: int = 0) -> InitSource | None:
    """The checkpoint ``config.init_from`` names, checked against this run's model flags and store (None
    without init_from). Call it only when the run folder holds no checkpoint of its own (a resume wins)."""
    if config.init_from is None:
        return None
    source = resolve(config.init_from)
    check_model(source, config)
    warning = check_store(source, store)
    if warning and rank == 0:
        print(warning, file=sys.stderr, flush=True)
    return source


def load(source: InitSource, dmp, optimizer=None) -> None:
    """Every trainable weight of ``source`` into ``dmp`` (any world size), and its optimizer state into
    ``optimizer`` when given; the frozen behaviour table keeps the store's rows."""
    load_into(source.checkpoint, dmp, optimizer)
