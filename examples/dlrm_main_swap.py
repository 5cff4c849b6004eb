"""A trainer written the way torchrec_dlrm's dlrm_main.py is written, with BAHE in DLRM's place, text off.

Written here (not copied): dlrm_main's structure -- get_dataloader, tables on meta, DLRMTrain-style
wrapper, apply_optimizer_in_backward on sparse_arch, EmbeddingShardingPlanner's collective plan,
DistributedModelParallel, CombinedOptimizer, an LR policy scheduler, TrainPipelineSparseDist and
torchmetrics' BinaryAUROC -- over BAHE's Parquet data (bahe-data). docs/migration.md shows the diff
between examples/dlrm_main_swap.py (text off) and examples/dlrm_main_text.py (text on).

    torchrun --nproc_per_node 2 examples/dlrm_main_swap.py --data_dir runs/demo/data --batch_size 64
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torchmetrics.classification import BinaryAUROC
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.comm import get_local_size
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.models.dlrm import DLRMTrain
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from bahe.ctr_data.parquet_io import SampleReader
from bahe.embeddings.process_group import close_process_group
from bahe.model.bahe import BAHE
from bahe.model.batch import SampleBatcher, id_feature_names
from bahe.training.dataloader import BaheDataLoader

PIPELINE_FILLER_BATCHES = 2  # the train pipeline holds two batches in flight


class LRPolicyScheduler(torch.optim.lr_scheduler.LRScheduler):
    """dlrm_main's policy: linear warm-up, then a quadratic decay to a floor of 1e-7, applied to EVERY
    param group of the optimizer it is given -- the fused table optimizers included."""

    FLOOR = 1e-7

    def __init__(self, optimizer, warmup_steps: int, decay_start: int, decay_steps: int):
        self.warmup_steps, self.decay_start, self.decay_steps = warmup_steps, decay_start, decay_steps
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        step = self._step_count
        if step < self.warmup_steps:
            return [base * step / self.warmup_steps for base in self.base_lrs]
        if self.decay_steps and step >= self.decay_start + self.decay_steps:
            return [self.FLOOR for _ in self.base_lrs]
        if self.decay_steps and step >= self.decay_start:
            left = (self.decay_start + self.decay_steps - step) / self.decay_steps
            return [max(self.FLOOR, base * left**2) for base in self.base_lrs]
        return list(self.base_lrs)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", type=Path, required=True, help="train/valid/test.parquet (bahe-data)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--learning_rate", type=float, default=0.05)
    parser.add_argument("--embedding_dim", type=int, default=8)
    parser.add_argument("--num_embeddings", type=int, default=1000)
    parser.add_argument("--dense_arch_layer_sizes", type=int, nargs="+", default=[16, 8])
    parser.add_argument("--over_arch_layer_sizes", type=int, nargs="+", default=[16, 1])
    parser.add_argument("--lr_warmup_steps", type=int, default=0)
    parser.add_argument("--lr_decay_start", type=int, default=0)
    parser.add_argument("--lr_decay_steps", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the results (JSON) here")
    return parser.parse_args(argv)


def get_dataloader(args: argparse.Namespace, batcher, stage: str) -> BaheDataLoader:
    return BaheDataLoader(args.data_dir / f"{stage}.parquet", batcher, batch_size=args.batch_size,
                          rank=dist.get_rank(), world=dist.get_world_size(), shuffle=stage == "train")


def _evaluate(pipeline: TrainPipelineSparseDist, loader: BaheDataLoader, stage: str) -> float:
    pipeline._model.eval()
    pipeline._connected = False  # refill with this loader's batches
    iterator = itertools.chain(iter(loader), itertools.islice(iter(loader), PIPELINE_FILLER_BATCHES))
    auroc = BinaryAUROC().to(pipeline._device)
    with torch.no_grad():
        for _ in range(len(loader)):
            _loss, logits, labels = pipeline.progress(iterator)
            auroc.update(torch.sigmoid(logits), labels)
    result = auroc.compute().item()
    if dist.get_rank() == 0:
        print(f"AUROC over {stage} set: {result:.4f}")
    return result


def _train(pipeline: TrainPipelineSparseDist, loader: BaheDataLoader, lr_scheduler) -> list[float]:
    pipeline._model.train()
    pipeline._connected = False
    iterator = itertools.chain(iter(loader), itertools.islice(iter(loader), PIPELINE_FILLER_BATCHES))
    losses = []
    for _ in range(len(loader)):
        loss, _logits, _labels = pipeline.progress(iterator)
        lr_scheduler.step()
        losses.append(float(loss))
    return losses


def main(argv: list[str]) -> dict:
    """Train, validate and test; returns the results with the trained model and optimizer."""
    args = parse_args(argv)
    dist.init_process_group("gloo")  # dlrm_main: nccl on CUDA
    device = torch.device("cpu")
    schema = SampleReader(args.data_dir / "train.parquet").schema
    keys = id_feature_names(schema)
    batcher = SampleBatcher(schema, dict.fromkeys(keys, args.num_embeddings))
    train_loader, val_loader, test_loader = (get_dataloader(args, batcher, s) for s in ("train", "valid", "test"))

    eb_configs = [EmbeddingBagConfig(name=f"t_{key}", embedding_dim=args.embedding_dim,
                                     num_embeddings=args.num_embeddings, feature_names=[key]) for key in keys]
    dlrm_model = BAHE(
        embedding_bag_collection=EmbeddingBagCollection(tables=eb_configs, device=torch.device("meta")),
        dense_in_features=len(schema.dense),
        dense_arch_layer_sizes=args.dense_arch_layer_sizes,
        over_arch_layer_sizes=args.over_arch_layer_sizes,
        dense_device=device,
    )
    train_model = DLRMTrain(dlrm_model)
    apply_optimizer_in_backward(torch.optim.Adagrad, train_model.model.sparse_arch.parameters(),
                                {"lr": args.learning_rate})
    planner = EmbeddingShardingPlanner(
        topology=Topology(local_world_size=get_local_size(), world_size=dist.get_world_size(),
                          compute_device=device.type),
        batch_size=args.batch_size,
        storage_reservation=HeuristicalStorageReservation(percentage=0.05),
    )
    plan = planner.collective_plan(train_model, get_default_sharders(), dist.GroupMember.WORLD)
    model = DistributedModelParallel(module=train_model, device=device, plan=plan)

    dense_optimizer = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(model.named_parameters())),
                                            lambda params: torch.optim.Adagrad(params, lr=args.learning_rate))
    optimizer = CombinedOptimizer([model.fused_optimizer, dense_optimizer])
    lr_scheduler = LRPolicyScheduler(optimizer, args.lr_warmup_steps, args.lr_decay_start, args.lr_decay_steps)

    train_pipeline = TrainPipelineSparseDist(model, optimizer, device)
    results = {"losses": [], "val_aurocs": []}
    for _ in range(args.epochs):
        results["losses"] += _train(train_pipeline, train_loader, lr_scheduler)
        results["val_aurocs"].append(_evaluate(TrainPipelineSparseDist(model, optimizer, device), val_loader, "val"))
    results["test_auroc"] = _evaluate(TrainPipelineSparseDist(model, optimizer, device), test_loader, "test")
    if args.out is not None and dist.get_rank() == 0:
        args.out.write_text(json.dumps(results))
    return {**results, "model": model, "optimizer": optimizer}


if __name__ == "__main__":
    main(sys.argv[1:])
    close_process_group()  # destroy_process_group, and gloo's threads joined before interpreter exit
