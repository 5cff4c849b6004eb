"""A loader of BAHE sample files for trainers written like dlrm_main.py: ``len()``, re-iterable, batches
of exactly ``batch_size`` rows on every rank.

dlrm_main calls ``len(loader)`` for its progress bars and ``iter(loader)`` more than once per epoch
(its two pipeline filler batches come from a second iterator). ``BaheDataLoader`` gives both over the
project's streaming reader (:func:`bahe.training.data.rank_tables`): one pass is one epoch, every rank
yields the same number of full batches (gloo's all-to-all needs equal sizes), and the rows past the
last full global batch (fewer than ``batch_size x world``) are left out of that pass -- a plain loop
like dlrm_main's cannot mask padded rows out of its AUROC. The trainer's own evaluation
(``bahe-train``) pads and masks instead, so it scores every row.

Example (where dlrm_main calls ``get_dataloader(args, backend, "train")``)::

    loader = BaheDataLoader(data_dir / "train.parquet", batcher, batch_size=2048, rank=rank, world=world)
    len(loader)                      # full batches per rank per epoch
    for batch in loader: ...         # BaheBatch: dense B x F, sparse KJT, behaviours KJT, labels B (int)
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

from bahe.ctr_data.parquet_io import SampleReader
from bahe.training.data import rank_tables


class BaheDataLoader:
    """Batches of one sample file for this rank.

    Args:
        path: a sample file (bahe-data's train/valid/test.parquet).
        batcher: the model's batcher (``build_model(...)[1]``): Arrow rows -> BaheBatch.
        batch_size: rows per rank per batch.
        rank, world: this rank and the number of ranks.
        shuffle: shuffle the rows (seeded; each new pass a new order); False reads them in file order.
        seed: the shuffle's seed (the same on every rank).
    """

    def __init__(self, path: str | Path, batcher: Callable, *, batch_size: int, rank: int, world: int,
                 shuffle: bool = False, seed: int = 0):
        if batch_size < 1 or world < 1 or not 0 <= rank < world:
            raise ValueError(f"BaheDataLoader: need batch_size >= 1 and 0 <= rank < world, got batch_size "
                             f"{batch_size}, rank {rank}, world {world}")
        self.path, self.batcher, self.batch_size, self.rank, self.world = Path(path), batcher, batch_size, rank, world
        self.shuffle, self.seed, self.passes = shuffle, seed, 0
        rows = SampleReader(self.path).num_rows
        self.batches = rows // (batch_size * world)
        if self.batches == 0:
            raise ValueError(f"{self.path} has {rows} rows, fewer than one global batch ({batch_size} x {world} "
                             "ranks); lower the batch size")

    def __len__(self) -> int:
        """Full batches this rank yields per pass (the same on every rank)."""
        return self.batches

    def __iter__(self) -> Iterator:
        seed = self.seed + self.passes  # a new shuffle order for each pass
        self.passes += 1
        tables = rank_tables(self.path, self.batch_size, self.rank, self.world, train=self.shuffle, seed=seed,
                             shuffle=self.shuffle, id_columns=tuple(getattr(self.batcher, "id_features", ())))
        return (self.batcher(table) for table, _ in itertools.islice(tables, self.batches))
