"""Loading a torch.distributed.checkpoint (DCP) folder without running pickled code from it.

DCP stores tensors as torch.save payloads (read with ``weights_only=True``), but it reads two things
with plain pickle: the ``.metadata`` file and the non-tensor values (e.g. optimiser hyper-parameters,
through ``DefaultLoadPlanner.load_bytes``). A checkpoint folder may come from someone else (a
resumed or evaluated run), so both go through restricted loaders here:

* ``.metadata``: an unpickler that resolves only the exact (module, name) pairs of ``ALLOWED`` (DCP's
  metadata records, ``torch.Size``, dtypes, layouts, paths, a few builtins). A dotted name (pickle
  protocol 4 would follow ``os.system`` through a module that imported ``os``) is refused, and what a
  name resolves to must be the class or function defined under that very name. BUILD on a class
  (which would set attributes of the class) is refused too. Then every storage path must be a file
  inside the checkpoint folder, long enough for the bytes the metadata promises (a truncated shard);
* non-tensor values: ``torch.load(..., weights_only=True)`` (Python primitives and tensors only).

Every refusal is raised before DCP reads a tensor, on every rank (each reads ``.metadata`` itself).
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

_DCP_RECORDS = ("ChunkStorageMetadata", "TensorStorageMetadata", "BytesStorageMetadata", "Metadata",
                "MetadataIndex", "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING")
_DTYPES = tuple(sorted(n for n in dir(torch) if isinstance(getattr(torch, n, None), torch.dtype)))

# exact (module, name) pairs -> what the name must be: "class", "function" or "dtype"
ALLOWED: dict[tuple[str, str], str] = {
    **{("torch.distributed.checkpoint.metadata", n): "class" for n in _DCP_RECORDS},
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): "class",
    ("torch", "Size"): "class",
    **{("torch", n): "dtype" for n in _DTYPES},
    ("torch.serialization", "_get_layout"): "function",
    **{("pathlib", n): "class" for n in ("Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath")},
    ("collections", "OrderedDict"): "class",
    **{("builtins", n): "class" for n in ("set", "frozenset", "slice")},
}
_NOTE = "refused (nothing from it ran); use checkpoints written by bahe-train only"


class UnsafeCheckpointError(ValueError):
    """A checkpoint file asks to build something other than checkpoint metadata, or to read a file
    outside its folder."""


class DamagedCheckpointError(ValueError):
    """A checkpoint file is missing, truncated or unreadable; the message names it."""


def resolve_allowed(module: str, name: str, source: object) -> Any:
    """The object an allowed (module, name) pair names; anything else raises UnsafeCheckpointError."""
    kind = ALLOWED.get((module, name))
    if kind is None or "." in name:
        raise UnsafeCheckpointError(f"{source} asks to load {name!r} from {module!r}, which is not checkpoint "
                                    f"metadata: {_NOTE}")
    import importlib

    obj = getattr(importlib.import_module(module), name, None)
    if kind == "dtype":
        fits = isinstance(obj, torch.dtype)
    else:
        fits = (isinstance(obj, type) if kind == "class" else callable(obj) and not isinstance(obj, type)) \
            and getattr(obj, "__module__", None) == module and getattr(obj, "__qualname__", None) == name
    if not fits:
        raise UnsafeCheckpointError(f"{source} asks to load {name!r} from {module!r}, which here is {obj!r}, not "
                                    f"the {kind} checkpoint metadata uses: {_NOTE}")
    return obj


class _MetadataUnpickler(pickle._Unpickler):
    """Pure-Python unpickler (its BUILD can be checked) whose globals go through :func:`resolve_allowed`."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, handle, source: object):
        super().__init__(handle)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        return resolve_allowed(module, name, self.source)

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError(f"{self.source} asks for a persistent object {pid!r}: {_NOTE}")

    def load_build(self) -> None:
        if isinstance(self.stack[-2] if len(self.stack) > 1 else None, type):
            raise UnsafeCheckpointError(f"{self.source} asks to set attributes of the class "
                                        f"{self.stack[-2].__qualname__}: {_NOTE}")
        pickle._Unpickler.load_build(self)

    dispatch[pickle.BUILD[0]] = load_build


def _check_storage(metadata: Metadata, folder: Path, source: Path) -> None:
    """Every storage entry is a file inside ``folder`` holding the bytes it promises."""
    storage = getattr(metadata, "storage_data", None)
    if not isinstance(storage, dict):
        raise UnsafeCheckpointError(f"{source} has no storage table (storage_data): not a DCP checkpoint; {_NOTE}")
    root, sizes = folder.resolve(), {}
    for info in storage.values():
        if type(info) is not _StorageInfo or not isinstance(info.relative_path, str) \
                or not isinstance(info.offset, int) or not isinstance(info.length, int):
            raise UnsafeCheckpointError(f"{source} has a storage entry that is not a DCP storage record: {_NOTE}")
        rel = info.relative_path
        target = (root / rel).resolve()
        if not rel or os.path.isabs(rel) or ".." in Path(rel).parts or "\\" in rel or target.parent != root:
            raise UnsafeCheckpointError(f"{source} points a tensor at {rel!r}, which is not a file inside {folder}: "
                                        f"{_NOTE}")
        if rel not in sizes:
            try:
                sizes[rel] = target.stat().st_size
            except OSError as err:
                raise DamagedCheckpointError(f"checkpoint {folder} lacks its shard {rel} ({err.strerror}): the "
                                             "checkpoint is incomplete; restore that file or point LATEST at an "
                                             "earlier complete step-* folder") from None
        if info.offset < 0 or info.length < 0 or info.offset + info.length > sizes[rel]:
            raise DamagedCheckpointError(f"checkpoint shard {target} is truncated or damaged: it holds {sizes[rel]} "
                                         f"bytes, the metadata needs bytes {info.offset}..{info.offset + info.length}; "
                                         "restore that file or point LATEST at an earlier complete step-* folder")


def read_metadata_safely(folder: Path) -> Metadata:
    """``folder/.metadata`` through the restricted unpickler, its storage paths and sizes checked."""
    folder = Path(folder)
    source = folder / ".metadata"
    try:
        with open(source, "rb") as handle:
            metadata = _MetadataUnpickler(handle, source).load()
    except UnsafeCheckpointError:
        raise
    except OSError as err:
        raise DamagedCheckpointError(f"cannot read {source} ({err.strerror}): the checkpoint is incomplete; point "
                                     "LATEST at an earlier complete step-* folder") from None
    except Exception as err:  # junk or truncated bytes: pickle's own errors, never a resolved global
        raise DamagedCheckpointError(f"{source} is not readable checkpoint metadata ({type(err).__name__}: {err}); "
                                     "restore it or point LATEST at an earlier complete step-* folder") from None
    if type(metadata) is not Metadata:
        raise UnsafeCheckpointError(f"{source} holds a {type(metadata).__name__}, not DCP Metadata: {_NOTE}")
    _check_storage(metadata, folder, source)
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose ``.metadata`` is read by the restricted unpickler (and checked)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:  # DCP's per-rank fallback: we only write global metadata
            raise FileNotFoundError("no per-rank metadata")
        metadata = read_metadata_safely(Path(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that reads non-tensor values with ``weights_only=True`` (the same placement
    as DefaultLoadPlanner.load_bytes, which would unpickle anything)."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as err:
            raise UnsafeCheckpointError(f"the checkpoint value {read_item.dest_index.fqn!r} is not plain data "
                                        f"(refused by weights_only; nothing from it ran): {err}") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


class CheckpointMismatchError(ValueError):
    """A checkpoint does not load into this model (another shape or layer count) or its bytes are damaged."""


def load_checkpoint(state: dict, path) -> None:
    """``dcp.load`` of ``path`` into ``state`` in place through the restricted loaders. A refusal raises
    :class:`UnsafeCheckpointError` / :class:`DamagedCheckpointError` before any tensor is read; a
    checkpoint that does not fit ``state`` raises :class:`CheckpointMismatchError` (one line)."""
    import torch.distributed.checkpoint as dcp

    read_metadata_safely(path)  # raises here, on every rank, rather than inside DCP's gathering
    try:
        dcp.load(state, storage_reader=SafeFileSystemReader(str(path)), planner=SafeLoadPlanner())
    except dcp.CheckpointException as err:
        reasons = []
        for failure in err.failures.values():
            inner = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(inner, (UnsafeCheckpointError, DamagedCheckpointError)):
                raise inner from None
            reasons.append(f"{type(inner).__name__}: {str(inner).strip().splitlines()[0][:300]}")
        raise CheckpointMismatchError(
            f"checkpoint {path} does not load into this model ({reasons[0] if reasons else err}): either it was "
            "trained with other model flags or --batch-size (resume or evaluate with the run's, see its "
            "run_config.json; or train into a new --out folder), or its files are damaged (point LATEST at an "
            "earlier complete step-* folder)") from None
