"""DistributedModelParallel for BAHE: planner, sharders and the sharding of each table.

The behaviour table (an EmbeddingCollection) and the ID tables (an EmbeddingBagCollection) are
sharded by TorchRec's planner over the launch's topology; the deep LLM layers and MLPs are
replicated data-parallel.

The behaviour table's sharding (``--behaviour-sharding``, :data:`~bahe.model.config.BEHAVIOUR_SHARDINGS`):

* ``row_wise``: each rank holds ceil(rows / W) rows, every column (1/W of the bytes) and reads one
  contiguous range of the store file;
* ``column_wise``: each rank holds one block of dim / W columns of every row (1/W of the bytes; each rank
  reads every page of the store, since a row of 576 floats is narrower than a page);
* ``table_wise``: one rank holds the whole table, the others none;
* ``auto`` (default): ``row_wise`` for a table of :data:`ROW_WISE_FROM_BYTES` (1 GiB) or more, else the
  planner's choice among the three. The rule keeps a rank's host memory for the table at 1/W of it
  whenever the table is big enough to matter: below 1 GiB any plan costs a rank less than 1 GiB (the
  constant of issue 28's bound, 1 GiB + 1.25 x the shard), so the planner's cost model (communication,
  compute) decides; from 1 GiB, row-wise is the one plan whose per-rank bytes AND reads are 1/W (left
  alone, the planner kept a 250k x 576 table whole on 1 CPU rank and split it into 4 column blocks on 2;
  issue 28 saw column-wise on 2 CPU ranks up to ~30M rows: docs/bench/store_scale.md).

The plan chosen is printed on rank 0, one line (:func:`describe_behaviour_plan`): the table, the sharding
type, why, and the shards of each rank. The launchers run the trainer or scorer inside
:func:`use_behaviour_sharding` (``--behaviour-sharding``); :func:`shard_model` takes that choice unless
given one. data_parallel is not available: torchrec 1.8's data-parallel EmbeddingCollection is broken
(docs/decisions.md). The behaviour table's shards are never filled with random values
(:class:`BehaviourTableSharder`): the store overwrites them (model/behaviour_lookup.py).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections import defaultdict

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed import batched_embedding_kernel
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.planner.types import KernelConfig, ParameterConstraints, TopologyFactory, TrainerConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from bahe.model.behaviour_lookup import BEHAVIOUR_TABLE
from bahe.model.config import BEHAVIOUR_SHARDINGS

SHARDING_TYPES = ("table_wise", "row_wise", "column_wise", "data_parallel")
BEHAVIOUR_TYPES = ("table_wise", "row_wise", "column_wise")  # those the behaviour table may take
ROW_WISE_FROM_BYTES = 1 << 30  # auto: row-wise for a behaviour table of at least this many bytes
# For a trainer with its own planner (dlrm_main): keep the behaviour table off data_parallel (see above);
# behaviour_table_constraints() applies --behaviour-sharding too
BEHAVIOUR_TABLE_CONSTRAINTS = {BEHAVIOUR_TABLE: ParameterConstraints(sharding_types=list(BEHAVIOUR_TYPES))}

_launch_choice = "auto"  # use_behaviour_sharding()


@contextlib.contextmanager
def use_behaviour_sharding(choice: str):
    """Inside, :func:`shard_model` takes ``choice`` (the launch's ``--behaviour-sharding``) when not given
    one: bahe-train, bahe-evaluate and bahe-predict build and shard their model deep inside the trainer or
    the scorer, so their launchers wrap that call in it. The previous choice comes back on the way out."""
    global _launch_choice
    previous, _launch_choice = _launch_choice, check_behaviour_sharding(choice)
    try:
        yield
    finally:
        _launch_choice = previous


def check_behaviour_sharding(choice: str) -> str:
    if choice == "data_parallel":
        raise ValueError("data_parallel is not available for the behaviour table: torchrec 1.8's data-parallel "
                         "EmbeddingCollection returns one pooled row per (sample, key) instead of one per position "
                         "(construct_jagged_tensors then fails). A frozen table gains nothing from replication's "
                         "gradient sync anyway; use table_wise (one full copy) or row_wise / column_wise")
    if choice not in BEHAVIOUR_SHARDINGS:
        raise ValueError(f"--behaviour-sharding {choice!r} is not one of {', '.join(BEHAVIOUR_SHARDINGS)}")
    return choice


def choose_behaviour_sharding(choice: str, table_bytes: int) -> tuple[list[str], str]:
    """(the sharding types the planner may give the behaviour table, why) for ``--behaviour-sharding
    choice`` and a table of ``table_bytes`` bytes (the rule: the module's docstring)."""
    check_behaviour_sharding(choice)
    if choice != "auto":
        return [choice], f"--behaviour-sharding {choice}"
    if table_bytes >= ROW_WISE_FROM_BYTES:
        return ["row_wise"], f"auto: row_wise from {_size(ROW_WISE_FROM_BYTES)}"
    return list(BEHAVIOUR_TYPES), f"auto: the planner's choice below {_size(ROW_WISE_FROM_BYTES)}"


def _size(nbytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{int(nbytes)} B"


def behaviour_table_constraints(choice: str, rows: int, dim: int, world: int, *,
                                bytes_per_value: int = 4) -> tuple[dict[str, ParameterConstraints], str]:
    """The planner constraints of the behaviour table (rows x dim) for ``--behaviour-sharding choice`` on
    ``world`` ranks, and why (for :func:`describe_behaviour_plan`)."""
    allowed, why = choose_behaviour_sharding(choice, rows * dim * bytes_per_value)
    # column-wise asked for: one column block per rank (the planner would otherwise keep small tables whole)
    columns = {"min_partition": max(4, dim // max(world, 1))} if allowed == ["column_wise"] else {}
    return {BEHAVIOUR_TABLE: ParameterConstraints(sharding_types=allowed, **columns)}, why


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


@contextlib.contextmanager
def _no_random_init():
    """torchrec's batched embedding kernels skip their init_parameters (uniform_ over every local row: a full
    pass over the shard) inside: fbgemm allocates the weights zeroed, and the store overwrites them."""
    kernel = batched_embedding_kernel.BaseBatchedEmbedding
    original = kernel.init_parameters
    kernel.init_parameters = lambda self: None
    try:
        yield
    finally:
        kernel.init_parameters = original


class BehaviourTableSharder(EmbeddingCollectionSharder):
    """torchrec's EmbeddingCollectionSharder, except that the frozen behaviour table's shards are not filled
    with random values at construction (one pass of uniform_ over each shard, seconds for a large store):
    they stay fbgemm's zeros until :func:`~bahe.model.behaviour_lookup.load_store_rows` copies the store
    into every element. Any other EmbeddingCollection is sharded as torchrec shards it."""

    def shard(self, module, params, env, device=None, module_fqn=None):
        frozen = [table.name for table in module.embedding_configs()] == [BEHAVIOUR_TABLE]
        with _no_random_init() if frozen else contextlib.nullcontext():
            return super().shard(module, params, env, device, module_fqn)


def sharders() -> list:
    return [EmbeddingBagCollectionSharder(), BehaviourTableSharder()]


def frozen_table_sharders(given: list) -> list:
    """``given`` (e.g. torchrec's get_default_sharders()) with its EmbeddingCollectionSharder replaced by
    :class:`BehaviourTableSharder`, for a trainer with its own planner (examples/dlrm_main_text.py)."""
    return [BehaviourTableSharder() if type(s) is EmbeddingCollectionSharder else s for s in given]


def describe_behaviour_plan(plan, rows: int, dim: int, why: str, world: int, dtype: torch.dtype = torch.float32
                            ) -> str | None:
    """One line: the behaviour table, its sharding type, why, and each rank's shards (None: no such table)."""
    found = next((sharding for tables in plan.plan.values() for name, sharding in tables.items()
                  if name == BEHAVIOUR_TABLE), None)
    if found is None:
        return None
    per_rank = defaultdict(list)
    shards = found.sharding_spec.shards if found.sharding_spec is not None else []
    for rank, shard in zip(found.ranks or [], shards):
        per_rank[rank].append(tuple(shard.shard_sizes))
    if not shards and found.ranks:  # a spec without shards: each rank named holds the whole table
        for rank in found.ranks:
            per_rank[rank].append((rows, dim))
    parts = []
    for rank in range(world):
        held = per_rank.get(rank, [])
        if not held:
            parts.append(f"rank {rank}: 0")
        elif len(set(held)) == 1:
            parts.append(f"rank {rank}: {len(held)} x ({held[0][0]:,} x {held[0][1]:,})")
        else:
            parts.append(f"rank {rank}: {len(held)} ({', '.join(f'{r:,} x {c:,}' for r, c in held)})")
    size = rows * dim * torch.empty((), dtype=dtype).element_size()
    return (f"behaviour table {BEHAVIOUR_TABLE} ({rows:,} x {dim:,} {str(dtype).removeprefix('torch.')}, {_size(size)}): "
            f"{found.sharding_type} ({why}); shards per rank: {'; '.join(parts)}")


def log_behaviour_plan(plan, rows: int, dim: int, why: str, dtype: torch.dtype = torch.float32) -> None:
    """Print :func:`describe_behaviour_plan` on rank 0 (nothing for a model without the table)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    line = describe_behaviour_plan(plan, rows, dim, why, world, dtype)
    if line and (not dist.is_initialized() or dist.get_rank() == 0):
        print(line, flush=True)


def shard_model(module: nn.Module, device: torch.device, *, behaviour_sharding: str | None = None,
                id_sharding: str | None = None, id_tables: list[str] = (), batch_size: int = 512
                ) -> DistributedModelParallel:
    """Plan and wrap ``module`` (tables built on ``meta``) with DistributedModelParallel; rank 0 prints the
    behaviour table's plan (one line).

    Args:
        module: e.g. ``BAHETrain(model)``; in-backward optimizers must already be attached.
        device: this rank's device (cpu, or cuda:LOCAL_RANK).
        behaviour_sharding: the behaviour table's sharding: one of
            :data:`~bahe.model.config.BEHAVIOUR_SHARDINGS` (``auto``: the rule in the module's docstring); None:
            the launch's (:func:`use_behaviour_sharding`; ``auto`` unless a launcher set it).
        id_sharding: pin the sharding type of the ``id_tables`` (None: the planner chooses).
        batch_size: per-rank batch size, for the planner's cost model.
    """
    behaviour_sharding = check_behaviour_sharding(_launch_choice if behaviour_sharding is None
                                                  else behaviour_sharding)
    if id_sharding is not None and id_sharding not in SHARDING_TYPES:
        raise ValueError(f"sharding type {id_sharding!r} is not one of {SHARDING_TYPES}")
    world = dist.get_world_size() if dist.is_initialized() else 1
    table = _behaviour_table(module)
    constraints, why = {}, ""
    if table is not None:
        rows, dim = int(table.shape[0]), int(table.shape[1])
        constraints, why = behaviour_table_constraints(behaviour_sharding, rows, dim, world,
                                                       bytes_per_value=table.element_size())
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
    if table is not None:
        log_behaviour_plan(plan, rows, dim, why, table.dtype)
    return DistributedModelParallel(module, device=device, plan=plan, sharders=sharders())
