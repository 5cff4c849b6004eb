"""Evaluation metrics across ranks: AUC (torchmetrics), NE, log loss and calibration (torchrec's
formulas on all-reduced sums)."""

from __future__ import annotations

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
