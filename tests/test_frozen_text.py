"""The downstream model of the paper's AUC_d (`bahe-train --arm bahe --frozen-text-from RUN`): a DLRM whose
interaction also takes the N + 1 text features of a trained BAHE run's text arch, frozen.

Protected: after training, the text arch's weights are the source checkpoint's bit for bit while the ID
tables, dense and over arch trained (fresh, not the source's); the text arch requires no gradient, sits in
no optimizer group and stays in eval mode when the trainer switches to training; the downstream model's
text features on sample rows equal the features serving/features.py computes from the source run (what
bahe-export writes); the run records where the text arch came from; a source whose text settings or store
differ, a non-BAHE arm or source, --init-from together with it, and a resume of a run that trained its
text arch are refused in one line naming both sides; on 2 ranks as on 1."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from bahe.ctr_data.parquet_io import SampleReader
from bahe.ctr_data.synthetic import SyntheticConfig, write_synthetic
from bahe.embeddings.build import build_store
from bahe.embeddings.encoder import EncoderConfig
from bahe.embeddings.vocabulary import PAD_ID
from bahe.model.batch import ITEM_TEXT_KEY
from bahe.training import frozen_text
from bahe.training.run_record import RECORD
from tests.model_fixtures import K, TinyPipeline, make_tiny_pipeline, split_by_time
from tests.test_init_from import DAY2, MODEL, bahe_train, refused, single_process, start
from tests.torchrun import torchrun

ROOT = Path(__file__).resolve().parents[1]
TEXT_PARTS = ("aggregator.decoder.layers.0.", "aggregator.decoder.layers.1.", "aggregator.decoder.norm", "user_norm",
              "item_norm", "user_projection", "item_projection")
TRAINED_PARTS = ("embedding_bags.t_item_id.weight", "dense_arch.", "over_arch.")


@dataclass
class Runs:
    root: Path
    pipeline: TinyPipeline
    data: Path
    source: Path  # a BAHE run
    best: Path  # its selected checkpoint
    downstream: Path  # --frozen-text-from source, checkpoints at steps 1..3

    def common(self) -> list:
        return ["--data-dir", self.data, "--store", self.pipeline.store, "--llm", self.pipeline.llm, *MODEL]


def tensors(checkpoint: Path, out: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's model tensors, read whole, the behaviour table left out."""
    dcp_to_torch_save(checkpoint, out)
    return {k: v for k, v in torch.load(out, weights_only=True)["model"].items() if "embeddings.behaviours." not in k}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    root = tmp_path_factory.mktemp("frozen-text")
    pipeline = make_tiny_pipeline(root / "p")
    data = root / "data"
    data.mkdir()
    split_by_time(pipeline, data)
    source, downstream = root / "source", root / "downstream"
    common = ["--data-dir", data, "--store", pipeline.store, "--llm", pipeline.llm, *MODEL]
    assert bahe_train(*common, "--out", source, "--steps", "4", "--eval-every", "2", "--eval-batches", "1") == 0
    best = source / "checkpoints" / f"step-{json.loads((source / 'checkpoints' / 'BEST.json').read_text())['step']:07d}"
    assert bahe_train(*common, "--out", downstream, "--steps", "3", "--checkpoint-every", "1", "--seed", "1",
                      "--frozen-text-from", source) == 0
    return Runs(root, pipeline, data, source, best, downstream)


def test_the_text_arch_is_the_sources_bit_for_bit_after_training_and_the_rest_trained(runs, tmp_path):
    source = tensors(runs.best, tmp_path / "source.pt")
    steps = [tensors(runs.downstream / "checkpoints" / f"step-{s:07d}", tmp_path / f"{s}.pt") for s in (1, 3)]
    text = frozen_text.text_arch_keys(source)
    assert all(any(part in key for key in text) for part in TEXT_PARTS), text
    for state in steps:
        assert set(state) == set(source)
        assert [key for key in text if not torch.equal(state[key], source[key])] == []
    trained = [key for key in source if any(part in key for part in TRAINED_PARTS)]
    assert len(trained) >= 5 and not set(trained) & set(text)
    first, last = steps
    assert all(not torch.equal(first[key], last[key]) for key in trained)  # they trained from step 1 to 3
    assert all(not torch.equal(first[key], source[key]) for key in trained)  # and were not the source's
    record = json.loads((runs.downstream / RECORD).read_text())["frozen_text_from"]
    assert record == {"run": str(runs.source), "checkpoint": str(runs.best), "step": int(runs.best.name[5:])}
    assert json.loads((runs.downstream / RECORD).read_text())["model"] == json.loads((runs.source / RECORD).read_text())["model"]


def test_the_text_arch_requires_no_gradient_sits_in_no_optimizer_group_and_stays_in_eval_mode(runs, tmp_path):
    with single_process():
        started, _ = start(*runs.common(), "--out", tmp_path / "down", "--frozen-text-from", runs.source)
        model = started.dmp.module.model
        started.dmp.train()  # what the trainer calls before training and after each evaluation
        assert model.training and model.over_arch.training and model.dense_arch.training
        assert not any(module.training for module in model.text_arch.modules())
        frozen = [p for n, p in model.text_arch.named_parameters() if not n.startswith(frozen_text.LOOKUP)]
        assert len(frozen) > 10 and not any(p.requires_grad for p in frozen)
        grouped = {id(p) for group in started.groups.values() for p in group.params.values()}
        assert set(started.groups) == {"dense"} and not grouped & {id(p) for p in frozen}
        assert all(p.requires_grad for p in model.over_arch.parameters())
        assert started.start == 0 and started.initialized is None


def test_the_downstream_text_features_are_the_exported_features_of_the_source_run(runs):
    """serving/features.py (what bahe-export writes) on the source run vs the trained downstream model's
    own text arch, as the trainer runs it (sharded behaviour table), on the test split's rows."""
    from bahe.serving.features import item_features, user_features
    from bahe.serving.restore import restore_run

    rows = SampleReader(runs.data / "test.parquet").read_all()
    restored = restore_run(runs.source)
    exported_users = user_features(restored.model.text_arch, restored.batcher, rows, batch_size=16)
    item_kjt = restored.batcher(rows).behaviour_features[ITEM_TEXT_KEY]
    item_ids = np.full(rows.num_rows, PAD_ID, dtype=np.int64)
    item_ids[item_kjt.lengths().numpy() == 1] = item_kjt.values().numpy()
    exported_items = item_features(restored.model.text_arch, item_ids)
    n = len(restored.batcher.sequence_names)
    assert (item_ids != PAD_ID).sum() > 10 and exported_users.shape[:2] == (rows.num_rows, n) and n >= 2
    with single_process():
        started, _ = start(*runs.common(), "--out", runs.downstream, "--steps", "3",
                           "--frozen-text-from", runs.source)  # nothing left to train: its last checkpoint
        assert started.start == 3
        model = started.dmp.module.model.eval()
        with torch.no_grad():
            features = torch.cat([model.text_arch(started.batcher(rows.slice(s, 16)).behaviour_features)
                                  for s in range(0, rows.num_rows, 16)]).numpy()
    assert features.shape == (rows.num_rows, n + 1, exported_users.shape[2])
    np.testing.assert_array_equal(features[:, :n], exported_users)
    np.testing.assert_array_equal(features[:, n], exported_items)


@pytest.mark.parametrize("flags, expect", [
    (["--deep-layers", "1"], "deep layers: that run has 2, this run 1"),
    (["--embedding-dim", "16", "--dense-arch", "16", "16"], "D (--embedding-dim): that run has 8, this run 16"),
    (["--max-behaviours", "4"], "max behaviours (--max-behaviours): that run has 6, this run 4"),
    (["--pooling", "last"], "pooling: that run has 'mean', this run 'last'"),
    (["--attention", "bidirectional"], "attention: that run has 'causal', this run 'bidirectional'"),
])
def test_another_text_arch_is_refused_naming_both_sides(runs, tmp_path, capsys, flags, expect):
    line = refused(capsys, tmp_path / "down", *runs.common(), *flags, "--frozen-text-from", runs.source)
    assert expect in line and f"--frozen-text-from {runs.best} trained another text arch than this run's" in line


def test_a_store_of_another_k_or_not_holding_the_sources_rows_is_refused(runs, tmp_path, capsys):
    common = ["--data-dir", runs.data, "--llm", runs.pipeline.llm, *MODEL]
    other_k = tmp_path / "store-k1"
    build_store(other_k, [runs.pipeline.data], EncoderConfig(model=str(runs.pipeline.llm), k=1, device="cpu",
                                                            batch_tokens=64), show_progress=False)
    line = refused(capsys, tmp_path / "a", *common, "--store", other_k, "--frozen-text-from",
                   runs.source)
    assert f"k: that run has {K}, this run 1" in line and "deep layers: that run has 2, this run 3" in line
    # both days' texts in another order: the ids of the source's texts moved
    write_synthetic(SyntheticConfig(**DAY2), tmp_path / "day2.parquet")
    moved = tmp_path / "store-moved"
    build_store(moved, [tmp_path / "day2.parquet", runs.pipeline.data],
                EncoderConfig(model=str(runs.pipeline.llm), k=K, device="cpu", batch_tokens=64), show_progress=False)
    line = refused(capsys, tmp_path / "b", *common, "--store", moved, "--frozen-text-from",
                   runs.source)
    assert f"--frozen-text-from {runs.best} was trained on store {runs.pipeline.store} v000001" in line
    assert f"this run's store {moved} v000001" in line and "neither that store nor a refresh of it" in line
    with single_process(), pytest.raises(frozen_text.FrozenTextError, match="nor a refresh of it"):
        start(*common, "--store", moved, "--out", tmp_path / "c", "--frozen-text-from",
              runs.source)  # the trainer itself refuses too, before the model is sharded


def test_other_arms_sources_init_from_and_a_resume_of_a_trained_text_arch_are_refused(runs, tmp_path, capsys):
    line = refused(capsys, tmp_path / "a", *runs.common(), "--arm", "dlrm", "--frozen-text-from", runs.source)
    assert line.endswith("freezes a BAHE text arch, and --arm dlrm builds none: give --arm bahe (with --store)")
    line = refused(capsys, tmp_path / "b", *runs.common(), "--init-from", runs.source, "--frozen-text-from", runs.source)
    assert f"give --frozen-text-from or --init-from, not both (--frozen-text-from {runs.source}, --init-from" in line
    assert bahe_train(*runs.common(), "--arm", "dlrm", "--out", tmp_path / "dlrm", "--steps", "1") == 0
    line = refused(capsys, tmp_path / "c", *runs.common(), "--frozen-text-from", tmp_path / "dlrm")
    assert f"--frozen-text-from {tmp_path / 'dlrm' / 'checkpoints' / 'step-0000001'} is a run of --arm dlrm" in line
    line = refused(capsys, tmp_path / "d", *runs.common(), "--frozen-text-from", tmp_path / "nowhere")
    assert f"--frozen-text-from {tmp_path / 'nowhere'} does not exist" in line
    trained = tmp_path / "trained"  # a run whose text arch trained, resumed with the flag
    shutil.copytree(runs.source, trained)
    with single_process(), pytest.raises(frozen_text.FrozenTextError, match="applies from step 0"):
        start(*runs.common(), "--out", trained, "--steps", "6", "--frozen-text-from", runs.source)


def test_a_resume_keeps_the_text_arch_frozen_without_the_flag(runs, tmp_path):
    resumed = tmp_path / "down"
    shutil.copytree(runs.downstream, resumed)
    with single_process():
        started, _ = start(*runs.common(), "--out", resumed, "--steps", "5")
        assert started.start == 3 and frozen_text.is_frozen(started.dmp.module.model)
    assert json.loads((resumed / RECORD).read_text())["frozen_text_from"]["run"] == str(runs.source)


@pytest.mark.integration
def test_two_ranks_train_the_downstream_model_with_the_sources_text_arch(runs, tmp_path):
    out = tmp_path / "down2"
    torchrun("-m", "bahe.launchers.train", *map(str, runs.common()), "--batch-size", "8", "--out", out,
             "--steps", "2", "--frozen-text-from", runs.source, timeout=300)
    source = tensors(runs.best, tmp_path / "source.pt")
    after = tensors(out / "checkpoints" / "step-0000002", tmp_path / "after.pt")
    assert [key for key in frozen_text.text_arch_keys(source) if not torch.equal(after[key], source[key])] == []
    assert all(not torch.equal(after[key], source[key]) for key in source if "over_arch." in key)
    assert json.loads((out / "metrics.json").read_text())["world_size"] == 2


def test_the_downstream_bench_summary_and_table_against_hand_worked_numbers():
    """bench.downstream_bench: per-arm means of test and valid AUC, AUC_d - DLRM-only per seed with its
    mean, min and max, and the table's rows."""
    from bench.downstream_bench import summarise, table

    def arm(test, valid):
        return {"test": {"auc": test}, "valid": {"auc": valid}}

    per_seed = [{"seed": 0, "bahe": arm(0.76, 0.74), "dlrm": arm(0.75, 0.73), "downstream": arm(0.755, 0.735)},
                {"seed": 1, "bahe": arm(0.77, 0.75), "dlrm": arm(0.74, 0.72), "downstream": arm(0.76, 0.73)}]
    summary = summarise(per_seed)
    gap = summary["downstream_minus_dlrm"]
    assert gap["test"]["mean"] == pytest.approx(0.0125) and gap["test"]["values"] == pytest.approx([0.005, 0.02])
    assert (gap["test"]["min"], gap["test"]["max"]) == pytest.approx((0.005, 0.02))
    assert gap["valid"]["mean"] == pytest.approx(0.0075) and summary["bahe_minus_dlrm"]["test"]["mean"] == pytest.approx(0.02)
    assert summary["downstream"]["test"]["mean"] == pytest.approx(0.7575)
    text = table(per_seed, summary, 600)
    assert "| 1 | 0.7700 (0.7500) | 0.7400 (0.7200) | 0.7600 (0.7300) | +0.0200 (+0.0100) | +0.0300 |" in text
    assert "| mean | 0.7650 (0.7450) | 0.7450 (0.7250) | 0.7575 (0.7325) | +0.0125 (+0.0075) | +0.0200 |" in text
    assert "AUC_d - DLRM-only on test: +0.0125 (min +0.0050, max +0.0200 over seeds)" in text


def test_the_downstream_bench_reuses_a_finished_run(tmp_path):
    """A run folder holding metrics.json is read back; nothing is started (there is no data to train on)."""
    from bench.downstream_bench import train_downstream

    run = tmp_path / "downstream-seed0-steps3"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"test": {"auc": 0.6}, "valid": {"auc": 0.61}}))
    before = sorted(p.name for p in run.iterdir())
    result = train_downstream(0, 3, tmp_path / "no-data", tmp_path / "no-store", tmp_path / "no-source", run, {})
    assert result == {"test": {"auc": 0.6}, "valid": {"auc": 0.61}} and sorted(p.name for p in run.iterdir()) == before


def test_bahe_evaluate_refuses_training_only_start_flags(tmp_path, capsys):
    """bahe-evaluate inherits bahe-train's parser: the flags that START a training run are refused, naming them."""
    from bahe.launchers.evaluate import main

    for flag in (["--frozen-text-from", str(tmp_path)], ["--init-from", str(tmp_path)]):
        with pytest.raises(SystemExit) as stop:
            main(["--checkpoint", str(tmp_path), "--data-dir", str(tmp_path), *flag])
        assert stop.value.code == 2
        assert "--frozen-text-from start a training run" in capsys.readouterr().err
