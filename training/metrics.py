"""Evaluation metrics across ranks: AUC (torchmetrics), NE, log loss and calibration (torchrec's
formulas on all-reduced sums); per segment (item popularity, history length) through :class:`SegmentRows`
and training/segments.py."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torchmetrics.classification import BinaryAUROC
from torchrec.metrics.calibration import compute_calibration
from torchrec.metrics.ne import compute_logloss, compute_ne, get_ne_states

ETA = 1e-12


class CtrMetrics:
    """Accumulate predictions (probabilities) and labels; :meth:`compute` syncs across ranks.

    Returns {"auc", "ne", "logloss", "calibration", "samples"}: NE is the log loss divided by the
    entropy of the positive rate (1.0 = no better than predicting the average); calibration is
    sum(predictions) / sum(labels) (1.0 = calibrated).
    """

    def __init__(self, device: torch.device):
        self.auroc = BinaryAUROC(thresholds=None).to(device)
        self.device = device
        self.sums = torch.zeros(6, dtype=torch.float64, device=device)  # ce, n, pos, neg, pred sum, label sum

    def update(self, probabilities: torch.Tensor, labels: torch.Tensor) -> None:
        probabilities, labels = probabilities.detach().float(), labels.detach().float()
        self.auroc.update(probabilities, labels.long())
        states = get_ne_states(labels.double(), probabilities.double(), torch.ones_like(labels, dtype=torch.float64),
                               ETA)
        self.sums += torch.stack([states["cross_entropy_sum"], states["weighted_num_samples"], states["pos_labels"],
                                  states["neg_labels"], probabilities.double().sum(), labels.double().sum()])

    def compute(self) -> dict[str, float]:
        sums = self.sums.clone()
        if dist.is_initialized():
            dist.all_reduce(sums)
        ce, n, pos, neg, pred_sum, label_sum = sums
        return {
            "auc": float(self.auroc.compute()),  # torchmetrics gathers every rank's predictions
            "ne": float(compute_ne(ce, n, pos, neg, ETA)),
            "logloss": float(compute_logloss(ce, pos, neg, ETA) * torch.log(torch.tensor(2.0, dtype=torch.float64))),
            "calibration": float(compute_calibration(pred_sum, label_sum)),
            "samples": int(n),
        }


class SegmentRows:
    """The rows of an evaluation with their segments (training/segments.py): every rank adds its real rows'
    probabilities, labels and segment ids; :meth:`compute` gathers every rank's rows on rank 0 (7 bytes a
    row: float32 score, int8 label and two int8 segment ids), which computes the report over ALL rows and
    hands it to every rank. Every rank calls :meth:`compute`."""

    def __init__(self, tagger):
        self.tagger = tagger
        self.parts: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.ids: list[tuple[np.ndarray, np.ndarray]] = []

    def update(self, probabilities, labels, item_ids: np.ndarray, history_ids: np.ndarray) -> None:
        """``probabilities`` and ``labels`` (tensors or arrays) of real rows, with their segment ids."""
        def as_numpy(value) -> np.ndarray:
            return value.detach().float().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)

        probabilities, labels = as_numpy(probabilities).astype(np.float32), as_numpy(labels).astype(np.int8)
        if not (len(probabilities) == len(labels) == len(item_ids) == len(history_ids)):
            raise ValueError("SegmentRows.update: scores, labels and segment ids differ in length")
        self.parts.append(probabilities)
        self.labels.append(labels)
        self.ids.append((np.asarray(item_ids, dtype=np.int8), np.asarray(history_ids, dtype=np.int8)))

    def _mine(self) -> tuple[np.ndarray, ...]:
        def join(arrays, dtype) -> np.ndarray:
            return np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)

        return (join(self.parts, np.float32), join(self.labels, np.int8), join([i for i, _ in self.ids], np.int8),
                join([h for _, h in self.ids], np.int8))

    def compute(self) -> dict:
        mine = self._mine()
        if dist.is_initialized() and dist.get_world_size() > 1:
            rank, world = dist.get_rank(), dist.get_world_size()
            every = [None] * world if rank == 0 else None
            dist.gather_object(mine, every, dst=0)
            box = [None]
            if rank == 0:
                try:
                    rows = [np.concatenate([part[i] for part in every]) for i in range(4)]
                    box = [self.tagger.report(*rows)]
                except Exception as err:  # never leave the other ranks waiting: every rank raises it
                    box = [f"segment metrics failed on rank 0: {type(err).__name__}: {err}"]
            dist.broadcast_object_list(box, src=0)
            if isinstance(box[0], str):
                raise RuntimeError(box[0])
            return box[0]
        return self.tagger.report(*mine)


def segment_tagger(spec, run_dir, train_path, rank: int, *, record: bool, on_rank0=None):
    """The segment tagger of a run's evaluations (training/segments.py), the same on every rank: the item
    popularity counts of the run's training split, recorded once in ``<run_dir>/item_counts.parquet``.

    ``record`` (a run that trains): rank 0 counts ``train_path`` into the run folder unless the run already
    recorded its counts (a resume keeps them), through ``on_rank0`` (the checkpointer's: a failed write is
    one line on every rank). Otherwise (bahe-evaluate) the run's recorded counts, or, for a run that recorded
    none, ``train_path`` counted now. Rank 0 reads them and hands them to every rank. None without a
    ``train_path`` (torchrec's random data: no items to count) or without a ``spec``."""
    from pathlib import Path

    from bahe.training.segments import ITEM_COUNTS, SegmentTagger, count_items, run_item_counts, write_item_counts

    if spec is None or train_path is None:
        return None
    run_dir = Path(run_dir)
    if record:
        def write() -> None:
            if not (run_dir / ITEM_COUNTS).is_file():
                write_item_counts(run_dir, count_items(train_path))

        on_rank0(write, f"write {run_dir / ITEM_COUNTS}")
    box = [None]
    if rank == 0:
        try:
            box = [run_item_counts(run_dir, train_path)]
        except (ValueError, OSError) as err:
            box = [str(err)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], str):
        raise ValueError(box[0])
    return SegmentTagger(spec, box[0]) if box[0] is not None else None
