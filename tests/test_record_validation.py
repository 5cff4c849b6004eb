"""Issue 27: a run's records are validated by one layer each, used by every reader, before anything is built.

* ``run_config.json`` (training/record_checks.py ``check_record``): absurd, negative or non-integer dims (table
  rows 10**12, a negative embedding dim, a layer size given as a string) are refused in one line naming the
  file, the field and the bound by bahe-predict, bahe-export, bahe-evaluate and bahe-train --init-from
  (before this change: the sharding planner's or the allocator's traceback, or a message naming no file).
* ``checkpoints/BEST.json`` (training/selection.py ``read_best``): a step that is not an integer is refused in
  one line naming the file and the field by the same four (before: ``Unknown format code 'd'``, no file)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.test_export import export
from tests.test_predict import process_group, train
from tests.test_predict import setup as setup  # noqa: F401 -- the module's trained run (BEST: step 3, latest: 6)

BOUND = "expected an integer in [1, 17,179,869,184]"


def copy_run(run: Path, target: Path, *, record=None, best=None) -> Path:
    """A copy of ``run`` with its run_config.json changed by ``record(dict)`` and its BEST.json by ``best(dict)``."""
    shutil.copytree(run, target)
    for path, change in ((target / "run_config.json", record), (target / "checkpoints" / "BEST.json", best)):
        if change is not None:
            body = json.loads(path.read_text())
            change(body)
            path.write_text(json.dumps(body))
    return target


def one_line(code: int, capsys, prefix: str, err: str | None = None) -> str:
    err = capsys.readouterr().err if err is None else err
    lines = [line for line in err.splitlines() if line.startswith(f"{prefix}: error: ")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def entry_point(name: str, setup, run: Path, tmp_path: Path, capsys) -> str:  # noqa: F811
    """Run one reader of the run's records on ``run``: it must exit 2 with one line (returned) and write nothing."""
    pipeline, data, _, _ = setup
    out = tmp_path / f"out-{name}"
    if name == "bahe-predict":
        from bahe.launchers.predict import main

        out.mkdir()
        with process_group():
            code = main(["--quiet", "--run", str(run), "--data", str(data / "test.parquet"), "--data-dir", str(data),
                         "--out", str(out / "scores.parquet")])
        line = one_line(code, capsys, name)
        assert list(out.iterdir()) == []
        return line
    if name == "bahe-export":
        result = export(run, data, out, [data / "test.parquet"], capsys=capsys)
        line = one_line(result["code"], capsys, name, result["err"])
        assert not (out / "LATEST").exists()
        return line
    if name == "bahe-evaluate":
        from bahe.launchers.evaluate import main

        with process_group():
            code = main(["--checkpoint", str(run), "--data-dir", str(data), "--out", str(out)])
        line = one_line(code, capsys, name)
        assert not (out / "evaluation.json").exists()
        return line
    assert name == "bahe-train --init-from"
    from bahe.launchers.train import main

    with process_group():
        code = main(["--init-from", str(run), "--data-dir", str(data), "--store", str(pipeline.store), "--llm",
                     str(pipeline.llm), "--out", str(out), "--steps", "2"])
    line = one_line(code, capsys, "bahe-train")
    assert not (out / "checkpoints").exists() and not (out / "run_config.json").exists()
    return line


READERS = ["bahe-predict", "bahe-export", "bahe-evaluate", "bahe-train --init-from"]


@pytest.mark.parametrize("reader", READERS)
def test_absurd_table_rows_in_run_config_are_refused_by_every_reader_before_building(setup, tmp_path, capsys,  # noqa: F811
                                                                                     reader):
    _, _, run, _ = setup
    bad = copy_run(run, tmp_path / "run", record=lambda r: r["model"].update({"--table-rows": 10**12}))
    line = entry_point(reader, setup, bad, tmp_path, capsys)
    assert f"{bad / 'run_config.json'}: model.--table-rows is 1000000000000, {BOUND}" in line


@pytest.mark.parametrize("field, value, expect", [
    ("--embedding-dim", -8, "model.--embedding-dim is -8, expected an integer in [1, 16,384]"),
    ("--dense-arch", ["16", 8], "model.--dense-arch[0] is '16', expected an integer in [1, 16,384]"),
    ("--over-arch", [16, 2.5, 1], "model.--over-arch[1] is 2.5, expected an integer in [1, 16,384]"),
    ("--table-rows-for", ["item_id=1000000000000"], "model.--table-rows-for[0] is 'item_id=1000000000000', expected "
                                                     "FEATURE=ROWS with ROWS an integer in [1, 17,179,869,184]"),
    ("--max-behaviours", True, "model.--max-behaviours is True, expected an integer in [1, 65,536] or null"),
    ("--pooling", "median", "model.--pooling is 'median', expected one of ['last', 'mean'] or null"),
])
def test_negative_or_non_integer_dims_in_run_config_are_one_line_naming_file_and_field(setup, tmp_path, capsys,  # noqa: F811
                                                                                      field, value, expect):
    _, _, run, _ = setup
    bad = copy_run(run, tmp_path / "run", record=lambda r: r["model"].update({field: value}))
    line = entry_point("bahe-predict", setup, bad, tmp_path, capsys)
    assert f"{bad / 'run_config.json'}: {expect}" in line


@pytest.mark.parametrize("section, change, expect", [
    ("defaults", lambda r: r["defaults"].update({"--batch-size": 0}), "defaults.--batch-size is 0"),
    ("dense_statistics", lambda r: r["dense_statistics"].update(std=[0.0] * len(r["dense_statistics"]["std"])),
     "dense_statistics.std[0] is 0.0, expected a finite number > 0"),
    ("store", lambda r: r["store"].update(rows="many"), "store.rows is 'many', expected an integer in [0, "),
    ("stream", lambda r: r.update(stream={"--data-lanes": -1}), "stream.--data-lanes is -1"),
])
def test_other_sections_of_run_config_are_validated_too(setup, tmp_path, capsys, section, change, expect):  # noqa: F811
    _, _, run, _ = setup
    bad = copy_run(run, tmp_path / "run", record=change)
    line = entry_point("bahe-export", setup, bad, tmp_path, capsys)
    assert f"{bad / 'run_config.json'}: {expect}" in line


@pytest.mark.parametrize("reader, step", [(reader, "3") for reader in READERS] +  # each reader; each bad value once
                         [("bahe-predict", step) for step in (3.5, -1, True)])
def test_a_best_json_whose_step_is_not_an_integer_is_one_line_naming_the_file(setup, tmp_path, capsys, reader,  # noqa: F811
                                                                              step):
    _, _, run, _ = setup
    bad = copy_run(run, tmp_path / "run", best=lambda b: b.update(step=step))
    line = entry_point(reader, setup, bad, tmp_path, capsys)
    best = bad / "checkpoints" / "BEST.json"
    assert f"{best}: step is {step!r}, expected a step number (an integer >= 0" in line
    assert "Unknown format code" not in line


def test_a_resume_with_a_damaged_best_json_is_one_line_and_the_run_untouched(setup, tmp_path, capsys):  # noqa: F811
    """bahe-train resuming the run (same --out): Selection.load reads BEST.json through the same layer."""
    pipeline, data, run, _ = setup
    bad = copy_run(run, tmp_path / "run", best=lambda b: b.update(value="high"))
    before = sorted(p.name for p in (bad / "checkpoints").iterdir())
    from bahe.launchers.train import main

    with process_group():
        code = main(["--data-dir", str(data), "--store", str(pipeline.store), "--llm", str(pipeline.llm),
                     "--out", str(bad), "--steps", "9", "--eval-every", "3", "--batch-size", "16", "--embedding-dim",
                     "8", "--dense-arch", "16", "8", "--over-arch", "16", "1", "--table-rows", "64",
                     "--max-behaviours", "6", "--warmup-steps", "1", "--no-shuffle"])
    line = one_line(code, capsys, "bahe-train")
    assert f"{bad / 'checkpoints' / 'BEST.json'}: value is 'high', expected a finite number" in line
    assert sorted(p.name for p in (bad / "checkpoints").iterdir()) == before


def test_the_records_of_a_real_run_pass(setup):  # noqa: F811
    """The validation accepts what bahe-train writes, and a DLRM-only run's record (text flags null)."""
    from bahe.training.run_record import read_record
    from bahe.training.selection import read_best

    pipeline, data, run, root = setup
    assert read_record(run)["model"]["--table-rows"] == 64
    assert isinstance(read_best(run / "checkpoints")["step"], int)
    dlrm = train(root / "dlrm-record", data, pipeline, "--steps", "1", "--arm", "dlrm")
    assert read_record(dlrm)["model"]["--k"] is None


@pytest.mark.parametrize("reader, expect", [
    ("bahe-predict", "do not fit the devices of this launch (torchrec's planner: "),
    ("bahe-export", "of available memory; export it on a machine with more memory"),
])
def test_tables_within_the_bound_but_too_large_for_the_launch_are_one_line(setup, tmp_path, capsys, reader,  # noqa: F811
                                                                          expect):
    """2**33 rows per table (1 TiB of fp32 tables): inside the record's bound, beyond the planner's devices
    (bahe-predict) or this machine's memory (bahe-export's unsharded restore). Before this change: torchrec's
    PlannerError report, or the allocator's RuntimeError (or, under overcommit, the OOM killer)."""
    _, _, run, _ = setup
    bad = copy_run(run, tmp_path / "run", record=lambda r: r["model"].update({"--table-rows": 2**33}))
    line = entry_point(reader, setup, bad, tmp_path, capsys)
    assert f"{bad / 'run_config.json'}: the model's ID tables (" in line and "8,589,934,592 rows" in line
    assert expect in line


def test_bahe_train_refuses_the_sizes_every_record_reader_refuses(capsys):
    """One set of bounds (model/config.py) for the model configs bahe-train builds and for the record readers:
    a size bahe-train accepts always reads back, and one beyond the bound is refused before a record is written."""
    from bahe.launchers import train as bahe_train
    from bahe.model import config
    from bahe.training import record_checks

    for name in ("MAX_TABLE_ROWS", "MAX_WIDTH", "MAX_LAYERS", "MAX_LLM_LAYERS", "MAX_BEHAVIOURS", "MAX_USER_TOKENS"):
        assert getattr(record_checks, name) == getattr(config, name), name
    with pytest.raises(ValueError, match=r"table sizes must be integers in \[1, 17,179,869,184\] \(--table-rows\)"):
        config.TablesConfig(default_rows=config.MAX_TABLE_ROWS + 1)
    with pytest.raises(ValueError, match=r"embedding_dim must be an integer in \[1, 16,384\]"):
        config.TablesConfig(embedding_dim=config.MAX_WIDTH + 1)
    with pytest.raises(ValueError, match="max_behaviours must be in"):
        config.TextConfig(store="s", max_behaviours=config.MAX_BEHAVIOURS + 1)
    code = bahe_train.main(["--data-dir", "missing", "--out", "missing", "--arm", "dlrm", "--table-rows", str(10**12)])
    line = one_line(code, capsys, "bahe-train")
    assert "(--table-rows)" in line and "1000000000000" in line
