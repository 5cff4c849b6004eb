"""Run by torchrun (2 gloo ranks) from tests/test_init_from.py; writes one JSON per rank.

Builds the trainer's model exactly as ``bahe-train`` does (``training.loop.start_model``) with the
given ``bahe-train`` flags (an ``--init-from`` among them), then compares every local shard with the
checkpoint's tensors (read into full tensors by the test) and the frozen behaviour table with the
store's rows. :func:`mismatches` is also what the 1-rank tests call.

    python -m torch.distributed.run ... tests/dist/init_from_worker.py REFERENCE.pt OUT_DIR -- BAHE_TRAIN_FLAGS
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

FROZEN = "embeddings.behaviours."


def pieces(value) -> list[tuple[torch.Tensor, tuple[int, ...]]]:
    """(local tensor, its offsets in the full tensor) for a ShardedTensor's local shards or a plain tensor."""
    if isinstance(value, ShardedTensor):
        return [(s.tensor, tuple(s.metadata.shard_offsets)) for s in value.local_shards()]
    return [(value, (0,) * value.dim())]


def _window(full: torch.Tensor, piece: torch.Tensor, offsets: tuple[int, ...]) -> torch.Tensor:
    return full[tuple(slice(o, o + n) for o, n in zip(offsets, piece.shape))]


def mismatches(state: dict, reference: dict, path: str = "") -> list[str]:
    """Keys of ``state`` (nested; frozen table left out) whose local values differ from ``reference``'s
    full tensors, or that ``reference`` lacks."""
    found = []
    for key, value in state.items():
        name = f"{path}{key}"
        if FROZEN in name:
            continue
        if key not in reference:
            found.append(f"{name}: not in the checkpoint")
        elif isinstance(value, dict):
            found += mismatches(value, reference[key], name + "/")
        elif isinstance(value, (torch.Tensor, ShardedTensor)):
            if any(not torch.equal(piece, _window(reference[key], piece, offsets)) for piece, offsets in pieces(value)):
                found.append(name)
        elif value != reference[key]:
            found.append(name)
    return found


def frozen_differs_from_store(state: dict, store) -> bool:
    """True unless every local shard of the behaviour table equals the store's rows it covers."""
    (value,) = [v for k, v in state.items() if FROZEN in k]
    full = torch.from_numpy(store.rows(0, store.rows_count))
    return tuple(value.size() if isinstance(value, ShardedTensor) else value.shape) != tuple(full.shape) or any(
        not torch.equal(piece, _window(full, piece, offsets)) for piece, offsets in pieces(value))


def tensors(tree) -> list:
    """Every tensor (or ShardedTensor) of a nested state dict, frozen table left out."""
    if isinstance(tree, dict):
        return [t for k, v in tree.items() if FROZEN not in str(k) for t in tensors(v)]
    return [tree] if isinstance(tree, (torch.Tensor, ShardedTensor)) else []


def is_fresh(optimizer_state: dict) -> bool:
    """No AdamW moments yet and all-zero Adagrad momentum: an optimizer that has not stepped."""
    return all(not piece.any() for value in tensors(optimizer_state) for piece, _ in pieces(value))


def main() -> None:
    import torch.distributed as dist
    from bahe.embeddings.store import BehaviourStore
    from bahe.launchers import train
    from bahe.training.loop import open_source, setup_distributed, start_model

    reference_path, out, argv = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[4:]
    args = train.build_parser().parse_args(argv)
    train._init_from_defaults(args, argv)
    config = train.config_from_args(args)
    rank, world, device = setup_distributed("cpu")
    source = open_source(config, rank)
    started = start_model(config, source, rank, device)
    reference = torch.load(reference_path, weights_only=True)
    model_state, optimizer_state = started.dmp.state_dict(), started.optimizer.state_dict()
    store = BehaviourStore.open(config.model.text.store)
    result = {"world": world, "start": started.start, "initialized": started.initialized,
              "model": mismatches(model_state, reference["model"]),
              "optimizer": mismatches(optimizer_state, reference["optimizer"]) if config.init_optimizer else None,
              "optimizer_fresh": is_fresh(optimizer_state),
              "frozen_differs_from_store": frozen_differs_from_store(model_state, store),
              # elements of each sharded table held here, and in all: the ranks split the tables between them
              "local": {k: sum(s.tensor.numel() for s in v.local_shards()) for k, v in model_state.items()
                        if isinstance(v, ShardedTensor)},
              "full": {k: v.size().numel() for k, v in model_state.items() if isinstance(v, ShardedTensor)}}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    from bahe.embeddings.process_group import close_process_group

    close_process_group()


if __name__ == "__main__":
    main()
