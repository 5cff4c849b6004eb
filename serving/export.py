"""``bahe-export``'s work: a trained run's text features and predictor -> a new version of an export folder.

1. The run is restored as bahe-predict restores it (serving/restore.py: its best checkpoint by default).
2. Item text features for every row of the behaviour store, user text features for every user of the
   sample files as of the cut-off (serving/features.py).
3. Incremental: when the folder already holds an export made from the same checkpoint (same SHA-256),
   store encoder and model shapes, its rows are reused byte for byte -- an item whose store id and text
   are unchanged, a user whose behaviours (store ids) are unchanged -- and only the rest is computed;
   users absent from this call's data keep their rows; a user whose newest sample here is older than the
   cached one keeps the cached row. Any other earlier export (another checkpoint: yesterday's model) is
   recomputed in full, and the manifest says why.
4. The TorchScript predictor(s) (serving/predictor.py), copied from the parent when reused.
5. Everything is published as the next version (serving/export_store.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from bahe.embeddings.folder_lock import FolderLock, FolderLockError
from bahe.embeddings.store import file_sha256
from bahe.model.deep_layers import PRECISIONS
from bahe.serving.export_store import (
    BUSY,
    ITEMS,
    PREDICTOR,
    USERS,
    ExportError,
    ExportVersion,
    fixed_lists,
    jagged_lists,
    latest_version,
    list_parts,
    matrix,
    publish,
)
from bahe.serving.features import (
    UserBehaviours,
    empty_user_features,
    item_features,
    latest_samples,
    same_lists,
    sequence_name,
    user_behaviours,
    user_features,
)
from bahe.serving.predictor import TABLE_DTYPES, cached_predictor, predictor_bytes, predictor_meta, script
from bahe.serving.restore import RestoredRun, restore_run
from bahe.serving.scoring_io import open_inputs
from bahe.training.run_record import store_record


@dataclass(frozen=True)
class ExportConfig:
    """Args:
        run: the training run folder (bahe-train --out).
        files: sample Parquet files holding the users' behaviours (bahe-data's schema).
        out: the export folder (created; an existing export there is refreshed).
        which: ``best`` (the run's selection on valid; its latest when it made none) or ``latest``.
        as_of: the cut-off: each user's behaviours come from the user's most recent sample with
            timestamp <= as_of (None: the most recent sample of all).
        data_dir: the run's training data folder (its train.parquet: schema, dense statistics).
        store, llm: the behaviour store and LLM folder (None: the run's).
        predictor_tables: the ID-table precisions to export predictors with (fp32 is exact; int8, fp16).
        full: recompute everything, even rows an earlier export of the same checkpoint holds.
        batch_size: rows per forward call of the deep layers.
        llm_precision: compute precision of the LLM layers (fp32: the CPU's numbers).
        show_progress: progress bars (stderr).
    """

    run: Path
    files: tuple[Path, ...]
    out: Path
    which: str = "best"
    as_of: int | None = None
    data_dir: Path | None = None
    store: str | None = None
    llm: str | None = None
    predictor_tables: tuple[str, ...] = ("fp32",)
    full: bool = False
    batch_size: int = 256
    llm_precision: str = "fp32"
    show_progress: bool = True
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "run", Path(self.run))
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "files", tuple(Path(f) for f in self.files))
        object.__setattr__(self, "predictor_tables", tuple(self.predictor_tables))
        if not self.files:
            raise ValueError("ExportConfig.files is empty: give the sample .parquet files holding the users' "
                             "behaviours (--data FILE ...)")
        if self.which not in ("best", "latest"):
            raise ValueError(f"ExportConfig.which={self.which!r}: choose best or latest (--which)")
        if self.batch_size < 1:
            raise ValueError(f"ExportConfig.batch_size={self.batch_size}: give rows per forward call >= 1 (--batch-size)")
        bad = [t for t in self.predictor_tables if t not in TABLE_DTYPES]
        if bad or "fp32" not in self.predictor_tables:
            raise ValueError(f"ExportConfig.predictor_tables={list(self.predictor_tables)}: fp32 (exact) plus any of "
                             f"{sorted(TABLE_DTYPES)} (--predictor-tables)")
        if self.llm_precision not in PRECISIONS:
            raise ValueError(f"ExportConfig.llm_precision={self.llm_precision!r}: choose one of {PRECISIONS}")
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"--out {self.out} is a file: give a folder (created if missing)")


def _reusable(parent: ExportVersion | None, manifest: dict, store, full: bool) -> tuple[ExportVersion | None, str]:
    """(the parent export whose rows may be reused, or None; why)."""
    from bahe.training.run_record import lineage_problem

    if parent is None:
        return None, "full: no earlier export in this folder"
    if full:
        return None, f"full: --full (earlier export {parent.version} not reused)"
    old = parent.manifest
    if old["producer"].get("checkpoint_sha256") != manifest["producer"]["checkpoint_sha256"]:
        return None, f"full: the checkpoint differs from {parent.version}'s"
    for key in ("sequence_keys", "embedding_dim", "llm_precision", "max_behaviours"):
        if old.get(key) != manifest.get(key):
            return None, f"full: {key} differs from {parent.version}'s"
    problem = lineage_problem(old["store"], store)  # the parent's store rows must be this store's first rows
    if problem:
        return None, f"full: the store is not {parent.version}'s or a refresh of it ({problem})"
    return parent, f"incremental from {parent.version}"


def _items(restored: RestoredRun, parent: ExportVersion | None, version: str, config: ExportConfig) -> tuple[pa.Table, dict]:
    vocabulary = restored.store.vocabulary
    ids = np.arange(len(vocabulary), dtype=np.int64)
    texts = pa.array(vocabulary.texts, pa.string())
    dim = restored.model.text_arch.item_projection.out_features
    features = np.zeros((len(ids), dim), dtype=np.float32)
    computed_in = np.full(len(ids), version, dtype=object)
    todo = np.ones(len(ids), dtype=bool)
    if parent is not None:
        old = parent.table(ITEMS)
        old_ids = old.column("store_id").to_numpy()
        shared = old_ids[old_ids < len(ids)]
        rows = np.flatnonzero(old_ids < len(ids))
        same = np.asarray([vocabulary.texts[i] for i in shared], dtype=object) == \
            np.asarray(old.column("text").to_pylist(), dtype=object)[rows]
        keep, source = shared[same], rows[same]
        features[keep] = matrix(old.column("feature"), dim)[source]
        computed_in[keep] = np.asarray(old.column("computed_in").to_pylist(), dtype=object)[source]
        todo[keep] = False
    if todo.any():
        features[todo] = item_features(restored.model.text_arch, ids[todo], batch_size=4 * config.batch_size,
                                       show_progress=config.show_progress)
    table = pa.table({"store_id": ids, "text": texts, "feature": fixed_lists(features),
                      "computed_in": pa.array(computed_in.tolist(), pa.string())})
    return table, {"total": len(ids), "computed": int(todo.sum()), "kept": int((~todo).sum())}


def _parent_users(parent: ExportVersion, keys: list[str], width: int) -> dict:
    old = parent.table(USERS)
    lists = {key: list_parts(old.column("behaviours_" + sequence_name(key))) for key in keys}
    return {"user_ids": old.column("user_id").to_numpy(), "as_of": old.column("as_of").to_numpy(),
            "lists": lists, "features": matrix(old.column("features"), width),
            "computed_in": np.asarray(old.column("computed_in").to_pylist(), dtype=object)}


def _users(restored: RestoredRun, fresh: UserBehaviours, parent: ExportVersion | None, version: str,
           config: ExportConfig) -> tuple[pa.Table, dict]:
    """Users of this call's data, merged with the parent's (see the module docstring)."""
    text_arch = restored.model.text_arch
    keys, dim = list(text_arch.sequence_keys), text_arch.user_projection.out_features
    width = len(keys) * dim
    n = len(fresh)
    features = np.zeros((n, width), dtype=np.float32)
    computed_in = np.full(n, version, dtype=object)
    todo = np.ones(n, dtype=bool)
    user_ids, as_of = fresh.user_ids, fresh.as_of
    lists = {key: (fresh.offsets[key], fresh.values[key]) for key in keys}
    stale_kept = 0
    if parent is not None:
        old = _parent_users(parent, keys, width)
        position = np.searchsorted(old["user_ids"], user_ids)
        known = position < len(old["user_ids"])
        known[known] = old["user_ids"][position[known]] == user_ids[known]
        mine, theirs = np.flatnonzero(known), position[known]
        same = np.ones(len(mine), dtype=bool)
        for key in keys:
            a_off, a_val = _take_lists(*lists[key], mine)
            b_off, b_val = _take_lists(*old["lists"][key], theirs)
            same &= same_lists(a_off, a_val, b_off, b_val)
        older = as_of[mine] < old["as_of"][theirs]  # the cached row is newer than this data's: keep it whole
        reuse = same | older
        features[mine[reuse]] = old["features"][theirs[reuse]]
        computed_in[mine[reuse]] = old["computed_in"][theirs[reuse]]
        todo[mine[reuse]] = False
        stale_kept = int(older.sum())
        as_of = as_of.copy()
        as_of[mine[older]] = old["as_of"][theirs[older]]
        for key in keys:
            lists[key] = _replace_lists(lists[key], mine[older], old["lists"][key], theirs[older])
        # users only in the parent: kept as they are
        only_old = np.setdiff1d(np.arange(len(old["user_ids"])), theirs, assume_unique=False)
    if todo.any():
        features[todo] = user_features(text_arch, restored.batcher, fresh.rows.take(pa.array(np.flatnonzero(todo))),
                                       batch_size=config.batch_size,
                                       show_progress=config.show_progress).reshape(-1, width)
    counts = {"from_data": n, "computed": int(todo.sum()), "kept_unchanged": int(n - todo.sum() - stale_kept),
              "kept_newer_in_cache": stale_kept, "kept_not_in_data": 0}
    if parent is not None and len(only_old):
        counts["kept_not_in_data"] = len(only_old)
        user_ids = np.concatenate([user_ids, old["user_ids"][only_old]])
        as_of = np.concatenate([as_of, old["as_of"][only_old]])
        features = np.concatenate([features, old["features"][only_old]])
        computed_in = np.concatenate([computed_in, old["computed_in"][only_old]])
        for key in keys:
            lists[key] = _concat_lists(lists[key], _take_lists(*old["lists"][key], only_old))
    order = np.argsort(user_ids, kind="stable")
    columns = {"user_id": user_ids[order], "as_of": as_of[order]}
    for key in keys:
        columns["behaviours_" + sequence_name(key)] = jagged_lists(*_take_lists(*lists[key], order))
    columns["features"] = fixed_lists(features[order])
    columns["computed_in"] = pa.array(computed_in[order].tolist(), pa.string())
    counts["total"] = len(user_ids)
    return pa.table(columns), counts


def _take_lists(offsets: np.ndarray, values: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``rows`` of a jagged list, as (offsets from 0, values)."""
    lengths = np.diff(offsets)[rows]
    new_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    within = np.arange(new_offsets[-1]) - np.repeat(new_offsets[:-1], lengths)
    return new_offsets, values[np.repeat(offsets[rows], lengths) + within]


def _concat_lists(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([a[0], a[0][-1] + b[0][1:]]), np.concatenate([a[1], b[1]])


def _replace_lists(lists: tuple[np.ndarray, np.ndarray], rows: np.ndarray, other: tuple[np.ndarray, np.ndarray],
                   other_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``lists`` with its rows ``rows`` replaced by ``other``'s rows ``other_rows``."""
    count = len(lists[0]) - 1
    index = np.arange(count)
    index[rows] = count + other_rows  # rows [0, count) of the concatenation are ``lists``', the rest ``other``'s
    return _take_lists(*_concat_lists(lists, other), index)


def _predictors(restored: RestoredRun, parent: ExportVersion | None, manifest: dict, tables: tuple[str, ...]) -> dict:
    blobs = {}
    for precision in tables:
        name = PREDICTOR[precision]
        if parent is not None and name in parent.manifest["files"]:
            # the same checkpoint: the same predictor, reused only as the parent's manifest signed it (its bytes
            # read once, checked against the SHA-256 there, and naming this checkpoint) before it is signed again
            data = parent.verified_bytes(name)
            made_by = (predictor_meta(data) or {}).get("producer", {})
            if not isinstance(made_by, dict) or \
                    made_by.get("checkpoint_sha256") != manifest["producer"]["checkpoint_sha256"]:
                raise ExportError(f"{parent.path / name} does not carry the metadata of the checkpoint its manifest "
                                  "names (extra/bahe_serving.json): it is not the predictor bahe-export wrote; "
                                  "restore the version, or export afresh with --full")
            blobs[name] = data
            continue
        meta = {"format": "bahe-serving-predictor/1", "id_tables": precision,
                **{key: manifest[key] for key in ("producer", "dense_columns", "id_features", "table_rows",
                                                  "sequence_keys", "embedding_dim", "inputs")}}
        blobs[name] = predictor_bytes(script(cached_predictor(restored.model, restored.batcher, restored.normalizer,
                                                              tables=precision)), meta)
    return blobs


INPUTS = {"dense": "B x F_dense float32: raw dense_<name> values, dense_columns order (log1p + z-scores applied inside)",
          "id_values": "int64: raw ids of the id_features, KeyedJaggedTensor values (feature-major; id % rows inside)",
          "id_lengths": "int64, F x B: ids per (feature, request), KeyedJaggedTensor lengths",
          "user_text": "B x N x D float32: users.parquet features of the request's user",
          "item_text": "B x D float32: items.parquet feature of the request's item title (store id)",
          "output": "B float32 logits (pre-sigmoid)"}


def export(config: ExportConfig) -> dict:
    """Run one export (see the module docstring); returns its summary. Raises ValueError / FileNotFoundError
    (one line) for bad input, a damaged earlier export, or a folder another export is writing."""
    began = time.perf_counter()
    restored = restore_run(config.run, which=config.which, data_dir=config.data_dir, store=config.store,
                           llm=config.llm, llm_precision=config.llm_precision)
    inputs = open_inputs(config.files, restored.schema)
    text_arch, batcher = restored.model.text_arch, restored.batcher
    manifest = {
        "producer": restored.identity(), "store": store_record(restored.store), "llm_precision": config.llm_precision,
        "sequence_keys": list(text_arch.sequence_keys), "embedding_dim": text_arch.user_projection.out_features,
        "max_behaviours": batcher.max_behaviours, "dense_columns": list(batcher.schema.dense_columns),
        "id_features": list(batcher.id_features), "table_rows": [batcher.table_sizes[n] for n in batcher.id_features],
        "as_of": config.as_of, "inputs": INPUTS,
        # a user the cache does not hold is served as one without behaviours (float32 values, exact in JSON)
        "empty_user_features": [float(x) for x in empty_user_features(text_arch).reshape(-1)],
        "data": [{"path": str(s.path.resolve()), "rows": s.rows, "sha256": file_sha256(s.path)} for s in inputs],
    }
    try:
        config.out.mkdir(parents=True, exist_ok=True)
        lock = FolderLock(config.out, BUSY).acquire()
    except OSError as err:
        raise FolderLockError(f"cannot make or lock {config.out}: {err.strerror or err}; choose a folder this user "
                              "can write (--out)") from err
    try:
        existing = latest_version(config.out)
        parent = ExportVersion.open(config.out, existing) if existing else None
        reuse, refresh = _reusable(parent, manifest, restored.store, config.full)
        version = f"v{int(existing[1:]) + 1 if existing else 1:06d}"
        items, item_counts = _items(restored, reuse, version, config)
        rows = latest_samples(inputs, batcher, config.as_of)
        if rows.num_rows == 0:
            when = f"at or before --as-of {config.as_of}" if config.as_of is not None else "at all"
            raise ExportError(f"no sample {when} in {', '.join(str(f) for f in config.files)}: give a later --as-of "
                              "or the files holding the users' samples (--data)")
        fresh = user_behaviours(rows, batcher, list(text_arch.sequence_keys))
        users, user_counts = _users(restored, fresh, reuse, version, config)
        manifest.update(refresh=refresh, items=item_counts, users=user_counts)
        blobs = _predictors(restored, reuse, manifest, config.predictor_tables)
        path = publish(config.out, manifest, {ITEMS: items, USERS: users}, blobs)
    finally:
        lock.release()
    if path.name != version:
        raise ExportError(f"{config.out}: wrote {path.name}, expected {version}")
    return {"out": str(path), "version": version, "refresh": refresh, "items": item_counts, "users": user_counts,
            "checkpoint": restored.checkpoint.name, "step": restored.step, "chosen": restored.chosen,
            "predictors": sorted(blobs), "seconds": round(time.perf_counter() - began, 2)}
