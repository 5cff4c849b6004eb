"""Run by tests/test_write_failures.py in a subprocess: checkpoints that fail to write.

``save LLM DATA STORE CKPT_DIR PG_FILE limit|fill``: the real BAHE (DMP on one gloo rank, the trainer's
optimisers) trains a step and saves step 10; trains another step and saves step 20 under an
RLIMIT_FSIZE of half the step-10 shard (``limit``), or on a filesystem filled up to half a shard of free
space (``fill``), so the write fails in the middle of that shard file as on a disk that fills up.
``restore LLM DATA STORE CKPT_DIR PG_FILE`` builds a fresh model (another seed), restores and saves step
20 again.
Prints one JSON line: sha256 of every tensor of the model and optimiser state, and what happened.

``two_ranks CKPT_DIR`` (under torchrun, 2 ranks): a checkpoint folder that is a file (rank 0 fails
to create the partial folder), then a write that fails on rank 1 only; every rank must raise the
same error rather than wait for the other.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import resource
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bahe.embeddings.process_group import close_process_group
from bahe.training.checkpoint import Checkpointer, CheckpointWriteError, without_frozen  # noqa: E402


def limit_file_size(limit: int) -> None:
    """Writes past ``limit`` bytes of any file fail with EFBIG (SIGXFSZ ignored), as on a full disk."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def digest(tree, prefix: str = "") -> dict[str, str]:
    """sha256 of every tensor (local shards of sharded ones) and repr of every other leaf, by path."""
    out = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(digest(value, f"{prefix}/{key}"))
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            out.update(digest(value, f"{prefix}/{i}"))
    elif hasattr(tree, "local_shards"):  # ShardedTensor
        for shard in tree.local_shards():
            out[f"{prefix}@{list(shard.metadata.shard_offsets)}"] = _sha(shard.tensor)
    elif isinstance(tree, torch.Tensor):
        out[prefix] = _sha(tree)
    else:
        out[prefix] = repr(tree)
    return out


def _sha(tensor: torch.Tensor) -> str:
    tensor = tensor.detach().cpu().contiguous()
    raw = tensor.reshape(-1).view(torch.uint8).numpy()
    return f"{tensor.dtype}{list(tensor.shape)}:" + hashlib.sha256(raw).hexdigest()


def bahe(llm: str, data: str, store_root: str, seed: int):
    from bahe.model.bahe import BAHETrain
    from bahe.model.behaviour_lookup import load_store_rows
    from bahe.model.factory import build_model
    from bahe.model.sharding import shard_model
    from tests.model_fixtures import TinyPipeline
    from bahe.training.config import OptimConfig
    from bahe.training.optimizers import attach_sparse_optimizer, build_optimizer

    pipeline = TinyPipeline(Path(llm), Path(data), Path(store_root))
    optim = OptimConfig(warmup_steps=2)
    torch.manual_seed(seed)
    model, batcher, store = build_model(pipeline.config(), pipeline.schema, device=torch.device("meta"))
    attach_sparse_optimizer(model, optim)
    dmp = shard_model(BAHETrain(model), torch.device("cpu"), batch_size=32)
    load_store_rows(dmp, store)
    optimizer, schedulers, _ = build_optimizer(dmp, dmp.fused_optimizer, optim, 40)
    return dmp, optimizer, schedulers, batcher, pipeline.table()


def train_step(dmp, optimizer, schedulers, batcher, table, start: int) -> None:
    loss, _ = dmp(batcher(table.slice(start, 32)))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    for scheduler in schedulers:
        scheduler.step()


def state_digest(dmp, optimizer) -> dict[str, str]:
    return digest({"model": without_frozen(dmp.state_dict()), "optimizer": without_frozen(optimizer.state_dict())})


def fill_filesystem(folder: Path, leave: int) -> None:
    """Fill the (small, test-mounted) filesystem of ``folder`` until about ``leave`` bytes are free."""
    stats = os.statvfs(folder)
    size = stats.f_bavail * stats.f_frsize - leave
    with open(folder.parent / "filler", "wb") as handle:
        handle.write(b"\0" * max(size, 0))
        handle.flush()
        os.fsync(handle.fileno())


def save_then_fail(args: list[str]) -> dict:
    llm, data, store_root, ckpt, pg, how = args
    dist.init_process_group("gloo", init_method=f"file://{pg}", rank=0, world_size=1)
    dmp, optimizer, schedulers, batcher, table = bahe(llm, data, store_root, seed=0)
    checkpointer = Checkpointer(Path(ckpt))
    train_step(dmp, optimizer, schedulers, batcher, table, 0)
    checkpointer.save(10, dmp, optimizer, schedulers, rows_seen=320)
    saved = state_digest(dmp, optimizer)
    shard = max((Path(ckpt) / "step-0000010").glob("*.distcp"), key=lambda p: p.stat().st_size).stat().st_size
    train_step(dmp, optimizer, schedulers, batcher, table, 32)
    changed = state_digest(dmp, optimizer)
    if how == "limit":
        limit_file_size(shard // 2)
    else:  # a really full filesystem: the test mounted a small tmpfs at ckpt's parent
        fill_filesystem(Path(ckpt), shard // 2)
    result = {"step10": saved, "step20": changed, "shard_bytes": shard, "limit": shard // 2}
    try:
        checkpointer.save(20, dmp, optimizer, schedulers, rows_seen=640)
        result["error"] = None
    except CheckpointWriteError as err:
        result.update(error=str(err), error_type=type(err).__name__, is_os_error=isinstance(err, OSError))
    return result


def restore_and_save(args: list[str]) -> dict:
    llm, data, store_root, ckpt, pg = args
    dist.init_process_group("gloo", init_method=f"file://{pg}", rank=0, world_size=1)
    dmp, optimizer, schedulers, batcher, table = bahe(llm, data, store_root, seed=1)
    checkpointer = Checkpointer(Path(ckpt))
    before = state_digest(dmp, optimizer)
    step = checkpointer.restore(dmp, optimizer, schedulers)
    result = {"before": before, "step": step, "rows_seen": checkpointer.rows_seen, "restored": state_digest(dmp, optimizer),
              "last_epochs": [s.last_epoch for s in schedulers]}
    train_step(dmp, optimizer, schedulers, batcher, table, 32)
    checkpointer.save(20, dmp, optimizer, schedulers, rows_seen=640)
    return result


class PerRank(torch.nn.Module):
    """A module whose state differs in keys per rank, so each rank writes its own 64 KiB to the checkpoint
    (DCP would write a replicated tensor on one rank only)."""

    def __init__(self, rank: int):
        super().__init__()
        self.weights = torch.nn.ParameterDict({f"rank{rank}": torch.nn.Parameter(torch.randn(128, 128))})


def two_ranks(args: list[str]) -> dict:
    (ckpt,) = args
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    module = PerRank(rank)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    result = {"rank": rank}
    blocker = Path(ckpt) / "blocked"  # a file where the checkpoint folder should be
    try:
        Checkpointer(blocker).save(5, module, optimizer, [], rows_seen=0)
    except CheckpointWriteError as err:
        result["file_error"] = str(err)
    checkpointer = Checkpointer(Path(ckpt) / "checkpoints")
    checkpointer.save(10, module, optimizer, [], rows_seen=0)
    if rank == 1:
        limit_file_size(16_384)  # rank 1's shard (64 KiB of floats) fails after 16 KiB
    with torch.no_grad():
        next(iter(module.parameters())).add_(1.0)
    try:
        checkpointer.save(20, module, optimizer, [], rows_seen=0)
    except CheckpointWriteError as err:
        result["write_error"] = str(err)
    dist.barrier()  # the test gives every rank its error before it looks at the folder
    # one file per rank (1 KiB, well under rank 1's limit): two ranks printing at once interleave
    (Path(ckpt) / f"rank{rank}.json").write_text(json.dumps(result))
    return result


def main() -> None:
    mode, *args = sys.argv[1:]
    result = {"save": save_then_fail, "restore": restore_and_save, "two_ranks": two_ranks}[mode](args)
    close_process_group()
    print(json.dumps(result), flush=True)  # stdout is a pipe: not subject to the file size limit


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
