"""The two arms of bench/efficiency_bench.py, each a training step over pre-built batches.

* ``full`` pipeline (default where torchrec and fbgemm work): each arm is built by
  :func:`model.factory.build_model` exactly as the trainer builds it -- BAHE from the real behaviour
  store (``bahe.embeddings.build.build_store``; rows copied with ``load_store_rows``), the token-level
  baseline (``text.arm = "token_level"``) from the same LLM -- wrapped in ``BAHETrain``; batches come
  from the factory's own batcher (``SampleBatcher`` / ``TokenBatcher``). One process, no
  DistributedModelParallel: the ID tables and the behaviour table are plain (unsharded) torchrec
  modules, the ID tables trained by the same dense optimizer as the rest. The behaviour table is
  frozen with ``requires_grad_(False)`` (under DMP its fused in-backward optimizer has lr=0).
* ``core`` pipeline (the fallback where torchrec cannot run, e.g. a GPU image without fbgemm-gpu): the
  same LLM modules (``load_decoder_slice`` for the token arm's frozen layers 0..k-1,
  ``DeepLayerAggregator`` for the trainable layers k..k+deep-1 of both arms), the same store rows in a
  frozen ``nn.Embedding``, and a plain MLP head over the N + 1 (BAHE) or 2 (token) text features; no
  ID or dense features. The LLM layers are nearly all of either arm's work, so the ratios carry over;
  the JSON says which pipeline ran.

Both pipelines: Adam (lr 1e-4) over every trainable parameter, fp32 master weights; ``--dtype bf16``
runs the forward under ``torch.autocast(bfloat16)`` in both arms.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from torch import nn

from bahe.ctr_data.parquet_io import SampleReader
from bench.efficiency_setup import SEQUENCE_TYPES, Shape

ARMS = ("token", "bahe")
EMBEDDING_DIM = 64
MAX_ITEM_TOKENS = 32  # the token-level arm's item-title width (TokenLevelTextArch's default)


def torchrec_problem(device: torch.device) -> str | None:
    """Why the full pipeline cannot run here (None: it can)."""
    try:
        import torchrec  # noqa: F401
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor  # noqa: F401

        values = torch.ones(3, 1, device=device)
        offsets = torch.tensor([0, 1, 3], device=device)
        torch.ops.fbgemm.jagged_to_padded_dense(values, [offsets], [2], 0.0)
    except Exception as err:  # noqa: BLE001 -- any failure means: use the fallback
        return f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    return None


@dataclass
class Arm:
    name: str
    module: nn.Module
    loss: Callable[[Any], torch.Tensor]
    batches: list
    optimizer: torch.optim.Optimizer = field(init=False)
    params: dict = field(init=False)

    def __post_init__(self) -> None:
        trainable = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(trainable, lr=1e-4)
        self.params = {"total": sum(p.numel() for p in self.module.parameters()),
                       "trainable": sum(p.numel() for p in trainable)}

    def step(self, batch, bf16: bool, device: torch.device) -> torch.Tensor:
        amp = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with amp:
            loss = self.loss(batch)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def build_arm(name: str, pipeline: str, shape: Shape, mc: dict, data: Path, store_root: Path, model_dir: Path,
              batch_size: int, n_batches: int, device: torch.device) -> Arm:
    table = SampleReader(data).read_all()
    if table.num_rows < batch_size * n_batches:
        raise ValueError(f"{data} has {table.num_rows} rows; {n_batches} batches of {batch_size} need more (--samples)")
    slices = [table.slice(i * batch_size, batch_size) for i in range(n_batches)]
    torch.manual_seed(0)
    if pipeline == "full":
        return _full(name, shape, mc, data, store_root, model_dir, slices, device)
    return _core(name, shape, mc, store_root, model_dir, slices, device)


# full: the repo's factory -----------------------------------------------------------------------------

def _full(name, shape, mc, data, store_root, model_dir, slices, device) -> Arm:
    from bahe.model.bahe import BAHETrain
    from bahe.model.behaviour_lookup import load_store_rows
    from bahe.model.config import ArchConfig, BaheModelConfig, TablesConfig, TextConfig
    from bahe.model.factory import build_model

    text = TextConfig(store=str(store_root), llm=str(model_dir), k=mc["k"], deep_layers=mc["deep_layers"],
                      max_behaviours=shape.m, arm="bahe" if name == "bahe" else "token_level",
                      max_user_tokens=shape.tokens)
    config = BaheModelConfig(tables=TablesConfig(embedding_dim=EMBEDDING_DIM, default_rows=1024), arch=ArchConfig(),
                             text=text)
    model, batcher, store = build_model(config, SampleReader(data).schema)
    if store is not None:
        load_store_rows(model, store)
        model.text_arch.lookup.requires_grad_(False)
    train = BAHETrain(model).to(device)
    batches = [batcher(t).to(device) for t in slices]
    return Arm(name, train, lambda batch: train(batch)[0], batches)


# core: torchrec-free fallback ---------------------------------------------------------------------------

class CoreTextModel(nn.Module):
    """The LLM part of one arm (the repo's modules) + projections + an MLP head; forward(batch) -> loss."""

    def __init__(self, name: str, model_dir: Path, mc: dict, n_features: int, vectors: np.ndarray | None):
        super().__init__()
        from bahe.model.deep_layers import DeepLayerAggregator, load_decoder_slice

        self.name = name
        if name == "bahe":
            self.table = nn.Embedding.from_pretrained(torch.from_numpy(np.asarray(vectors)), freeze=True)
        else:
            self.shallow = load_decoder_slice(model_dir, 0, mc["k"], keep_embeddings=True)
            self.shallow.norm = nn.Identity()  # as TokenLevelTextArch: the final norm belongs after the deep layers
            self.shallow.requires_grad_(False)
        self.deep = DeepLayerAggregator(model_dir, mc["k"], mc["deep_layers"])
        h = self.deep.hidden_size
        self.user = nn.Sequential(nn.LayerNorm(h), nn.Linear(h, EMBEDDING_DIM))
        self.item = nn.Sequential(nn.LayerNorm(h), nn.Linear(h, EMBEDDING_DIM))
        self.head = nn.Sequential(nn.Linear(n_features * EMBEDDING_DIM, 256), nn.ReLU(), nn.Linear(256, 64), nn.ReLU(),
                                  nn.Linear(64, 1))

    def _encode(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if self.name == "bahe":
            return self.deep(self.table(ids), lengths)
        positions = torch.arange(ids.shape[1], device=ids.device)
        mask = (positions.unsqueeze(0) < lengths.unsqueeze(1)) | (positions.unsqueeze(0) == 0)
        with torch.no_grad():  # frozen shallow layers: forward only
            states = self.shallow(input_ids=ids, attention_mask=mask.long(), use_cache=False).last_hidden_state
        return self.deep(states, lengths)

    def forward(self, batch: dict) -> torch.Tensor:
        rows = batch["labels"].shape[0]
        user = self.user(self._encode(batch["user"], batch["user_lengths"])).reshape(rows, -1)
        item = self.item(self._encode(batch["item"], batch["item_lengths"]))
        logits = self.head(torch.cat([user, item], dim=1)).squeeze(-1)
        return F.binary_cross_entropy_with_logits(logits.float(), batch["labels"])


def _core(name, shape, mc, store_root, model_dir, slices, device) -> Arm:
    from bahe.embeddings.store import BehaviourStore

    store = BehaviourStore.open(store_root)
    types = SEQUENCE_TYPES[:shape.n]
    if name == "bahe":
        module = CoreTextModel(name, model_dir, mc, shape.n + 1, store.rows(0, store.rows_count))
        batches = [_core_bahe_batch(t, types, shape, store.vocabulary) for t in slices]
    else:
        from transformers import AutoTokenizer

        module = CoreTextModel(name, model_dir, mc, 2, None)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        batches = [_core_token_batch(t, types, shape, tokenizer) for t in slices]
    module = module.to(device)
    batches = [{key: value.to(device) for key, value in b.items()} for b in batches]
    return Arm(name, module, module, batches)


def _labels(table) -> torch.Tensor:
    return torch.from_numpy(table.column("label").to_numpy(zero_copy_only=False).astype(np.float32))


def _core_bahe_batch(table, types, shape: Shape, vocabulary) -> dict:
    rows = table.num_rows
    ids = np.stack([vocabulary.lookup_array(pc.list_flatten(table.column(f"seq_{n}"))).reshape(rows, shape.m)
                    for n in types], axis=1)  # B x N x M (every sequence has exactly M behaviours)
    item = vocabulary.lookup_array(table.column("item_text")).reshape(rows, 1)
    return {"user": torch.from_numpy(ids.reshape(rows * shape.n, shape.m)),
            "user_lengths": torch.full((rows * shape.n,), shape.m, dtype=torch.long),
            "item": torch.from_numpy(item), "item_lengths": torch.ones(rows, dtype=torch.long), "labels": _labels(table)}


def _core_token_batch(table, types, shape: Shape, tokenizer) -> dict:
    """TokenBatcher's layout: per type "name: " + texts joined by "; " + "; ", the most recent T tokens."""
    def tokens(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    separator = tokens("; ")
    columns = [(tokens(f"{n}: "), table.column(f"seq_{n}").to_pylist()) for n in types]
    width = shape.tokens
    user = torch.zeros(table.num_rows, width, dtype=torch.long)
    user_lengths = torch.zeros(table.num_rows, dtype=torch.long)
    for row in range(table.num_rows):
        ids: list[int] = []
        for prefix, column in columns:
            ids += prefix
            for i, text in enumerate(column[row]):
                ids += tokens(text) + (separator if i < len(column[row]) - 1 else [])
            ids += separator
        ids = ids[-width:]
        user[row, :len(ids)] = torch.tensor(ids)
        user_lengths[row] = len(ids)
    item = torch.zeros(table.num_rows, MAX_ITEM_TOKENS, dtype=torch.long)
    item_lengths = torch.zeros(table.num_rows, dtype=torch.long)
    for row, title in enumerate(table.column("item_text").to_pylist()):
        ids = tokens(title)[:MAX_ITEM_TOKENS]
        item[row, :len(ids)] = torch.tensor(ids)
        item_lengths[row] = len(ids)
    return {"user": user, "user_lengths": user_lengths, "item": item, "item_lengths": item_lengths,
            "labels": _labels(table)}


def batch_tokens(arm: Arm, pipeline: str) -> dict:
    """Real (unpadded) text positions per sample that the arm's first batch feeds its LLM layers."""
    batch = arm.batches[0]
    if pipeline == "core":
        rows = batch["labels"].shape[0]
        return {"user": float(batch["user_lengths"].sum()) / rows, "item": float(batch["item_lengths"].sum()) / rows}
    features = batch.behaviour_features
    rows = batch.labels.shape[0]
    keys = features.keys()
    item_key = "item_tokens" if "item_tokens" in keys else "item_text"
    user = sum(float(features[k].lengths().sum()) for k in keys if k != item_key)
    return {"user": user / rows, "item": float(features[item_key].lengths().sum()) / rows}
