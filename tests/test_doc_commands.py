"""Every documented command line runs as written (issue 27, bug 4).

Two checks:

1. torchrun reads every ``--option`` of its command line, also those after ``-m MODULE``: an option of a
   program that runs under torchrun that is a prefix of one of torchrun's options is refused
   ("ambiguous option: --run could match --run-path, --run_path") or, worse, taken by torchrun. No option
   of such a program may be one (torchrun's own parser, from torch, says which options it has), except
   the single-process aliases a program declares (``SINGLE_PROCESS_ALIASES``): those must be refused by
   torchrun loudly and never appear in a documented torchrun command. The same for the TorchX
   components' arguments under ``torchx run`` and ``python -m bahe.launchers.submit``.
2. The command lines of README.md and docs/**/*.md (code blocks: ``bahe-*``, ``python -m bahe...``,
   ``torchrun ...``, ``torchx run ...``, ``make ...``; ``\\`` continuations and ``#`` comments handled)
   each parse with the program's own parser: a dry parse, no work done. A torchrun line is parsed by
   torchrun's parser, then its module's parser on the rest; a TorchX line (``torchx run``, ``submit``)
   builds its AppDef offline and its torchrun command is parsed the same way down to the program. Inline
   code spans naming a program are checked for unknown options. The cheap ones run: ``--help`` of every
   documented program, ``make -n`` of every documented target, and the documented multi-rank
   ``bahe-predict`` under the real torchrun.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]  # the guides and docs/bench/
_SCRIPTS_TOML = (ROOT / "pyproject.toml").read_text().split("[project.scripts]")[1].split("\n[")[0]
SCRIPTS = dict(re.findall(r'^([\w-]+)\s*=\s*"([\w.]+):\w+"', _SCRIPTS_TOML, flags=re.M))  # bahe-data -> module
# bahe-daily starts torchrun itself (one process per step) and is never started by it; bahe-data runs on one
# process. Every other program may run under torchrun (the TorchX components run them so).
NOT_UNDER_TORCHRUN = {"bahe.launchers.daily", "bahe.ctr_data.cli"}
SEPARATORS = {"&&", "||", ";", "|"}
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_-]{2,}$")  # COMPONENT, COMPONENT-ARGS: a usage synopsis


# ---------------------------------------------------------------------------------------------------------
# parsers
# ---------------------------------------------------------------------------------------------------------

def torchrun_parser() -> argparse.ArgumentParser:
    from torch.distributed.run import get_args_parser

    return get_args_parser()


def option_strings(parser: argparse.ArgumentParser) -> list[tuple[str, str]]:
    """(subcommand path, option string) of a parser and all its subparsers."""
    found = []

    def walk(p: argparse.ArgumentParser, path: str) -> None:
        for action in p._actions:
            found.extend((path, s) for s in action.option_strings)
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{path} {name}".strip())

    walk(parser, "")
    return found


def module_parser(module: str) -> argparse.ArgumentParser:
    return importlib.import_module(module).build_parser()


def parse(parser: argparse.ArgumentParser, argv: list[str], what: str) -> argparse.Namespace | None:
    """parser.parse_args(argv); an argparse error becomes an AssertionError with its message. None: --help."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return parser.parse_args(argv)
    except SystemExit as exit_:
        if exit_.code == 0:
            return None
        message = err.getvalue().strip().splitlines()[-1:] or ["(no message)"]
        raise AssertionError(f"{what}: {shlex.join(argv)}\n    -> {message[0]}") from None


def component_parsers() -> dict[str, argparse.ArgumentParser]:
    """The argument parser TorchX builds for each component (``torchx run launchers/components.py:NAME``)."""
    from torchx.specs.builders import _create_args_parser

    from bahe.launchers.profiles import COMPONENTS

    return {name: _create_args_parser(fn) for name, fn in COMPONENTS.items()}


def torchx_run_option_strings() -> list[str]:
    from torchx.cli.main import create_parser, get_sub_cmds

    top = create_parser(get_sub_cmds())
    run = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction)).choices["run"]
    return [s for p in (top, run) for a in p._actions for s in a.option_strings]


def under_torchrun() -> list[str]:
    """Modules run under torchrun: every console script's but NOT_UNDER_TORCHRUN, the components' modules and
    every module a documented torchrun line names."""
    from bahe.launchers import components

    modules = set(SCRIPTS.values()) - NOT_UNDER_TORCHRUN
    modules |= {getattr(components, n) for n in dir(components) if n.endswith("_MODULE")}
    for command in doc_commands():
        if command.argv[:1] == ["torchrun"] and "-m" in command.argv:
            modules.add(command.argv[command.argv.index("-m") + 1])
    return sorted(modules)


def prefix_clashes(ours: list[tuple[str, str]], theirs: list[str], allowed: tuple[str, ...] = ()) -> list[str]:
    clashes = []
    for path, s in ours:
        if s in ("-h", "--help") or s in allowed:  # -h/--help: equal, passed through (checked dynamically)
            continue
        hits = [t for t in theirs if t.startswith(s)] if s.startswith("--") else [t for t in theirs if t == s[:2]]
        if hits:
            clashes.append(f"{path + ' ' if path else ''}{s} -> {hits}")
    return clashes


# ---------------------------------------------------------------------------------------------------------
# the command lines of the docs
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Command:
    where: str  # FILE:LINE
    text: str  # as documented (continuations joined, the comment dropped)
    argv: list[str]
    inline: bool  # an inline code span of the prose (options are checked, no full parse)


def _split_commands(tokens: list[str]) -> list[list[str]]:
    parts, current = [], []
    for token in tokens:
        if token in SEPARATORS:
            parts.append(current)
            current = []
        else:
            current.append(token)
    return [p for p in [*parts, current] if p]


def _tokens(text: str) -> list[str]:
    try:
        lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split, lexer.commenters = True, "#"
        return list(lexer)
    except ValueError:  # an apostrophe in prose
        return re.sub(r"(&&|\|\||;|\|)", r" \1 ", text.split(" #")[0]).split()


def _is_program(argv: list[str]) -> bool:
    if not argv:
        return False
    head = argv[0]
    if head in SCRIPTS or head in ("torchrun", "make"):
        return True
    if head == "torchx":
        return argv[1:2] == ["run"]
    module = argv[2] if len(argv) > 2 and head in ("python", "python3") and argv[1] == "-m" else ""
    return bool(re.fullmatch(r"bahe(\.\w+)+", module))  # python -m bahe.x.y (not `python -m bahe...` in prose)


def _sources() -> list[tuple[str, str]]:
    """(name, markdown): README.md, docs/*.md and the --help text (module docstring) of every program."""
    sources = [(str(path.relative_to(ROOT)), path.read_text()) for path in DOCS]
    for module in sorted({*SCRIPTS.values(), "bahe.launchers.submit", "bahe.launchers.components"}):
        doc = (importlib.import_module(module).__doc__ or "").replace("``", "")
        doc = "\n".join(line if line[:1].isspace() else "" for line in doc.splitlines())  # examples are indented
        sources.append((f"{module} (its --help)", "```\n" + doc + "\n```\n"))
    return sources


def doc_commands() -> list[Command]:
    commands = []
    for name, source in _sources():
        lines = source.splitlines()
        in_block, i = False, 0
        while i < len(lines):
            line = lines[i]
            if line.lstrip().startswith("```"):
                in_block = not in_block
                i += 1
                continue
            start = i
            if in_block:
                text = line
                while text.rstrip().endswith("\\") and i + 1 < len(lines):  # continuation lines
                    i += 1
                    text = text.rstrip()[:-1] + " " + lines[i].strip()
                for argv in _split_commands(_tokens(text)):
                    if _is_program(argv):
                        commands.append(Command(f"{name}:{start}" if name.endswith("--help)") else f"{name}:{start + 1}",
                                                text.split(" #")[0].strip(),
                                                argv, inline=False))
            i += 1
        prose = re.sub(r"^```.*?^```", lambda m: "\n" * m.group(0).count("\n"), source, flags=re.S | re.M)
        for match in re.finditer(r"`([^`]+)`", prose):
            text = match.group(1).replace("\n", " ")
            if re.match(r"^[\w.-]+:\s", text):  # an error message (`bahe-data: error: ...`)
                continue
            for argv in _split_commands(_tokens(text)):
                if _is_program(argv):
                    commands.append(Command(f"{name}:{prose[:match.start()].count(chr(10)) + 1}",
                                            text, argv, inline=True))
    return commands


# ---------------------------------------------------------------------------------------------------------
# 1. option names under torchrun, torchx run and submit
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("module", under_torchrun())
def test_no_option_of_a_program_run_under_torchrun_is_a_prefix_of_a_torchrun_option(module):
    theirs = [s for a in torchrun_parser()._actions for s in a.option_strings]
    assert "--nproc_per_node" in theirs and "--run-path" in theirs  # torch's parser, not a copy
    ours = option_strings(module_parser(module))
    aliases = getattr(importlib.import_module(module), "SINGLE_PROCESS_ALIASES", ())
    assert prefix_clashes(ours, theirs, aliases) == [], (
        f"{module}: these options are prefixes of torchrun options: torchrun refuses them as ambiguous or takes "
        "them as its own when they follow -m MODULE; rename them")
    for path, s in ours:  # and torchrun hands each of them to the module, unchanged
        if s in aliases:
            continue
        argv = ["--nproc_per_node", "2", "-m", module, *path.split(), s, "x"]
        args = parse(torchrun_parser(), argv, "torchrun")
        assert args is not None and args.training_script_args == [*path.split(), s, "x"], (s, args)


@pytest.mark.parametrize("module", ["bahe.launchers.predict", "bahe.launchers.export"])
def test_a_single_process_alias_is_refused_by_torchrun_loudly_and_never_documented_under_it(module):
    """--run (the older name of --run-dir): kept for one process; torchrun refuses it (exit 2, ambiguous), so
    it is never taken silently. No documented torchrun command uses it."""
    aliases = importlib.import_module(module).SINGLE_PROCESS_ALIASES
    assert aliases == ("--run",)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_:
        torchrun_parser().parse_args(["--nproc_per_node", "2", "-m", module, "--run", "r", "--out", "o"])
    assert exit_.value.code == 2 and "ambiguous option: --run could match --run-path" in err.getvalue()
    assert parse(module_parser(module), ["--run", "r", "--data", "a.parquet", "--out", "o.parquet"], module).run \
        == Path("r")  # one process: still the run
    for command in doc_commands():
        if command.argv[:1] == ["torchrun"] and module in command.argv:
            assert not set(aliases) & set(command.argv), f"{command.where}: {command.text}"


def test_component_arguments_are_no_prefix_of_torchx_run_or_submit_options():
    from bahe.launchers.submit import build_parser as submit_parser

    torchx_options = torchx_run_option_strings()
    submit_options = [s for a in submit_parser()._actions for s in a.option_strings]
    for name, parser in component_parsers().items():
        ours = option_strings(parser)
        assert prefix_clashes(ours, torchx_options) == [], f"component {name} under torchx run"
        assert prefix_clashes(ours, submit_options) == [], f"component {name} under bahe.launchers.submit"


@pytest.mark.parametrize("profile", ["local", "gpu-node", "k8s", "slurm", "slurm-local"])
@pytest.mark.parametrize("component,args", [
    ("encode", ["--store", "s", "--data", "a.parquet,b.parquet", "--", "--pooling", "last"]),
    ("train", ["--data_dir", "d", "--out", "o", "--store", "s", "--", "--batch-size", "64"]),
    ("evaluate", ["--checkpoint", "r", "--data_dir", "d", "--store", "s"]),
    ("predict", ["--run", "r", "--data", "a.parquet,b.parquet", "--out", "s.parquet", "--data_dir", "d", "--",
                 "--batch-size", "256"]),
])
def test_every_component_builds_a_torchrun_command_its_program_parses(profile, component, args):
    """The AppDef's command goes through torchrun's parser and then the program's (the predict component
    built `--run r`, which torchrun refused)."""
    from bahe.launchers.profiles import get_profile, render

    app, _ = render(get_profile(profile), component, args)
    namespaces = check_appdef(app, f"{component} on {profile}")
    assert len(namespaces) == 1
    if component == "predict":
        assert namespaces[0].run == Path("r") and namespaces[0].batch_size == 256


# ---------------------------------------------------------------------------------------------------------
# 2. the documented command lines
# ---------------------------------------------------------------------------------------------------------

def _drop_optional_groups(argv: list[str]) -> tuple[list[str], list[str]]:
    """(argv without [..] groups, the options inside them)."""
    kept, optional, depth = [], [], 0
    for token in argv:
        opening, closing = token.count("["), token.count("]")
        bare = token.strip("[]")
        if depth or opening:
            if bare.startswith("-"):
                optional.append(bare)
        else:
            kept.append(token)
        depth += opening - closing
    return kept, optional


def _drop_placeholder_ellipses(argv: list[str]) -> list[str]:
    """`... ` standing for more flags (not in a value's place) is not an argument."""
    return [t for i, t in enumerate(argv) if not (t == "..." and (i == 0 or not argv[i - 1].startswith("-")))]


def check_module(module: str, argv: list[str], where: str, *, only_names: bool = False):
    """Dry-parse ``python -m module argv``; for submit, also the component and its torchrun command."""
    parser = module_parser(module)
    kept, optional = _drop_optional_groups(argv)
    known = {s for _, s in option_strings(parser)}
    unknown = [o.split("=")[0] for o in optional if o.split("=")[0] not in known and o != "--"]
    assert not unknown, f"{where}: {module} has no option {unknown}"
    if only_names or any(PLACEHOLDER.match(t) for t in kept):  # a synopsis: its option names must exist
        names = []
        for token in kept:
            if token == "--":
                break
            if token.startswith("--"):
                names.append(token.split("=")[0])
        unknown = [n for n in names if n not in known]
        assert not unknown, f"{where}: {module} has no option {unknown}"
        return None
    args = parse(parser, _drop_placeholder_ellipses(kept), f"{where}: {module}")
    if args is None:  # --help
        return None
    if module == "bahe.launchers.submit" and args.component and not args.list:
        from bahe.launchers.profiles import render
        from bahe.launchers.submit import _parse_cfg

        rest = args.component_args[1:] if args.component_args[:1] == ["--"] else args.component_args
        app = _build(lambda: render(_profile(args), args.component, rest, _parse_cfg(args.cfg))[0], where)
        check_appdef(app, where)
    if module == "bahe.launchers.daily" and args.command == "run" and args.train_flags:
        flags = args.train_flags[1:] if args.train_flags[:1] == ["--"] else args.train_flags
        parse(module_parser("bahe.launchers.train"), [*_drop_placeholder_ellipses(flags), "--out", "o"],
              f"{where}: the bahe-train flags of bahe-daily run")
    return args


def _build(make, where: str):
    """An AppDef from TorchX; its argument errors (argparse's exit, a ValueError) become an AssertionError."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return make()
    except SystemExit:
        raise AssertionError(f"{where}\n    -> {(err.getvalue().strip().splitlines() or ['?'])[-1]}") from None
    except ValueError as error:
        raise AssertionError(f"{where}\n    -> {error}") from None


def _profile(args: argparse.Namespace):
    from bahe.launchers.profiles import get_profile

    return get_profile(args.profile, args.profiles)


def check_torchrun(argv: list[str], where: str):
    args = parse(torchrun_parser(), argv, f"{where}: torchrun")
    if args is None or not args.module:  # a script (examples/...py): its own parser is not ours to load
        return None
    return check_module(args.training_script, args.training_script_args, where)


def check_appdef(app, where: str) -> list:
    """Each role's torchrun command (TorchX ``dist.ddp`` runs ``bash -c 'torchrun ...'``), parsed down."""
    namespaces = []
    for role in app.roles:
        command = role.args[-1] if role.entrypoint == "bash" else shlex.join([role.entrypoint, *role.args])
        argv = shlex.split(command)
        assert argv[0] == "torchrun", (where, command)
        namespaces.append(check_torchrun(argv[1:], f"{where} (role {role.name}: {command})"))
    return namespaces


def check_torchx_run(argv: list[str], where: str) -> None:
    from torchx.cli.argparse_util import ArgOnceAction, torchxconfig
    from torchx.cli.main import create_parser, get_sub_cmds
    from torchx.specs.builders import materialize_appdef

    torchxconfig.called_args.clear()  # torchx's "specified once" bookkeeping lives in class attributes
    ArgOnceAction.called_args.clear()
    args = parse(create_parser(get_sub_cmds()), argv[1:], f"{where}: torchx")
    if args is None:
        return
    name, *component_args = args.component_name_and_args
    file, _, function = name.rpartition(":")
    assert file.endswith("launchers/components.py"), f"{where}: not a component of this repository: {name}"
    if "--help" in component_args:
        return
    from bahe.launchers import components

    check_appdef(_build(lambda: materialize_appdef(getattr(components, function), component_args), where), where)


def check_make(argv: list[str], where: str, *, run: bool) -> None:
    targets = set(re.findall(r"^([\w.-]+):", (ROOT / "Makefile").read_text(), flags=re.M))
    wanted = [t for t in argv[1:] if not t.startswith("-")]
    assert set(wanted) <= targets, f"{where}: make has no target {sorted(set(wanted) - targets)}"
    if run:
        done = subprocess.run(["make", "-n", *wanted], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"{where}: make -n {' '.join(wanted)}: {done.stderr[-500:]}"


def check_command(command: Command) -> None:
    argv, where = command.argv, f"{command.where}: {command.text}"
    head = argv[0]
    if head == "make":
        check_make(argv, where, run=not command.inline)
    elif command.inline:
        _check_inline_names(argv, where)
    elif head in SCRIPTS:
        check_module(SCRIPTS[head], argv[1:], where)
    elif head in ("python", "python3"):
        check_module(argv[2], argv[3:], where)
    elif head == "torchrun":
        check_torchrun(argv[1:], where)
    elif head == "torchx":
        check_torchx_run(argv, where)


def _check_inline_names(argv: list[str], where: str) -> None:
    """An inline span (`bahe-train --init-from RUN [--init-optimizer]`): every option it names exists."""
    if argv[0] == "torchrun":
        theirs = {s for a in torchrun_parser()._actions for s in a.option_strings}
        own = argv[1:argv.index("-m")] if "-m" in argv else argv[1:]
        names = [t.strip("[]").split("=")[0] for t in own if t.strip("[]").startswith("--")]
        assert set(names) <= theirs, f"{where}: torchrun has no option {sorted(set(names) - theirs)}"
        if "-m" in argv and len(argv) > argv.index("-m") + 1:  # then the module's own options
            _check_inline_names(["python", "-m", *argv[argv.index("-m") + 1:]], where)
        return
    if argv[0] == "torchx":
        return
    module = SCRIPTS.get(argv[0]) or argv[2]
    rest = argv[1:] if argv[0] in SCRIPTS else argv[3:]
    parser = module_parser(module)
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    known = {s for a in parser._actions for s in a.option_strings}
    if subparsers and rest and rest[0] in subparsers[0].choices:
        known |= {s for a in subparsers[0].choices[rest[0]]._actions for s in a.option_strings}
        rest = rest[1:]
    names = []
    for token in rest:
        bare = token.strip("[]")
        if token == "--" or (module == "bahe.launchers.submit" and bare in ("encode", "train", "evaluate", "predict")):
            break  # what follows is another parser's
        if bare.startswith("--"):
            names.append(bare.split("=")[0])
    unknown = [n for n in names if n not in known]
    assert not unknown, f"{where}: {argv[0] if argv[0] in SCRIPTS else module} has no option {unknown}"


COMMANDS = doc_commands()


def test_the_docs_hold_the_command_lines_this_test_checks():
    where = {c.where.split(":")[0] for c in COMMANDS}
    assert {"README.md", "docs/launching.md", "docs/daily.md", "docs/migration.md", "docs/serving.md", "docs/training.md",
            "docs/data.md"} <= where
    texts = [c.text for c in COMMANDS if not c.inline]
    assert any(t.startswith("torchrun --nproc_per_node 2 -m bahe.launchers.predict") for t in texts)  # bug 4's
    assert any(t.startswith("torchx run") for t in texts) and any(t.startswith("make ") for t in texts)
    assert len([c for c in COMMANDS if not c.inline]) >= 25


@pytest.mark.parametrize("command", COMMANDS, ids=[f"{c.where}{'-inline' if c.inline else ''}" for c in COMMANDS])
def test_a_documented_command_parses(command):
    check_command(command)


def test_the_extraction_joins_continuations_drops_comments_and_splits_compound_lines(tmp_path):
    argv = _split_commands(_tokens("mkdir -p runs/slurm && cd runs/slurm   # jobs write here"))
    assert argv == [["mkdir", "-p", "runs/slurm"], ["cd", "runs/slurm"]]
    readme = next(c for c in COMMANDS if c.text.startswith("torchrun --nproc_per_node 2 -m bahe.launchers.predict"))
    assert "--out" in readme.argv and "or:" not in readme.argv and "\\" not in readme.argv
    assert _drop_optional_groups(["bahe-export", "--out", "s", "[--as-of", "TIMESTAMP]", "[--full]"]) == \
        (["bahe-export", "--out", "s"], ["--as-of", "--full"])


def test_a_broken_documented_command_is_caught():
    """The check itself: the pre-fix README line, an unknown flag, a missing value, a wrong component flag."""
    broken = {
        "torchrun --nproc_per_node 2 -m bahe.launchers.predict --run runs/bahe --data a.parquet --out s.parquet":
            "ambiguous option: --run could match --run-path",
        "bahe-train --data-dir d --out o --stepz 3": "unrecognized arguments: --stepz",
        "bahe-data slices --out o": "required: inputs",
        "python -m bahe.launchers.submit --profile local train -- --data-dir d --out o": "--data_dir",
    }
    for text, message in broken.items():
        argv = shlex.split(text)
        with pytest.raises(AssertionError, match=re.escape(message)):
            check_command(Command("test", text, argv, inline=False))
    with pytest.raises(AssertionError, match="has no option"):
        check_command(Command("test", "bahe-train --init-frm RUN", ["bahe-train", "--init-frm", "RUN"], inline=True))


# ---------------------------------------------------------------------------------------------------------
# the cheap ones, run
# ---------------------------------------------------------------------------------------------------------

def _documented_programs() -> list[list[str]]:
    programs = set()
    for c in COMMANDS:
        if c.inline:
            continue
        if c.argv[0] in SCRIPTS:
            programs.add((sys.executable, "-m", SCRIPTS[c.argv[0]]))
        elif c.argv[0] in ("python", "python3"):
            programs.add((sys.executable, "-m", c.argv[2]))
        elif c.argv[0] == "torchrun" and "-m" in c.argv:
            programs.add((sys.executable, "-m", c.argv[c.argv.index("-m") + 1]))
    return sorted(map(list, programs))


@pytest.mark.integration
def test_every_documented_program_answers_help():
    programs = _documented_programs()
    assert [sys.executable, "-m", "bahe.launchers.predict"] in programs
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for argv in programs:
        done = subprocess.run([*argv, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=180, env=env)
        assert done.returncode == 0 and "usage:" in done.stdout, (argv, done.stderr[-1000:])
    scripts = Path(sys.executable).parent
    for name in sorted({c.argv[0] for c in COMMANDS if c.argv[0] in SCRIPTS and not c.inline}):
        if (scripts / name).exists():  # the console script itself
            done = subprocess.run([str(scripts / name), "--help"], capture_output=True, text=True, timeout=180,
                                  env=env)
            assert done.returncode == 0 and "usage:" in done.stdout, (name, done.stderr[-1000:])


@pytest.mark.integration
def test_the_documented_multi_rank_predict_reaches_bahe_predict_under_the_real_torchrun(tmp_path):
    """README's torchrun line as written, in a folder without runs/bahe: both ranks start bahe-predict, which
    refuses the missing run in its own words (before this fix torchrun stopped at `--run`, ambiguous)."""
    readme = next(c for c in COMMANDS if c.text.startswith("torchrun --nproc_per_node 2 -m bahe.launchers.predict"))
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([str(torchrun), *readme.argv[1:]], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env=env)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "ambiguous option" not in output and "bahe-predict: error:" in output, output[-3000:]
    assert "runs/bahe" in output
