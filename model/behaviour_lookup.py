"""The behaviour store as a frozen TorchRec table (bahe.md, "How it maps onto TorchRec").

One ``EmbeddingCollection`` table, ``behaviours`` (store rows x store dim), serves every behaviour
sequence type and the item text: one copy of the table, one vector per position. Why an
EmbeddingCollection rather than an EmbeddingBagCollection with bags of one: docs/decisions.md.

Frozen bit-exactly: the lookup runs under ``torch.no_grad()``, so no backward ever reaches the table
and fbgemm's fused kernels (which update a table inside backward) never run their update, whatever
learning rate a scheduler writes into the optimizer's param groups. Belt and braces: the table also
gets its own in-backward SGD with lr=0.0 at construction (without one fbgemm would fall back to a
default SGD), and trainers build their dense optimizer from parameters WITHOUT an in-backward
optimizer (torchrec's ``in_backward_optimizer_filter``). The weights come from the store
after DistributedModelParallel has sharded the table: :func:`load_store_rows` copies into every
local shard only the rows and columns that shard holds, a bounded chunk at a time, straight from the
store's memory map (bahe.embeddings.shard_reader); the table is never filled with random values first.
Measured per rank: peak RSS = the process (~0.37 GiB) + its shard + at most one chunk (docs/bench/store_scale.md).
"""

from __future__ import annotations

import contextlib
import math
import time

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec import DataType, EmbeddingCollection, EmbeddingConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from bahe.embeddings.shard_reader import CHUNK_BYTES, ShardReader
from bahe.embeddings.store import VECTORS, BehaviourStore, StoreError

BEHAVIOUR_TABLE = "behaviours"
STORE_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TABLE_DATA_TYPES = {torch.float32: DataType.FP32, torch.float16: DataType.FP16, torch.bfloat16: DataType.BF16}


class BehaviourLookup(nn.Module):
    """Store ids -> behaviour vectors, padded per key.

    Args:
        num_rows: rows of the store (its vocabulary size).
        dim: H, the store's vector size (the LLM hidden size).
        keys: the KJT keys served (``seq_<name>`` per sequence type, ``item_text``).
        max_lengths: M per key; inputs must not be longer (SampleBatcher caps them, keeping the most
            recent M).
        device: where to build the table (``meta`` before DistributedModelParallel).

    Example::

        lookup = BehaviourLookup(1664, 576, ["seq_liked", "item_text"], {"seq_liked": 50, "item_text": 1})
        vectors, lengths = lookup(kjt)["seq_liked"]   # B x 50 x 576, B
    """

    def __init__(self, num_rows: int, dim: int, keys: list[str], max_lengths: dict[str, int],
                 device: torch.device | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        missing = [k for k in keys if k not in max_lengths]
        if missing:
            raise ValueError(f"max_lengths lacks {missing}")
        self.keys, self.max_lengths, self.dim = list(keys), dict(max_lengths), dim
        # Never filled with random values: the store overwrites every element (load_store_rows). Built on
        # meta (nn.Embedding's own normal_ init and torchrec's uniform init_fn are each a full pass over the
        # table), then, off meta, one zeroed table. init_fn does nothing: a sharded table's reset_parameters
        # calls it on shards fbgemm has just allocated zeroed (model/sharding.py skips the kernels' uniform_).
        self.embedding_collection = EmbeddingCollection(
            tables=[EmbeddingConfig(name=BEHAVIOUR_TABLE, embedding_dim=dim, num_embeddings=num_rows,
                                    feature_names=list(keys), init_fn=_filled_by_the_store,
                                    data_type=TABLE_DATA_TYPES[dtype])],
            device=torch.device("meta"))
        where = torch.device(device) if device is not None else torch.device("cpu")
        if where.type != "meta":
            self.embedding_collection.embeddings[BEHAVIOUR_TABLE].weight = nn.Parameter(
                torch.zeros(num_rows, dim, device=where, dtype=dtype))
            self.embedding_collection._device = where  # torchrec's record of where the collection lives
        _apply_optimizer_in_backward(torch.optim.SGD, self.embedding_collection.parameters(), {"lr": 0.0})

    def forward(self, features: KeyedJaggedTensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """
        Args:
            features: KJT of store ids with (at least) this module's keys; stride B.

        Returns:
            key -> (B x M_key x H right-padded vectors, B lengths <= M_key).
        """
        # No gradient is ever taken through the frozen table: fbgemm's fused kernels update a table inside
        # backward, so with no backward through it no optimizer, scheduler or wrapper (dlrm_main's
        # LRPolicyScheduler lifting every lr to a floor) can move it. It also saves the table's backward
        # all-to-all. The deep layers above still get gradients; the vectors are their constant inputs.
        with torch.no_grad():
            jagged = self.embedding_collection(features)
        out = {}
        for key in self.keys:
            jt = jagged[key]
            lengths = jt.lengths()
            width = self.max_lengths[key]
            # the batcher already kept the most recent M (SampleBatcher.max_behaviours); no host sync here
            # float32 for the deep layers whatever the table's dtype (a no-op for a float32 table)
            padded = torch.ops.fbgemm.jagged_to_padded_dense(jt.values().float(), [jt.offsets()], [width], 0.0)
            out[key] = (padded, lengths)
        return out


def table_dtype(store_dtype: str, device: torch.device | str) -> torch.dtype:
    """The behaviour table's dtype for a store of ``store_dtype`` built on ``device``: the store's own where the
    embedding kernel has it (float32, float16 on every device; bfloat16 for a table built on CUDA), else
    float32: fbgemm 1.8's CPU lookup has no bfloat16 kernel ("split_embedding_nobag_cpu_forward_2" not
    implemented), and a table built on ``meta`` before DistributedModelParallel may land on CPU, so a bfloat16
    store is upcast chunk by chunk as it loads (one line on rank 0)."""
    wanted = STORE_TORCH_DTYPES[store_dtype]
    if wanted == torch.bfloat16 and torch.device(device).type != "cuda":
        return torch.float32
    return wanted


def _filled_by_the_store(weight: torch.Tensor) -> None:
    """The behaviour table's init_fn: nothing (load_store_rows writes every element)."""


def load_store_rows(model: nn.Module, store: BehaviourStore, *, chunk_bytes: int = CHUNK_BYTES,
                    timings: dict | None = None) -> int:
    """Copy the store's vectors into the (sharded or plain) behaviour table of ``model``.

    Call it AFTER DistributedModelParallel has wrapped the model. Each rank reads from the store only the
    blocks its local shards hold -- their rows AND columns (row-wise, column-wise, table-wise; a rank may
    hold none) -- in chunks of at most ``chunk_bytes`` of file span, each copied straight from the store's
    memory map into its place in the shard (bahe.embeddings.shard_reader): no staging copy of the shard, no
    full-size masks, so loading adds at most about one chunk to a rank's resident memory. Returns the rows
    read here (a row counts once per local shard that holds it).

    The store is verified on the way: each rank hashes the digest chunks its rows lie in against the manifest
    (:func:`_integrity_problem`; a store written before them: rank 0 recomputes its files' checksums) and
    checks each chunk it loads for NaN / inf (stopping at the first such chunk); the ranks agree (one
    all-gather), so a corrupt store raises the same one-line :class:`StoreError` on all of them, naming the
    file and the rows. A half-precision store loads into a table of its dtype, or is upcast chunk by chunk
    (one line on rank 0) where the table is float32 (:func:`table_dtype`).

    ``timings``: a dict this fills with each phase's seconds -- ``verify`` (hashing this rank's digest chunks),
    ``copy`` (the chunks into the shards, with the NaN / inf check) and ``agree`` (the ranks' all-gather) ->
    ``{"wall_s", "cpu_s" (the process's CPU), "thread_cpu_s" (this thread's)}`` -- plus ``verified_bytes`` and
    ``copied_bytes`` (bench/store_scale.py reads them; nothing else changes).
    """
    clock = _PhaseClock(timings)
    suffix = f"embeddings.{BEHAVIOUR_TABLE}.weight"
    targets = [(name, t) for name, t in model.state_dict().items() if name.endswith(suffix)]
    if not targets:
        raise ValueError(f"the model has no behaviour table (no state-dict key ending in {suffix!r})")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    pieces = []
    for name, tensor in targets:
        shape = tensor.size() if isinstance(tensor, ShardedTensor) else tensor.shape
        if tuple(shape) != (store.rows_count, store.dim):
            raise ValueError(f"{name} is {tuple(shape)}, the store {store.path} is ({store.rows_count}, "
                             f"{store.dim}): build the model from this store's size, or point it at the right store")
        if isinstance(tensor, ShardedTensor):
            pieces += [(shard.tensor, *shard.metadata.shard_offsets, *shard.metadata.shard_sizes)
                       for shard in tensor.local_shards()]
        else:
            pieces.append((tensor, 0, 0, store.rows_count, store.dim))
    rows_read = 0
    with ShardReader(store, chunk_bytes) as reader:
        with clock("verify"):
            problem = _integrity_problem(reader, store, pieces, rank, world)
        table_dtype = targets[0][1].dtype
        if rank == 0 and table_dtype != STORE_TORCH_DTYPES[store.store_dtype]:
            print(f"behaviour table: the store's {store.store_dtype} rows are upcast to {table_dtype} chunk by "
                  f"chunk as they load ({store.path}): this device's embedding kernel has no {store.store_dtype} table",
                  flush=True)
        with clock("copy"):
            for target, row, col, n_rows, n_cols in pieces:
                if problem is None:
                    problem = _load_block(reader, target, store, row, col, n_rows, n_cols, rank)
                rows_read += n_rows
        if timings is not None:
            timings.update(verified_bytes=reader.delivered.verified_bytes, copied_bytes=reader.delivered.bytes)
    if world > 1:
        with clock("agree"):
            found = [None] * world
            dist.all_gather_object(found, problem)
        problem = next((p for p in found if p), None)
    if problem:
        raise StoreError(problem)
    return rows_read


class _PhaseClock:
    """``with clock("phase"):`` adds the block's wall, process-CPU and thread-CPU seconds to ``timings[phase]``;
    does nothing when ``timings`` is None."""

    def __init__(self, timings: dict | None):
        self.timings = timings

    @contextlib.contextmanager
    def __call__(self, phase: str):
        if self.timings is None:
            yield
            return
        wall, cpu, thread = time.perf_counter(), time.process_time(), time.thread_time()
        try:
            yield
        finally:
            entry = self.timings.setdefault(phase, {"wall_s": 0.0, "cpu_s": 0.0, "thread_cpu_s": 0.0})
            entry["wall_s"] += time.perf_counter() - wall
            entry["cpu_s"] += time.process_time() - cpu
            entry["thread_cpu_s"] += time.thread_time() - thread


def _integrity_problem(reader: ShardReader, store: BehaviourStore, pieces: list, rank: int, world: int) -> str | None:
    """Check the rows this rank loads against the manifest, before loading them. A store with per-chunk
    digests (``row_chunks``): each digest chunk that some rank's shards touch is hashed by one of those ranks
    (the ranks holding it take turns by chunk index), so a rank hashes about the rows it loads (1/W of a
    row-wise table) and a column-wise table's rows are hashed once in all, 1/W per rank. A store written before
    them: rank 0 recomputes every file's checksum (reads the whole store), with a one-line note."""
    chunks = store.row_chunks
    if chunks is None:
        if rank == 0:
            print(f"note: store {store.path} was written before per-chunk checksums: rank 0 checks its whole files "
                  "(reads every row); a refresh with bahe-encode build writes them", flush=True)
        return _checksum_problem(store) if rank == 0 else None
    touched = sorted({i for _, row, _, n_rows, _ in pieces for i in chunks.overlapping(row, row + n_rows)})
    holders = [touched]
    if world > 1:
        holders = [None] * world
        dist.all_gather_object(holders, touched)
    by_chunk: dict[int, list[int]] = {}
    for who, held in enumerate(holders):
        for i in held:
            by_chunk.setdefault(i, []).append(who)
    mine = [i for i in touched if by_chunk[i][i % len(by_chunk[i])] == rank]
    return reader.verify(mine, f", rank {rank}'s")


def _load_block(reader: ShardReader, target: torch.Tensor, store: BehaviourStore, row: int, col: int,
                n_rows: int, n_cols: int, rank: int) -> str | None:
    """Copy store rows [row, row + n_rows) x columns [col, col + n_cols) into ``target`` (that block's shard)
    chunk by chunk, each checked for NaN / inf once in place; the first bad chunk's problem, else None."""
    if tuple(target.shape) != (n_rows, n_cols):
        raise ValueError(f"a local shard of {tuple(target.shape)} for a block of {n_rows} x {n_cols}")
    with torch.no_grad():
        for first, chunk in reader.chunks((row, row + n_rows), (col, col + n_cols)):
            place = target[first - row:first - row + len(chunk)]
            values = torch.from_numpy(chunk)
            place.copy_(values.view(torch.bfloat16) if store.store_dtype == "bfloat16" else values)  # copy_ upcasts
            # A sum is finite only if every value is (NaN and inf propagate), and it allocates nothing the size of
            # the chunk (torch.isfinite does: abs() and three masks, ~1.75x the chunk). A non-finite sum of finite
            # values (float32 overflow) is told apart by the exact check, which also finds the row.
            if not math.isfinite(float(place.sum(dtype=torch.float32))):
                block = place.detach().float().cpu().numpy()
                problem = non_finite_problem(block, store, first, span=(first, first + len(chunk), col, col + n_cols),
                                             rank=rank)
                if problem:
                    return problem
    return None


def _checksum_problem(store: BehaviourStore) -> str | None:
    """The first store file whose SHA-256 differs from the manifest's, as a message; else None (measured:
    ~300 MB/s on a shared 2-core CPU, about as fast as copying the rows out of the memory map)."""
    try:
        store.verify_files()
    except StoreError as err:
        return f"{err}; rebuild this version with bahe-encode build (bahe-encode verify STORE checks a store)"
    return None


def non_finite_problem(block: np.ndarray, store: BehaviourStore, first_row: int, *,
                       span: tuple[int, int, int, int] | None = None, rank: int | None = None) -> str | None:
    """The first store row in ``block`` (rows from ``first_row``) holding NaN / inf, as a message; else None.
    ``span`` (row start, row stop, column start, column stop): the chunk ``block`` was read as, named too."""
    bad = ~np.isfinite(block)
    if not bad.any():
        return None
    row = int(np.flatnonzero(bad.any(axis=1))[0])
    value = block[row][bad[row]][0]
    where = ""
    if span is not None:
        who = f"rank {rank}'s" if rank is not None else "the"
        where = f" (in rows [{span[0]}, {span[1]}) x columns [{span[2]}, {span[3]}), {who} chunk being loaded)"
    return (f"{store.path / VECTORS}: row {first_row + row} holds a non-finite value ({value}): the store is corrupt"
            f"{where}; rebuild this version with bahe-encode build (bahe-encode verify STORE checks a store)")
