"""Loading a torch.distributed.checkpoint (DCP) folder without running pickled code from it.

DCP stores tensors as torch.save payloads (read with ``weights_only=True``), but it reads two things
with plain pickle: the ``.metadata`` file and the non-tensor values (e.g. optimiser hyper-parameters,
through ``DefaultLoadPlanner.load_bytes``). A checkpoint folder may come from someone else (a
resumed or evaluated run), so both go through restricted loaders here:

* ``.metadata``: an unpickler that builds only DCP's own metadata records, ``torch.Size``, dtypes,
  layouts and paths; any other global (``os.system``, ...) is refused with an error naming the file;
* non-tensor values: ``torch.load(..., weights_only=True)`` (Python primitives and tensors only).
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import StorageMeta

_ALLOWED = {
    "torch.distributed.checkpoint.metadata": None,  # every record class of DCP's metadata module
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "slice"},
}


class UnsafeCheckpointError(ValueError):
    """A checkpoint file asks to build something other than checkpoint metadata."""


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, handle, source: object):
        super().__init__(handle)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED.get(module, set())
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if allowed is None or name in allowed:
            return super().find_class(module, name)
        raise UnsafeCheckpointError(f"{self.source} asks to load {module}.{name}, which is not checkpoint metadata: "
                                    "refused (nothing from it ran); use checkpoints written by bahe-train only")


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose ``.metadata`` is read by the restricted unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as handle:
            metadata = _MetadataUnpickler(handle, path).load()
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


def load_checkpoint(state: dict, path) -> None:
    """``dcp.load`` of ``path`` into ``state`` in place through the restricted loaders; a refusal comes out
    as :class:`UnsafeCheckpointError` (DCP would wrap it in a CheckpointException of every rank)."""
    import torch.distributed.checkpoint as dcp

    try:
        dcp.load(state, storage_reader=SafeFileSystemReader(str(path)), planner=SafeLoadPlanner())
    except dcp.CheckpointException as err:
        for failure in err.failures.values():
            inner = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(inner, UnsafeCheckpointError):
                raise inner from None
            if "which is not checkpoint metadata" in str(inner):  # DCP re-raises metadata failures as text
                raise UnsafeCheckpointError(str(inner).split("global metadata read failed: ")[-1].split(";")[0]
                                            ) from None
        raise
