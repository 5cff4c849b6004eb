"""One rank of the segment metrics' cross-rank check: the trainer's ``evaluate`` with a segment tagger
(padded batches, every rank its own rows, the rows gathered on rank 0) on a real DLRM-arm model, beside
the same model's scores of the whole split in one pass on rank 0, with each row's item and history length.
Writes both to OUT/segments-<world>.json.

    torchrun --nproc_per_node 2 tests/dist/segments_worker.py DATA_DIR OUT BATCH_SIZE
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from bahe.ctr_data.parquet_io import SampleReader
from bahe.embeddings.process_group import close_process_group
from bahe.training.loop import evaluate
from bahe.training.metrics import segment_tagger
from bahe.training.segments import SegmentSpec, history_lengths

from tests.dist.metrics_worker import tiny_dlrm

SPEC = SegmentSpec(item_thresholds=(0, 2, 4), history_thresholds=(0, 3), bootstrap=30, seed=11)


def main(data_dir: Path, out: Path, batch_size: int) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    train_model, batcher, source, config = tiny_dlrm(data_dir, out, batch_size)
    run = out / f"run-{world}"
    run.mkdir(exist_ok=True)

    def on_rank0(action, what):
        if rank == 0:
            action()
        dist.barrier()

    tagger = segment_tagger(SPEC, run, source.paths["train"], rank, record=True, on_rank0=on_rank0)
    result = evaluate(train_model, source, "valid", batcher, config, rank, world, torch.device("cpu"), None, tagger)
    if rank == 0:
        table = SampleReader(data_dir / "valid.parquet").read_all()
        with torch.no_grad():
            _, (_, logits, labels) = train_model.eval()(batcher(table))
        reference = {"probabilities": torch.sigmoid(logits).tolist(), "labels": labels.tolist(),
                     "items": table.column("item_id").to_pylist(), "history": history_lengths(table).tolist()}
        (out / f"segments-{world}.json").write_text(json.dumps({"evaluate": result, "reference": reference}))
    dist.barrier()
    close_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
