"""Dense features -> the DenseArch's input: DLRM's ``log1p(max(x, 0))``, then standardised with the
train split's statistics.

Why standardise: after log1p, rates in [0, 1] keep a spread of about 0.1 around a large constant
(MovieLens: a user's recent positive rate has std 0.17), so the first MLP layer sees mostly the
constant and learns slowly; z-scores put every feature on one scale. The statistics come from the
first ``max_rows`` rows of the train split in file order -- deterministic, so a resumed run, an
evaluation and every rank compute the same numbers without storing them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from bahe.ctr_data.parquet_io import SampleReader
from bahe.ctr_data.schema import DataError

MIN_STD = 1e-6  # a constant feature is centred, not divided by ~0


def log1p_dense(table: pa.Table, columns: tuple[str, ...]) -> np.ndarray:
    """B x F_dense float64: ``log1p(max(x, 0))`` of each dense column (DLRM's transform).

    A NaN or infinite value is refused (DataError naming the column and the row of the table):
    sample files cannot hold one (``validate_batch``), so it means a table built by other code.
    """
    if not columns:
        return np.zeros((table.num_rows, 0))
    dense = np.stack([table.column(c).to_numpy(zero_copy_only=False) for c in columns], axis=1).astype(np.float64)
    finite = np.isfinite(dense)
    if not finite.all():
        row, col = (int(i[0]) for i in np.nonzero(~finite))
        raise DataError(f"dense value must be finite, got {dense[row, col]} in row {row} of the table; "
                        "read the data with bahe.ctr_data.parquet_io.SampleReader, which refuses such rows",
                        field=columns[col])
    return np.log1p(np.maximum(dense, 0.0))


@dataclass(frozen=True)
class DenseNormalizer:
    """Per-feature mean and std of the log1p'd dense features.

    Example::

        normalizer = DenseNormalizer.fit(SampleReader("data/train.parquet"))
        x = normalizer(table)   # B x F_dense float32, zero mean and unit std on train
    """

    columns: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if not len(self.columns) == len(self.mean) == len(self.std):
            raise ValueError(f"DenseNormalizer: {len(self.columns)} columns but {len(self.mean)} means and "
                             f"{len(self.std)} stds")
        if not all(np.isfinite(self.mean)) or not all(np.isfinite(self.std)):
            raise ValueError(f"DenseNormalizer: non-finite statistics for {self.columns}: mean {self.mean}, "
                             f"std {self.std}")

    @classmethod
    def fit(cls, reader: SampleReader, max_rows: int = 1_000_000) -> DenseNormalizer:
        """Statistics of the first ``max_rows`` rows of a (train) file, streamed."""
        columns = reader.schema.dense_columns
        total = np.zeros(len(columns))
        squares = np.zeros(len(columns))
        count, shift = 0, None
        for table in reader.iter_batches():
            x = log1p_dense(table.slice(0, max_rows - count), columns)
            shift = x[0] if shift is None else shift  # shifted sums: no cancellation for near-constant features
            x = x - shift
            total += x.sum(axis=0)
            squares += (x * x).sum(axis=0)
            count += len(x)
            if count >= max_rows:
                break
        if count == 0:
            raise ValueError(f"{reader.path} has no rows to fit the dense statistics on")
        mean = total / count
        std = np.sqrt(np.maximum(squares / count - mean * mean, 0.0))
        mean = mean + shift
        return cls(tuple(columns), tuple(mean.tolist()), tuple(np.maximum(std, MIN_STD).tolist()))

    def __call__(self, table: pa.Table) -> np.ndarray:
        """B x F_dense float32 z-scores."""
        x = log1p_dense(table, self.columns)
        return ((x - np.asarray(self.mean)) / np.asarray(self.std)).astype(np.float32)
