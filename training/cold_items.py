"""Cold-item simulation in training (DropoutNet-style ID dropout): teach the model to score items it has
no ID history for, from what it still knows of them (the title's text feature, genres, year).

A held-out item reaches the model with an untrained ID row (near zero: the table's initial values) and
"never seen" item statistics; in a plain run every training row carries a trained ID row, so the model
learns to lean on the ID and has no reason to read the title. With ``share`` > 0, each TRAINING row is,
with that probability, shown as a never-seen item: its ``id_features`` bags are emptied (the pooled ID
embedding is zero) and its ``dense`` columns are set to their never-seen values. Valid, test and every
scoring path are untouched. The draw is seeded by (seed, rank, step), so a resumed run draws what an
uninterrupted one would.

Example (MovieLens: a new item has 0 earlier ratings and the global prior rate, ~0.55)::

    bahe-train ... --cold-item-dropout 0.3 --cold-item-dense dense_item_history=0 \\
        dense_item_prior_positive_rate=0.55
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

MEAN = "mean"  # a dense column's never-seen value: its train mean (z-score 0)


@dataclass(frozen=True)
class ColdItemSimulation:
    """Args:
        share: the probability that a training row is shown as a never-seen item, in [0, 1) (0: off).
        id_features: the ID features whose bags such a row loses (default ``item_id``).
        dense: (column, value) pairs: the raw value a never-seen item has in that dense column (before
            log1p and standardisation), or ``"mean"`` for the column's train mean.
    """

    share: float = 0.0
    id_features: tuple[str, ...] = ("item_id",)
    dense: tuple[tuple[str, float | str], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "id_features", tuple(self.id_features))
        object.__setattr__(self, "dense", tuple((str(c), v) for c, v in self.dense))
        if isinstance(self.share, bool) or not (math.isfinite(self.share) and 0.0 <= self.share < 1.0):
            raise ValueError(f"ColdItemSimulation.share={self.share} (--cold-item-dropout): give a probability in "
                             "[0, 1), e.g. 0.3 (0: off)")
        if self.share and not self.id_features:
            raise ValueError("ColdItemSimulation.id_features (--cold-item-features) is empty: name the item's ID "
                             "feature(s), e.g. item_id")
        for column, value in self.dense:
            if value != MEAN and not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ValueError(f"ColdItemSimulation.dense: {column}={value!r} (--cold-item-dense): give a finite "
                                 f"number or '{MEAN}'")
        columns = [column for column, _ in self.dense]
        if len(set(columns)) != len(columns):
            raise ValueError(f"ColdItemSimulation.dense names a column twice: {columns}")

    @classmethod
    def from_flags(cls, share: float, id_features: list[str], dense: list[str]) -> ColdItemSimulation:
        """From ``--cold-item-dropout``, ``--cold-item-features`` and ``--cold-item-dense COLUMN=VALUE ...``."""
        pairs = []
        for pair in dense:
            column, _, value = pair.partition("=")
            if not column or not value:
                raise ValueError(f"--cold-item-dense takes COLUMN=VALUE (a number or '{MEAN}'), got {pair!r}")
            try:
                pairs.append((column, value if value == MEAN else float(value)))
            except ValueError:
                raise ValueError(f"--cold-item-dense {pair!r}: the value must be a number or '{MEAN}'") from None
        return cls(share, tuple(id_features), tuple(pairs))

    def as_dict(self) -> dict:
        return {"share": self.share, "id_features": list(self.id_features), "dense": dict(self.dense)}


class ColdItemBatcher:
    """Wraps a batcher for the TRAINING stream: each call batches one step's table, then shows a seeded
    ``share`` of its rows as never-seen items (see the module doc). Anything else (counters, sequence
    names) is the wrapped batcher's."""

    def __init__(self, batcher, simulation: ColdItemSimulation, *, seed: int, rank: int, first_step: int):
        self.batcher, self.simulation = batcher, simulation
        self.seed, self.rank, self.step = seed, rank, first_step
        missing = [name for name in simulation.id_features if name not in batcher.id_features]
        if missing:
            raise ValueError(f"--cold-item-features names {missing}, which the model does not read "
                             f"(its ID features: {batcher.id_features})")
        self.dense_values = self._dense_values(batcher, simulation)

    @staticmethod
    def _dense_values(batcher, simulation: ColdItemSimulation) -> dict[int, float]:
        """dense column index -> its never-seen value as the model sees it (log1p'd, standardised)."""
        columns = list(batcher.schema.dense_columns)
        normalizer = batcher.dense_normalizer
        values = {}
        for column, raw in simulation.dense:
            if column not in columns:
                raise ValueError(f"--cold-item-dense names {column!r}, which is not a dense column of the data "
                                 f"({columns})")
            i = columns.index(column)
            if raw == MEAN and normalizer is None:
                raise ValueError(f"--cold-item-dense {column}={MEAN} needs the dense standardisation (leave out "
                                 "--no-dense-standardize) or a number")
            x = 0.0 if raw == MEAN else math.log1p(max(raw, 0.0))
            values[i] = 0.0 if raw == MEAN else (x - normalizer.mean[i]) / normalizer.std[i] if normalizer else x
        return values

    def __getattr__(self, name: str):
        return getattr(self.batcher, name)

    def __call__(self, table):
        import torch

        batch = self.batcher(table)
        self.step += 1
        if not self.simulation.share:
            return batch
        rng = np.random.default_rng([self.seed, self.rank, self.step])
        cold = torch.from_numpy(rng.random(len(batch.labels)) < self.simulation.share)
        batch.sparse_features = empty_bags(batch.sparse_features, self.simulation.id_features, cold)
        for i, value in self.dense_values.items():
            batch.dense_features[cold, i] = value
        return batch


def empty_bags(features: KeyedJaggedTensor, keys: tuple[str, ...], rows: torch.Tensor) -> KeyedJaggedTensor:
    """``features`` with the bags of ``keys`` emptied in the rows where ``rows`` (B bool) is set; every
    other bag as it was."""
    import torch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
    batch, names = features.stride(), features.keys()
    lengths, values = features.lengths().clone(), features.values()
    keep = torch.ones(values.numel(), dtype=torch.bool)
    offsets = features.offsets()
    for i, name in enumerate(names):
        if name not in keys:
            continue
        part = lengths[i * batch:(i + 1) * batch]
        start, end = int(offsets[i * batch]), int(offsets[(i + 1) * batch])
        keep[start:end] = ~rows.repeat_interleave(part)
        lengths[i * batch:(i + 1) * batch] = torch.where(rows, torch.zeros_like(part), part)
    weights = features.weights_or_none()
    return KeyedJaggedTensor.from_lengths_sync(keys=names, values=values[keep], lengths=lengths,
                                               weights=None if weights is None else weights[keep])
