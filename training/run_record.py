"""The run folder's record of its model: ``<out>/run_config.json``.

Checkpoints hold weights, not the architecture. A resume (or ``bahe-evaluate``) with another
``--pooling``, ``--attention``, ``--embedding-dim``, ``--deep-layers``, ... would either crash deep in
DCP or, worse, silently continue with weights trained for another model. So rank 0 records the model
flags beside each checkpoint it publishes (atomically, ``Checkpointer.save``), and a start that
finds a checkpoint is refused before anything starts if its model flags differ, naming every one.
``bahe-evaluate`` defaults the model flags it was not given to the recorded ones.
"""

from __future__ import annotations

import json
from pathlib import Path

from bahe.embeddings.store import write_text_atomic

RECORD = "run_config.json"  # in the run folder, beside checkpoints/
# flag -> the argparse destination that holds it (the flags that make the model: shape and computation)
MODEL_FLAGS = {"--arm": "arm", "--embedding-dim": "embedding_dim", "--table-rows": "table_rows",
               "--table-rows-for": "table_rows_for", "--drop-id-features": "drop_id_features",
               "--dense-arch": "dense_arch", "--over-arch": "over_arch", "--no-dense-standardize": "no_dense_standardize",
               "--k": "k", "--deep-layers": "deep_layers", "--pooling": "pooling", "--attention": "attention",
               "--max-behaviours": "max_behaviours", "--max-user-tokens": "max_user_tokens"}
TEXT_ONLY = ("--k", "--deep-layers", "--pooling", "--attention", "--max-behaviours", "--max-user-tokens")
# recorded as defaults for bahe-evaluate, not compared: the batch size picks the sharding plan, and with
# it the checkpoint's layout (a table may be sharded or data parallel)
DEFAULT_FLAGS = {"--store": "store", "--llm": "llm", "--batch-size": "batch_size"}


class RunConfigError(ValueError):
    """A run folder's checkpoint was trained with other model flags (or its record is damaged)."""


def model_flags(config) -> dict:
    """The model flags of a TrainConfig, as ``bahe-train`` spells them (JSON-stable)."""
    model, text = config.model, config.model.text
    flags = {"--arm": text.arm if text else "dlrm", "--embedding-dim": model.tables.embedding_dim,
             "--table-rows": model.tables.default_rows,
             "--table-rows-for": sorted(f"{k}={v}" for k, v in model.tables.rows.items()),
             "--drop-id-features": list(model.tables.drop), "--dense-arch": list(model.arch.dense_arch_layer_sizes),
             "--over-arch": list(model.arch.over_arch_layer_sizes),
             "--no-dense-standardize": not config.standardize_dense}
    for flag in TEXT_ONLY:  # None for the DLRM-only arm, which ignores them
        flags[flag] = getattr(text, MODEL_FLAGS[flag]) if text else None
    return flags


def record_of(config) -> dict:
    text = config.model.text
    return {"model": model_flags(config), "defaults": {"--store": text.store if text else None,
                                                       "--llm": text.llm if text else None,
                                                       "--batch-size": config.batch_size}}


def write_record(run: Path, config) -> None:
    """Rank 0, beside each published checkpoint: the model flags its weights were trained with."""
    path, text = Path(run) / RECORD, json.dumps(record_of(config), indent=2) + "\n"
    try:
        if path.read_text() == text:
            return
    except (OSError, UnicodeDecodeError):
        pass
    write_text_atomic(path, text)


def read_record(run: Path) -> dict | None:
    path = Path(run) / RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        if not isinstance(record.get("model"), dict) or not isinstance(record.get("defaults", {}), dict):
            raise ValueError("no 'model' section")
    except (ValueError, UnicodeDecodeError, AttributeError) as err:
        raise RunConfigError(f"{path} is not a run record ({err}); restore it, or delete it to record this "
                             "start's model flags") from None
    return record


def _show(value) -> str:
    return "the default" if value is None else repr(value)


def differences(recorded: dict, now: dict) -> list[str]:
    """'--pooling: run has 'mean', now 'last'' for every model flag that differs."""
    return [f"{flag}: run has {_show(recorded.get(flag))}, now {_show(now.get(flag))}"
            for flag in MODEL_FLAGS if recorded.get(flag) != now.get(flag)]


def has_checkpoint(run: Path) -> bool:
    return (Path(run) / "checkpoints" / "LATEST").exists()


def check_resume(config) -> None:
    """Refuse a start whose model flags differ from those the run folder's checkpoint was trained with
    (read only: the record is written beside the checkpoints, :func:`write_record`)."""
    run = Path(config.checkpoint_dir).parent
    recorded = read_record(run)
    if recorded is None or not has_checkpoint(run):
        return
    found = differences(recorded["model"], model_flags(config))
    if found:
        raise RunConfigError(f"{run} holds a checkpoint trained with other model flags ({'; '.join(found)}); "
                             "resume with the run's flags (see its run_config.json) or train into a new --out")


def check_out_folder(out: Path) -> None:
    """``--out`` must be a folder, or not exist yet, and lie under no file."""
    for path in (Path(out), *Path(out).parents):
        if path.exists() and not path.is_dir():
            where = "is a file" if path == Path(out) else f"lies under {path}, which is a file"
            raise RunConfigError(f"--out {out} {where}, not a run folder: choose another --out")


def apply_record(args, argv: list[str], run: Path) -> None:
    """``bahe-evaluate``: model flags (and --store, --llm, --batch-size) not on the command line take the run's
    values; the caller then builds the config and :func:`check_resume` refuses any that differ."""
    record = read_record(run)
    if record is None:
        return
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    values = {**record["model"], **record.get("defaults", {})}
    for flag, dest in {**MODEL_FLAGS, **DEFAULT_FLAGS}.items():
        value = values.get(flag)
        if flag in given or flag not in values or (value is None and flag not in DEFAULT_FLAGS):
            continue
        setattr(args, dest, value)
