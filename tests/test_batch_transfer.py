"""model/batch.py: ``BaheBatch`` moves, pins and stream-records ALL its fields, ``behaviour_features``
included (torchrec's ``Batch`` methods know only dense, sparse and labels; TrainPipelineSparseDist
calls these on every batch it copies to the device).

On a CPU-only torch, ``Tensor.pin_memory`` and ``Tensor.record_stream`` raise (no accelerator; the CPU
backend has no record_stream kernel), so here ``to`` is checked for real with the ``meta`` device and
``pin_memory`` / ``record_stream`` through spies on the tensor methods they must call; the real
pinning, device copy and stream recording run only where CUDA is available (skipped otherwise)."""

from __future__ import annotations

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from bahe.model.batch import BaheBatch

CUDA = torch.cuda.is_available()


def make_batch(with_behaviours: bool = True) -> BaheBatch:
    sparse = KeyedJaggedTensor.from_lengths_sync(keys=["user_id", "item_id"], values=torch.tensor([3, 5, 7, 9]),
                                                 lengths=torch.tensor([1, 1, 1, 1]))
    behaviours = KeyedJaggedTensor(  # a 2-row batch: sequences of 2 and 1, one item text each
        keys=["seq_liked", "item_text"], values=torch.tensor([11, 12, 13, 20, 21]),
        lengths=torch.tensor([2, 1, 1, 1]), offsets=torch.tensor([0, 2, 3, 4, 5]))  # holds all three tensors
    return BaheBatch(dense_features=torch.tensor([[0.5, 1.0], [2.0, -1.0]]), sparse_features=sparse,
                     labels=torch.tensor([1, 0], dtype=torch.int32),
                     behaviour_features=behaviours if with_behaviours else None)


def tensors(batch: BaheBatch) -> dict[str, torch.Tensor]:
    """Every tensor a batch holds, by name (the KJTs' values, and lengths / offsets where they are held:
    a KJT computes missing offsets on demand, from the lengths it holds)."""
    out = {"dense": batch.dense_features, "labels": batch.labels}
    for name in ("sparse", "behaviour"):
        kjt = getattr(batch, f"{name}_features")
        if kjt is None:
            continue
        out[f"{name}.values"] = kjt.values()
        for part in ("lengths", "offsets"):
            held = getattr(kjt, f"{part}_or_none")()
            if held is not None:
                out[f"{name}.{part}"] = held
    return out


def assert_same_content(moved: BaheBatch, original: BaheBatch) -> None:
    assert isinstance(moved, BaheBatch)
    for kjt_name in ("sparse_features", "behaviour_features"):
        a, b = getattr(moved, kjt_name), getattr(original, kjt_name)
        assert (a is None) == (b is None)
        if a is not None:
            assert a.keys() == b.keys()
    a, b = tensors(moved), tensors(original)
    assert a.keys() == b.keys()
    for name in b:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        if a[name].device.type != "meta":
            assert torch.equal(a[name].cpu(), b[name]), name


@pytest.mark.parametrize("with_behaviours", [True, False])
def test_to_moves_every_field_including_behaviour_features(with_behaviours):
    batch = make_batch(with_behaviours)
    moved = batch.to(torch.device("meta"), non_blocking=True)
    assert_same_content(moved, batch)
    assert {name: t.device.type for name, t in tensors(moved).items()} == dict.fromkeys(tensors(batch), "meta")
    back = batch.to(torch.device("cpu"))
    assert_same_content(back, batch)


@pytest.fixture
def pin_spy(monkeypatch):
    """Tensor.pin_memory replaced by a copy that is remembered as 'pinned'."""
    pinned: list[torch.Tensor] = []

    def fake_pin(self, *args, **kwargs):
        copy = self.clone()
        pinned.append(copy)
        return copy

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    return pinned


@pytest.mark.parametrize("with_behaviours", [True, False])
def test_pin_memory_returns_a_bahe_batch_with_every_field_pinned(pin_spy, with_behaviours):
    batch = make_batch(with_behaviours)
    assert ("behaviour.offsets" in tensors(batch)) == with_behaviours
    result = batch.pin_memory()
    assert_same_content(result, batch)
    pinned_ids = {id(t) for t in pin_spy}
    unpinned = [name for name, t in tensors(result).items() if id(t) not in pinned_ids]
    assert unpinned == []


@pytest.mark.skipif(CUDA, reason="CUDA is available: the real pinning test runs instead")
def test_pin_memory_without_an_accelerator_raises_torchs_error():
    """What torch does without an accelerator: pin_memory raises (nothing is silently unpinned). The CPU build says
    it needs an accelerator, a CUDA build on a machine without a driver (make test-range-max) that it found none."""
    with pytest.raises(RuntimeError, match="accelerator|no NVIDIA driver"):
        make_batch().pin_memory()


def test_record_stream_reaches_every_tensor_including_behaviour_features(monkeypatch):
    recorded: list[tuple[int, object]] = []
    monkeypatch.setattr(torch.Tensor, "record_stream",
                        lambda self, stream: recorded.append((id(self), stream)))
    batch = make_batch()
    stream = torch.Stream(device="cpu")  # any stream (recorded, not run); a CUDA build here has no driver
    batch.record_stream(stream)
    assert {s for _, s in recorded} == {stream}
    ids = {i for i, _ in recorded}
    assert [name for name, t in tensors(batch).items() if id(t) not in ids] == []
    recorded.clear()
    make_batch(with_behaviours=False).record_stream(stream)  # the DLRM-only arm's batch: no behaviours
    assert len(recorded) == len(tensors(make_batch(with_behaviours=False)))


@pytest.mark.skipif(not CUDA, reason="needs CUDA: pinned host memory and CUDA streams")
def test_cuda_pin_copy_and_record_stream_for_real():
    batch = make_batch()
    pinned = batch.pin_memory()
    assert all(t.is_pinned() for t in tensors(pinned).values())
    assert_same_content(pinned, batch)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        on_gpu = pinned.to(torch.device("cuda"), non_blocking=True)
    torch.cuda.current_stream().wait_stream(side)
    on_gpu.record_stream(torch.cuda.current_stream())
    assert all(t.is_cuda for t in tensors(on_gpu).values())
    assert_same_content(on_gpu, batch)
