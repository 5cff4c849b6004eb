"""Model selection on the valid split: the best checkpoint by valid AUC (or log loss), early stopping.

Each periodic evaluation (``--eval-every``) is a candidate. An improvement is checkpointed at once, so
the best model is always on disk; ``BEST.json`` in the checkpoint folder names its step and carries
the selection's state (the best value, evaluations since it, where the run stopped early), so a resumed
run selects exactly as an uninterrupted one. The run's final valid / test metrics are those of the
selected checkpoint, and ``bahe-evaluate`` scores it by default.

Epochs: ``epochs_to_steps`` turns ``--epochs E`` into optimisation steps for a train split of R rows
at B rows x W ranks per step; :func:`passes_warning` says when a run re-reads its data with nothing to
select on.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from bahe.embeddings.store import write_text_atomic

BEST = "BEST.json"
REPASS_TOLERANCE = 1.1  # warn from this many passes over the train split with nothing to select on
SELECT_BY = {"auc": 1.0, "logloss": -1.0}  # metric -> sign (higher is better after multiplying)


@dataclass
class Selection:
    """The selection's state; ``step`` is None until the first evaluation."""

    metric: str = "auc"
    patience: int = 0  # evaluations without improvement before stopping (0: never stop early)
    step: int | None = None
    value: float | None = None
    evals_since_best: int = 0
    stopped_at: int | None = None  # the step at which early stopping ended training

    def __post_init__(self) -> None:
        if self.metric not in SELECT_BY:
            raise ValueError(f"select_by={self.metric!r}: choose one of {sorted(SELECT_BY)}")
        if self.patience < 0:
            raise ValueError(f"patience={self.patience}: give 0 (no early stopping) or a number of evaluations >= 1")

    def update(self, step: int, result: dict[str, float]) -> bool:
        """Record an evaluation at ``step``; True when it is the best so far (checkpoint it)."""
        value = float(result[self.metric])
        if not math.isfinite(value):
            improved = False
        else:
            improved = self.value is None or SELECT_BY[self.metric] * (value - self.value) > 0
        if improved:
            self.step, self.value, self.evals_since_best = step, value, 0
        else:
            self.evals_since_best += 1
        if self.patience and self.evals_since_best >= self.patience:
            self.stopped_at = step
        return improved

    def save(self, directory: Path) -> None:
        write_text_atomic(Path(directory) / BEST, json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path, metric: str, patience: int) -> Selection:
        """The state saved in ``directory`` (a resumed run), or a fresh one. A run must keep its metric."""
        path = Path(directory) / BEST
        saved = read_best(directory, "delete it to select among later evaluations only")
        if saved is None:
            return cls(metric, patience)
        state = cls(**{k: saved[k] for k in ("metric", "step", "value", "evals_since_best", "stopped_at")},
                    patience=patience)
        if state.metric != metric:
            raise ValueError(f"{path}: this run selects by {state.metric}, not {metric}: pass --select-by "
                             f"{state.metric}, or train into another --out")
        return state


class BestRecordError(ValueError):
    """A ``BEST.json`` that is not a selection record; the message names the file, the field and what to do."""


def _whole(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


# field -> (is it valid, what it must be): BEST.json's one validation layer, used by every reader of it
BEST_FIELDS = {
    "metric": (lambda v: isinstance(v, str) and v in SELECT_BY, f"one of {sorted(SELECT_BY)}"),
    "step": (lambda v: v is None or _whole(v, 0), "a step number (an integer >= 0; null before the first evaluation)"),
    "value": (lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)),
              "a finite number (null before the first evaluation)"),
    "evals_since_best": (lambda v: _whole(v, 0), "an integer >= 0"),
    "stopped_at": (lambda v: v is None or _whole(v, 0), "a step number (an integer >= 0) or null"),
}


def read_best(directory: Path, advice: str = "delete it to use the latest checkpoint") -> dict | None:
    """``directory``/BEST.json, validated (every field of the selection's state, of its type and in range), or
    None when the run made no selection. Raises :class:`BestRecordError` in one line naming the file, the field
    and what to do (``advice``: what deleting it means to the caller) -- the one reader of BEST.json: a resume
    (:meth:`Selection.load`), bahe-evaluate, bahe-predict, bahe-export, --init-from, --frozen-text-from."""
    path = Path(directory) / BEST
    if not path.is_file():
        return None
    fix = f"restore it, or {advice}"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as err:  # UnicodeDecodeError is a ValueError
        raise BestRecordError(f"{path} is damaged ({type(err).__name__}: {err}): {fix}") from None
    if not isinstance(saved, dict):
        raise BestRecordError(f"{path} is damaged (a JSON {type(saved).__name__}, not an object): {fix}")
    for name, (valid, expected) in BEST_FIELDS.items():
        if name not in saved:
            raise BestRecordError(f"{path} is damaged (no {name!r}): {fix}")
        if not valid(saved[name]):
            shown = repr(saved[name])
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise BestRecordError(f"{path}: {name} is {shown}, expected {expected}: {fix}")
    return saved


def recorded_metric(directory: Path) -> str | None:
    """The metric a run selected by (its BEST.json in ``directory``), or None when it made no selection."""
    saved = read_best(directory, "delete it to evaluate the latest step")
    return None if saved is None else saved["metric"]


def epochs_to_steps(epochs: float, train_rows: int, batch_size: int, world: int) -> int:
    """Optimisation steps that pass ``epochs`` times over ``train_rows`` rows (at least 1)."""
    return max(1, round(epochs * train_rows / (batch_size * world)))


def passes_warning(steps: int, train_rows: int, batch_size: int, world: int, eval_every: int) -> str | None:
    """A warning when the run passes over its training split more than ``REPASS_TOLERANCE`` times with no
    validation to select on."""
    passes = steps * batch_size * world / max(train_rows, 1)
    if passes <= REPASS_TOLERANCE or eval_every:  # a few rows of a second pass are no overfitting risk
        return None
    return (f"bahe-train: warning: {steps} steps of {batch_size} x {world} rows pass {passes:.1f} times over the "
            f"{train_rows:,} training rows with no validation (--eval-every 0): later passes may overfit and the "
            "last step is kept; add --eval-every N (the best checkpoint by valid is kept) and --patience P, or "
            f"train --epochs 1")
