"""BAHE under DistributedModelParallel on 2 gloo ranks: the behaviour table stays bit-exactly frozen
in every shard for table-wise, column-wise and row-wise plans while the loss falls and the LLM
layers learn; the sharded forward equals the unsharded one; both sharded modules are pipelined."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bahe.model.bahe import BAHETrain
from bahe.model.factory import build_model
from bahe.model.sharding import shard_model
from tests.model_fixtures import make_tiny_pipeline
from tests.torchrun import torchrun

ROOT = Path(__file__).resolve().parents[1]
SHARDINGS = ("table_wise", "column_wise", "row_wise")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    pipeline = make_tiny_pipeline(root / "pipeline")
    out = root / "out"
    out.mkdir()
    torchrun(ROOT / "tests" / "dist" / "sharded_bahe_worker.py", pipeline.llm, pipeline.data, pipeline.store,
             ",".join(SHARDINGS), out)
    return {(s, r): json.loads((out / f"{s}-rank{r}.json").read_text()) for s in SHARDINGS for r in (0, 1)}


pytestmark = pytest.mark.integration


@pytest.mark.parametrize("sharding", SHARDINGS)
def test_behaviour_table_is_frozen_in_every_shard(results, sharding):
    shards = {}
    for rank in (0, 1):
        result = results[(sharding, rank)]
        assert result["plan"]["model.text_arch.lookup.embedding_collection"] == {"behaviours": sharding}
        assert result["checksums_before"] == result["checksums_after"]
        shards.update(result["checksums_before"])
        losses, epoch = result["losses"], len(result["losses"]) // 4  # 4 passes over the same batches
        assert sum(losses[-epoch:]) / epoch < sum(losses[:epoch]) / epoch - 0.02  # while the model learns
        assert result["layer_moved"]  # and the deep LLM layers train
    rows = sum(shape[0] for _, _, shape in shards.values())
    columns = sum(shape[1] for _, _, shape in shards.values())
    expected = {"table_wise": (1, 180, 32), "column_wise": (2, 360, 32), "row_wise": (2, 180, 64)}[sharding]
    assert (len(shards), rows, columns) == expected  # a real split: TW whole, CW 2 column blocks, RW 2 row blocks


@pytest.mark.parametrize("sharding", SHARDINGS)
def test_sharded_forward_equals_unsharded(results, sharding):
    assert all(results[(sharding, r)]["forward_gap"] < 1e-6 for r in (0, 1))


@pytest.mark.parametrize("sharding", SHARDINGS)
def test_train_pipeline_pipelines_both_sharded_modules(results, sharding):
    """TrainPipelineSparseDist found the ID tables AND the behaviour table among the batch's inputs."""
    assert all(results[(sharding, r)]["pipelined_modules"] == 2 for r in (0, 1))


def test_data_parallel_behaviour_table_is_refused_with_a_reason(tmp_path):
    pipeline = make_tiny_pipeline(tmp_path)
    model, _, _ = build_model(pipeline.config(), pipeline.schema, device=torch.device("meta"))
    with pytest.raises(ValueError, match="data_parallel is not available for the behaviour table"):
        shard_model(BAHETrain(model), torch.device("cpu"), behaviour_sharding="data_parallel")
