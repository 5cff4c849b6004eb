"""Run by torchrun (2 gloo ranks) from tests/test_shard_load.py; writes one JSON per rank.

Stores of random rows (bench/store_scale.py's writer). For each sharding of the behaviour table: the
torchrec kernels that ran their random init on its shards (none) and the shards right after sharding
(zeros), the blocks the store reader handed out and their bytes (a spy on ShardReader), the shards against
the store bit for bit; auto's choice with the row-wise threshold lowered; the growth of resident memory
while a modest store loads (row-wise and column-wise); the message of a store holding a NaN row.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed import batched_embedding_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import bahe.model.behaviour_lookup as behaviour_lookup  # noqa: E402
import bahe.model.sharding as sharding  # noqa: E402
from bahe.embeddings.process_group import close_process_group
from bahe.embeddings.store import BehaviourStore, StoreError  # noqa: E402
from bahe.launchers.train import quiet_library_deprecations  # noqa: E402
from bahe.model.behaviour_lookup import BEHAVIOUR_TABLE, BehaviourLookup, load_store_rows  # noqa: E402
from bench.store_scale import reset_peak, status  # noqa: E402

READERS = []


class SpyReader(behaviour_lookup.ShardReader):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        READERS.append(self)


behaviour_lookup.ShardReader = SpyReader
RANDOM_INITS = []  # the tables of every torchrec kernel that ran its random init (uniform_ over its shards)
_init_parameters = batched_embedding_kernel.BaseBatchedEmbedding.init_parameters


def spy_init_parameters(self):
    RANDOM_INITS.append([table.name for table in self._config.embedding_tables])
    return _init_parameters(self)


batched_embedding_kernel.BaseBatchedEmbedding.init_parameters = spy_init_parameters


class Table(nn.Module):
    """The behaviour table alone, with one dense weight for DistributedModelParallel's DDP part."""

    def __init__(self, store: BehaviourStore):
        super().__init__()
        self.lookup = BehaviourLookup(store.rows_count, store.dim, ["item_text"], {"item_text": 1},
                                      device=torch.device("meta"))
        self.dense = nn.Linear(1, 1)


def local_shards(dmp) -> list[tuple[torch.Tensor, int, int, int, int]]:
    """(tensor, row, col, rows, cols) of every local shard of the behaviour table."""
    out = []
    for name, tensor in dmp.state_dict().items():
        if name.endswith(f"{BEHAVIOUR_TABLE}.weight"):
            shards = tensor.local_shards() if isinstance(tensor, ShardedTensor) else []
            out += [(s.tensor, *s.metadata.shard_offsets, *s.metadata.shard_sizes) for s in shards]
    return out


def shard(store: BehaviourStore, choice: str):
    return sharding.shard_model(Table(store), torch.device("cpu"), behaviour_sharding=choice, batch_size=64)


def exactness(store_root: str, choice: str) -> dict:
    store = BehaviourStore.open(store_root)
    RANDOM_INITS.clear()
    dmp = shard(store, choice)
    random_inits = sum(BEHAVIOUR_TABLE in tables for tables in RANDOM_INITS)
    shards = local_shards(dmp)
    zeros_before = all(bool((t == 0).all()) for t, *_ in shards)
    READERS.clear()
    rows = load_store_rows(dmp, store, chunk_bytes=4096)
    reference = np.load(store.path / "vectors.npy", mmap_mode="r")
    exact = all(np.array_equal(t.detach().numpy().view(np.int32), reference[r:r + n, c:c + m].view(np.int32))
                for t, r, c, n, m in shards)
    return {"rows_loaded": rows, "zeros_before": zeros_before, "random_inits": random_inits, "exact": exact,
            "shards": sorted([r, r + n, c, c + m] for _, r, c, n, m in shards),
            "delivered": sorted(list(b) for reader in READERS for b in reader.delivered.blocks),
            "delivered_bytes": sum(reader.delivered.bytes for reader in READERS),
            "chunks": sum(reader.delivered.chunks for reader in READERS),
            "shard_bytes": sum(n * m * 4 for _, _, _, n, m in shards)}


def memory(store_root: str, choice: str, chunk_bytes: int) -> dict:
    store = BehaviourStore.open(store_root)
    dmp = shard(store, choice)
    shard_bytes = sum(n * m * 4 for _, _, _, n, m in local_shards(dmp))
    gc.collect()
    dist.barrier()
    before = status()["VmRSS"]
    reset_peak()
    load_store_rows(dmp, store, chunk_bytes=chunk_bytes)
    peak = status()["VmHWM"]
    del dmp
    gc.collect()
    return {"shard_bytes": shard_bytes, "before": before, "peak": peak, "growth": peak - before}


def refusal(store_root: str, choice: str) -> str | None:
    store = BehaviourStore.open(store_root)
    dmp = shard(store, choice)
    try:
        load_store_rows(dmp, store, chunk_bytes=4096)
    except StoreError as err:
        return str(err)
    return None


def main() -> None:
    small, big, nan, out_dir = sys.argv[1:5]
    quiet_library_deprecations()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result = {"exact": {}, "memory": {}, "refusal": {}}
    for choice in ("row_wise", "column_wise", "table_wise"):
        result["exact"][choice] = exactness(small, choice)
    sharding.ROW_WISE_FROM_BYTES = 1  # every table is "large": auto must take row-wise
    result["exact"]["auto_large"] = exactness(small, "auto")
    sharding.ROW_WISE_FROM_BYTES = 1 << 30
    for choice in ("row_wise", "column_wise"):
        result["memory"][choice] = memory(big, choice, chunk_bytes=4 << 20)
    for choice in ("row_wise", "column_wise"):
        result["refusal"][choice] = refusal(nan, choice)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    close_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
