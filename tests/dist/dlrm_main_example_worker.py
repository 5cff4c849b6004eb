"""One rank of the dlrm_main-shaped examples' test (tests/test_dlrm_main_examples.py).

    torchrun --nproc_per_node 2 tests/dist/dlrm_main_example_worker.py text|swap OUT_DIR -- EXAMPLE_ARGS

Runs examples/dlrm_main_<text|swap>.py's ``main`` and records, per rank: the losses and AUROCs, the
learning rate every param group ended with (dlrm_main's scheduler lifts them all, the frozen table's
included, to its 1e-7 floor), and for the text example whether every local shard of the behaviour
table still equals the store's rows bit for bit.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from bahe.embeddings.process_group import close_process_group
from bahe.embeddings.store import BehaviourStore
from torch.distributed._shard.sharded_tensor import ShardedTensor


def table_equals_store(model, store_root: str) -> tuple[bool, int]:
    """(every local shard of the behaviour table == the store's rows, number of elements compared)."""
    store = BehaviourStore.open(store_root)
    same, compared = True, 0
    for name, tensor in model.state_dict().items():
        if not name.endswith("embeddings.behaviours.weight") or not isinstance(tensor, ShardedTensor):
            continue
        for shard in tensor.local_shards():
            (row, col), (rows, cols) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
            expected = torch.from_numpy(store.rows(row, row + rows)[:, col:col + cols])
            same = same and torch.equal(shard.tensor, expected)
            compared += shard.tensor.numel()
    return same, compared


def main() -> None:
    which, out = sys.argv[1], Path(sys.argv[2])
    argv = sys.argv[sys.argv.index("--") + 1:]
    example = importlib.import_module(f"examples.dlrm_main_{which}")
    result = example.main(argv)
    record = {key: result[key] for key in ("losses", "val_aurocs", "test_auroc")}
    record["final_lrs"] = [group["lr"] for group in result["optimizer"].param_groups]
    if which == "text":
        store = argv[argv.index("--store") + 1]
        record["table_equals_store"], record["table_elements"] = table_equals_store(result["model"], store)
    (out / f"{which}-rank{dist.get_rank()}.json").write_text(json.dumps(record))
    close_process_group()


if __name__ == "__main__":
    main()
