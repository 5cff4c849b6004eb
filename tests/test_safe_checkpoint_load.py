"""Nothing unsafe is loaded from a checkpoint folder: DCP would read its .metadata and its non-tensor
values with plain pickle; ours resolves only exact (module, name) pairs of checkpoint metadata (no
dotted names), reads no file outside the checkpoint folder, refuses a truncated shard by name, and
still loads real checkpoints exactly."""

from __future__ import annotations

import io
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.metadata as dcp_metadata
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bahe.training.checkpoint import Checkpointer
from bahe.training.safe_load import (
    DamagedCheckpointError,
    UnsafeCheckpointError,
    _MetadataUnpickler,
    load_checkpoint,
    read_metadata_safely,
)

DCP_MODULE = "torch.distributed.checkpoint.metadata"  # it has imported os and torch


class RunsCode:
    """Unpickling this would run os.system (here: touch a marker file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class DottedGlobalPickler(pickle._Pickler):
    """Pickles os.system as STACK_GLOBAL('torch.distributed.checkpoint.metadata', 'os.system'): protocol 4's
    dotted lookup reaches it through the `os` that module imported."""

    def save_global(self, obj, name=None):
        if obj is not os.system:
            return super().save_global(obj, name)
        self.save(DCP_MODULE)
        self.save("os.system")
        self.write(pickle.STACK_GLOBAL)


def save(tmp_path, state):
    dcp.save(state, checkpoint_id=str(tmp_path / "ckpt"), no_dist=True)
    return tmp_path / "ckpt"


def load(path, state):
    load_checkpoint(state, path)


def real_checkpoint(root: Path):
    """A checkpoint written by the project's Checkpointer (a trained Linear and its AdamW), and a fresh
    state of the same shape to load it into."""
    torch.manual_seed(0)
    module = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(module.parameters(), lr=0.01)
    module(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    path = Checkpointer(root / "checkpoints").save(3, module, optimizer, [], rows_seen=96)

    def fresh() -> dict:
        other = torch.nn.Linear(4, 3)
        opt = torch.optim.AdamW(other.parameters(), lr=0.5)
        other(torch.randn(2, 4)).sum().backward()
        opt.step()
        return {"model": other.state_dict(), "optimizer": opt.state_dict(),
                "progress": {"step": torch.tensor(0), "rows_seen": torch.tensor(0),
                             "schedulers": torch.zeros(0, dtype=torch.long)}}
    return path, module, fresh


def test_a_real_checkpoint_loads_exactly(tmp_path):
    state = {"w": torch.randn(4, 3), "progress": {"step": torch.tensor(7)}, "groups": [{"lr": 0.1, "betas": (0.9, 0.99)}]}
    path = save(tmp_path, state)
    target = {"w": torch.zeros(4, 3), "progress": {"step": torch.tensor(0)}, "groups": [{"lr": 0.0, "betas": (0, 0)}]}
    load(path, target)
    assert torch.equal(target["w"], state["w"]) and int(target["progress"]["step"]) == 7
    assert target["groups"] == [{"lr": 0.1, "betas": (0.9, 0.99)}]


def test_a_checkpointer_checkpoint_loads_exactly(tmp_path):
    path, module, fresh = real_checkpoint(tmp_path)
    state = fresh()
    load(path, state)
    assert torch.equal(state["model"]["weight"], module.weight) and int(state["progress"]["rows_seen"]) == 96
    assert state["optimizer"]["param_groups"][0]["lr"] == 0.01


def test_a_metadata_file_that_would_run_code_is_refused(tmp_path):
    path = save(tmp_path, {"w": torch.ones(2)})
    marker = tmp_path / "ran"
    (path / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(UnsafeCheckpointError, match=r"asks to load 'system' from '(posix|os)'") as info:
        load(path, {"w": torch.zeros(2)})
    assert not marker.exists()
    assert "not checkpoint metadata" in str(info.value) and str(path / ".metadata") in str(info.value)


def test_a_real_metadata_with_a_dotted_global_reaching_os_system_is_refused(tmp_path):
    """The exact attack: a real Checkpointer checkpoint whose .metadata is re-pickled with one extra BUILD
    entry holding STACK_GLOBAL('torch.distributed.checkpoint.metadata', 'os.system') + REDUCE. Plain pickle
    (what DCP uses) runs it; ours refuses before anything runs, naming the file and the name."""
    path, _, fresh = real_checkpoint(tmp_path)
    marker = tmp_path / "ran"
    metadata = pickle.loads((path / ".metadata").read_bytes())  # our own file: trusted here
    metadata.__dict__["extra"] = RunsCode(marker)
    buffer = io.BytesIO()
    DottedGlobalPickler(buffer, protocol=4).dump(metadata)
    attack = buffer.getvalue()
    assert b"os.system" in attack and b"posix" not in attack
    pickle.loads(attack)  # proof that the stream is live: plain unpickling runs the command
    assert marker.exists()
    marker.unlink()
    (path / ".metadata").write_bytes(attack)
    with pytest.raises(UnsafeCheckpointError) as info:
        load(path, fresh())
    assert not marker.exists()
    message = str(info.value)
    assert str(path / ".metadata") in message and "'os.system'" in message and DCP_MODULE in message


@pytest.mark.parametrize("name", ["os", "torch", "Enum", "dataclass", "StorageMeta.__init__"])
def test_other_names_of_the_metadata_module_are_refused(tmp_path, name):
    """Only DCP's record classes: not the modules or helpers the metadata module happens to import."""
    stream = b"\x80\x04" + pickle.SHORT_BINUNICODE + bytes([len(DCP_MODULE)]) + DCP_MODULE.encode() + \
        pickle.SHORT_BINUNICODE + bytes([len(name)]) + name.encode() + pickle.STACK_GLOBAL + pickle.STOP
    (tmp_path / ".metadata").write_bytes(stream)
    with pytest.raises(UnsafeCheckpointError, match=f"asks to load '{name}' from '{DCP_MODULE}'"):
        read_metadata_safely(tmp_path)


def test_an_allowed_name_that_resolves_to_something_else_is_refused(tmp_path, monkeypatch):
    """The resolved object must be the class defined under that name in that module."""
    path = save(tmp_path, {"w": torch.ones(2)})
    monkeypatch.setattr(dcp_metadata, "StorageMeta", os.system)
    with pytest.raises(UnsafeCheckpointError, match="which here is <built-in function system>"):
        read_metadata_safely(path)


def test_build_on_a_class_is_refused(tmp_path):
    """BUILD with slot state on a class would set its attributes (e.g. poison DCP's records)."""
    stream = b"\x80\x04" + pickle.SHORT_BINUNICODE + bytes([len(DCP_MODULE)]) + DCP_MODULE.encode() + \
        pickle.SHORT_BINUNICODE + b"\x0bStorageMeta" + pickle.STACK_GLOBAL + pickle.NONE + pickle.EMPTY_DICT + \
        pickle.SHORT_BINUNICODE + b"\x07save_id" + pickle.NONE + pickle.SETITEM + pickle.TUPLE2 + pickle.BUILD + \
        pickle.STOP
    (tmp_path / ".metadata").write_bytes(stream)
    before = dict(vars(dcp_metadata.StorageMeta))
    with pytest.raises(UnsafeCheckpointError, match="set attributes of the class StorageMeta"):
        read_metadata_safely(tmp_path)
    assert dict(vars(dcp_metadata.StorageMeta)) == before


@pytest.mark.parametrize("where", ["dotdot", "absolute", "symlink"])
def test_a_storage_path_outside_the_checkpoint_folder_is_refused(tmp_path, where):
    """A .metadata pointing a tensor at ../x, /abs/x or a symlink leading out: refused, naming the file and
    the path, although the outside file holds valid tensor bytes (plain DCP reads it)."""
    path, _, fresh = real_checkpoint(tmp_path)
    shard = next(path.glob("*.distcp"))
    outside = tmp_path / "outside.distcp"
    shutil.copy(shard, outside)
    metadata = pickle.loads((path / ".metadata").read_bytes())
    entry = {"dotdot": "../../outside.distcp", "absolute": str(outside), "symlink": "link.distcp"}[where]
    if where == "symlink":
        (path / "link.distcp").symlink_to(outside)
    for info in metadata.storage_data.values():
        info.relative_path = entry
    (path / ".metadata").write_bytes(pickle.dumps(metadata, protocol=4))
    state = fresh()
    dcp.load(state, checkpoint_id=str(path), no_dist=True)  # stock DCP follows the path
    with pytest.raises(UnsafeCheckpointError) as info:
        load(path, fresh())
    assert str(path / ".metadata") in str(info.value) and repr(entry) in str(info.value)
    assert "not a file inside" in str(info.value)


def test_a_truncated_shard_is_named(tmp_path):
    path, _, fresh = real_checkpoint(tmp_path)
    shard = next(path.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(DamagedCheckpointError, match=f"checkpoint shard {shard} is truncated or damaged"):
        load(path, fresh())


def test_a_missing_shard_and_junk_metadata_are_named(tmp_path):
    path, _, fresh = real_checkpoint(tmp_path)
    shard = next(path.glob("*.distcp"))
    shard.unlink()
    with pytest.raises(DamagedCheckpointError, match=f"lacks its shard {shard.name}"):
        load(path, fresh())
    (path / ".metadata").write_bytes(b"not a pickle at all")
    with pytest.raises(DamagedCheckpointError, match="is not readable checkpoint metadata"):
        load(path, fresh())


def test_a_non_tensor_value_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = save(tmp_path, {"w": torch.ones(2), "extra": {"x": RunsCode(marker)}})
    assert not marker.exists()  # saving pickles it, nothing runs
    with pytest.raises(UnsafeCheckpointError, match="'extra.x' is not plain data"):
        load(path, {"w": torch.zeros(2), "extra": {"x": None}})
    assert not marker.exists()


def test_torch_weights_only_refuses_the_dotted_global_too(tmp_path):
    """The other unpickler on checkpoint paths (tensor shards, non-tensor values, warm-start files) is
    torch's weights_only one: it matches 'module.name' exactly, so the dotted name is refused as well."""
    marker = tmp_path / "ran"
    stream = b"\x80\x02" + pickle.GLOBAL + f"{DCP_MODULE}\nos.system\n".encode() + _text(f"touch {marker}") + \
        pickle.TUPLE1 + pickle.REDUCE + pickle.STOP
    with pytest.raises(pickle.UnpicklingError, match="os.system"):
        torch.load(io.BytesIO(stream), weights_only=True)
    assert not marker.exists()


def test_unsafe_checkpoint_error_is_a_value_error():
    assert issubclass(UnsafeCheckpointError, ValueError) and issubclass(DamagedCheckpointError, ValueError)


# ---- property: no name outside the allow-list is ever resolved ----------------------------------------

def _expected_allowed() -> set[int]:
    """Written out here, independently of safe_load.ALLOWED."""
    import collections
    import pathlib

    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.serialization import _get_layout

    objects = [getattr(dcp_metadata, n) for n in ("ChunkStorageMetadata", "TensorStorageMetadata", "Metadata",
                                                  "BytesStorageMetadata", "MetadataIndex", "TensorProperties",
                                                  "StorageMeta", "_MEM_FORMAT_ENCODING")]
    objects += [_StorageInfo, torch.Size, _get_layout, collections.OrderedDict, set, frozenset, slice,
                pathlib.Path, pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath, pathlib.PureWindowsPath]
    objects += [v for v in vars(torch).values() if isinstance(v, torch.dtype)]
    return {id(o) for o in objects}


ALLOWED_IDS = _expected_allowed()
MODULES = [DCP_MODULE, "torch.distributed.checkpoint.filesystem", "torch", "torch.serialization", "pathlib",
           "collections", "builtins", "os", "posix", "subprocess", "sys", "shutil", "torch.distributed.checkpoint",
           "pickle", "importlib", "__builtin__", "copyreg", "functools"]
NAMES = ["Metadata", "StorageMeta", "_StorageInfo", "Size", "float32", "_get_layout", "PosixPath", "OrderedDict",
         "set", "slice", "system", "os.system", "os", "torch", "eval", "exec", "getattr", "__import__", "apply",
         "load", "loads", "Popen", "os.path", "pathlib.os.system", "torch.load", "sys.modules", "Metadata.__init__",
         "Path.write_text", "_MEM_FORMAT_ENCODING", "dataclass", "field", "import_module", "partial", "rmtree"]


def _text(value: str) -> bytes:
    raw = value.encode()
    return pickle.BINUNICODE + len(raw).to_bytes(4, "little") + raw


names = st.one_of(st.sampled_from(NAMES), st.text(min_size=0, max_size=12),
                  st.lists(st.sampled_from(NAMES), min_size=2, max_size=3).map(".".join))
modules = st.one_of(st.sampled_from(MODULES), st.text(min_size=0, max_size=12))
fragments = st.one_of(
    st.tuples(modules, names).map(lambda mn: _text(mn[0]) + _text(mn[1]) + pickle.STACK_GLOBAL),
    st.tuples(modules, names).map(lambda mn: pickle.GLOBAL + f"{mn[0]}\n{mn[1]}\n".encode("utf-8", "replace")),
    names.map(_text),
    st.sampled_from([pickle.REDUCE, pickle.BUILD, pickle.NEWOBJ, pickle.EMPTY_TUPLE, pickle.TUPLE1, pickle.TUPLE2,
                     pickle.MARK, pickle.TUPLE, pickle.EMPTY_DICT, pickle.SETITEMS, pickle.SETITEM, pickle.POP,
                     pickle.MEMOIZE, pickle.BINGET + b"\x00", pickle.NONE, pickle.NEWTRUE, pickle.BININT1 + b"\x07",
                     pickle.EMPTY_LIST, pickle.APPENDS, pickle.EXT1 + b"\x01", pickle.STOP, pickle.DUP,
                     pickle.OBJ, pickle.INST + b"os\nsystem\n", pickle.STACK_GLOBAL, pickle.NEWOBJ_EX]),
    st.binary(max_size=6))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.lists(fragments, max_size=14), protocol=st.sampled_from([b"\x80\x02", b"\x80\x04", b"\x80\x05", b""]))
def test_property_no_name_outside_the_allow_list_is_ever_resolved(body, protocol):
    """Any opcode stream, any (module, name) pairs (dotted names, modules that import os): every object the
    unpickler resolves is one of the allowed ones; every other outcome is UnsafeCheckpointError or
    DamagedCheckpointError (a pickle error), never a loaded object."""
    resolved = []
    original = _MetadataUnpickler.find_class

    def recording(self, module, name):
        obj = original(self, module, name)
        resolved.append(obj)
        return obj

    _MetadataUnpickler.find_class = recording
    try:
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / ".metadata").write_bytes(protocol + b"".join(body) + pickle.STOP)
            try:
                read_metadata_safely(Path(folder))
            except (UnsafeCheckpointError, DamagedCheckpointError):
                pass
            else:
                pytest.fail("a stream that is not a DCP checkpoint loaded")
    finally:
        _MetadataUnpickler.find_class = original
    assert all(id(obj) in ALLOWED_IDS for obj in resolved), resolved
