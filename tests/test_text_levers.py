"""The text arch's two levers on the pooled state (issue 17, item 3; model/text_levers.py), both off by default.

Protected: the defaults are the shared projection of the mean-pooled states, bit for bit; ``per_type`` projects
each sequence type with its own weights; ``target_attention`` equals a hand-written DIN-style attention over
the real positions (an empty sequence gives zeros, padding never counts) with the item feature as query;
gradients reach every new part; bahe-train records both flags, a resume / --init-from / restore reads an
older record as the defaults and refuses a mismatch naming the flag; a target-attention run trains and scores
with the full model, and every per-user cache (bahe-export, bahe-predict --features, --frozen-text-from)
refuses it in one line naming the flag."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bahe.launchers import train
from bahe.model.bahe import BAHETrain
from bahe.model.batch import ITEM_TEXT_KEY
from bahe.model.behaviour_lookup import load_store_rows
from bahe.model.config import TextConfig
from bahe.model.factory import build_model
from bahe.model.text_levers import PerTypeProjection
from bahe.training.run_record import RECORD, RunConfigError, apply_record, check_resume, write_record
from tests.model_fixtures import make_tiny_pipeline, split_by_time

B = 24  # rows per test batch


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return make_tiny_pipeline(tmp_path_factory.mktemp("levers"))


@pytest.fixture(scope="module")
def data(pipeline, tmp_path_factory) -> Path:
    return split_by_time(pipeline, tmp_path_factory.mktemp("levers-data"))


def built(pipeline, **text_options):
    torch.manual_seed(0)
    model, batcher, store = build_model(pipeline.config(**text_options), pipeline.schema)
    load_store_rows(model, store)
    return model, batcher


def inputs(text, batcher, pipeline):
    """(behaviour KJT, B x N x M x H vectors, B x N lengths, the item's looked-up (vectors, lengths))."""
    kjt = batcher(pipeline.table(B)).behaviour_features
    looked_up = text.lookup(kjt)
    vectors = torch.stack([looked_up[k][0] for k in text.sequence_keys], dim=1)
    lengths = torch.stack([looked_up[k][1] for k in text.sequence_keys], dim=1)
    return kjt, vectors, lengths, looked_up[ITEM_TEXT_KEY]


def test_the_defaults_are_the_shared_projection_of_the_mean_pooled_states(pipeline):
    model, batcher = built(pipeline)
    text = model.text_arch.eval()
    assert isinstance(text.user_projection, nn.Linear) and text.user_aggregation == "pooled"
    kjt, vectors, lengths, item = inputs(text, batcher, pipeline)
    n, width, hidden = vectors.shape[1], vectors.shape[2], vectors.shape[3]
    assert n >= 2 and ((lengths > 0) & (lengths < width)).any()  # padding to ignore in the mean
    with torch.no_grad():
        out = text(kjt)
        states = text.aggregator(vectors.flatten(0, 1), lengths.flatten(), pooled=False)  # (B*N) x M x H
        real = (torch.arange(width) < lengths.flatten().unsqueeze(1)).float()
        mean = (states * real.unsqueeze(-1)).sum(1) / real.sum(1, keepdim=True).clamp(min=1.0)
        users = text.user_projection(text.user_norm(mean.view(-1, n, hidden)))
        items = text.item_projection(text.item_norm(text.aggregator(*item)))
    assert torch.equal(out[:, :n], users) and torch.equal(out[:, n], items)


def test_per_type_projects_each_sequence_type_with_its_own_weights(pipeline):
    model, batcher = built(pipeline, user_projection="per_type")
    text = model.text_arch.eval()
    kjt, vectors, lengths, _ = inputs(text, batcher, pipeline)
    n, dim = vectors.shape[1], 8
    projection = text.user_projection
    assert isinstance(projection, PerTypeProjection)
    assert projection.weight.shape == (n, dim, text.aggregator.hidden_size) and projection.bias.shape == (n, dim)
    assert not torch.equal(projection.weight[0], projection.weight[1])  # initialised independently
    with torch.no_grad():
        out = text(kjt)[:, :n]
        normed = text.user_norm(text.aggregator(vectors.flatten(0, 1), lengths.flatten()).view(B, n, -1))
        for t in range(n):
            torch.testing.assert_close(out[:, t], F.linear(normed[:, t], projection.weight[t], projection.bias[t]))
        projection.weight[0] += 1.0  # type 0's weights move type 0's feature only
        moved = text(kjt)[:, :n]
    assert not torch.allclose(moved[:, 0], out[:, 0]) and torch.equal(moved[:, 1:], out[:, 1:])


def reference_attention(text, vectors, lengths, item) -> torch.Tensor:
    """By hand, per user and type: softmax over the real positions of (proj(norm(h_m)) . q) / sqrt(D), then the
    weighted sum of proj(norm(h_m)); zeros for an empty sequence."""
    n, width = vectors.shape[1], vectors.shape[2]
    states = text.aggregator(vectors.flatten(0, 1), lengths.flatten(), pooled=False).view(-1, n, width, vectors.shape[3])
    projection = text.user_projection
    out = torch.zeros(vectors.shape[0], n, item.shape[1])
    for b in range(vectors.shape[0]):
        for t in range(n):
            real = int(lengths[b, t])
            if real == 0:
                continue
            weight, bias = (projection.weight, projection.bias) if isinstance(projection, nn.Linear) else \
                (projection.weight[t], projection.bias[t])
            keys = F.linear(text.user_norm(states[b, t, :real]), weight, bias)  # real x D
            attention = torch.softmax(keys @ item[b] / math.sqrt(item.shape[1]), dim=0)
            out[b, t] = attention @ keys
    return out


@pytest.mark.parametrize("projection", ["shared", "per_type"])
def test_target_attention_is_din_attention_over_the_real_positions_with_the_item_as_query(pipeline, projection):
    model, batcher = built(pipeline, user_projection=projection, user_aggregation="target_attention")
    text = model.text_arch.eval()
    kjt, vectors, lengths, item_inputs = inputs(text, batcher, pipeline)
    n = vectors.shape[1]
    with torch.no_grad():
        full = text(kjt)
        item = text.item_text_features(*item_inputs)
        assert torch.equal(full[:, n], item)  # the item side is unchanged
        assert torch.equal(full[:, :n], text.user_text_features(vectors, lengths, item))
        lengths = lengths.clone()
        lengths[0, 0], lengths[1, :] = 0, 1  # an empty sequence; one behaviour each
        out = text.user_text_features(vectors, lengths, item)
        torch.testing.assert_close(out, reference_attention(text, vectors, lengths, item))
        assert torch.equal(out[0, 0], torch.zeros(8)) and out[0, 1].abs().sum() > 0
        # one behaviour: its weight is 1, the feature is that position's projected state
        torch.testing.assert_close(out[1], reference_attention(text, vectors[1:2, :, :1], lengths[1:2], item[1:2])[0])
    with pytest.raises(ValueError, match="--user-aggregation target_attention"):
        text.user_text_features(vectors, lengths)  # a per-user call (serving) has no item: refused


@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_target_attention_ignores_padding_positions(pipeline, attention):
    model, batcher = built(pipeline, user_aggregation="target_attention", attention=attention)
    text = model.text_arch.eval()
    _, vectors, lengths, item_inputs = inputs(text, batcher, pipeline)
    lengths = lengths.clone()
    lengths[0, 0] = 0
    width = vectors.shape[2]
    padding = torch.arange(width) >= lengths.unsqueeze(-1)  # B x N x M
    assert padding[0, 0].all() and padding.sum() > 2 * B
    noisy = torch.where(padding.unsqueeze(-1), torch.randn_like(vectors) * 10, vectors)
    with torch.no_grad():
        item = text.item_text_features(*item_inputs)
        out = text.user_text_features(vectors, lengths, item)
        assert torch.equal(text.user_text_features(noisy, lengths, item), out)
        real = (~padding).nonzero()[0].tolist()  # a real position's vector does count
        moved = vectors.clone()
        moved[tuple(real)] += 1.0
        assert not torch.allclose(text.user_text_features(moved, lengths, item)[real[0], real[1]], out[real[0], real[1]])


def test_gradients_reach_every_part_of_the_new_paths(pipeline):
    model, batcher = built(pipeline, user_projection="per_type", user_aggregation="target_attention")
    loss, _ = BAHETrain(model)(batcher(pipeline.table(B)))
    loss.backward()
    text = model.text_arch
    grad = text.user_projection.weight.grad
    assert grad is not None and all(grad[t].abs().sum() > 0 for t in range(grad.shape[0]))
    assert all(text.user_projection.bias.grad[t].abs().sum() > 0 for t in range(grad.shape[0]))
    for part in (text.user_norm.weight, text.aggregator.decoder.layers[0].mlp.up_proj.weight):
        assert part.grad is not None and part.grad.abs().sum() > 0
    text.zero_grad()  # the query's path: the user features alone reach the item side's weights
    kjt = batcher(pipeline.table(B)).behaviour_features
    text(kjt)[:, :len(text.sequence_keys)].sum().backward()
    assert text.item_projection.weight.grad.abs().sum() > 0 and text.item_norm.weight.grad.abs().sum() > 0


def test_config_refuses_unknown_values_and_other_arms():
    with pytest.raises(ValueError, match=r"user_projection must be one of \('shared', 'per_type'\) \(--user-projection"):
        TextConfig(store="s", user_projection="typed")
    with pytest.raises(ValueError, match="user_aggregation must be one of .* got 'attention'"):
        TextConfig(store="s", user_aggregation="attention")
    with pytest.raises(ValueError, match="--user-aggregation target_attention: options of the BAHE text arch only "
                                         r"\(--arm bahe\), not --arm token_level"):
        TextConfig(store="s", arm="token_level", user_aggregation="target_attention")


def _config(data: Path, out: Path, *flags: str):
    args = train.build_parser().parse_args(["--data-dir", str(data), "--out", str(out), "--store",
                                            str(out.parent / "store"), "--llm", str(out.parent / "llm"), *flags])
    return train.config_from_args(args)


def test_the_run_record_holds_both_flags_and_an_older_record_reads_as_the_defaults(data, tmp_path):
    from bahe.serving.restore import run_model_config
    from bahe.training.init_from import InitFromError, InitSource, check_model

    out = tmp_path / "run"
    write_record(out, _config(data, out, "--user-projection", "per_type", "--user-aggregation", "target_attention"))
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "LATEST").write_text("step-0000004\n")
    record = json.loads((out / RECORD).read_text())
    assert (record["model"]["--user-projection"], record["model"]["--user-aggregation"]) == ("per_type", "target_attention")
    with pytest.raises(RunConfigError, match="--user-projection: run has 'per_type', now 'shared'; --user-aggregation: "
                                             "run has 'target_attention', now 'pooled'"):
        check_resume(_config(data, out))
    check_resume(_config(data, out, "--user-projection", "per_type", "--user-aggregation", "target_attention"))
    with pytest.raises(InitFromError, match="--user-aggregation: run has 'target_attention', now 'pooled'"):
        check_model(InitSource(out, out / "checkpoints" / "step-0000004", 4, record), _config(data, tmp_path / "warm"))
    argv = ["--data-dir", "d", "--out", str(tmp_path / "x")]  # bahe-evaluate / --init-from: flags left out -> the run's
    args = train.build_parser().parse_args(argv)
    apply_record(args, argv, out)
    assert (args.user_projection, args.user_aggregation) == ("per_type", "target_attention")
    text = run_model_config(out, store=None, llm=None, llm_precision="fp32")[0].text  # bahe-predict / bahe-export
    assert (text.user_projection, text.user_aggregation) == ("per_type", "target_attention")
    # a record written before the flags existed: the defaults, and a mismatch named as such
    for flag in ("--user-projection", "--user-aggregation"):
        del record["model"][flag]
    (out / RECORD).write_text(json.dumps(record))
    check_resume(_config(data, out))
    with pytest.raises(RunConfigError, match="--user-projection: run has 'shared', now 'per_type'"):
        check_resume(_config(data, out, "--user-projection", "per_type"))
    args = train.build_parser().parse_args(argv)
    apply_record(args, argv, out)
    assert (args.user_projection, args.user_aggregation) == ("shared", "pooled")
    text = run_model_config(out, store=None, llm=None, llm_precision="fp32")[0].text
    assert (text.user_projection, text.user_aggregation) == ("shared", "pooled")


def test_a_dlrm_run_compares_equal_with_and_without_the_flags_recorded(data, tmp_path):
    out = tmp_path / "dlrm"
    write_record(out, _config(data, out, "--arm", "dlrm"))
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "LATEST").write_text("step-0000004\n")
    record = json.loads((out / RECORD).read_text())
    assert record["model"]["--user-projection"] is None  # the DLRM arm ignores text flags
    for flag in ("--user-projection", "--user-aggregation"):
        del record["model"][flag]
    (out / RECORD).write_text(json.dumps(record))
    check_resume(_config(data, out, "--arm", "dlrm"))


MODEL = ["--batch-size", "16", "--embedding-dim", "8", "--dense-arch", "16", "8", "--over-arch", "16", "1",
         "--table-rows", "64", "--max-behaviours", "6", "--log-every", "2"]


@pytest.mark.integration
def test_a_target_attention_run_trains_and_scores_and_every_per_user_cache_refuses_it(pipeline, data, tmp_path, capsys):
    """bahe-train (TorchRec's pipeline traces the new path) and bahe-predict with the full model work;
    bahe-export, bahe-predict --features and --frozen-text-from refuse in one line naming the flag."""
    from bahe.launchers import export
    from tests.test_init_from import bahe_train, refused
    from tests.test_predict import predict, process_group

    run = tmp_path / "run"
    common = ["--data-dir", data, "--store", pipeline.store, "--llm", pipeline.llm, *MODEL]
    assert bahe_train(*common, "--out", run, "--steps", "2", "--eval-batches", "1", "--user-projection", "per_type",
                      "--user-aggregation", "target_attention") == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 < metrics["test"]["auc"] < 1
    capsys.readouterr()
    meta = predict(run, [data / "test.parquet"], tmp_path / "scores.parquet", data_dir=data)
    scores = pq.read_table(tmp_path / "scores.parquet")
    assert scores.num_rows == pq.read_metadata(data / "test.parquet").num_rows and meta["text_features"] == {"from": "model"}
    assert all(math.isfinite(x) for x in scores["logit"].to_pylist())
    named = "the run was trained with --user-aggregation target_attention, so its user text features depend on the item"

    assert export.main(["--run", str(run), "--data", str(data / "test.parquet"), "--out", str(tmp_path / "export"),
                        "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"bahe-export: error: {run}: {named}") and "\n" not in err, err
    assert not (tmp_path / "export").exists()

    from bahe.launchers.predict import main as bahe_predict

    with process_group():
        assert bahe_predict(["--quiet", "--run", str(run), "--data", str(data / "test.parquet"), "--out",
                             str(tmp_path / "cached.parquet"), "--features", str(tmp_path / "any-export")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"bahe-predict: error: --features {tmp_path / 'any-export'}: {run}: {named}") and "\n" not in err

    line = refused(capsys, tmp_path / "down", *common, "--frozen-text-from", run)
    assert f"--frozen-text-from {run / 'checkpoints'}" in line and named in line
    assert line.endswith("give a run trained with --user-aggregation pooled")


def test_the_quality_bench_sweeps_the_levers_on_the_bahe_arm_only(tmp_path, monkeypatch):
    """bench.quality_bench --user-projection / --user-aggregation: one cell per value, the BAHE arm trained with
    the non-default flags into its own folders (-pertype, -tattn); the DLRM arm's run shared by every cell; the
    default cell's command unchanged (no lever flag)."""
    import subprocess

    import bench.quality_bench as quality
    from bahe.training import baselines

    started, run = [], subprocess.run

    def trainer(cmd, **kwargs):
        if "bahe.launchers.train" not in cmd:  # bench.machine's own commands (git, lscpu, ...)
            return run(cmd, **kwargs)
        started.append(cmd)
        out = Path(cmd[cmd.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps({"test": {"auc": 0.6, "logloss": 0.7},
                                                      "valid": {"auc": 0.6 + 0.01 * len(started)}}))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(quality.subprocess, "run", trainer)
    monkeypatch.setattr(quality, "prepare", lambda work, *a, **k: (work / "data", work / "store"))
    monkeypatch.setattr(baselines, "non_learned_baseline", lambda data: {"test": 0.55, "chosen": "item rate"})
    assert quality.main(["--arms", "dlrm", "bahe", "--seeds", "0", "--steps", "3", "--work", str(tmp_path),
                         "--user-aggregation", "pooled", "target_attention", "--user-projection", "shared", "per_type",
                         "--out", str(tmp_path / "q.json")]) == 0
    runs = {Path(cmd[cmd.index("--out") + 1]).name: cmd for cmd in started}
    assert sorted(runs) == ["bahe-seed0-steps3", "bahe-seed0-steps3-pertype", "bahe-seed0-steps3-pertype-tattn",
                            "bahe-seed0-steps3-tattn", "dlrm-seed0-steps3"]

    def levers(cmd):
        return [cmd[i:i + 2] for i, part in enumerate(cmd) if part in ("--user-projection", "--user-aggregation")]

    assert levers(runs["bahe-seed0-steps3"]) == [] and levers(runs["dlrm-seed0-steps3"]) == []
    assert levers(runs["bahe-seed0-steps3-tattn"]) == [["--user-aggregation", "target_attention"]]
    assert levers(runs["bahe-seed0-steps3-pertype-tattn"]) == [["--user-projection", "per_type"],
                                                               ["--user-aggregation", "target_attention"]]
    report = json.loads((tmp_path / "q.json").read_text())
    assert [(c["user_projection"], c["user_aggregation"]) for c in report["cells"]] == [
        ("shared", "pooled"), ("shared", "target_attention"), ("per_type", "pooled"), ("per_type", "target_attention")]
    table = (tmp_path / "q.md").read_text()
    assert "| user projection | user aggregation |" in table and "| per_type | target_attention |" in table
