"""The non-learned floor a CTR model must beat: the item's positive rate in train plus the user's
recent positive rate, scored on the test split with the same AUC code as the trainer.

score = (item positives + 1) / (item ratings in train + 2) + user positives / ratings among the user's
last ``recent`` interactions before the sample (0.5 with none) -- each part computed only from what
was known before the sample (train for the item rate; all earlier samples for the user's labels).
"""

from __future__ import annotations

from collections import defaultdict, deque
from pathlib import Path

import pyarrow as pa
import torch
from bahe.ctr_data.parquet_io import SampleReader
from torchmetrics.functional.classification import binary_auroc


def non_learned_baseline(data_dir: Path, recent: int = 20) -> dict[str, float]:
    """AUC of the floor on valid and test."""
    tables = {split: SampleReader(Path(data_dir) / f"{split}.parquet").read_all() for split in ("train", "valid", "test")}
    item_stats: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    train = tables["train"]
    for item, label in zip(train.column("item_id").to_pylist(), train.column("label").to_pylist()):
        item_stats[item][0] += label
        item_stats[item][1] += 1
    ordered = pa.concat_tables(tables.values())  # files are time-ordered and consecutive
    history: dict[int, deque] = defaultdict(lambda: deque(maxlen=recent))
    scores, labels, splits = [], [], []
    split_of = ["train"] * train.num_rows + ["valid"] * tables["valid"].num_rows + ["test"] * tables["test"].num_rows
    timestamps = ordered.column("timestamp").to_pylist()
    rows = list(zip(ordered.column("user_id").to_pylist(), ordered.column("item_id").to_pylist(),
                    ordered.column("label").to_pylist(), timestamps, split_of))
    start = 0
    while start < len(rows):  # a group of equal timestamps sees only strictly earlier labels
        end = start
        while end < len(rows) and timestamps[end] == timestamps[start]:
            end += 1
        for user, item, label, _, split in rows[start:end]:
            if split != "train":
                positives, seen = item_stats[item]
                past = history[user]
                scores.append((positives + 1) / (seen + 2) + (sum(past) / len(past) if past else 0.5))
                labels.append(label)
                splits.append(split)
        for user, _, label, _, _ in rows[start:end]:
            history[user].append(label)
        start = end
    result = {}
    for split in ("valid", "test"):
        pick = [i for i, s in enumerate(splits) if s == split]
        result[split] = float(binary_auroc(torch.tensor([scores[i] for i in pick]),
                                           torch.tensor([labels[i] for i in pick])))
    return result
