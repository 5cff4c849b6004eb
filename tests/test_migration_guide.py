"""docs/migration.md starts from upstream's dlrm_main.py: its diff is real, small, and what it promises holds.

examples/dlrm_main_upstream.py mirrors facebookresearch/dlrm's torchrec_dlrm/dlrm_main.py (the commit its
docstring names); examples/dlrm_main_upstream_text.py is it with BAHE's text. Checked here:

* the guide embeds exactly ``diff -u`` of the two files, and it stays small (issue 29: <= 30 changed lines);
* every dlrm_main option the text trainer cannot honour is refused before any work, in one line naming
  the option and what to do; ``--num_embeddings_per_feature`` maps onto the data's ID features;
* the loader reads dlrm_main's stages from the project's files by the GLOBAL rank;
* on 2 gloo ranks: the text trainer trains, validates and tests with no default cap on the batches, its
  frozen table equals the store bit for bit after dlrm_main's scheduler lifted that table's lr from 0,
  the text arch's AdamW lr is untouched by that scheduler, and it adds no warning beyond upstream's;
  text off (no --store) runs with an empty text group; the upstream mirror runs on random data;
* the optimizer recipe on MovieLens-100K (test_the_recipe_*): see its docstring for what it measures.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import re
import subprocess
from pathlib import Path

import pytest

from tests.model_fixtures import make_tiny_pipeline, split_by_time
from tests.torchrun import ROOT, torchrun

WORKER = ROOT / "tests" / "dist" / "dlrm_main_upstream_worker.py"
UPSTREAM_COMMIT = "f06d3deed5a15710fb28e0ede0af31ebd53789cb"
MAX_CHANGED_LINES = 30
TINY = ["--batch_size", "8", "--embedding_dim", "8", "--dense_arch_layer_sizes", "8,8", "--over_arch_layer_sizes",
        "8,1", "--adagrad", "--learning_rate", "0.05"]


def _diff() -> list[str]:
    done = subprocess.run(["diff", "-u", "examples/dlrm_main_upstream.py", "examples/dlrm_main_upstream_text.py"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 1, done.stderr
    return done.stdout.splitlines()


def test_the_guide_embeds_exactly_the_diff_between_the_upstream_shaped_examples():
    real = _diff()
    guide = (ROOT / "docs" / "migration.md").read_text()
    shown = re.search(r"<!-- upstream-diff -->\n```diff\n(.*?)```", guide, re.S)
    assert shown, "docs/migration.md lacks the ```diff block after <!-- upstream-diff -->"
    lines = shown.group(1).splitlines()
    # the two file-name lines carry dates in diff's output: the guide shows the names alone
    assert lines[:2] == ["--- examples/dlrm_main_upstream.py", "+++ examples/dlrm_main_upstream_text.py"]
    assert lines[2:] == real[2:], ("docs/migration.md's diff is stale: regenerate it with "
                                   "diff -u examples/dlrm_main_upstream.py examples/dlrm_main_upstream_text.py")
    changed = [line for line in real[2:] if line[:1] in "+-"]
    assert 0 < len(changed) <= MAX_CHANGED_LINES, changed


def test_the_examples_and_the_guide_name_the_upstream_commit_they_mirror():
    for path in ("examples/dlrm_main_upstream.py", "examples/dlrm_main_upstream_text.py", "docs/migration.md"):
        assert UPSTREAM_COMMIT in (ROOT / path).read_text(), path


@pytest.fixture(scope="module")
def text_example():
    return importlib.import_module("examples.dlrm_main_upstream_text")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("upstream_examples")
    pipeline = make_tiny_pipeline(root / "pipeline")
    (root / "data").mkdir()
    return pipeline, split_by_time(pipeline, root / "data"), root


REFUSALS = [  # (extra argv, the option the one line must start with)
    (["--in_memory_binary_criteo_path", "/criteo"], "--in_memory_binary_criteo_path"),
    (["--synthetic_multi_hot_criteo_path", "/criteo"], "--synthetic_multi_hot_criteo_path"),
    (["--multi_hot_sizes", "2,2,2,2"], "--multi_hot_sizes"),
    (["--collect_multi_hot_freqs_stats"], "--collect_multi_hot_freqs_stats"),
    (["--interaction_type", "dcn"], "--interaction_type"),
    (["--interaction_type", "projection"], "--interaction_type"),
    (["--undersampling_rate", "0.3"], "--undersampling_rate"),
    (["--num_embeddings_per_feature", "10,20"], "--num_embeddings_per_feature"),
    (["--num_embeddings_per_feature", "10,20,0,5"], "--num_embeddings_per_feature"),
    (["--test_batch_size", "0"], "--test_batch_size"),
]


@pytest.mark.parametrize("extra,option", REFUSALS, ids=[" ".join(extra) for extra, _ in REFUSALS])
def test_an_unsupported_dlrm_main_option_is_refused_at_start_up_in_one_line(text_example, tiny, extra, option):
    import torch.distributed as dist

    _, data, _ = tiny
    with pytest.raises(SystemExit) as refused:
        text_example.main(["--bahe_data_dir", str(data), *TINY, *extra])
    message = str(refused.value)
    assert message.startswith(option + " ") or message.startswith(option + ":"), message
    assert "\n" not in message and len(message) < 300, message
    assert not dist.is_initialized()  # before any work: no process group, no loader, no model


def test_no_data_dir_and_a_data_dir_without_dlrm_mains_stages_are_refused(text_example, tmp_path):
    with pytest.raises(SystemExit, match=r"^--bahe_data_dir: required"):
        text_example.main(TINY)
    (tmp_path / "train.parquet").write_bytes(b"")
    with pytest.raises(SystemExit, match=r"^--bahe_data_dir .*: no valid.parquet \(dlrm_main's val stage\)"):
        text_example.main(["--bahe_data_dir", str(tmp_path), *TINY])


def _args(data: Path, **overrides) -> argparse.Namespace:
    values = {"bahe_data_dir": data, "num_embeddings": 64, "num_embeddings_per_feature": None, "store": None,
              "max_behaviours": 6, "batch_size": 8, "test_batch_size": None, "seed": None, "pin_memory": None}
    return argparse.Namespace(**{**values, **overrides})


def test_num_embeddings_per_feature_maps_onto_the_datas_id_features_in_order(tiny):
    from bahe.training import dlrm_main_adapter as adapter

    _, data, _ = tiny
    names, dense = adapter.feature_names(_args(data, num_embeddings=None, num_embeddings_per_feature=[11, 12, 13, 14]))
    assert names == ["user_id", "item_id", "cat_user_segment", "cat_item_category"]
    assert dense == ["user_activity", "item_popularity"]
    sizes = adapter._table_sizes(_args(data, num_embeddings=None, num_embeddings_per_feature=[11, 12, 13, 14]), names)
    assert sizes == {"user_id": 11, "item_id": 12, "cat_user_segment": 13, "cat_item_category": 14}


def test_the_loader_reads_dlrm_mains_stages_from_the_projects_files_by_the_global_rank(tiny, monkeypatch):
    """dlrm_main's own ``rank`` is LOCAL_RANK: on host 2 of 2 (local rank 0, global rank 3 of 4) the loader must
    still read global rank 3's share, or every host would read the same rows."""
    from bahe.training import dlrm_main_adapter as adapter

    _, data, _ = tiny
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(adapter.dist, "get_rank", lambda: 3)
    monkeypatch.setattr(adapter.dist, "get_world_size", lambda: 4)
    loaders = {stage: adapter.get_dataloader(_args(data, test_batch_size=4), "gloo", stage)
               for stage in ("train", "val", "test")}
    assert {stage: loader.path.name for stage, loader in loaders.items()} == adapter.STAGE_FILES
    assert {stage: (loader.rank, loader.world) for stage, loader in loaders.items()} == dict.fromkeys(loaders, (3, 4))
    assert [loader.batch_size for loader in loaders.values()] == [8, 4, 4]  # --test_batch_size for val and test
    assert [loader.shuffle for loader in loaders.values()] == [True, False, False]
    assert len(loaders["train"]) == 320 // (8 * 4)  # full global batches of the 320 train rows
    with pytest.raises(ValueError, match="stage 'valid'"):
        adapter.get_dataloader(_args(data), "gloo", "valid")


def test_without_a_text_arch_the_text_group_is_empty_and_dlrm_mains_optimizer_keeps_every_dense_parameter():
    import torch
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper

    from bahe.training import dlrm_main_adapter as adapter

    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    dense = adapter.without_text(model.named_parameters())
    assert sorted(dense) == ["0.bias", "0.weight"]
    assert adapter.text_optimizers(model, argparse.Namespace(text_learning_rate=1e-3)) == []
    inner = CombinedOptimizer([KeyedOptimizerWrapper(dense, lambda ps: torch.optim.SGD(ps, lr=0.1))])
    assert len(CombinedOptimizer([inner, *adapter.text_optimizers(model, argparse.Namespace())]).param_groups) == 1


def _run(which: str, root: Path, argv: list[str], *, seed: int = 0, name: str | None = None) -> list[dict]:
    out = root / f"{name or which}.json"
    torchrun(WORKER, which, out, str(seed), "--", *map(str, argv))
    return [json.loads(out.with_name(f"{out.stem}-rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.integration
def test_the_text_trainer_keeps_the_frozen_table_equal_to_the_store_under_dlrm_mains_scheduler(tiny):
    pipeline, data, root = tiny
    text_lr = 0.002
    ranks = _run("upstream_text", root, [
        "--bahe_data_dir", data, "--store", pipeline.store, "--llm", pipeline.llm, "--max_behaviours", "6", *TINY,
        "--num_embeddings_per_feature", "64,32,8,8", "--test_batch_size", "4", "--text_learning_rate", text_lr,
        "--lr_warmup_steps", "2", "--lr_decay_start", "3", "--lr_decay_steps", "2"])
    for rank in ranks:
        # no 10-batch default: every full global batch of the 320 train rows (20), plus dlrm_main's 2 fillers
        assert len(rank["losses"]) == 320 // (8 * 2) + 2
        assert all(math.isfinite(x) for x in rank["losses"]) and max(rank["losses"]) <= 2 * rank["losses"][0]
        assert 0.0 <= rank["test_auroc"] <= 1.0 and len(rank["val_aurocs"]) == 1
        assert rank["eval_batch_sizes"] == [4]  # --test_batch_size
        # groups: fused ID tables, the frozen table's lr=0 in-backward SGD, dlrm_main's dense Adagrad, text AdamW
        assert 1e-7 in rank["final_lrs"]  # the scheduler lifted the frozen table's lr from 0: the trap is exercised
        assert rank["final_lrs"][-1] == pytest.approx(text_lr)  # ... and never touched the text arch's AdamW
        assert rank["table_equals_store"] is True
        assert not [w for w in rank["warnings"] if "DTensor" in w]
    assert sum(rank["table_elements"] for rank in ranks) > 0


@pytest.mark.integration
def test_the_text_trainer_runs_with_text_off_and_the_mirror_runs_upstreams_random_data(tiny):
    _, data, root = tiny
    for rank in _run("upstream_text", root, ["--bahe_data_dir", data, *TINY, "--num_embeddings", "64"], name="off"):
        assert len(rank["losses"]) == 22 and all(math.isfinite(x) for x in rank["losses"])
        assert len(rank["final_lrs"]) == 2  # fused ID tables and dlrm_main's dense optimizer: no text group
    mirror = _run("upstream", root, ["--embedding_dim", "8", "--dense_arch_layer_sizes", "8,8",
                                     "--over_arch_layer_sizes", "8,1", "--num_embeddings", "64", "--batch_size", "16"])
    for rank in mirror:  # upstream's default for random data: 10 batches per stage (+ 2 filler batches)
        assert len(rank["losses"]) == 12 and 0.0 <= rank["test_auroc"] <= 1.0


# Valid AUROC after 100 steps, text on minus text off, the same seed (bench/dlrm_main_text_bench.py, Adagrad
# 0.05 with dlrm_main's policy, seeds 0-2 on a shared 2-core machine): +0.0054, +0.0338 and +0.0028 (text on 0.6981 / 0.6933 / 0.6990, text off 0.6927 /
# 0.6595 / 0.6962). Text off alone spans
# 0.037 over those seeds (its init decides much after 100 steps). The margin lets seed 0 swing by about
# that much the other way before the test calls text a loss.
AUROC_MARGIN = 0.02


@pytest.mark.integration
def test_the_recipe_keeps_text_bounded_and_no_worse_than_text_off_under_dlrm_mains_adagrad(tmp_path_factory):
    """Issue 29's check of the optimizer recipe on MovieLens-100K: dlrm_main's Adagrad with its warm-up /
    decay policy at the learning rates of upstream's README examples (1.0 and 15.0) and at 0.05, 100 steps
    of 32 rows on 2 gloo ranks, text on (the recipe) and text off, seed 0. What it chose to stay a test on
    2 CPU cores: a store of k = 2 (a 1-minute build), 1 deep layer, M = 5, the demo's model size, 1 test
    batch; about 6 minutes in all (measured: 353 s on 2 shared CPU cores, the store build included).

    At 0.05 the text run's loss never exceeds twice its first value and its valid AUROC is at least text
    off's minus AUROC_MARGIN. At 1.0 and 15.0 the DLRM itself diverges under Adagrad (text off: peak / first
    about 400 and 5e7, valid AUROC 0.5), so no text arm can keep that bound there (docs/migration.md says
    so); the test keeps what the recipe owns: the text arch's lr untouched by the policy, the frozen table
    equal to the store, no NaN, and an AUROC no worse than text off's.
    """
    from bench.dlrm_main_text_bench import prepare, run

    work = tmp_path_factory.mktemp("recipe")
    data, store = prepare(work, k=2)
    for lr in (0.05, 1.0, 15.0):
        off, on = run(work, data, None, lr, 0), run(work, data, store, lr, 0)
        assert on["steps"] == off["steps"] == 102  # 100 + dlrm_main's 2 filler batches
        assert on["table_equals_store"] is True
        assert on["final_lrs"][-1] == pytest.approx(3e-4)  # the text arch's AdamW: the policy never touched it
        assert math.isfinite(on["peak_loss"]) and math.isfinite(on["val_auroc"])
        if lr == 0.05:
            assert on["peak_over_first"] <= 2.0, on
        assert on["val_auroc"] >= off["val_auroc"] - AUROC_MARGIN, (on, off)
