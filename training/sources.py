"""Where the trainer's batches come from: sample Parquet splits, Criteo TSV day files, or torchrec's
random dataset -- the three inputs a dlrm_main user brings.

Every source gives the model's :class:`~bahe.ctr_data.schema.SampleSchema` and two streams per rank:

* ``train(...)``: endless ``Batch`` objects of ``batch_size`` rows (equal on every rank);
* ``evaluate(split, ...)``: ``(batch, real_rows)`` pairs covering a split once (rows past
  ``real_rows`` are padding, so every rank runs the same number of collectives).

``ParquetData`` reads ``train/valid/test.parquet`` (``bahe-data`` writes them; :func:`criteo_data`
converts TSV days into them first). ``RandomData`` is ``torchrec.datasets.random.RandomRecDataset``
unchanged, its plain ``torchrec.datasets.utils.Batch`` going straight into the model.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import torch.distributed as dist
from torchrec.datasets.random import RandomRecDataset

from bahe.ctr_data.criteo import criteo_schema, write_criteo_splits
from bahe.ctr_data.parquet_io import SampleReader
from bahe.ctr_data.schema import SampleSchema
from bahe.embeddings.store import write_text_atomic
from bahe.model.dense_features import DenseNormalizer
from bahe.training.data import batches, eval_batches

SPLITS = ("train", "valid", "test")


class ParquetData:
    """``train/valid/test.parquet`` in ``data_dir``; batches through the model's batcher. Each rank reads
    only the row groups that hold its rows; ``lanes`` deals the training stream into that many parts
    (:mod:`bahe.training.data`): 1 keeps one stream, a multiple of the world size has each rank read
    ~1/world of the train split (the global batch must then be a multiple of ``lanes``)."""

    def __init__(self, data_dir: Path, *, lanes: int = 1):
        if lanes < 1:
            raise ValueError(f"ParquetData: lanes must be >= 1, got {lanes}")
        self.paths = {name: Path(data_dir) / f"{name}.parquet" for name in SPLITS}
        self.schema: SampleSchema = SampleReader(self.paths["train"]).schema
        self.lanes = lanes

    def dense_normalizer(self) -> DenseNormalizer:
        """Dense statistics of the train split (its first million rows)."""
        return DenseNormalizer.fit(SampleReader(self.paths["train"]))

    def train(self, batcher, batch_size: int, rank: int, world: int, *, skip_rows: int, seed: int,
              shuffle: bool) -> Iterator:
        return batches(self.paths["train"], batcher, batch_size, rank, world, skip_rows=skip_rows, seed=seed,
                       shuffle=shuffle, lanes=self.lanes)

    def evaluate(self, split: str, batcher, batch_size: int, rank: int, world: int) -> Iterator:
        return eval_batches(self.paths[split], batcher, batch_size, rank, world)


class RandomData:
    """torchrec's ``RandomRecDataset``: Criteo-shaped random batches (13 dense, c1..c26 plus user_id
    and item_id, one id per feature within each table's hash size, random labels). For speed and
    plumbing checks: its AUC is 0.5 by construction. ``eval_batches`` batches per split and rank."""

    def __init__(self, eval_batches: int = 8):
        self.schema = criteo_schema()
        self.eval_batches = eval_batches

    def dense_normalizer(self) -> None:
        return None  # RandomRecDataset's dense features are already uniform in [0, 1)

    def _dataset(self, batcher, batch_size: int, seed: int, num_batches: int | None) -> RandomRecDataset:
        keys = list(batcher.id_features)
        return RandomRecDataset(keys=keys, batch_size=batch_size, hash_sizes=[batcher.table_sizes[k] for k in keys],
                                ids_per_feature=1, num_dense=len(self.schema.dense), manual_seed=seed,
                                num_batches=num_batches)

    def train(self, batcher, batch_size: int, rank: int, world: int, *, skip_rows: int, seed: int,
              shuffle: bool) -> Iterator:
        stream = iter(self._dataset(batcher, batch_size, seed * 1009 + rank, None))
        return itertools.islice(stream, skip_rows // (batch_size * world), None)

    def evaluate(self, split: str, batcher, batch_size: int, rank: int, world: int) -> Iterator:
        seed = 1_000_003 * (SPLITS.index(split) + 1) + rank
        return ((batch, batch_size) for batch in self._dataset(batcher, batch_size, seed, self.eval_batches))


def criteo_data(tsv_files: tuple[Path, ...], data_dir: Path, rank: int) -> ParquetData:
    """Convert Criteo TSV days into ``data_dir`` once (rank 0; the others wait), then read them.
    A complete conversion of the same files (paths, sizes, modification times) is reused."""
    data_dir = Path(data_dir)
    marker = data_dir / "criteo_sources.json"
    sources = [{"path": str(p.resolve()), "bytes": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns}
               for p in map(Path, tsv_files)]
    done = marker.is_file() and json.loads(marker.read_text()) == sources \
        and all((data_dir / f"{name}.parquet").is_file() for name in SPLITS)
    if rank == 0 and not done:
        print(f"converting {len(tsv_files)} Criteo TSV file(s) -> {data_dir}", flush=True)
        marker.unlink(missing_ok=True)
        write_criteo_splits(tsv_files, data_dir)
        write_text_atomic(marker, json.dumps(sources))
    if dist.is_initialized():
        dist.barrier()
    return ParquetData(data_dir)
