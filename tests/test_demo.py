"""launchers/demo.py (`make demo`): every preset's trainer flags are flags `bahe-train` accepts and mean the
preset's values; the demo's own main renders its encode and train jobs into commands the encoder's and
trainer's parsers accept with the preset's (or --steps') values; --help works; and (integration) a real
run with 2 training steps goes through all five steps and writes its report."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from bahe.embeddings import cli as encode_cli
from bahe.launchers import demo
from bahe.launchers.profiles import get_profile, render
from bahe.launchers.train import build_parser, config_from_args

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("keep_signal_handlers")  # tests/conftest.py


def check_preset_config(config, preset: dict, arm: str) -> None:
    """A TrainConfig holds the preset's values and the demo's fixed choices."""
    assert config.batch_size == preset["batch_size"]
    assert config.steps == preset["steps"]
    assert config.log_every == 25
    assert config.model.tables.embedding_dim == 32
    assert config.model.tables.default_rows == 2000
    assert config.model.tables.drop == ("user_id",)
    assert config.model.arch.dense_arch_layer_sizes == (64, 32)
    assert config.model.arch.over_arch_layer_sizes == (128, 32, 1)
    assert config.optim.dense_lr == 3e-3 and config.optim.llm_lr == 1e-3
    if arm == "dlrm":
        assert config.model.text is None
    else:
        assert config.model.text.arm == arm
        assert config.model.text.deep_layers == preset["deep_layers"]
        assert config.model.text.max_behaviours == preset["max_history"]


@pytest.mark.parametrize("arm", ["bahe", "token_level", "dlrm"])
@pytest.mark.parametrize("name", sorted(demo.PRESETS))
def test_trainer_flags_parse_to_the_presets_values(tmp_path, name, arm):
    """The quality bench trains every arm with trainer_flags(preset): bahe-train's parser must take them."""
    preset = demo.PRESETS[name]
    (tmp_path / "data").mkdir()
    for split in ("train", "valid", "test"):  # the trainer's config checks the splits exist, nothing more
        (tmp_path / "data" / f"{split}.parquet").touch()
    args = build_parser().parse_args(["--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
                                      "--arm", arm, "--store", str(tmp_path / "store"),
                                      "--steps", str(preset["steps"]), *demo.trainer_flags(preset)])
    check_preset_config(config_from_args(args), preset, arm)


def module_args(app) -> tuple[str, list[str]]:
    """(module, its arguments) of the torchrun command a rendered component runs."""
    words = shlex.split(app.roles[0].args[1])
    at = words.index("-m")
    return words[at + 1], words[at + 2:]


@pytest.mark.parametrize(("argv", "steps"), [([], 600), (["--steps", "7"], 7)])
def test_main_renders_jobs_the_encoder_and_trainer_accept(tmp_path, monkeypatch, capsys, argv, steps):
    """demo.main writes the data (and prints its summary), then launches encode and train: both, rendered
    through the local profile, are commands whose parsers give the preset's k, data, store and training
    values (--steps overrides only the steps). The jobs themselves are not run here (see the integration test)."""
    launched = []

    class Stop(Exception):
        pass

    def record(component, args, profile_name):
        launched.append((component, list(args), profile_name))
        if component == "train":
            raise Stop

    monkeypatch.setattr(demo, "_launch", record)
    out = tmp_path / "demo"
    with pytest.raises(Stop):
        demo.main(["--out", str(out), *argv])
    printed = capsys.readouterr().out
    preset = dict(demo.PRESETS["cpu"], steps=steps)
    data = [out / "data" / f"{split}.parquet" for split in ("train", "valid", "test")]
    assert all(p.is_file() for p in data)
    from bahe.ctr_data.summary import format_summary, summarize

    assert format_summary(summarize(data)) in printed
    assert [(c, p) for c, _, p in launched] == [("encode", "local"), ("train", "local")]

    module, encode_args = module_args(render(get_profile("local"), "encode", launched[0][1])[0])
    assert module == "bahe.embeddings.cli"
    parsed = encode_cli.build_parser().parse_args(encode_args)
    assert parsed.command == "build" and parsed.k == preset["k"] and parsed.quiet
    assert parsed.store == out / "store" and sorted(parsed.data) == sorted(data)

    module, train_args = module_args(render(get_profile("local"), "train", launched[1][1])[0])
    assert module == "bahe.launchers.train"
    config = config_from_args(build_parser().parse_args(train_args))
    check_preset_config(config, preset, "bahe")
    assert config.data_dir == out / "data" and config.out_dir == out / "bahe"
    assert config.model.text.store == str(out / "store")


def test_help_and_a_bad_preset():
    done = subprocess.run([sys.executable, "-m", "bahe.launchers.demo", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    for flag in ("--out", "--preset", "--profile", "--steps"):
        assert flag in done.stdout
    assert "[1/5]" not in done.stdout  # --help ran nothing
    with pytest.raises(SystemExit) as exc:
        demo.main(["--preset", "huge"])
    assert exc.value.code == 2


def test_an_earlier_demos_store_of_another_k_is_refused_before_any_work(tmp_path, monkeypatch):
    """A folder holding an earlier demo's store (encoded with another k, as before the cpu preset took k = 8)
    is refused in one line naming both k's, before the data step or any job, and its files stay as they were;
    a store of the preset's own k passes the check."""
    from tests.model_fixtures import K, make_tiny_pipeline

    out = tmp_path / "demo"
    make_tiny_pipeline(out, samples=60)  # out/store: a real store, encoded with k = K
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    launched = []
    monkeypatch.setattr(demo, "_launch", lambda *a: launched.append(a))
    monkeypatch.setitem(demo.PRESETS, "cpu", dict(demo.PRESETS["cpu"], k=K + 6))
    with pytest.raises(SystemExit) as exc:
        demo.main(["--out", str(out)])
    message = str(exc.value)
    assert f"k = {K}" in message and f"k = {K + 6}" in message and str(out / "store") in message
    assert launched == [] and not (out / "data").exists()
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    demo.refuse_an_earlier_store(out, dict(demo.PRESETS["cpu"], k=K))  # the same k: no refusal
