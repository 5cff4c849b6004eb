"""The non-learned floor a CTR model must beat: the strongest of the standard heuristics, chosen on valid.

Candidates, each computed only from what was known before the sample (train for the item's rate; all
earlier samples, in time order, for the user's labels; a group of equal timestamps sees only strictly
earlier labels):

* ``item``: the item's smoothed train positive rate, (positives + m p) / (ratings + m) with the train
  positive rate p as prior and m = ``ITEM_PRIOR_WEIGHT`` pseudo-ratings;
* ``user_last{5,10,30}`` / ``user_all``: the user's positive rate over their last N (all) earlier
  ratings (p with none);
* ``item+user_last{N}`` / ``item+user_all``: their sums;
* ``item_laplace+user_last20``: the floor this project printed before (Laplace item rate + the user's
  last 20, 0.5 with none).

The candidate with the best VALID AUC is the floor, and its TEST AUC is what the learned arms are
compared with: choosing on test would flatter the floor, choosing a weaker one flatters the model. The
old floor's figures are also reported on their own as ``old_floor`` (docs/decisions.md).
"""

from __future__ import annotations

from collections import defaultdict, deque
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from torchmetrics.functional.classification import binary_auroc

from bahe.ctr_data.parquet_io import SampleReader

ITEM_PRIOR_WEIGHT = 10.0
USER_WINDOWS = {"user_last5": 5, "user_last10": 10, "user_last30": 30, "user_all": None}
OLD_FLOOR_WINDOW = 20
OLD_FLOOR = "item_laplace+user_last20"  # the floor printed before, a candidate too


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    return float(binary_auroc(torch.from_numpy(scores), torch.from_numpy(labels).long()))


def candidate_scores(data_dir: Path) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """(candidate -> scores of every valid and test row in file order, labels, split of each row).

    Rows are visited in time order (a stable sort of the three files by timestamp; the time split's files
    are in that order already). On an item-cold split (the schema's ``extra.split`` is ``item_cold``) the
    valid and test rows of items with no train row are held out of every user's history, as the split's own
    features hold them out: their labels never score another row."""
    readers = {split: SampleReader(Path(data_dir) / f"{split}.parquet") for split in ("train", "valid", "test")}
    tables = {split: reader.read_all() for split, reader in readers.items()}
    item_cold = readers["train"].schema.extra.get("split") == "item_cold"
    train = tables["train"]
    prior = float(np.mean(train.column("label").to_numpy())) if train.num_rows else 0.5
    item_stats: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for item, label in zip(train.column("item_id").to_pylist(), train.column("label").to_pylist()):
        item_stats[item][0] += label
        item_stats[item][1] += 1
    ordered = pa.concat_tables(tables.values())
    split_of = ["train"] * train.num_rows + ["valid"] * tables["valid"].num_rows + ["test"] * tables["test"].num_rows
    stamps = ordered.column("timestamp").to_numpy()
    order = np.argsort(stamps, kind="stable")  # the identity on a time split
    timestamps = stamps[order].tolist()
    columns = [ordered.column(name).to_pylist() for name in ("user_id", "item_id", "label")]
    rows = [(columns[0][i], columns[1][i], columns[2][i], split_of[i], int(i)) for i in order]
    history: dict[int, deque] = defaultdict(deque)
    parts: dict[str, list[float]] = defaultdict(list)
    labels, splits, positions = [], [], []
    start = 0
    while start < len(rows):
        end = start
        while end < len(rows) and timestamps[end] == timestamps[start]:
            end += 1
        for user, item, label, split, position in rows[start:end]:
            if split == "train":
                continue
            positions.append(position)
            positives, seen = item_stats.get(item, (0, 0))
            parts["item"].append((positives + ITEM_PRIOR_WEIGHT * prior) / (seen + ITEM_PRIOR_WEIGHT))
            parts["old_item"].append((positives + 1) / (seen + 2))
            past = list(history[user])
            for name, window in {**USER_WINDOWS, "old_user": OLD_FLOOR_WINDOW}.items():
                recent = past[-window:] if window else past
                default = 0.5 if name == "old_user" else prior
                parts[name].append(sum(recent) / len(recent) if recent else default)
            labels.append(label)
            splits.append(split)
        for user, item, label, _, _ in rows[start:end]:
            if not (item_cold and item not in item_stats):  # a held-out item's label feeds no history
                history[user].append(label)
        start = end
    back = np.argsort(positions, kind="stable")  # visit order -> file order
    scores = {name: np.asarray(parts[name])[back] for name in ("item", *USER_WINDOWS)}
    scores.update({f"item+{name}": scores["item"] + scores[name] for name in USER_WINDOWS})
    scores[OLD_FLOOR] = (np.asarray(parts["old_item"]) + np.asarray(parts["old_user"]))[back]
    return scores, np.asarray(labels)[back], np.asarray(splits)[back]


def non_learned_baseline(data_dir: Path) -> dict:
    """{"valid", "test": AUC of the floor (the candidate best on valid), "chosen": its name,
    "candidates": name -> {"valid", "test"}, "old_floor": {"valid", "test"}} (AUCs)."""
    scores, labels, splits = candidate_scores(data_dir)
    table = {name: {split: _auc(values[splits == split], labels[splits == split]) for split in ("valid", "test")}
             for name, values in scores.items()}
    chosen = max(table, key=lambda name: table[name]["valid"])
    return {**table[chosen], "chosen": chosen, "candidates": table, "old_floor": table[OLD_FLOOR]}
