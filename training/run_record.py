"""The run folder's record of its model: ``<out>/run_config.json``.

Checkpoints hold weights, not the architecture. A resume (or ``bahe-evaluate``) with another
``--pooling``, ``--attention``, ``--embedding-dim``, ``--deep-layers``, ... would either crash deep in
DCP or, worse, silently continue with weights trained for another model. So rank 0 records the model
flags beside each checkpoint it publishes (atomically, ``Checkpointer.save``), and a start that
finds a checkpoint is refused before anything starts if its model flags differ, naming every one.
``bahe-evaluate`` (and ``bahe-train --init-from``) default the model flags not given to the recorded ones.

The record also names the behaviour store the run trained on (``store``: root, version, LLM, k, rows
and digests of its rows, :func:`store_record`) and where its weights started (``initialized_from``).
A later start on a store checks that store's lineage (:func:`lineage_problem`): a refresh appends new
texts as new rows and keeps every old row byte-identical, so the run's rows must be the new store's
first rows, same encoder, same texts in the same order, same vectors. Every encoding choice counts
(pooling, post-transform and its statistics, tokenizer: bahe.embeddings.encoding): a store encoded
another way is another store, and a store (or record) older than a choice reads as its default.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from bahe.embeddings.encoding import describe_choices
from bahe.embeddings.encoding import differences as encoding_differences
from bahe.embeddings.store import BehaviourStore, write_text_atomic
from bahe.model.dense_features import DenseNormalizer
from bahe.training.record_checks import RunConfigError, check_record

RECORD = "run_config.json"  # in the run folder, beside checkpoints/
# flag -> the argparse destination that holds it (the flags that make the model: shape and computation)
MODEL_FLAGS = {"--arm": "arm", "--embedding-dim": "embedding_dim", "--table-rows": "table_rows",
               "--table-rows-for": "table_rows_for", "--drop-id-features": "drop_id_features",
               "--dense-arch": "dense_arch", "--over-arch": "over_arch", "--no-dense-standardize": "no_dense_standardize",
               "--k": "k", "--deep-layers": "deep_layers", "--pooling": "pooling", "--attention": "attention",
               "--max-behaviours": "max_behaviours", "--max-user-tokens": "max_user_tokens",
               "--user-projection": "user_projection", "--user-aggregation": "user_aggregation"}
TEXT_ONLY = ("--k", "--deep-layers", "--pooling", "--attention", "--max-behaviours", "--max-user-tokens",
             "--user-projection", "--user-aggregation")
# model flags added after runs began recording theirs: a record without one (or None, as the DLRM-only arm
# records every text flag) reads as the flag's default, so an older run compares equal to a default start
LATER_FLAG_DEFAULTS = {"--user-projection": "shared", "--user-aggregation": "pooled"}
# recorded as defaults for bahe-evaluate, not compared: the batch size picks the sharding plan, and with
# it the checkpoint's layout (a table may be sharded or data parallel)
DEFAULT_FLAGS = {"--store": "store", "--llm": "llm", "--batch-size": "batch_size"}


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


def stream_flags(config) -> dict:
    """The flags that fix the training stream's order (a resume must keep them; a warm start need not)."""
    return {"--data-lanes": getattr(config, "data_lanes", 1)}


def record_of(config) -> dict:
    text = config.model.text
    return {"model": model_flags(config), "stream": stream_flags(config), "defaults": {"--store": text.store if text else None,
                                                       "--llm": text.llm if text else None,
                                                       "--batch-size": config.batch_size,
                                                       # where it trained (bahe-predict's default train split);
                                                       # not a default of bahe-evaluate or of a warm start
                                                       "--data-dir": str(config.data_dir)}}


def write_record(run: Path, config, extra: dict | None = None) -> None:
    """Rank 0, at the start of training and beside each published checkpoint: the model flags its weights
    were trained with, and ``extra`` sections (``store``, ``initialized_from``)."""
    path, text = Path(run) / RECORD, json.dumps({**record_of(config), **(extra or {})}, indent=2) + "\n"
    try:
        if path.read_text() == text:
            return
    except (OSError, UnicodeDecodeError):
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)


def read_record(run: Path) -> dict | None:
    """``run``/run_config.json, validated by :func:`check_record` (None: the run has none) -- the one reader of
    the record: bahe-train's resume and --init-from, bahe-evaluate, bahe-predict, bahe-export,
    --frozen-text-from. Raises :class:`RunConfigError` in one line naming the file, the field and the bound."""
    path = Path(run) / RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or not isinstance(record.get("model"), dict) or \
                not isinstance(record.get("defaults", {}), dict):
            raise ValueError("no 'model' section")
    except (OSError, ValueError, UnicodeDecodeError, AttributeError) as err:
        raise RunConfigError(f"{path} is not a run record ({err}); restore it, or delete it to record this "
                             "start's model flags") from None
    check_record(record, path)
    return record

def _show(value) -> str:
    return "the default" if value is None else repr(value)


def recorded_flag(flags: dict, flag: str):
    """A model flag's value in a record's ``model`` section; a flag the record predates (or None) reads as
    its default where :data:`LATER_FLAG_DEFAULTS` has one."""
    value = flags.get(flag)
    return LATER_FLAG_DEFAULTS.get(flag) if value is None else value


def differences(recorded: dict, now: dict, flags=MODEL_FLAGS) -> list[str]:
    """'--pooling: run has 'mean', now 'last'' for every flag of ``flags`` (the model flags) that differs."""
    return [f"{flag}: run has {_show(recorded_flag(recorded, flag))}, now {_show(recorded_flag(now, flag))}"
            for flag in flags if recorded_flag(recorded, flag) != recorded_flag(now, flag)]


def recorded_dense_statistics(run: Path) -> DenseNormalizer | None:
    """The dense z-score statistics a run's weights were trained with (training/loop.py records them in
    run_config.json); None for a run recorded before runs kept them."""
    recorded = (read_record(run) or {}).get("dense_statistics")
    if not recorded:
        return None
    return DenseNormalizer(tuple(recorded["columns"]), tuple(recorded["mean"]), tuple(recorded["std"]))


def has_checkpoint(run: Path) -> bool:
    return (Path(run) / "checkpoints" / "LATEST").exists()


def check_resume(config) -> None:
    """Refuse a start whose model flags differ from those the run folder's checkpoint was trained with
    (read only: the record is written beside the checkpoints, :func:`write_record`)."""
    run = Path(config.checkpoint_dir).parent
    recorded = read_record(run)
    if recorded is None or not has_checkpoint(run):
        return
    found = differences(recorded["model"], model_flags(config)) + \
        differences(recorded.get("stream", {"--data-lanes": 1}), stream_flags(config), ("--data-lanes",))
    if found:
        raise RunConfigError(f"{run} holds a checkpoint trained with other model or data-order flags ({'; '.join(found)}); "
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


# Rows whose vectors the digest of a store written before per-chunk checksums reads: evenly spaced over the
# shared rows (first and last included). Its texts digest covers every shared text.
STORE_DIGEST_ROWS = 4096


def shared_rows_digest(store: BehaviourStore, rows: int) -> dict[str, str]:
    """The digest of a store written before per-chunk checksums (reads its rows): SHA-256 of the first
    ``rows`` vocabulary texts (in id order) and of the vectors of :data:`STORE_DIGEST_ROWS` rows spread evenly
    over them (float32 bytes, in row order)."""
    texts = hashlib.sha256()
    for start in range(0, rows, 65_536):  # JSON of 65,536 texts at a time, read through the store's text index:
        # bounded memory (no vocabulary in the heap), the same bytes as the whole vocabulary's slices
        texts.update(json.dumps(store.texts(start, min(start + 65_536, rows)), ensure_ascii=False).encode())
    picked = np.unique(np.linspace(0, rows - 1, min(rows, STORE_DIGEST_ROWS)).round().astype(np.int64))
    vectors = hashlib.sha256()
    for row in picked.tolist():
        vectors.update(store.rows(row, row + 1).tobytes())
    return {"texts_sha256": texts.hexdigest(), "rows_sample_sha256": vectors.hexdigest()}


def chunk_digest(store: BehaviourStore, rows: int) -> dict[str, str] | None:
    """The digest of the first ``rows`` rows from the manifest alone (no row or text is read): SHA-256 of the
    per-chunk checksums of the chunks that make up exactly those rows (bahe.embeddings.row_chunks), with the
    row count, dim and store dtype (``vectors_digest``), and of their texts' checksums (``texts_digest``). None:
    the store has no per-chunk checksums, or ``rows`` is not one of its chunk boundaries (so it is not the
    store of that many rows or a refresh of it: a refresh keeps every ancestor's row count as a boundary)."""
    chunks = store.row_chunks
    n = chunks.up_to(rows) if chunks is not None else None
    if n is None:
        return None

    def digest(body: dict) -> str:
        return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    return {"texts_digest": digest({"rows": rows, "texts_sha256": chunks.texts[:n]}),
            "vectors_digest": digest({"rows": rows, "dim": store.dim, "store_dtype": store.store_dtype,
                                      "stops": chunks.stops[:n], "vectors_sha256": chunks.vectors[:n]})}


def store_identity(store: BehaviourStore) -> dict:
    """The store's root, version, LLM, encoding choices (every one, defaults filled in for an older
    manifest) and size (from its manifest; nothing read)."""
    manifest = store.manifest
    return {"root": str(store.path.parent), "version": store.version, "llm": manifest["model"]["name"],
            "llm_sha256": manifest["model"]["sha256"], "k": manifest["encoder"]["k"],
            "encoder": store.encoding, "dim": store.dim, "rows": store.rows_count}


def store_record(store: BehaviourStore) -> dict:
    """What a run records of the store it trains on (run_config.json's ``store``): its identity and the
    digests of all its rows: :func:`chunk_digest` (from the manifest, O(1) in the rows), or for a store written
    before per-chunk checksums :func:`shared_rows_digest` (reads every text and a sample of rows)."""
    return {**store_identity(store),
            **(chunk_digest(store, store.rows_count) or shared_rows_digest(store, store.rows_count))}


def describe_store(record: dict) -> str:
    """'stores/ml v000002 (llm smollm2-135m, k 6, 1,664 rows)', with the pooling and post-transform when
    they are not the defaults ('..., k 6, pooling mean_skip_first, post-transform whiten (...), 1,664 rows')."""
    choices = describe_choices(record.get("encoder", {}), defaults_too=False)
    return (f"{record['root']} {record['version']} (llm {record['llm']}, k {record['k']}, "
            f"{choices + ', ' if choices else ''}{record['rows']:,} rows)")


def lineage_problem(recorded: dict, store: BehaviourStore) -> str | None:
    """Why ``store`` does not hold the recorded store's rows unchanged as its first rows; None when it does
    (the same version, or a refresh of it)."""
    manifest, rows = store.manifest, int(recorded["rows"])
    if manifest["model"]["sha256"] != recorded["llm_sha256"]:
        return (f"it was encoded by another LLM (weights sha256 {manifest['model']['sha256'][:12]}..., the run's "
                f"{recorded['llm_sha256'][:12]}...)")
    if manifest["encoder"]["k"] != recorded["k"]:
        return f"it was encoded with another k ({manifest['encoder']['k']}, the run's {recorded['k']})"
    # both sides normalised: a record or manifest older than a choice reads as its default, and a tokenizer
    # fact the run's record does not know is not compared
    settings = [f"{key} {now!r} (the run's {then!r})"
                for key, then, now in encoding_differences(recorded["encoder"], store.encoding)]
    if settings or store.dim != recorded["dim"]:
        return f"it was encoded with other settings ({'; '.join(settings) or f'dim {store.dim}'})"
    if store.rows_count < rows:
        return f"it has fewer rows ({store.rows_count:,}, the run's {rows:,})"
    if "vectors_digest" in recorded:  # recorded from the manifest's per-chunk checksums: compared the same way
        digest = chunk_digest(store, rows)
        if digest is None:
            return (f"its rows are not cut into checksummed chunks at row {rows:,} as the run's store's were, so it is "
                    "neither that store nor a refresh of it (a store rebuilt from scratch or from other data: the "
                    "ids of the texts differ)")
        if digest["texts_digest"] != recorded["texts_digest"]:
            return (f"its first {rows:,} texts are not the run's in the same order (a store rebuilt from scratch or "
                    "from other data: the ids of the texts differ)")
        if digest["vectors_digest"] != recorded["vectors_digest"]:
            return f"the vectors of its first {rows:,} rows are not the run's (the texts were encoded again)"
        return None
    digest = shared_rows_digest(store, rows)
    if digest["texts_sha256"] != recorded["texts_sha256"]:
        return (f"its first {rows:,} texts are not the run's in the same order (a store rebuilt from scratch or "
                "from other data: the ids of the texts differ)")
    if digest["rows_sample_sha256"] != recorded["rows_sample_sha256"]:
        return f"the vectors of its first {rows:,} rows are not the run's (the texts were encoded again)"
    return None


def check_run_store(run: Path, store: BehaviourStore | None) -> None:
    """A resume (or ``bahe-evaluate``) of ``run`` on a store that does not hold the rows the run trained on
    unchanged is refused, naming both stores (a run recorded before stores were recorded: not checked)."""
    recorded = (read_record(run) or {}).get("store")
    if recorded is None or store is None:
        return
    problem = lineage_problem(recorded, store)
    if problem:
        raise RunConfigError(f"{run} was trained on store {describe_store(recorded)}, and the store given now, "
                             f"{describe_store(store_identity(store))}, does not hold those rows unchanged: {problem}; "
                             "give the run's store (or a refresh of it, bahe-encode build), or train into a new --out")
