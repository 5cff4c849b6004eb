"""One rank of the upstream-shaped examples' tests (tests/test_migration_guide.py).

    torchrun --nproc_per_node 2 tests/dist/dlrm_main_upstream_worker.py upstream|upstream_text OUT.json SEED \\
        -- EXAMPLE_ARGS

Runs ``main`` of examples/dlrm_main_<which>.py unchanged (torch seeded with SEED first) and records from
outside, per rank: every training step's loss, wall time and this rank's CPU time (wrapping ``TrainPipelineSparseDist.progress``),
the val and test AUROCs and batch sizes, each param group's final learning rate (the model and optimizer are caught on
their way into ``train_val_test``), the deprecation warnings raised, and, with a store, whether every
local shard of the behaviour table still equals the store's rows bit for bit.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torchrec.distributed import TrainPipelineSparseDist

from tests.dist.dlrm_main_example_worker import table_equals_store


def main() -> None:
    which, out, seed = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    argv = sys.argv[sys.argv.index("--") + 1:]
    torch.manual_seed(seed)
    example = importlib.import_module(f"examples.dlrm_main_{which}")
    record = {"losses": [], "step_seconds": [], "step_cpu_seconds": [], "eval_batch_sizes": set()}
    progress = TrainPipelineSparseDist.progress

    def timed_progress(self, iterator):
        start, cpu = time.perf_counter(), time.process_time()
        output = progress(self, iterator)
        if self._model.training:
            record["step_seconds"].append(time.perf_counter() - start)
            record["step_cpu_seconds"].append(time.process_time() - cpu)
            record["losses"].append(float(output[0]))
        else:
            record["eval_batch_sizes"].add(output[2].numel())
        return output

    caught = {}
    train_val_test = example.train_val_test

    def catching(args, model, optimizer, *rest):
        caught.update(model=model, optimizer=optimizer)
        caught["results"] = train_val_test(args, model, optimizer, *rest)
        return caught["results"]

    TrainPipelineSparseDist.progress = timed_progress
    example.train_val_test = catching
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", FutureWarning)
        warnings.simplefilter("always", DeprecationWarning)
        example.main(argv)  # upstream's main returns nothing: the results are caught on their way out
    results = caught["results"]
    record["eval_batch_sizes"] = sorted(record["eval_batch_sizes"])
    record["val_aurocs"], record["test_auroc"] = results.val_aurocs, results.test_auroc
    record["final_lrs"] = [group["lr"] for group in caught["optimizer"].param_groups]
    record["group_sizes"] = [len(group["params"]) for group in caught["optimizer"].param_groups]
    record["warnings"] = sorted({f"{w.category.__name__}: {w.message}" for w in seen
                                 if issubclass(w.category, FutureWarning | DeprecationWarning)})
    if "--store" in argv:
        store = argv[argv.index("--store") + 1]
        record["table_equals_store"], record["table_elements"] = table_equals_store(caught["model"], store)
    out.with_name(f"{out.stem}-rank{dist.get_rank()}.json").write_text(json.dumps(record))
    from bahe.embeddings.process_group import close_process_group

    close_process_group()


if __name__ == "__main__":
    main()
