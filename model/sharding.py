"""DistributedModelParallel for BAHE: planner, sharders and the sharding of each table.

The behaviour table (an EmbeddingCollection) and the ID tables (an EmbeddingBagCollection) are
sharded by TorchRec's planner over the launch's topology; the deep LLM layers and MLPs are
replicated data-parallel. ``behaviour_sharding`` pins the behaviour table's sharding type
(table_wise, row_wise, column_wise, data_parallel), e.g. row-wise for a store too big for one rank.

The behaviour table is kept to table_wise / row_wise / column_wise: the planner would choose
data_parallel for a small one, and torchrec 1.8's data-parallel EmbeddingCollection is broken
(docs/decisions.md).
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist
from bahe.model.behaviour_lookup import BEHAVIOUR_TABLE
from torch import nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.planner.types import KernelConfig, ParameterConstraints, TopologyFactory, TrainerConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

SHARDING_TYPES = ("table_wise", "row_wise", "column_wise", "data_parallel")
# For a trainer with its own planner (dlrm_main): keep the behaviour table off data_parallel (see above)
BEHAVIOUR_TABLE_CONSTRAINTS = {BEHAVIOUR_TABLE: ParameterConstraints(sharding_types=["table_wise", "row_wise",
                                                                                     "column_wise"])}


def _behaviour_table(module: nn.Module) -> nn.Parameter | None:
    """The behaviour table's weight, or None for a model without text (the DLRM-only arm)."""
    return next((p for n, p in module.named_parameters() if n.endswith(f"embeddings.{BEHAVIOUR_TABLE}.weight")), None)


# torchrec's heuristic: parameters + optimiser state (~2x) + DDP buffers (~3x) per dense parameter byte
DENSE_BYTES_PER_PARAMETER_BYTE = 6


def dense_tensor_estimate(module: nn.Module) -> int:
    """Bytes each rank needs for the replicated (dense) part: the deep LLM layers, MLPs and projections,
    their AdamW state and DDP buffers. Counted from shapes, so it is right on ``meta`` too (torchrec's
    own estimate is not, and warns about it)."""
    tables = {id(p) for m in module.modules() if isinstance(m, (EmbeddingBagCollection, EmbeddingCollection))
              for p in m.parameters()}
    dense = sum(p.numel() * p.element_size() for p in module.parameters() if id(p) not in tables)
    return DENSE_BYTES_PER_PARAMETER_BYTE * dense


def topology(world: int, device: torch.device):
    """The launch's topology through torchrec's TopologyFactory: ``world`` ranks, LOCAL_WORLD_SIZE of
    them per host (torchrun sets it; a 2x1 launch is 2 hosts of 1 rank, whose traffic the planner
    prices at the cross-host bandwidth)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if local < 1 or world % local:
        raise ValueError(f"LOCAL_WORLD_SIZE={local} does not divide the world size {world}: every host must run "
                         "the same number of ranks (torchrun --nproc_per_node, TorchX -j NODESxRANKS)")
    return TopologyFactory.create_topology(TrainerConfig(world_size=world, local_world_size=local),
                                           kernel_config=KernelConfig(compute_device=device.type))


def hosts(topo) -> int:
    """Hosts of a topology: world size / ranks per host."""
    return topo.world_size // topo.local_world_size


def sharders() -> list:
    return [EmbeddingBagCollectionSharder(), EmbeddingCollectionSharder()]


def shard_model(module: nn.Module, device: torch.device, *, behaviour_sharding: str | None = None,
                id_sharding: str | None = None, id_tables: list[str] = (), batch_size: int = 512
                ) -> DistributedModelParallel:
    """Plan and wrap ``module`` (tables built on ``meta``) with DistributedModelParallel.

    Args:
        module: e.g. ``BAHETrain(model)``; in-backward optimizers must already be attached.
        device: this rank's device (cpu, or cuda:LOCAL_RANK).
        behaviour_sharding: pin the behaviour table's sharding type (None: the planner chooses among
            table_wise, row_wise and column_wise).
        id_sharding: pin the sharding type of the ``id_tables`` (None: the planner chooses).
        batch_size: per-rank batch size, for the planner's cost model.
    """
    for choice in (behaviour_sharding, id_sharding):
        if choice is not None and choice not in SHARDING_TYPES:
            raise ValueError(f"sharding type {choice!r} is not one of {SHARDING_TYPES}")
    if behaviour_sharding == "data_parallel":
        raise ValueError("data_parallel is not available for the behaviour table: torchrec 1.8's data-parallel "
                         "EmbeddingCollection returns one pooled row per (sample, key) instead of one per position "
                         "(construct_jagged_tensors then fails). A frozen table gains nothing from replication's "
                         "gradient sync anyway; use table_wise (one full copy) or row_wise / column_wise")
    world = dist.get_world_size() if dist.is_initialized() else 1
    # the planner would pick data_parallel for a small behaviour table: keep it to the working types
    allowed = [behaviour_sharding] if behaviour_sharding else ["table_wise", "row_wise", "column_wise"]
    # column-wise: one column block per rank (the planner would otherwise keep small tables whole)
    table = _behaviour_table(module)
    columns = {"min_partition": max(4, int(table.shape[1]) // world)} \
        if behaviour_sharding == "column_wise" and table is not None else {}
    constraints = {BEHAVIOUR_TABLE: ParameterConstraints(sharding_types=allowed, **columns)} \
        if table is not None else {}
    if id_sharding:
        constraints.update({name: ParameterConstraints(sharding_types=[id_sharding]) for name in id_tables})
    with warnings.catch_warnings():  # its constructor warns to pass an estimate, which we do
        warnings.simplefilter("ignore", FutureWarning)
        reservation = HeuristicalStorageReservation(percentage=0.15, dense_tensor_estimate=dense_tensor_estimate(module))
    topo = topology(world, device)
    if hosts(topo) > 1 and (not dist.is_initialized() or dist.get_rank() == 0):  # one host: nothing to say
        print(f"sharding plan for {hosts(topo)} hosts x {topo.local_world_size} rank(s) ({device.type})", flush=True)
    planner = EmbeddingShardingPlanner(topology=topo, batch_size=batch_size,
                                       constraints=constraints, storage_reservation=reservation)
    pg = dist.GroupMember.WORLD if dist.is_initialized() else None
    plan = planner.collective_plan(module, sharders(), pg) if pg is not None else planner.plan(module, sharders())
    return DistributedModelParallel(module, device=device, plan=plan, sharders=sharders())
