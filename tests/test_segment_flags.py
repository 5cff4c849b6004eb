"""The segment metric flags (launchers/segment_flags.py): ONE definition that bahe-train, bahe-evaluate and
bahe-predict share, and a bad value stops each with one line naming the flag, before anything is written.
(The values reaching the reports: tests/test_segment_reports.py.)"""

from __future__ import annotations

import importlib

import pytest

from bahe.launchers.segment_flags import segment_spec

PROGRAMS = {"bahe-train": ("bahe.launchers.train", ["--data-dir", "{tmp}/data", "--out", "{tmp}/run", "--arm", "dlrm"]),
            "bahe-evaluate": ("bahe.launchers.evaluate", ["--checkpoint", "{tmp}/run", "--out", "{tmp}/eval"]),
            "bahe-predict": ("bahe.launchers.predict", ["--run-dir", "{tmp}/run", "--data", "{tmp}/d.parquet",
                                                        "--out", "{tmp}/scores.parquet"])}
FLAGS = ("--segment-thresholds", "--history-thresholds", "--bootstrap", "--confidence", "--segment-seed")


def parser(program: str):
    return importlib.import_module(PROGRAMS[program][0]).build_parser()


def test_the_three_programs_share_one_definition_of_the_flags():
    def actions(program):
        return {a.option_strings[0]: (a.dest, a.default, a.nargs, a.type, a.help)
                for a in parser(program)._actions if a.option_strings and a.option_strings[0] in FLAGS}

    assert set(actions("bahe-train")) == set(FLAGS)
    assert actions("bahe-train") == actions("bahe-evaluate") == actions("bahe-predict")


def test_the_flags_give_the_spec():
    args = parser("bahe-predict").parse_args(["--run-dir", "r", "--data", "d", "--out", "o", "--segment-thresholds",
                                              "0", "5", "--history-thresholds", "2", "--bootstrap", "0",
                                              "--confidence", "0.8", "--segment-seed", "3"])
    assert segment_spec(args).record() == {"item_thresholds": [0, 5], "history_thresholds": [2], "bootstrap": 0,
                                           "confidence": 0.8, "seed": 3}
    defaults = parser("bahe-train").parse_args(["--out", "o"])
    from bahe.training.segments import DEFAULT_SPEC

    assert segment_spec(defaults) == DEFAULT_SPEC


@pytest.mark.parametrize("program", PROGRAMS)
@pytest.mark.parametrize(("flags", "named"), [
    (["--segment-thresholds", "20", "0"], "--segment-thresholds"),
    (["--segment-thresholds", "-1", "5"], "--segment-thresholds"),
    (["--history-thresholds", "5", "5"], "--history-thresholds"),
    (["--bootstrap", "-1"], "--bootstrap"),
    (["--confidence", "1.5"], "--confidence"),
], ids=["thresholds-descending", "thresholds-negative", "history-repeated", "bootstrap-negative", "confidence-above-1"])
def test_a_bad_value_stops_with_one_line_naming_the_flag(program, flags, named, tmp_path, capsys):
    module, argv = PROGRAMS[program]
    code = importlib.import_module(module).main([a.format(tmp=tmp_path) for a in argv] + flags)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"{program}: error: ") and named in err and "\n" not in err, err
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("component", ["train", "evaluate", "predict"])
def test_the_torchx_components_pass_the_flags_through_to_the_program(component):
    """The components add nothing for the segment flags: after ``--`` they reach the program as given
    (the torchrun command of the AppDef parsed by torchrun's parser, then the program's)."""
    from bahe.launchers.profiles import get_profile, render
    from tests.test_doc_commands import check_appdef

    args = {"train": ["--data_dir", "d", "--out", "o", "--store", "s"], "evaluate": ["--checkpoint", "r"],
            "predict": ["--run", "r", "--data", "a.parquet", "--out", "s.parquet"]}[component]
    app, _ = render(get_profile("local"), component, [*args, "--", "--segment-thresholds", "0", "5", "--bootstrap",
                                                      "10", "--segment-seed", "4"])
    [parsed] = check_appdef(app, component)
    assert segment_spec(parsed).record() == {"item_thresholds": [0, 5], "history_thresholds": [0, 5, 20, 100],
                                             "bootstrap": 10, "confidence": 0.9, "seed": 4}
