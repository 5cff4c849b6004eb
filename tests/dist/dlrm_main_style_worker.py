"""Run by torchrun (2 gloo ranks) from tests/test_dlrm_swap_in.py; writes one JSON per rank.

A training loop written the way dlrm_main.py writes it -- torchrec ``Batch`` in, tables on meta,
``apply_optimizer_in_backward`` on ``model.sparse_arch``, an EmbeddingShardingPlanner's collective
plan, DistributedModelParallel, a CombinedOptimizer of the fused and dense optimizers,
TrainPipelineSparseDist, and a binary AUROC on the three tensors the train wrapper returns -- run
twice on the Criteo sample with nothing changed but the model class (torchrec's DLRM, then our
BAHE). A third run feeds BaheBatch (text behaviours) to BAHE with a text arch through the same
pipeline, to count the pipelined modules when text rides in the batch.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torchmetrics.classification import BinaryAUROC
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.datasets.utils import Batch
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.comm import get_local_size
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.models.dlrm import DLRM, DLRMTrain
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bahe.ctr_data.criteo import iter_criteo_tsv  # noqa: E402
from bahe.embeddings.process_group import close_process_group
from bahe.model.bahe import BAHE, BAHETrain  # noqa: E402
from bahe.model.batch import SampleBatcher, id_feature_names  # noqa: E402
from bahe.model.behaviour_lookup import load_store_rows  # noqa: E402
from bahe.model.factory import build_model  # noqa: E402
from tests.model_fixtures import TinyPipeline  # noqa: E402

BATCH, DIM, ROWS = 8, 8, 1000


class PipelineLog(logging.Handler):
    """Collects torchrec's train-pipeline messages ("Module '...' will [NOT] be pipelined")."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def criteo_batches(tsv: Path, rank: int, world: int) -> tuple[list[Batch], list[str]]:
    """Plain torchrec Batches of this rank (dense B x 13, KJT of c1..c26, labels B)."""
    table = next(iter_criteo_tsv(tsv))
    from bahe.ctr_data.criteo import criteo_schema

    schema = criteo_schema()
    keys = [k for k in id_feature_names(schema) if k.startswith("cat_")]  # Criteo has no user / item id
    batcher = SampleBatcher(schema, dict.fromkeys(keys, ROWS))
    out = []
    for start in range(rank * BATCH, table.num_rows - BATCH + 1, BATCH * world):
        b = batcher(table.slice(start, BATCH))
        out.append(Batch(dense_features=b.dense_features, sparse_features=b.sparse_features, labels=b.labels))
    return out, keys


def dlrm_main_style(model_class, batches: list[Batch], keys: list[str], log: PipelineLog) -> dict:
    """The loop of dlrm_main.py; ``model_class`` is the only thing that varies."""
    device = torch.device("cpu")
    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(
        tables=[EmbeddingBagConfig(name=f"t_{k}", embedding_dim=DIM, num_embeddings=ROWS, feature_names=[k])
                for k in keys], device=torch.device("meta"))
    model = model_class(embedding_bag_collection=ebc, dense_in_features=13, dense_arch_layer_sizes=[16, DIM],
                        over_arch_layer_sizes=[16, 1])
    train_model = DLRMTrain(model)
    apply_optimizer_in_backward(RowWiseAdagrad, train_model.model.sparse_arch.parameters(), {"lr": 0.05})
    planner = EmbeddingShardingPlanner(
        topology=Topology(local_world_size=get_local_size(), world_size=dist.get_world_size(), compute_device="cpu"),
        batch_size=BATCH)
    plan = planner.collective_plan(train_model, None, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(module=train_model, device=device, plan=plan)
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())),
                                  lambda params: torch.optim.Adagrad(params, lr=0.05))
    optimizer = CombinedOptimizer([dmp.fused_optimizer, dense])
    return train_and_score(dmp, optimizer, batches, log)


def train_and_score(dmp, optimizer, batches: list, log: PipelineLog) -> dict:
    device = torch.device("cpu")
    log.messages.clear()
    pipeline = TrainPipelineSparseDist(dmp, optimizer, device)
    losses, stream = [], iter(batches * 3)
    dmp.train()
    while True:
        try:
            loss, _, _ = pipeline.progress(stream)
        except StopIteration:
            break
        losses.append(float(loss))
    pipelined = [m for m in log.messages if "pipelined" in m]
    modules = len(getattr(pipeline, "_pipelined_modules", []))
    pipeline.detach()
    dmp.eval()
    auroc = BinaryAUROC()
    with torch.no_grad():
        for batch in batches:
            _, (_, logits, labels) = dmp(batch)
            auroc.update(torch.sigmoid(logits), labels.int())
    return {"losses": losses, "auroc": float(auroc.compute()), "pipeline_log": pipelined, "pipelined_modules": modules}


def bahe_with_text(pipeline: TinyPipeline, rank: int, world: int, log: PipelineLog) -> dict:
    """BAHE with a text arch and BaheBatch (behaviours beside dense / sparse) through the same loop."""
    from bahe.model.sharding import shard_model

    torch.manual_seed(0)
    model, batcher, store = build_model(pipeline.config(), pipeline.schema, device=torch.device("meta"))
    apply_optimizer_in_backward(RowWiseAdagrad, model.sparse_arch.parameters(), {"lr": 0.05})
    dmp = shard_model(BAHETrain(model), torch.device("cpu"), batch_size=BATCH)
    load_store_rows(dmp, store)
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())),
                                  lambda params: torch.optim.Adagrad(params, lr=0.05))
    table = pipeline.table()
    batches = [batcher(table.slice(s, BATCH)) for s in range(rank * BATCH, 160, BATCH * world)]
    return train_and_score(dmp, CombinedOptimizer([dmp.fused_optimizer, dense]), batches, log)


def main() -> None:
    tsv, llm, data, store, out_dir = sys.argv[1:6]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    log = PipelineLog()
    logging.getLogger("torchrec.distributed.train_pipeline.utils").addHandler(log)
    logging.getLogger("torchrec.distributed.train_pipeline.utils").setLevel(logging.INFO)
    batches, keys = criteo_batches(Path(tsv), rank, world)
    result = {"dlrm": dlrm_main_style(DLRM, batches, keys, log), "bahe": dlrm_main_style(BAHE, batches, keys, log),
              "bahe_text": bahe_with_text(TinyPipeline(Path(llm), Path(data), Path(store)), rank, world, log)}
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
    close_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
