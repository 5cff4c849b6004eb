"""The exported predictor (serving/predictor.py): given a request's raw dense features, raw ids and the cached
text features, its TorchScript file returns the full BAHE model's logits on every row (fp32 ID tables through
torchrec's inference quantization: exact; int8: close); it loads and runs in a fresh Python that cannot
import this project; a malformed request stops with a message naming the input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.model_fixtures import make_tiny_pipeline

FRESH_PROCESS = r"""
import sys
sys.path.append(sys.argv[1])  # torch, fbgemm_gpu and safetensors only: -S skips site (and the project's .pth)
try:
    import bahe
except ImportError:
    pass
else:
    raise SystemExit("the project is importable here: " + str(bahe.__path__))
import fbgemm_gpu  # registers fbgemm's operators (the quantized ID tables)
import torch
from safetensors.torch import load_file, save_file

inputs = load_file("inputs.safetensors")
out = {}
for name in ("predictor.pt", "predictor_int8.pt"):
    module = torch.jit.load(name)
    with torch.no_grad():
        out[name] = module(inputs["dense"], inputs["id_values"], inputs["id_lengths"], inputs["user_text"],
                           inputs["item_text"]).contiguous()
save_file({"fp32": out["predictor.pt"], "int8": out["predictor_int8.pt"]}, "logits.safetensors")
print(",".join(sorted(m for m in sys.modules if m.split(".")[0] in ("bahe", "torchrec"))))
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The tiny pipeline's BAHE model (untrained weights; the store loaded), its 400 rows as the full model sees
    them, the predictor's inputs for them (text features computed by the exporter's functions), and the
    full model's logits."""
    from bahe.ctr_data.parquet_io import SampleReader
    from bahe.model.behaviour_lookup import load_store_rows
    from bahe.model.dense_features import DenseNormalizer
    from bahe.model.factory import build_model
    from bahe.serving.features import item_features, user_features
    from bahe.serving.requests import request_tensors

    root = tmp_path_factory.mktemp("predictor")
    pipeline = make_tiny_pipeline(root / "pipeline", samples=400)
    normalizer = DenseNormalizer.fit(SampleReader(pipeline.data))
    torch.manual_seed(0)
    model, batcher, store = build_model(pipeline.config(), pipeline.schema, device="cpu", dense_normalizer=normalizer)
    load_store_rows(model, store)
    model.eval()
    table = pipeline.table()
    batch = batcher(table)
    with torch.no_grad():
        expected = model(batch.dense_features, batch.sparse_features, batch.behaviour_features).squeeze(-1)
    manifest = {"dense_columns": list(pipeline.schema.dense_columns), "id_features": list(batcher.id_features)}
    dense, id_values, id_lengths = request_tensors(table, manifest)
    item_ids = batch.behaviour_features["item_text"]
    present = item_ids.lengths().bool().numpy()
    store_ids = np.zeros(table.num_rows, dtype=np.int64)  # an empty title: store id 0
    store_ids[present] = item_ids.values().numpy()
    inputs = {"dense": dense, "id_values": id_values, "id_lengths": id_lengths,
              "user_text": torch.from_numpy(user_features(model.text_arch, batcher, table, batch_size=64)),
              "item_text": torch.from_numpy(item_features(model.text_arch, store_ids))}
    return model, batcher, normalizer, inputs, expected, root


_SCRIPTED: dict = {}


def scripted(served, tables: str):
    """The TorchScript predictor of the fixture's model (scripted once per table precision and fixture)."""
    from bahe.serving.predictor import cached_predictor, script

    model, batcher, normalizer, *_ = served
    key = (id(model), tables)
    if key not in _SCRIPTED:
        _SCRIPTED[key] = script(cached_predictor(model, batcher, normalizer, tables=tables))
    return _SCRIPTED[key]


def test_scripted_predictor_returns_the_full_models_logits_on_every_row(served):
    model, _, _, inputs, expected, _ = served
    with torch.no_grad():
        fp32 = scripted(served, "fp32")(**inputs)
        int8 = scripted(served, "int8")(**inputs)
    assert fp32.shape == expected.shape == (400,)
    assert (fp32 - expected).abs().max() <= 1e-5
    assert (int8 - expected).abs().max() <= 0.05 and not torch.equal(int8, fp32)  # int8 rows: close, not equal
    assert model.text_arch is not None  # exporting left the model as it was


def test_predictor_file_runs_in_a_fresh_python_that_cannot_import_the_project(served, tmp_path):
    from bahe.serving.predictor import predictor_bytes

    *_, inputs, expected, _ = served
    (tmp_path / "predictor.pt").write_bytes(predictor_bytes(scripted(served, "fp32"), {"id_tables": "fp32"}))
    (tmp_path / "predictor_int8.pt").write_bytes(predictor_bytes(scripted(served, "int8"), {"id_tables": "int8"}))
    save_file({name: value.contiguous() for name, value in inputs.items()}, str(tmp_path / "inputs.safetensors"))
    environment = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    site_packages = str(Path(torch.__file__).resolve().parents[1])
    done = subprocess.run([sys.executable, "-I", "-S", "-c", FRESH_PROCESS, site_packages], cwd=tmp_path,
                          env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == ""  # neither the project nor torchrec was imported there
    logits = load_file(str(tmp_path / "logits.safetensors"))
    assert (logits["fp32"] - expected).abs().max() <= 1e-5
    assert (logits["int8"] - expected).abs().max() <= 0.05


def test_malformed_requests_stop_with_a_message_naming_the_input(served):
    *_, inputs, _, _ = served
    predictor = scripted(served, "fp32")
    bad = {"dense": {"dense": inputs["dense"][:, :1]},
           "ids must be >= 0": {"id_values": -inputs["id_values"] - 1},
           "item_text must be B x D: D floats": {"item_text": inputs["item_text"][:, :-1]},
           "user_text must be B x N x D: N sequence features": {"user_text": inputs["user_text"][:, :1]},
           "id_lengths must hold one length per ID feature": {"id_lengths": inputs["id_lengths"][:-1]}}
    for message, change in bad.items():
        with pytest.raises(torch.jit.Error, match=message):
            predictor(**{**inputs, **change})


def test_lean_interaction_gives_torchrecs_dlrm_logits(served):
    """The predictor's lean interaction (one concatenation, one index_select; serving/predictor.py) computes what
    torchrec's own DLRM forward computes, bit for bit, on the same modules: the serving bench's like-for-like
    DLRM arm and the cached predictor rest on it."""
    from torchrec import EmbeddingBagCollection
    from torchrec.models.dlrm import DLRM

    from bahe.serving.predictor import dlrm_predictor, script

    model, batcher, normalizer, inputs, _, _ = served
    torch.manual_seed(1)
    ebc = EmbeddingBagCollection(tables=model.sparse_arch.embedding_bag_collection.embedding_bag_configs())
    dlrm = DLRM(ebc, inputs["dense"].size(1), [16, ebc.embedding_bag_configs()[0].embedding_dim], [16, 1]).eval()
    args = (inputs["dense"], inputs["id_values"], inputs["id_lengths"])
    with torch.no_grad():
        stock = script(dlrm_predictor(dlrm, batcher, normalizer))(*args)
        lean = script(dlrm_predictor(dlrm, batcher, normalizer, lean=True))(*args)
    assert stock.shape == (400,) and stock.std() > 0
    assert torch.equal(lean, stock)
