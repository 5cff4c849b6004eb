"""Run by torchrun (2 gloo ranks) from tests/test_sharded_model.py; writes one JSON per rank.

For one sharding type of the behaviour table: build BAHE on meta, attach the optimizers, wrap it
in DistributedModelParallel, load the store, compare the sharded forward with an unsharded model
holding the same weights, train a few steps with TrainPipelineSparseDist and record the checksum
of every local shard of the behaviour table before and after, the losses, and whether the
trainable parts moved.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bahe.embeddings.process_group import close_process_group
from bahe.model.bahe import BAHETrain  # noqa: E402
from bahe.model.behaviour_lookup import BEHAVIOUR_TABLE, load_store_rows  # noqa: E402
from bahe.model.factory import build_model  # noqa: E402
from bahe.model.sharding import shard_model  # noqa: E402
from tests.model_fixtures import TinyPipeline  # noqa: E402


def local_shards(state_dict) -> dict[str, float]:
    """sum and a position-weighted sum of every local shard of the behaviour table (exact in float64)."""
    out = {}
    for name, tensor in state_dict.items():
        if not name.endswith(f"{BEHAVIOUR_TABLE}.weight"):
            continue
        shards = [(tuple(s.metadata.shard_offsets), s.tensor) for s in tensor.local_shards()] \
            if isinstance(tensor, ShardedTensor) else [((0, 0), tensor)]
        for offsets, t in shards:
            t = t.detach().double()
            weights = torch.arange(1, t.numel() + 1, dtype=torch.float64).view_as(t)
            out[f"{offsets}"] = [t.sum().item(), (t * weights).sum().item(), list(t.shape)]
    return out


def main() -> None:
    llm, data, store_root, shardings, out_dir = sys.argv[1:6]
    dist.init_process_group("gloo")
    for sharding in shardings.split(","):
        run(Path(llm), Path(data), Path(store_root), sharding, Path(out_dir))
    close_process_group()


def run(llm: Path, data: Path, store_root: Path, sharding: str, out_dir: Path) -> None:
    rank = dist.get_rank()
    device = torch.device("cpu")
    pipeline = TinyPipeline(llm, data, store_root)
    config = pipeline.config()
    torch.manual_seed(0)
    reference, batcher, store = build_model(config, pipeline.schema)  # unsharded, same seed on every rank
    load_store_rows(reference, store)
    torch.manual_seed(0)
    model, _, _ = build_model(config, pipeline.schema, device=torch.device("meta"))
    _apply_optimizer_in_backward(torch.optim.Adagrad, model.sparse_arch.parameters(), {"lr": 0.05})
    dmp = shard_model(BAHETrain(model), device, behaviour_sharding=sharding, batch_size=32)
    dmp.load_state_dict(BAHETrain(reference).state_dict(), strict=False)  # same weights as the reference
    load_store_rows(dmp, store)
    plan = {k: {t: str(p.sharding_type) for t, p in v.items()} for k, v in dmp.plan.plan.items()}

    table = pipeline.table()
    batches = [batcher(table.slice(start, 32)) for start in range(rank * 32, table.num_rows - 32, 64)]
    dmp.eval()
    reference.eval()
    with torch.no_grad():
        _, (_, sharded_logits, _) = dmp(batches[0])
        ref_logits = reference(batches[0].dense_features, batches[0].sparse_features,
                               batches[0].behaviour_features).squeeze(-1)
    forward_gap = (sharded_logits - ref_logits).abs().max().item()

    before = local_shards(dmp.state_dict())
    layer_name = next(n for n in dict(dmp.named_parameters()) if "decoder.layers.0.mlp.up_proj" in n)
    layer_before = dict(dmp.named_parameters())[layer_name].detach().clone()
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())),
                                  lambda params: torch.optim.Adam(params, lr=5e-3))
    optimizer = CombinedOptimizer([dmp.fused_optimizer, dense])
    dmp.train()
    train_pipeline = TrainPipelineSparseDist(dmp, optimizer, device)
    losses = []
    data_iter = iter(batches * 4)
    while True:
        try:
            loss, _, _ = train_pipeline.progress(data_iter)  # the detached (loss, logits, labels)
        except StopIteration:
            break
        losses.append(float(loss))
    after = local_shards(dmp.state_dict())
    result = {"rank": rank, "sharding": sharding, "plan": plan, "forward_gap": forward_gap,
              "checksums_before": before, "checksums_after": after, "losses": losses,
              "layer_moved": not torch.equal(dict(dmp.named_parameters())[layer_name].detach(), layer_before),
              "pipelined_modules": len(getattr(train_pipeline, "_pipelined_modules", []))}
    (out_dir / f"{sharding}-rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
