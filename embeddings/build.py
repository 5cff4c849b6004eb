"""Build or refresh a behaviour store: encode only what the store has not seen, crash-safely.

``build_store(root, sample_files, EncoderConfig(...))``, holding the store's lock
(``<root>/.lock``, :mod:`bahe.embeddings.folder_lock`) from step 1 to publishing: a second build of the
same store is refused at once, naming the first (PID, host, start time), and touches nothing.

1. counts every normalised text of the sample files (sequences and item texts);
2. opens the LATEST version as the parent (if any), refuses a parent encoded any other way (model, k,
   pooling, post-transform, tokenizer, dtype or token settings: bahe.embeddings.encoding; one line naming
   both sides), and extends its vocabulary: old ids stay, new texts append;
3. splits the new texts into chunks of ``chunk_texts`` ids; rank r of a torchrun launch encodes
   chunks r, r + world, ...; each finished chunk is saved under ``<root>/.work/<version>/`` by an
   atomic rename, so a killed run resumes where it stopped and never re-encodes a finished chunk
   (the folder holds one plan's chunks: another plan's are parked beside it, never mixed in);
4. rank 0 assembles the parent's rows (copied unchanged) and the chunks, post-transformed with the
   store's frozen statistics (fitted on the first build's texts, copied unchanged by every refresh:
   bahe.embeddings.post_transform), and the text index (the parent's extended with the new texts:
   bahe.embeddings.text_index) into a new version directory, writes checksums and the manifest
   (with a digest of itself), renames the directory into place and only then moves ``LATEST``. A
   crash at any point leaves the previous version intact and current.

A write that fails (a full disk, an unwritable folder) raises :class:`StoreWriteError` naming the file,
the reason and the version that stays current; the half-written file is removed, the finished chunks
are kept, and the same build run again resumes from them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from bahe.embeddings.build_io import reason, save_npy_atomic, vector_blocks, write_vectors, writing
from bahe.embeddings.encoder import EncoderConfig, EncodeStats, ShallowEncoder
from bahe.embeddings.encoding import POST_TRANSFORM_FIELDS, differences, encoder_identity, tokenizer_facts
from bahe.embeddings.folder_lock import rank0_folder_lock
from bahe.embeddings.post_transform import POST_TRANSFORM_FILE, PostTransform
from bahe.embeddings.pretrained import resolve_model_dir, weights_sha256
from bahe.embeddings.process_group import init_process_group
from bahe.embeddings.row_chunks import ROW_CHUNKS, ChunkHasher, RowChunks, digest_chunk_rows, texts_digest
from bahe.embeddings.store import (
    FORMAT,
    LATEST,
    MANIFEST,
    MANIFEST_DIGEST,
    VECTORS,
    VOCAB,
    BehaviourStore,
    Expected,
    StoreError,
    StoreWriteError,
    file_sha256,
    latest_version,
    manifest_digest,
    stored_dtype,
    version_name,
    write_text_atomic,
)
from bahe.embeddings.text_index import FILES as TEXT_INDEX_FILES
from bahe.embeddings.text_index import SECTION as TEXT_INDEX
from bahe.embeddings.text_index_writer import write_text_index
from bahe.embeddings.vocabulary import BehaviourVocabulary, count_texts

WORK = ".work"
STORE_BUSY = "store {folder} is being built by {holder}; wait for it or use another store"


@dataclass
class BuildReport:
    version: str
    parent: str | None
    rows: int
    distinct_texts: int  # distinct texts in the given data
    occurrences: int  # their occurrences in the given data
    new_texts: int  # texts encoded by this build (all ranks)
    resumed_chunks: int  # chunks found finished from an interrupted run and not re-encoded
    tokens_encoded: int
    tokens_per_occurrence_encoder: int  # what encoding every occurrence would have cost
    truncated: int
    padding_waste: float
    seconds: float

    def format(self) -> str:
        ratio = self.occurrences / max(self.distinct_texts, 1)
        saving = self.tokens_per_occurrence_encoder / max(self.tokens_encoded, 1)
        return (f"store version {self.version} (parent {self.parent or 'none'}): {self.rows:,} rows\n"
                f"data: {self.distinct_texts:,} distinct texts, {self.occurrences:,} occurrences (x{ratio:.1f})\n"
                f"encoded now: {self.new_texts:,} new texts, {self.tokens_encoded:,} tokens in {self.seconds:.1f}s "
                f"(a per-occurrence encoder: {self.tokens_per_occurrence_encoder:,} tokens, x{saving:.1f}); "
                f"{self.truncated} truncated, padding waste {self.padding_waste:.1%}, "
                f"{self.resumed_chunks} chunk(s) resumed")


def _rank_world() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        init_process_group("nccl" if torch.cuda.is_available() else "gloo")  # its timeout: bahe-encode --pg-timeout
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _check_parent(parent: BehaviourStore, identity: dict, sha: str) -> None:
    """Refuse to refresh ``parent`` with any other encoding choice (the post-transform's statistics are the
    parent's own, reused: not compared here)."""
    parent.check(Expected(model_sha256=sha, k=identity["k"]))
    differs = [f"{key}: parent {old!r}, now {new!r}"
               for key, old, new in differences(parent.manifest["encoder"], identity, ignore=("post_transform_sha256",))]
    if differs:
        raise StoreError(f"cannot refresh {parent.path} with other encoding choices ({'; '.join(differs)}): its "
                         "vectors would not be comparable; use the parent's choices or build a new store elsewhere")


def _frozen_post_transform(parent: BehaviourStore | None, work: Path, n_chunks: int, config: EncoderConfig,
                           dim: int, version: str) -> tuple[PostTransform | None, dict | None]:
    """The store's post-transform and where it was fitted: the parent's frozen one (never refitted), or, on
    the first build, one fitted on every new (= every distinct) text's raw vector in the chunks."""
    if config.post_transform == "none":
        return None, None
    if parent is not None:
        return parent.post_transform(), parent.manifest.get("post_transform_fit")

    def raw_blocks():
        return (np.load(work / f"chunk-{c:06d}.npy", allow_pickle=False) for c in range(n_chunks))

    try:
        transform = PostTransform.fit(config.post_transform, raw_blocks, config.whiten_eps)
    except ValueError as err:
        raise StoreError(f"cannot fit the {config.post_transform} post-transform of the new store: {err}") from None
    rows = sum(len(block) for block in raw_blocks())
    if config.post_transform == "whiten" and rows <= dim:
        print(f"bahe-encode: warning: whitening fitted on {rows} texts of {dim}-dim vectors: the covariance is "
              f"rank-deficient, so later texts' components outside the fitted span are amplified up to "
              f"1/sqrt(eps); fit on more texts than {dim}", file=sys.stderr)
    return transform, {"version": version, "rows": rows}


def _plan_digest(plan: dict) -> str:
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]


def _read_plan(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _prepare_work_dir(work: Path, plan: dict, rank: int) -> None:
    """``work`` (``.work/<version>``) holds the chunks of exactly this plan, so an interrupted build of the
    same plan resumes from them. A build of another plan found there is parked whole as
    ``.work/<version>-<its plan digest>``, never deleted or mixed in, and comes back when its plan runs
    again. Rank 0 does this under the store's lock: no other build runs meanwhile."""
    if rank == 0:
        plan_path = work / "plan.json"
        found = _read_plan(plan_path)
        if work.is_dir() and found != plan:
            if found is None:  # made, but its plan never written: no chunk can be in it
                with writing(work, "remove the unplanned build folder"):
                    shutil.rmtree(work)
            else:
                parked = work.with_name(f"{work.name}-{_plan_digest(found)}")
                with writing(parked, "park the build of another plan in"):
                    shutil.rmtree(parked, ignore_errors=True)
                    os.replace(work, parked)
        ours = work.with_name(f"{work.name}-{_plan_digest(plan)}")
        if not work.exists() and ours.is_dir():
            with writing(work, "resume the parked build in"):
                os.replace(ours, work)
        with writing(work, "create"):
            work.mkdir(parents=True, exist_ok=True)
        if not plan_path.is_file():
            with writing(plan_path):
                write_text_atomic(plan_path, json.dumps(plan, indent=2, sort_keys=True))
    _barrier()


def _drop_dead_work(root: Path, published: str) -> None:
    """Once ``published`` is LATEST, a build planned for it or an earlier version can never be resumed
    (a new build plans the next version on the new parent): remove its folder, parked or not."""
    for folder in (root / WORK).glob("v[0-9]*"):
        if folder.is_dir() and folder.name[:7] <= published:
            shutil.rmtree(folder, ignore_errors=True)


def _encode_chunks(work: Path, texts: list[str], config: EncoderConfig, chunk_texts: int, rank: int, world: int,
                   show_progress: bool) -> tuple[EncodeStats, int]:
    """Encode this rank's unfinished chunks; returns (stats of this run, chunks found finished)."""
    n_chunks = -(-len(texts) // chunk_texts)
    mine = [c for c in range(n_chunks) if c % world == rank]
    todo = [c for c in mine if not (work / f"chunk-{c:06d}.npy").is_file()]
    stats = EncodeStats()
    if todo:
        if config.device in ("auto", "cuda") and torch.cuda.is_available():  # one GPU per rank, not all on GPU 0
            config = dataclasses.replace(config, device=f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        encoder = ShallowEncoder(config)
        total = sum(len(texts[c * chunk_texts:(c + 1) * chunk_texts]) for c in todo)
        bar = tqdm(total=total, unit="text", desc=f"encode rank {rank}", disable=not show_progress, file=sys.stderr)
        tokens_done = [0]

        def tick(n_texts: int, n_tokens: int) -> None:
            tokens_done[0] += n_tokens
            bar.update(n_texts)
            bar.set_postfix_str(f"{tokens_done[0] / max(bar.format_dict['elapsed'], 1e-9):,.0f} tok/s", refresh=False)

        for c in todo:
            chunk = texts[c * chunk_texts:(c + 1) * chunk_texts]
            vectors, chunk_stats = encoder.encode(chunk, progress=tick)
            # the .npy is the chunk's completion marker, so it is written last: a kill between the two
            # writes leaves a chunk that is simply encoded again
            with writing(work / f"chunk-{c:06d}.json"):
                write_text_atomic(work / f"chunk-{c:06d}.json", json.dumps(asdict(chunk_stats)))
            with writing(work / f"chunk-{c:06d}.npy"):
                save_npy_atomic(work / f"chunk-{c:06d}.npy", vectors)
            stats.add(chunk_stats)
        bar.close()
    return stats, len(mine) - len(todo)


def _finished_chunk_stats(work: Path, n_chunks: int) -> EncodeStats:
    total = EncodeStats()
    for c in range(n_chunks):
        item = json.loads((work / f"chunk-{c:06d}.json").read_text())
        item["length_histogram"] = {int(k): v for k, v in item["length_histogram"].items()}
        total.add(EncodeStats(**item))
    return total


def _manifest(version: str, parent: str | None, config: EncoderConfig, model_dir: Path, sha: str, identity: dict,
              rows: int, stats: EncodeStats, fit: dict | None, store_dtype: str = "float32") -> dict:
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(model_dir, trust_remote_code=config.trust_remote_code)
    return {
        "format": FORMAT, "version": version, "parent": parent,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": str(config.model), "dir": str(model_dir), "sha256": sha,
                  "architecture": (model_config.architectures or [model_config.model_type])[0],
                  "num_layers": model_config.num_hidden_layers, "hidden_size": model_config.hidden_size},
        "encoder": identity, "dim": int(model_config.hidden_size), "rows": rows, "store_dtype": store_dtype,
        "stats": {"new_texts": stats.texts, "tokens": stats.tokens, "computed_tokens": stats.computed_tokens,
                  "truncated": stats.truncated, "encode_seconds": round(stats.seconds, 3)},
        **({"post_transform_fit": fit} if fit else {}),  # where the frozen post-transform was fitted, on how many texts
    }


def _assemble(root: Path, work: Path, version: str, parent: BehaviourStore | None, vocab: BehaviourVocabulary,
              n_chunks: int, dim: int, manifest: dict, transform: PostTransform | None) -> None:
    staging = work / "assembled"
    try:
        with writing(staging, "create"):
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
        dtype = manifest.get("store_dtype", "float32")
        carried = parent.row_chunks if parent is not None else None  # the parent's chunks and digests, kept
        first = parent.rows_count if carried is not None else 0
        per = carried.rows_per_chunk if carried is not None else digest_chunk_rows(dim, stored_dtype(dtype).itemsize)
        stops = [*range(first + per, len(vocab), per), *([len(vocab)] if len(vocab) > first else [])]
        hasher = ChunkHasher(first, stops)
        with writing(staging / VECTORS):
            written = write_vectors(staging / VECTORS, len(vocab), dim,
                                    vector_blocks(parent, work, n_chunks, dim, transform, dtype), dtype, hasher)
        if written != len(vocab) or len(hasher.done) != len(stops):
            raise StoreError(f"assembled {written} rows for a vocabulary of {len(vocab)}: chunks are missing in {work}")
        texts = [texts_digest(vocab.texts[a:b]) for a, b in zip([first, *stops[:-1]], stops)]
        manifest[ROW_CHUNKS] = RowChunks(per, (*(carried.stops if carried else ()), *stops),
                                         (*(carried.vectors if carried else ()), *hasher.done),
                                         (*(carried.texts if carried else ()), *texts)).as_manifest()
        with writing(staging / VOCAB):
            vocab.save(staging / VOCAB)
        # the text index (text -> row for the readers): the parent's extended (its files' checksums checked
        # first), or built from every text when there is no parent or it was written before text indexes
        parent_index = parent.text_index if parent is not None and TEXT_INDEX in parent.manifest else None
        manifest[TEXT_INDEX] = write_text_index(staging, vocab.texts, parent.rows_count if parent else 0, parent_index)
        names = (VECTORS, VOCAB, *TEXT_INDEX_FILES)
        if transform is not None:  # the frozen statistics travel with every version, byte for byte
            with writing(staging / POST_TRANSFORM_FILE):
                save_npy_atomic(staging / POST_TRANSFORM_FILE, transform.to_array())
            digest = file_sha256(staging / POST_TRANSFORM_FILE)
            if parent is not None and digest != parent.encoding["post_transform_sha256"]:
                raise StoreError(f"the post-transform written to {staging} is not byte for byte its parent's "
                                 f"{parent.path / POST_TRANSFORM_FILE}: refusing to publish a refitted store")
            manifest["encoder"]["post_transform_sha256"] = digest
            names += (POST_TRANSFORM_FILE,)
        manifest["files"] = {name: {"sha256": file_sha256(staging / name), "bytes": (staging / name).stat().st_size}
                             for name in names}
        manifest[MANIFEST_DIGEST] = manifest_digest(manifest)  # covers every field, the checksums included
        with writing(staging / MANIFEST):
            write_text_atomic(staging / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
        final = root / version
        with writing(final, "publish"):
            os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # give back the space; the chunks stay for the rerun
        raise
    try:
        write_text_atomic(root / LATEST, version + "\n")
    except OSError as err:
        # unpublish (rename, then delete), so that no version directory stands beside a LATEST that does
        # not name it (the rerun would number its version past it); the rerun assembles it again
        with contextlib.suppress(OSError):
            os.replace(final, staging)
            shutil.rmtree(staging, ignore_errors=True)
        raise StoreWriteError(f"cannot write {root / LATEST}: {reason(err)}") from err
    _drop_dead_work(root, version)  # the version is published: a leftover here is only wasted space


def build_store(root: str | os.PathLike, sample_files: list[str | os.PathLike], config: EncoderConfig, *,
                chunk_texts: int = 4096, show_progress: bool = True, store_dtype: str | None = None) -> BuildReport:
    """Create the first version of a store, or refresh its LATEST version with new texts. ``store_dtype``: the
    rows' dtype on disk (float32, float16, bfloat16; None: the parent's, else float32); a refresh keeps its
    parent's and refuses another."""
    if chunk_texts < 1:
        raise ValueError(f"chunk_texts must be >= 1, got {chunk_texts}")
    if store_dtype is not None:
        stored_dtype(store_dtype)
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise StoreWriteError(f"{root} is a file, not a store folder: remove it or choose another store folder")
    with writing(root, "create the store folder"):
        root.mkdir(parents=True, exist_ok=True)
    rank, world = _rank_world()
    with rank0_folder_lock(root, STORE_BUSY):  # one build per store, from planning to publishing
        return _plan_encode_publish(root, sample_files, config, chunk_texts, show_progress, rank, world, store_dtype)


def _plan_encode_publish(root: Path, sample_files: list[str | os.PathLike], config: EncoderConfig, chunk_texts: int,
                         show_progress: bool, rank: int, world: int, store_dtype: str | None = None) -> BuildReport:
    from transformers import AutoTokenizer

    model_dir = resolve_model_dir(config.model)
    sha = weights_sha256(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=config.trust_remote_code)
    identity = encoder_identity(config, tokenizer_facts(model_dir, tokenizer))
    parent_name = latest_version(root)
    parent = BehaviourStore(root / parent_name) if parent_name else None
    if parent is not None:
        _check_parent(parent, identity, sha)
        if store_dtype is not None and store_dtype != parent.store_dtype:
            raise StoreError(f"cannot refresh {parent.path} (store dtype {parent.store_dtype}) with --store-dtype "
                             f"{store_dtype}: a refresh keeps its parent's rows byte for byte, so its dtype too; leave "
                             f"--store-dtype out (or give {parent.store_dtype}), or build a new store elsewhere")
    store_dtype = parent.store_dtype if parent is not None else store_dtype or "float32"
    vocab = BehaviourVocabulary(parent.vocabulary.texts, parent.vocabulary.counts) if parent else BehaviourVocabulary()
    counts = count_texts(sample_files)
    new_ids = vocab.extend(counts)
    new_texts = [vocab.texts[i] for i in new_ids]
    existing = sorted(p.name for p in root.glob("v[0-9]*") if p.is_dir())
    version = version_name(int(existing[-1][1:]) + 1 if existing else 1)

    stats, resumed = EncodeStats(), 0
    if new_texts:
        work = root / WORK / version
        plan = {"parent": parent_name, "first_new_id": new_ids[0], "new_texts": len(new_texts),
                "texts_sha256": hashlib.sha256("\n".join(new_texts).encode()).hexdigest(), "chunk_texts": chunk_texts,
                "model_sha256": sha,  # the chunks hold raw vectors: the post-transform is not part of their plan
                "encoder": {key: value for key, value in identity.items() if key not in POST_TRANSFORM_FIELDS}}
        try:
            _prepare_work_dir(work, plan, rank)
            stats, resumed = _encode_chunks(work, new_texts, config, chunk_texts, rank, world,
                                            show_progress and rank == 0)
            _barrier()
            n_chunks = -(-len(new_texts) // chunk_texts)
            if rank == 0:
                stats = _finished_chunk_stats(work, n_chunks)  # this run's and earlier runs' chunks alike
                dim = _hidden_size(model_dir, config)
                transform, fit = _frozen_post_transform(parent, work, n_chunks, config, dim, version)
                manifest = _manifest(version, parent_name, config, model_dir, sha, dict(identity), len(vocab), stats,
                                     fit, store_dtype)
                _assemble(root, work, version, parent, vocab, n_chunks, manifest["dim"], manifest, transform)
        except StoreWriteError as err:
            raise _build_failed(err, root, work, version, parent_name) from err.__cause__
        _barrier()
    else:
        version = parent_name  # nothing new: the LATEST version already covers the data

    per_occurrence = _per_occurrence_tokens(counts, config, tokenizer)
    return BuildReport(version=version, parent=parent_name if new_texts else None, rows=len(vocab),
                       distinct_texts=len(counts), occurrences=sum(counts.values()), new_texts=len(new_texts),
                       resumed_chunks=resumed, tokens_encoded=stats.tokens, tokens_per_occurrence_encoder=per_occurrence,
                       truncated=stats.truncated, padding_waste=stats.padding_waste, seconds=stats.seconds)


def _build_failed(err: StoreWriteError, root: Path, work: Path, version: str, parent: str | None) -> StoreWriteError:
    kept = f"The previous version {parent} is intact and still current (LATEST)" if parent else \
        "No version was published"
    done = len(list(work.glob("chunk-*.npy"))) if work.is_dir() else 0
    return StoreWriteError(f"building store version {version} in {root} failed: {err}. {kept}; "
                           f"free space or make the folder writable (or build into another folder), then run the "
                           f"same build again: it resumes from the {done} chunk(s) already encoded in {work}")


def _hidden_size(model_dir: Path, config: EncoderConfig) -> int:
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(model_dir, trust_remote_code=config.trust_remote_code).hidden_size)


def _per_occurrence_tokens(counts, config: EncoderConfig, tokenizer) -> int:
    """Tokens an encoder that re-encodes every occurrence would process (truncation applied)."""
    texts = list(counts)
    total = 0
    for start in range(0, len(texts), 8192):
        batch = texts[start:start + 8192]
        for text, ids in zip(batch, tokenizer(batch, add_special_tokens=True)["input_ids"]):
            total += counts[text] * min(len(ids), config.max_tokens)
    return total
