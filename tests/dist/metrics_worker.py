"""One rank of the metrics reference check: the trainer's ``evaluate`` (padded batches, every rank its
own rows, CtrMetrics all-reduced) on a real DLRM-arm model, beside the same model's scores of the
whole split in one pass on rank 0. Writes both to OUT/metrics-<world>.json.

    torchrun --nproc_per_node 2 tests/dist/metrics_worker.py DATA_DIR OUT BATCH_SIZE
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from bahe.ctr_data.parquet_io import SampleReader
from bahe.embeddings.process_group import close_process_group
from bahe.model.bahe import BAHETrain
from bahe.model.config import ArchConfig, BaheModelConfig, TablesConfig
from bahe.model.factory import build_model
from bahe.training.config import TrainConfig
from bahe.training.loop import evaluate
from bahe.training.sources import ParquetData


def tiny_dlrm(data_dir: Path, out: Path, batch_size: int):
    """(train model, batcher, source, config): a small DLRM-arm model with the same weights on every rank and
    every world size, and the trainer's config for ``data_dir``."""
    torch.manual_seed(0)
    model_config = BaheModelConfig(tables=TablesConfig(embedding_dim=8, default_rows=64),
                                   arch=ArchConfig(dense_arch_layer_sizes=(16, 8), over_arch_layer_sizes=(16, 1)))
    source = ParquetData(data_dir)
    model, batcher, _ = build_model(model_config, source.schema, device=torch.device("cpu"))
    config = TrainConfig(data_dir=data_dir, out_dir=out, model=model_config, batch_size=batch_size)
    return BAHETrain(model), batcher, source, config


def main(data_dir: Path, out: Path, batch_size: int) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    train_model, batcher, source, config = tiny_dlrm(data_dir, out, batch_size)
    result = evaluate(train_model, source, "valid", batcher, config, rank, world, torch.device("cpu"), None)
    if rank == 0:
        with torch.no_grad():
            _, (_, logits, labels) = train_model.eval()(batcher(SampleReader(data_dir / "valid.parquet").read_all()))
        reference = {"probabilities": torch.sigmoid(logits).tolist(), "labels": labels.tolist()}
        (out / f"metrics-{world}.json").write_text(json.dumps({"evaluate": result, "reference": reference}))
    dist.barrier()
    close_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
