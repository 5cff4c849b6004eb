"""Dense features are DLRM's log1p, then z-scored with the train split's statistics: the statistics
equal a numpy reference over the fitted rows, train comes out with zero mean and unit std, and
statistics that do not fit the data are refused."""

from __future__ import annotations

import numpy as np
import pytest

from bahe.ctr_data.parquet_io import SampleReader, SampleWriter
from bahe.ctr_data.schema import SampleSchema
from bahe.model.batch import SampleBatcher
from bahe.model.dense_features import DenseNormalizer
from tests.conftest import tiny_rows


@pytest.fixture
def train_file(tmp_path):
    schema = SampleSchema(categorical=("genre",), dense=("age", "rate", "flag"), sequences=(), dataset="tiny")
    rows = tiny_rows(300)
    for name in ("liked", "disliked"):
        rows.pop(f"seq_{name}")
    rng = np.random.default_rng(0)
    rows["dense_age"] = rng.uniform(7, 73, 300).tolist()
    rows["dense_rate"] = rng.uniform(-0.5, 1, 300).tolist()  # negatives clamp to 0 before log1p
    rows["dense_flag"] = [3.0] * 300  # constant: centred, not divided by ~0
    path = tmp_path / "train.parquet"
    with SampleWriter(path, schema, row_group_size=64) as writer:
        writer.write(rows)
    return path, rows


def test_statistics_equal_a_numpy_reference_and_standardise_train(train_file):
    path, rows = train_file
    normalizer = DenseNormalizer.fit(SampleReader(path))
    raw = np.stack([np.asarray(rows[c], dtype=np.float32) for c in ("dense_age", "dense_rate", "dense_flag")], 1)
    x = np.log1p(np.maximum(raw.astype(np.float64), 0))
    np.testing.assert_allclose(normalizer.mean, x.mean(0), rtol=1e-9)
    np.testing.assert_allclose(normalizer.std[:2], x.std(0)[:2], rtol=1e-6)
    z = normalizer(SampleReader(path).read_all())
    assert z.dtype == np.float32
    np.testing.assert_allclose(z[:, :2].mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(z[:, :2].std(0), 1, atol=1e-5)
    assert np.all(z[:, 2] == 0)  # the constant feature


def test_fit_on_the_first_rows_only(train_file):
    path, rows = train_file
    head = DenseNormalizer.fit(SampleReader(path), max_rows=100)
    x = np.log1p(np.asarray(rows["dense_age"][:100], dtype=np.float32).astype(np.float64))
    assert head.mean[0] == pytest.approx(x.mean(), rel=1e-9)


def test_the_batcher_uses_the_statistics_and_refuses_foreign_ones(train_file, tiny_schema):
    path, _ = train_file
    reader = SampleReader(path)
    normalizer = DenseNormalizer.fit(reader)
    table = reader.read_all().slice(0, 8)
    batch = SampleBatcher(reader.schema, {"item_id": 10}, dense_normalizer=normalizer)(table)
    np.testing.assert_array_equal(batch.dense_features.numpy(), normalizer(table))
    plain = SampleBatcher(reader.schema, {"item_id": 10})(table)
    np.testing.assert_allclose(plain.dense_features.numpy()[:, 0], np.log1p(table.column("dense_age").to_numpy()),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="fit them on this data's train split"):
        SampleBatcher(tiny_schema, {"item_id": 10}, dense_normalizer=normalizer)
    with pytest.raises(ValueError, match="non-finite"):
        DenseNormalizer(("a",), (float("nan"),), (1.0,))
