"""Warm-start BAHE from a trained TorchRec DLRM, so adopting BAHE keeps what the DLRM learned.

The ID tables, the dense arch and the over arch are copied. With a text arch, BAHE's interaction
output is wider (F' = F + N + 1 features); the first over-arch Linear gets the DLRM's weights in
the columns of the same inputs (the D dense columns and the pairwise dot products among dense and
ID features) and zeros in the new ones, so at warm start BAHE's logits equal the DLRM's. The text
arch stays as built.

Example::

    model, batcher, store = build_model(config, schema)        # or a DMP-wrapped BAHETrain
    report = load_dlrm_weights(model, "runs/dlrm/model.pt")    # DLRM / DLRMTrain / DMP state dict
    print(len(report.copied), report.zero_initialised_columns)

Sharded models: call it on every rank with the DistributedModelParallel module itself and the full
state dict; DMP's ``load_state_dict`` slices each full table into the shards that rank holds, and
the frozen behaviour table is handed its own values. Warm-start AFTER wrapping: DMP builds the
sharded tables anew, so values copied into an unsharded model's tables before wrapping are lost.
BAHE's ID tables must be listed in the DLRM's order: the over arch's interaction columns follow it.
A state dict's key order shows that order only when the keys are not sorted (DMP and safetensors sort
them), so a different order is caught for ``DLRM.state_dict()`` but cannot be for every source.
"""

from __future__ import annotations

import fnmatch
import os
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn
from torch.distributed._shard.sharded_tensor import ShardedTensor

from bahe.model.bahe import BAHE

_PREFIXES = ("module.", "_dmp_wrapped_module.", "model.")  # DDP, DMP, DLRMTrain / BAHETrain
_TABLES = "sparse_arch.embedding_bag_collection.embedding_bags."


@dataclass(frozen=True)
class WarmStartReport:
    """What :func:`load_dlrm_weights` did. Keys are relative to the BAHE module.

    Attributes:
        copied: BAHE state-dict keys loaded from the DLRM.
        zero_initialised_columns: input columns of the first over-arch Linear set to zero (the
            interactions that involve text features or ``ignore_missing`` tables).
        skipped: BAHE keys left as built (the text arch, ``ignore_missing`` matches).
    """

    copied: tuple[str, ...]
    zero_initialised_columns: int
    skipped: tuple[str, ...]


def read_dlrm_state(source: Mapping[str, Tensor] | str | os.PathLike) -> tuple[dict[str, Tensor], bool]:
    """A DLRM state dict of full tensors with DDP / DMP / DLRMTrain prefixes stripped.

    Args:
        source: a state dict, a ``torch.save``-d state dict (loaded with ``weights_only=True``: no
            pickled objects) or a ``.safetensors`` file.

    Returns:
        (state dict, whether its key order is the module order; safetensors files keep no order).
    """
    ordered = True
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state, ordered = load_file(path, device="cpu"), False
        else:
            try:
                state = torch.load(path, weights_only=True, map_location="cpu")
            except pickle.UnpicklingError as error:
                raise ValueError(f"{path} holds more than tensors; it is not unpickled (weights_only). Save the "
                                 "DLRM's state_dict() alone, or convert it to .safetensors") from error
    else:
        state = source
    if not isinstance(state, Mapping):
        raise ValueError(f"expected a state dict (name -> tensor), got a {type(state).__name__}")
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        name = key
        while name.startswith(_PREFIXES):
            name = name.split(".", 1)[1]
        if name in out:
            raise ValueError(f"{key!r} and another key both name {name!r} once prefixes are stripped")
        out[name] = _full(key, value)
    return out, ordered


def _full(key: str, value: object) -> Tensor:
    """A plain tensor; a ShardedTensor only when this rank's shards cover all of it."""
    if isinstance(value, ShardedTensor):
        full = torch.zeros(value.size(), dtype=value.dtype)
        covered = 0
        for shard in value.local_shards():
            meta = shard.metadata
            full[tuple(slice(o, o + s) for o, s in zip(meta.shard_offsets, meta.shard_sizes))] = shard.tensor.cpu()
            covered += shard.tensor.numel()
        if covered != full.numel():
            raise ValueError(f"{key}: this rank holds {covered} of its {full.numel()} values; save a full checkpoint "
                             "(e.g. from one rank, or with torch.distributed.checkpoint) and load that")
        return full
    if type(value) not in (Tensor, nn.Parameter):
        raise ValueError(f"{key}: a {type(value).__name__}, not a plain tensor")
    return value.detach()


def _hint(key: str, shape: tuple[int, ...] | None = None) -> str:
    if key.startswith(_TABLES):
        table = key[len(_TABLES):].rsplit(".", 1)[0]
        if shape is None:
            return f"remove table {table!r} from BAHE's EBC, or pass ignore_missing=({table!r},) to keep it as built"
        return f"build table {table!r} in BAHE's EBC with num_embeddings={shape[0]}, embedding_dim={shape[1]}"
    if key.startswith("dense_arch."):
        return "set BAHE's dense_in_features and dense_arch_layer_sizes to the DLRM's"
    if key.startswith("over_arch."):
        return "set BAHE's over_arch_layer_sizes to the DLRM's"
    return "not part of torchrec's plain DLRM (DLRM_DCN / DLRM_Projection checkpoints are not supported)"


def _shape(tensor: Tensor) -> tuple[int, ...]:
    return tuple(tensor.size())  # ShardedTensor: the global size


def _column_map(dim: int, positions: list[int], num_features: int) -> Tensor:
    """BAHE column of each DLRM column of the first over-arch Linear.

    InteractionArch emits ``[dense (D), triu(X X^T, offset 1)]`` for X = [dense, f_1 .. f_F] (row-major
    pairs (i, j), i < j). ``positions`` are the BAHE feature indices (0 = dense) of the DLRM's features.
    """
    new_pairs = torch.triu_indices(num_features + 1, num_features + 1, offset=1).t().tolist()
    column = {(i, j): dim + c for c, (i, j) in enumerate(new_pairs)}
    old_pairs = torch.triu_indices(len(positions), len(positions), offset=1).t().tolist()
    return torch.tensor([*range(dim), *(column[positions[i], positions[j]] for i, j in old_pairs)])


def load_dlrm_weights(model: nn.Module, dlrm_state: Mapping[str, Tensor] | str | os.PathLike, *,
                      ignore_missing: Sequence[str] = (), new_columns: Literal["zero", "keep"] = "zero"
                      ) -> WarmStartReport:
    """Copy a trained ``torchrec.models.dlrm.DLRM`` into BAHE, in place.

    Args:
        model: a BAHE, a BAHETrain, or DistributedModelParallel around either; materialised (not meta).
        dlrm_state: the DLRM's state dict (DLRM, DLRMTrain or DMP keys) or a file (see
            :func:`read_dlrm_state`). Tables: ``rows x D``; dense arch: its MLP; over arch: the first
            Linear is ``H1 x (D + C(F + 1, 2))`` for F ID features.
        ignore_missing: fnmatch patterns of BAHE keys (or ID table names) the DLRM lacks, kept as built;
            an ignored table's interaction columns are treated like the text's.
        new_columns: ``zero`` sets the over-arch columns of new features to 0 (logits equal the DLRM's);
            ``keep`` leaves them as built.

    Returns:
        a :class:`WarmStartReport`.

    Raises:
        ValueError: listing every key whose name or shape does not match, with both shapes and what to change.
    """
    if new_columns not in ("zero", "keep"):
        raise ValueError(f"new_columns must be 'zero' or 'keep', got {new_columns!r}")
    source, ordered = read_dlrm_state(dlrm_state)
    found = [m for m in model.modules() if isinstance(m, BAHE)]
    if len(found) != 1:
        raise ValueError(f"expected one BAHE module inside {type(model).__name__}, found {len(found)}")
    bahe = found[0]
    state = model.state_dict()
    prefix = next(k.split(_TABLES)[0] for k in state if _TABLES in k)
    target = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    meta = [k for k, v in target.items() if not isinstance(v, ShardedTensor) and v.is_meta]
    if meta:
        raise ValueError(f"{len(meta)} tensors (e.g. {meta[0]}) are on the meta device: wrap the model in "
                         "DistributedModelParallel (or build it on a real device) before warm-starting")

    def ignored(key: str) -> bool:
        table = key[len(_TABLES):].rsplit(".", 1)[0] if key.startswith(_TABLES) else None
        return any(fnmatch.fnmatchcase(key, p) or (table and fnmatch.fnmatchcase(table, p)) for p in ignore_missing)

    errors, skipped, loaded = [], [], {}
    first_over = next(k for k in target if k.startswith("over_arch.") and k.endswith("weight"))
    for key, value in target.items():
        if key.startswith("text_arch.") or (key not in source and ignored(key)):
            skipped.append(key)
        elif key not in source:
            errors.append(f"{key}: BAHE has it {_shape(value)}, the DLRM does not -- {_hint(key)}")
        elif key != first_over and _shape(source[key]) != _shape(value):
            errors.append(f"{key}: DLRM {_shape(source[key])} vs BAHE {_shape(value)} -- "
                          f"{_hint(key, _shape(source[key]))}")
        elif key != first_over:
            loaded[key] = source[key]
    errors += [f"{key}: the DLRM has it {_shape(v)}, BAHE does not -- {_hint(key, _shape(v))}"
               for key, v in source.items() if key not in target]

    # the DLRM's features: BAHE's ID features of the tables it shares, in BAHE's order (0 = dense)
    ebc = bahe.sparse_arch.embedding_bag_collection
    configs = ebc.embedding_bag_configs() if hasattr(ebc, "embedding_bag_configs") else ebc._embedding_bag_configs
    positions, index, shared = [0], 1, []
    for config in configs:
        if f"{_TABLES}{config.name}.weight" in source:
            positions += range(index, index + len(config.feature_names))
            shared.append(config.name)
        index += len(config.feature_names)
    dlrm_order = [k[len(_TABLES):].rsplit(".", 1)[0] for k in source if k.startswith(_TABLES)]
    # key order is the module order for state_dict(), sorted for DMP's and safetensors': check it when unsorted
    if ordered and dlrm_order != sorted(dlrm_order) and [t for t in dlrm_order if t in shared] != shared:
        errors.append(f"ID tables: the DLRM orders them {dlrm_order}, BAHE {[c.name for c in configs]} -- list "
                      "BAHE's EmbeddingBagConfigs in the DLRM's order (the over arch's columns follow it)")
    zeroed = 0
    if first_over in source:
        want, have = _shape(target[first_over]), _shape(source[first_over])
        dim = configs[0].embedding_dim
        expected = (want[0], dim + (len(positions) - 1) * len(positions) // 2)  # D + C(F + 1, 2)
        if have != expected:
            errors.append(f"{first_over}: DLRM {have} vs {expected} expected from BAHE's over_arch_layer_sizes[0], "
                          f"D={dim} and the {len(positions) - 1} ID features it shares with the DLRM -- "
                          f"{_hint(first_over)}, and its tables to the DLRM's")
        elif not errors:
            weight = torch.zeros(want, dtype=source[first_over].dtype) if new_columns == "zero" \
                else target[first_over].detach().cpu().clone()
            weight[:, _column_map(dim, positions, bahe.inter_arch.F)] = source[first_over].to(weight.dtype)
            loaded[first_over] = weight
            zeroed = want[1] - have[1] if new_columns == "zero" else 0
    if errors:
        raise ValueError(f"cannot warm-start BAHE from this DLRM: {len(errors)} mismatch(es):\n  - "
                         + "\n  - ".join(errors))
    # torchrec's load hooks of a sharded module want every one of its tables: hand the ones we do not
    # load (the frozen behaviour table) their own values back
    own = {k: v for k, v in state.items() if isinstance(v, ShardedTensor) and k[len(prefix):] not in loaded}
    result = model.load_state_dict({**own, **{prefix + k: v for k, v in loaded.items()}}, strict=False)
    if result.unexpected_keys:  # cannot happen: every key was taken from the model's own state dict
        raise RuntimeError(f"load_state_dict did not take {result.unexpected_keys}")
    return WarmStartReport(tuple(k for k in target if k in loaded), zeroed, tuple(skipped))
