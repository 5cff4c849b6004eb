#!/usr/bin/env python3
# ruff: noqa: UP006, UP035, UP045, SIM105  (upstream's typing and try/except style, kept line for line)
"""Upstream's TorchRec DLRM trainer, structure for structure, and the same trainer with BAHE's text.

examples/dlrm_main_upstream.py mirrors ``torchrec_dlrm/dlrm_main.py`` of facebookresearch/dlrm at
commit f06d3deed5a15710fb28e0ede0af31ebd53789cb: the same functions (parse_args, _evaluate, _train,
TrainValTestResults, train_val_test, main), the same flags with the same defaults, the same stages
(train / val / test through ``get_dataloader(args, backend, stage)``), the same default of 10 batches
per stage when no Criteo path is given, the same model branches (DLRM, DLRM_DCN, DLRM_Projection),
optimizers (fused in-backward SGD or Adagrad on ``sparse_arch``, the dense one through
``in_backward_optimizer_filter``, ``CombinedOptimizer``), LR policy scheduler, planner, DMP,
``TrainPipelineSparseDist`` with two filler batches, and metric (a binary AUROC over
``sigmoid(logits)``, over every rank's samples). It is written here, not copied.

examples/dlrm_main_upstream_text.py is that file with BAHE and its text behaviours, reading the
project's Parquet (bahe-data) and behaviour store (bahe-encode); ``diff -u`` of the two is the change
docs/migration.md asks a team to apply to its own dlrm_main.py (bahe.training.dlrm_main_adapter holds
the helpers it imports). Where the mirror is known to differ from upstream (what a ``patch`` of the
real file may meet):

* the metric object: upstream takes torcheval's ``BinaryAUROC`` and gathers it with
  ``torcheval.metrics.toolkit.sync_and_compute``; this file takes torchmetrics' ``BinaryAUROC``, whose
  ``compute()`` gathers every rank's samples the same way (torcheval is not installed here);
* upstream's sibling modules (data/dlrm_dataloader.py, lr_scheduler.py, multi_hot.py) are one module
  here, examples/dlrm_upstream_parts.py, without the multi-hot parts (they raise, naming the flag);
* ``main`` returns the results of ``train_val_test`` (upstream drops them); comments, docstrings and
  help texts are this project's own words, and their line layout differs.

    torchrun --nproc_per_node 2 examples/dlrm_main_upstream.py --embedding_dim 8 \\
        --dense_arch_layer_sizes 8,8 --over_arch_layer_sizes 8,1 --num_embeddings 64
    torchrun --nproc_per_node 2 examples/dlrm_main_upstream_text.py --bahe_data_dir data/ml-100k \\
        --store stores/ml --adagrad --learning_rate 0.05 --batch_size 64 --embedding_dim 32 \\
        --dense_arch_layer_sizes 64,32 --over_arch_layer_sizes 128,32,1 --num_embeddings 2000
"""

import argparse
import itertools
import os
import sys
from dataclasses import dataclass, field
from enum import Enum
from typing import List, Optional

import torch
from pyre_extensions import none_throws
from torch import distributed as dist
from torch.utils.data import DataLoader
from torchmetrics.classification import BinaryAUROC
from torchrec import EmbeddingBagCollection
from torchrec.datasets.criteo import DEFAULT_CAT_NAMES, DEFAULT_INT_NAMES
from torchrec.distributed import TrainPipelineSparseDist
from torchrec.distributed.comm import get_local_size
from torchrec.distributed.model_parallel import (
    DistributedModelParallel,
    get_default_sharders,
)
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.storage_reservations import (
    HeuristicalStorageReservation,
)
from torchrec.models.dlrm import DLRM, DLRM_DCN, DLRM_Projection, DLRMTrain
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from tqdm import tqdm

# run as a script: the helper module lies beside this file
try:
    from dlrm_upstream_parts import (
        LRPolicyScheduler,
        Multihot,
        RestartableMap,
        get_dataloader,
    )
except ImportError:
    pass

# imported as examples.dlrm_main_upstream
try:
    from .dlrm_upstream_parts import (  # noqa F811
        LRPolicyScheduler,
        Multihot,
        RestartableMap,
        get_dataloader,
    )
except ImportError:
    pass

TRAIN_PIPELINE_STAGES = 3  # batches in flight in TrainPipelineSparseDist


class InteractionType(Enum):
    ORIGINAL = "original"
    DCN = "dcn"
    PROJECTION = "projection"

    def __str__(self):
        return self.value


def parse_args(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="DLRM trainer (dlrm_main.py's flags)")
    add = parser.add_argument
    add("--epochs", type=int, default=1, help="passes over the training data")
    add("--batch_size", type=int, default=32, help="training batch size per rank")
    add(
        "--drop_last_training_batch",
        dest="drop_last_training_batch",
        action="store_true",
        help="leave out the last training batch when it is not full",
    )
    add("--test_batch_size", type=int, default=None, help="val/test batch size (default: --batch_size)")
    add("--limit_train_batches", type=int, default=None, help="train on at most this many batches per epoch")
    add("--limit_val_batches", type=int, default=None, help="validate on at most this many batches")
    add("--limit_test_batches", type=int, default=None, help="test on at most this many batches")
    add("--dataset_name", type=str, default="criteo_1t", help="criteo_1tb or criteo_kaggle")
    add(
        "--num_embeddings",
        type=int,
        default=100_000,
        help="rows of every table, unless --num_embeddings_per_feature is given",
    )
    add(
        "--num_embeddings_per_feature",
        type=str,
        default=None,
        help="rows per table, comma separated, one per sparse feature (Criteo: 26)",
    )
    add("--dense_arch_layer_sizes", type=str, default="512,256,64", help="dense arch widths, comma separated")
    add("--over_arch_layer_sizes", type=str, default="512,512,256,1", help="over arch widths, comma separated")
    add("--embedding_dim", type=int, default=64, help="embedding size of every table")
    add(
        "--interaction_branch1_layer_sizes",
        type=str,
        default="2048,2048",
        help="projection interaction: branch 1 widths",
    )
    add(
        "--interaction_branch2_layer_sizes",
        type=str,
        default="2048,2048",
        help="projection interaction: branch 2 widths",
    )
    add("--dcn_num_layers", type=int, default=3, help="DCN interaction: layers")
    add("--dcn_low_rank_dim", type=int, default=512, help="DCN interaction: low-rank dimension")
    add("--undersampling_rate", type=float, help="share of the label-0 rows to keep, in (0, 1]")
    add("--seed", type=int, help="random seed")
    add("--pin_memory", dest="pin_memory", action="store_true", help="pin the loaded batches")
    add("--mmap_mode", dest="mmap_mode", action="store_true", help="memory-map the Criteo .npy files")
    add("--in_memory_binary_criteo_path", type=str, default=None, help="folder of the Criteo day_*.npy files")
    add(
        "--synthetic_multi_hot_criteo_path",
        type=str,
        default=None,
        help="folder of MLPerf's synthetic multi-hot .npz files",
    )
    add("--learning_rate", type=float, default=15.0, help="learning rate")
    add("--shuffle_batches", dest="shuffle_batches", action="store_true", help="shuffle the batches")
    add(
        "--shuffle_training_set",
        dest="shuffle_training_set",
        action="store_true",
        help="shuffle the training rows in memory (overrides --mmap_mode)",
    )
    add("--validation_freq_within_epoch", type=int, default=None, help="validate every N training steps")
    parser.set_defaults(
        pin_memory=None,
        mmap_mode=None,
        drop_last=None,
        shuffle_batches=None,
        shuffle_training_set=None,
    )
    add("--adagrad", dest="adagrad", action="store_true", help="Adagrad instead of SGD")
    add(
        "--interaction_type",
        type=InteractionType,
        choices=list(InteractionType),
        default=InteractionType.ORIGINAL,
        help="original (pairwise dot products), dcn or projection",
    )
    add(
        "--collect_multi_hot_freqs_stats",
        dest="collect_multi_hot_freqs_stats",
        action="store_true",
        help="count how often each embedding row is read",
    )
    add("--multi_hot_sizes", type=str, default=None, help="multi-hot size per sparse feature, comma separated")
    add(
        "--multi_hot_distribution_type",
        type=str,
        choices=["uniform", "pareto"],
        default="uniform",
        help="how the multi-hot ids are drawn",
    )
    add("--lr_warmup_steps", type=int, default=0)
    add("--lr_decay_start", type=int, default=0)
    add("--lr_decay_steps", type=int, default=0)
    add("--print_lr", action="store_true", help="print every param group's learning rate each step")
    add("--allow_tf32", action="store_true", help="TensorFloat-32 matmuls (A100 and newer)")
    add(
        "--print_sharding_plan",
        action="store_true",
        help="print the plan of every table",
    )
    return parser.parse_args(argv)


def _evaluate(
    limit_batches: Optional[int],
    eval_pipeline: TrainPipelineSparseDist,
    eval_dataloader: DataLoader,
    stage: str,
) -> float:
    """AUROC of the model over one stage ("val" or "test"), at most ``limit_batches`` batches per rank,
    over the samples of every rank; printed on rank 0."""
    eval_pipeline._model.eval()
    device = eval_pipeline._device

    # a pipeline that ran before must take its first batches again
    eval_pipeline._connected = False

    batches = itertools.islice(iter(eval_dataloader), limit_batches)
    # the pipeline reads two batches ahead: two more keep it going until the real ones are scored
    fillers = itertools.islice(iter(eval_dataloader), TRAIN_PIPELINE_STAGES - 1)
    iterator = itertools.chain(batches, fillers)

    auroc = BinaryAUROC().to(device)
    samples = 0

    is_rank_zero = dist.get_rank() == 0
    if is_rank_zero:
        pbar = tqdm(iter(int, 1), desc=f"Evaluating {stage} set", total=len(eval_dataloader), disable=False)
    with torch.no_grad():
        while True:
            try:
                _loss, logits, labels = eval_pipeline.progress(iterator)
            except StopIteration:
                break
            auroc.update(torch.sigmoid(logits), labels)
            samples += labels.numel()
            if is_rank_zero:
                pbar.update(1)

    auroc_result = auroc.compute().item()  # every rank's samples
    num_samples = torch.tensor(samples, device=device)
    dist.reduce(num_samples, 0, op=dist.ReduceOp.SUM)

    if is_rank_zero:
        print(f"AUROC over {stage} set: {auroc_result}.")
        print(f"Number of {stage} samples: {num_samples}")
    return auroc_result


def _train(
    train_pipeline: TrainPipelineSparseDist,
    val_pipeline: TrainPipelineSparseDist,
    train_dataloader: DataLoader,
    val_dataloader: DataLoader,
    epoch: int,
    lr_scheduler,
    print_lr: bool,
    validation_freq: Optional[int],
    limit_train_batches: Optional[int],
    limit_val_batches: Optional[int],
) -> None:
    """One epoch: at most ``limit_train_batches`` steps, the scheduler stepped after each, and a
    validation every ``validation_freq`` steps when given."""
    train_pipeline._model.train()

    # a pipeline that ran before must take its first batches again
    train_pipeline._connected = False

    batches = itertools.islice(iter(train_dataloader), limit_train_batches)
    # the pipeline reads two batches ahead: two more keep it going until the real ones are trained on
    fillers = itertools.islice(iter(train_dataloader), TRAIN_PIPELINE_STAGES - 1)
    iterator = itertools.chain(batches, fillers)

    is_rank_zero = dist.get_rank() == 0
    if is_rank_zero:
        pbar = tqdm(iter(int, 1), desc=f"Epoch {epoch}", total=len(train_dataloader), disable=False)
    for it in itertools.count(1):
        try:
            if is_rank_zero and print_lr:
                for i, group in enumerate(train_pipeline._optimizer.param_groups):
                    print(f"lr: {it} {i} {group['lr']:.6f}")
            train_pipeline.progress(iterator)
            lr_scheduler.step()
            if is_rank_zero:
                pbar.update(1)
            if validation_freq and it % validation_freq == 0:
                _evaluate(limit_val_batches, val_pipeline, val_dataloader, "val")
                train_pipeline._model.train()
        except StopIteration:
            if is_rank_zero:
                print("Total number of iterations:", it - 1)
            break


@dataclass
class TrainValTestResults:
    val_aurocs: List[float] = field(default_factory=list)
    test_auroc: Optional[float] = None


def train_val_test(
    args: argparse.Namespace,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    train_dataloader: DataLoader,
    val_dataloader: DataLoader,
    test_dataloader: DataLoader,
    lr_scheduler: LRPolicyScheduler,
) -> TrainValTestResults:
    """``args.epochs`` epochs, each followed by a validation; then one test. One pipeline per stage."""
    results = TrainValTestResults()
    train_pipeline = TrainPipelineSparseDist(model, optimizer, device)
    val_pipeline = TrainPipelineSparseDist(model, optimizer, device)
    test_pipeline = TrainPipelineSparseDist(model, optimizer, device)

    for epoch in range(args.epochs):
        _train(
            train_pipeline,
            val_pipeline,
            train_dataloader,
            val_dataloader,
            epoch,
            lr_scheduler,
            args.print_lr,
            args.validation_freq_within_epoch,
            args.limit_train_batches,
            args.limit_val_batches,
        )
        results.val_aurocs.append(_evaluate(args.limit_val_batches, val_pipeline, val_dataloader, "val"))

    results.test_auroc = _evaluate(args.limit_test_batches, test_pipeline, test_dataloader, "test")
    return results


def main(argv: List[str]) -> TrainValTestResults:
    """Train, validate and test a DLRM (https://arxiv.org/abs/1906.00091): ID tables sharded across the
    ranks (model parallel), MLPs and interaction replicated (data parallel), loading, input
    distribution and compute overlapped by the train pipeline. Data: random, or Criteo 1TB."""
    args = parse_args(argv)
    for name, value in list(vars(args).items()):
        if isinstance(value, str):  # comma-separated integers become lists
            try:
                setattr(args, name, [int(part) for part in value.split(",")])
            except ValueError:
                pass

    torch.backends.cuda.matmul.allow_tf32 = args.allow_tf32

    if args.multi_hot_sizes is not None:
        tables = len(args.num_embeddings_per_feature or DEFAULT_CAT_NAMES)
        assert len(args.multi_hot_sizes) == tables, "--multi_hot_sizes needs one size per embedding table"
    assert (
        args.in_memory_binary_criteo_path is None or args.synthetic_multi_hot_criteo_path is None
    ), "--in_memory_binary_criteo_path and --synthetic_multi_hot_criteo_path exclude each other"
    assert (
        args.multi_hot_sizes is None or args.synthetic_multi_hot_criteo_path is None
    ), "--multi_hot_sizes turns 1-hot data into multi-hot: not with --synthetic_multi_hot_criteo_path"
    assert (
        args.multi_hot_distribution_type is None or args.synthetic_multi_hot_criteo_path is None
    ), "--multi_hot_distribution_type belongs to --multi_hot_sizes: not with --synthetic_multi_hot_criteo_path"

    rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        device: torch.device = torch.device(f"cuda:{rank}")
        backend = "nccl"
        torch.cuda.set_device(device)
    else:
        device: torch.device = torch.device("cpu")
        backend = "gloo"

    if rank == 0:
        print(
            "PARAMS: (lr, batch_size, warmup_steps, decay_start, decay_steps): "
            f"{(args.learning_rate, args.batch_size, args.lr_warmup_steps, args.lr_decay_start, args.lr_decay_steps)}"
        )
    dist.init_process_group(backend=backend)

    if args.num_embeddings_per_feature is not None:
        args.num_embeddings = None

    # random data: 10 batches per stage unless limits are given
    if (
        args.in_memory_binary_criteo_path
        is args.synthetic_multi_hot_criteo_path
        is None
    ):
        for split in ["train", "val", "test"]:
            attr = f"limit_{split}_batches"
            if getattr(args, attr) is None:
                setattr(args, attr, 10)

    train_dataloader = get_dataloader(args, backend, "train")
    val_dataloader = get_dataloader(args, backend, "val")
    test_dataloader = get_dataloader(args, backend, "test")

    eb_configs = [
        EmbeddingBagConfig(
            name=f"t_{feature_name}",
            embedding_dim=args.embedding_dim,
            num_embeddings=args.num_embeddings
            if args.num_embeddings is not None
            else none_throws(args.num_embeddings_per_feature)[feature_idx],
            feature_names=[feature_name],
        )
        for feature_idx, feature_name in enumerate(DEFAULT_CAT_NAMES)
    ]
    sharded_module_kwargs = {}
    if args.over_arch_layer_sizes is not None:
        sharded_module_kwargs["over_arch_layer_sizes"] = args.over_arch_layer_sizes

    if args.interaction_type == InteractionType.ORIGINAL:
        dlrm_model = DLRM(
            embedding_bag_collection=EmbeddingBagCollection(
                tables=eb_configs, device=torch.device("meta")
            ),
            dense_in_features=len(DEFAULT_INT_NAMES),
            dense_arch_layer_sizes=args.dense_arch_layer_sizes,
            over_arch_layer_sizes=args.over_arch_layer_sizes,
            dense_device=device,
        )
    elif args.interaction_type == InteractionType.DCN:
        dlrm_model = DLRM_DCN(
            embedding_bag_collection=EmbeddingBagCollection(
                tables=eb_configs, device=torch.device("meta")
            ),
            dense_in_features=len(DEFAULT_INT_NAMES),
            dense_arch_layer_sizes=args.dense_arch_layer_sizes,
            over_arch_layer_sizes=args.over_arch_layer_sizes,
            dcn_num_layers=args.dcn_num_layers,
            dcn_low_rank_dim=args.dcn_low_rank_dim,
            dense_device=device,
        )
    elif args.interaction_type == InteractionType.PROJECTION:
        dlrm_model = DLRM_Projection(
            embedding_bag_collection=EmbeddingBagCollection(
                tables=eb_configs, device=torch.device("meta")
            ),
            dense_in_features=len(DEFAULT_INT_NAMES),
            dense_arch_layer_sizes=args.dense_arch_layer_sizes,
            over_arch_layer_sizes=args.over_arch_layer_sizes,
            interaction_branch1_layer_sizes=args.interaction_branch1_layer_sizes,
            interaction_branch2_layer_sizes=args.interaction_branch2_layer_sizes,
            dense_device=device,
        )
    else:
        raise ValueError(f"--interaction_type {args.interaction_type}: expected original, dcn or projection")

    train_model = DLRMTrain(dlrm_model)
    embedding_optimizer = torch.optim.Adagrad if args.adagrad else torch.optim.SGD
    # the ID tables' optimizer runs inside backward, fused into fbgemm's table kernels
    apply_optimizer_in_backward(
        embedding_optimizer,
        train_model.model.sparse_arch.parameters(),
        {"lr": args.learning_rate},
    )
    planner = EmbeddingShardingPlanner(
        topology=Topology(
            local_world_size=get_local_size(),
            world_size=dist.get_world_size(),
            compute_device=device.type,
        ),
        batch_size=args.batch_size,
        # raise the percentage if the planned tables do not fit
        storage_reservation=HeuristicalStorageReservation(percentage=0.05),
    )
    plan = planner.collective_plan(
        train_model, get_default_sharders(), dist.GroupMember.WORLD
    )

    model = DistributedModelParallel(
        module=train_model,
        device=device,
        plan=plan,
    )
    if rank == 0 and args.print_sharding_plan:
        for collectionkey, plans in model._plan.plan.items():
            print(collectionkey)
            for table_name, plan in plans.items():
                print(table_name, "\n", plan, "\n")

    def optimizer_with_params():
        if args.adagrad:
            return lambda params: torch.optim.Adagrad(params, lr=args.learning_rate)
        return lambda params: torch.optim.SGD(params, lr=args.learning_rate)

    dense_optimizer = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(model.named_parameters())),
        optimizer_with_params(),
    )
    optimizer = CombinedOptimizer([model.fused_optimizer, dense_optimizer])
    lr_scheduler = LRPolicyScheduler(
        optimizer, args.lr_warmup_steps, args.lr_decay_start, args.lr_decay_steps
    )

    if args.multi_hot_sizes is not None:
        multihot = Multihot(
            args.multi_hot_sizes,
            args.num_embeddings_per_feature,
            args.batch_size,
            collect_freqs_stats=args.collect_multi_hot_freqs_stats,
            dist_type=args.multi_hot_distribution_type,
        )
        multihot.pause_stats_collection_during_val_and_test(model)
        train_dataloader = RestartableMap(multihot.convert_to_multi_hot, train_dataloader)
        val_dataloader = RestartableMap(multihot.convert_to_multi_hot, val_dataloader)
        test_dataloader = RestartableMap(multihot.convert_to_multi_hot, test_dataloader)
    results = train_val_test(
        args,
        model,
        optimizer,
        device,
        train_dataloader,
        val_dataloader,
        test_dataloader,
        lr_scheduler,
    )
    if args.collect_multi_hot_freqs_stats:
        multihot.save_freqs_stats()
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
