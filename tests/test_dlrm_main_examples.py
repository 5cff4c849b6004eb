"""The dlrm_main-shaped examples (examples/dlrm_main_swap.py, text off; examples/dlrm_main_text.py,
text on) run end to end on 2 gloo ranks, and their diff stays small. (docs/migration.md shows the diff
from upstream's dlrm_main.py instead: examples/dlrm_main_upstream*.py, tests/test_migration_guide.py.)

What a dlrm_main user hits when adding text, each checked here:
* dlrm_main's BinaryAUROC takes the batch's labels as they are: BaheBatch labels are integers, as in
  torchrec's Batch, so evaluation runs;
* dlrm_main calls ``len()`` on its loaders: BaheDataLoader has it;
* dlrm_main's LR policy scheduler writes its 1e-7 floor into EVERY param group, the frozen behaviour
  table's lr=0 optimizer included: the table must still equal the store bit for bit.
"""

from __future__ import annotations

import json
import math
import subprocess

import pytest

from tests.model_fixtures import make_tiny_pipeline, split_by_time
from tests.torchrun import ROOT, torchrun

WORKER = ROOT / "tests" / "dist" / "dlrm_main_example_worker.py"
COMMON = ["--batch_size", "8", "--lr_warmup_steps", "2", "--lr_decay_start", "3", "--lr_decay_steps", "2"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("examples")
    pipeline = make_tiny_pipeline(root / "pipeline")
    (root / "data").mkdir()
    return pipeline, split_by_time(pipeline, root / "data"), root


def _run(which: str, tiny, extra: list[str]) -> list[dict]:
    _, data, root = tiny
    torchrun(WORKER, which, root, "--", "--data_dir", data, *COMMON, *extra)
    return [json.loads((root / f"{which}-rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.integration
def test_text_example_trains_evaluates_and_leaves_the_frozen_table_bit_identical_under_dlrm_mains_scheduler(tiny):
    pipeline, _, _ = tiny
    ranks = _run("text", tiny, ["--store", pipeline.store, "--llm", pipeline.llm, "--max_behaviours", "6"])
    for rank in ranks:
        assert len(rank["losses"]) == 20 and all(math.isfinite(x) for x in rank["losses"])  # 320 rows / (8 x 2)
        assert 0.0 <= rank["test_auroc"] <= 1.0 and len(rank["val_aurocs"]) == 1
        # the trap is really exercised: the scheduler lifted every group, the frozen table's too, to 1e-7
        assert rank["final_lrs"] and all(lr == pytest.approx(1e-7) for lr in rank["final_lrs"])
    assert sum(rank["table_elements"] for rank in ranks) > 0
    assert all(rank["table_equals_store"] for rank in ranks)


@pytest.mark.integration
def test_text_off_swap_example_trains_and_evaluates(tiny):
    for rank in _run("swap", tiny, []):
        assert len(rank["losses"]) == 20 and all(math.isfinite(x) for x in rank["losses"])
        assert 0.0 <= rank["test_auroc"] <= 1.0


def test_the_examples_diff_is_the_text_change_alone_and_small():
    done = subprocess.run(["diff", "-u", "examples/dlrm_main_swap.py", "examples/dlrm_main_text.py"], cwd=ROOT,
                          capture_output=True, text=True)
    real = done.stdout.splitlines()[2:]  # without the two file-name lines (they carry dates)
    changed = [line for line in real if line[:1] in "+-"]
    assert 0 < len(changed) <= 40, changed
