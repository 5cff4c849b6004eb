"""The downstream CTR model of the paper's AUC_d: ``bahe-train --arm bahe --frozen-text-from RUN``.

BAHE's claim is that its text features are useful beyond BAHE itself: a downstream CTR model that takes
them as input should beat the same model without them. The features a trained run serves
(serving/features.py, ``bahe-export``) are exactly what its text arch computes from a sample's behaviours
and item text. So the downstream model is a DLRM whose pairwise interaction also takes those N + 1 text
features, computed per training row from that row's OWN behaviours by RUN's text arch, FROZEN:

* :func:`resolve`: RUN's selected checkpoint (best by valid, else LATEST; or a checkpoint folder), as
  ``--init-from`` resolves it (training/init_from.py);
* :func:`check`: refuse (one line naming both sides) a RUN trained with ``--user-aggregation
  target_attention`` (its user features depend on the item: there are no per-user features to take), or whose
  text arch differs from this run's: the LLM, k, deep layers, D, sequence types, M, pooling, attention, user
  projection and aggregation; or whose store this run's store does not
  hold unchanged as its first rows (the same store or a refresh of it);
* :func:`freeze`: before sharding, every text-arch weight (deep LLM layers, norms, projections) stops
  requiring gradients, so no optimizer group holds it and DDP does not reduce it, and the text arch stays
  in eval mode when the trainer switches the model to training (no dropout: the features are the export's);
* :func:`load`: after sharding, ONLY the text arch's weights from RUN's checkpoint (the restricted DCP
  loader, any world size). The ID tables, dense arch and over arch keep their fresh, seed-controlled
  initialisation and are trained from scratch.

The run records ``frozen_text_from`` (run, checkpoint, step) in run_config.json. A resume keeps the text
arch frozen (its own checkpoint holds the same weights); bahe-evaluate / bahe-predict / bahe-export treat
the run as any BAHE run.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from bahe.embeddings.store import BehaviourStore
from bahe.training import init_from
from bahe.training.checkpoint import FROZEN_MARKER, merge_into, without_frozen
from bahe.training.init_from import InitSource
from bahe.training.run_record import (
    RECORD,
    describe_store,
    lineage_problem,
    read_record,
    recorded_flag,
    store_identity,
)
from bahe.training.safe_load import load_checkpoint

FLAG = "--frozen-text-from"
TEXT_ARCH = "text_arch."  # the text arch's state-dict keys contain it (BAHE.text_arch)
LOOKUP = "lookup."  # the frozen behaviour table inside the text arch: the store's, never a checkpoint's


class FrozenTextError(ValueError):
    """``--frozen-text-from`` names no usable run, or one whose text arch does not fit this run."""


@dataclass(frozen=True)
class FrozenText:
    """What a run freezes: ``source`` to load at step 0 (None on a resume: its own checkpoint holds the
    weights) and the ``record`` (run_config.json's ``frozen_text_from``)."""

    source: InitSource | None
    record: dict


def as_record(source: InitSource) -> dict:
    return {"run": str(source.run), "checkpoint": str(source.checkpoint), "step": source.step}


def resolve(path: str | Path) -> InitSource:
    """RUN's selected checkpoint (or the checkpoint folder given) and its record."""
    return init_from.resolve(path, flag=FLAG)


def _llm(name: str, sha256: str) -> str:
    return f"{name} (weights sha256 {sha256[:12]}...)"


def _layers(llm: str) -> int:
    from transformers import AutoConfig

    from bahe.embeddings.pretrained import resolve_model_dir

    return int(AutoConfig.from_pretrained(resolve_model_dir(llm), trust_remote_code=False).num_hidden_layers)


def run_settings(config, store: BehaviourStore, sequences: tuple[str, ...]) -> dict:
    """This run's text arch as the trainer will build it (k and deep layers resolved)."""
    text, manifest = config.model.text, store.manifest
    k = text.k if text.k is not None else int(manifest["encoder"]["k"])
    deep = text.deep_layers if text.deep_layers is not None else _layers(text.llm) - k
    return {"LLM": _llm(manifest["model"]["name"], manifest["model"]["sha256"]), "k": k, "deep layers": deep,
            "D (--embedding-dim)": config.model.tables.embedding_dim, "sequences": list(sequences),
            "max behaviours (--max-behaviours)": text.max_behaviours, "pooling": text.pooling,
            "attention": text.attention, "user projection (--user-projection)": text.user_projection,
            "user aggregation (--user-aggregation)": text.user_aggregation}


def source_settings(source: InitSource, llm_layers: int | None) -> dict:
    """The text arch RUN trained, from its record; ``llm_layers`` (L) resolves a recorded deep-layers default
    (None: L - k) when RUN's LLM is this run's."""
    model, store = source.record["model"], source.record["store"]
    k = model["--k"] if model.get("--k") is not None else int(store["k"])
    deep = model.get("--deep-layers")
    if deep is None:
        deep = llm_layers - k if llm_layers is not None else "all the rest (L - k)"
    return {"LLM": _llm(store["llm"], store["llm_sha256"]), "k": k, "deep layers": deep,
            "D (--embedding-dim)": model.get("--embedding-dim"), "sequences": _source_sequences(source),
            "max behaviours (--max-behaviours)": model.get("--max-behaviours"), "pooling": model.get("--pooling"),
            "attention": model.get("--attention"),  # flags its record predates read as their defaults
            "user projection (--user-projection)": recorded_flag(model, "--user-projection"),
            "user aggregation (--user-aggregation)": recorded_flag(model, "--user-aggregation")}


def _source_sequences(source: InitSource) -> list[str] | None:
    """The sequence types RUN's text arch read: those of its train split (None when that file is gone)."""
    from bahe.ctr_data.parquet_io import SampleReader

    data_dir = source.record.get("defaults", {}).get("--data-dir")
    train = Path(data_dir) / "train.parquet" if data_dir else None
    return list(SampleReader(train).schema.sequences) if train is not None and train.is_file() else None


def check(source: InitSource, config, store: BehaviourStore, sequences: tuple[str, ...], *, rank: int = 0) -> None:
    """Refuse a RUN that is no BAHE run, whose text arch differs from this run's, or whose store this run's
    store does not hold unchanged as its first rows; one line naming both sides."""
    given = f"{FLAG} {source.checkpoint}"
    arm = source.record["model"].get("--arm")
    if arm != "bahe":
        raise FrozenTextError(f"{given} is a run of --arm {arm}, which has no BAHE text arch: give a run trained "
                              "with --arm bahe")
    from bahe.model.text_levers import refuse_item_dependent

    try:
        refuse_item_dependent(recorded_flag(source.record["model"], "--user-aggregation"), given,
                              "give a run trained with --user-aggregation pooled")
    except ValueError as err:
        raise FrozenTextError(str(err)) from None
    recorded = source.record.get("store")
    if recorded is None:
        raise FrozenTextError(f"{given}: {source.run / RECORD} records no behaviour store (the run is older than "
                              "the store record), so its text arch's inputs cannot be checked: retrain it, or "
                              "warm-start a run from it (--init-from) instead")
    now = run_settings(config, store, sequences)
    same_llm = recorded["llm_sha256"] == store.manifest["model"]["sha256"]
    then = source_settings(source, _layers(config.model.text.llm) if same_llm else None)
    if then["sequences"] is None:
        then["sequences"] = now["sequences"]
        if rank == 0:
            print(f"bahe-train: warning: {given}: the train split its run trained on is gone, so its sequence "
                  f"types cannot be checked; make sure they are {now['sequences']}", file=sys.stderr, flush=True)
    found = [f"{name}: that run has {then[name]!r}, this run {now[name]!r}" for name in now if then[name] != now[name]]
    if found:
        raise FrozenTextError(f"{given} trained another text arch than this run's ({'; '.join(found)}): the frozen "
                              "features are that run's only with its text settings; give this run the flags of "
                              f"{source.run / RECORD}")
    problem = lineage_problem(recorded, store)
    if problem:
        raise FrozenTextError(f"{given} was trained on store {describe_store(recorded)}; this run's store "
                              f"{describe_store(store_identity(store))} does not hold those rows unchanged as its "
                              f"first rows: {problem}. Train on that store or a refresh of it")


def prepare(config, store: BehaviourStore | None, sequences: tuple[str, ...], *, resuming: bool,
            rank: int = 0) -> FrozenText | None:
    """What this run freezes, checked before the model is sharded (None: nothing). A fresh run resolves and
    checks ``config.frozen_text_from``; a resume freezes when its own record says it was trained so."""
    if resuming:
        run = config.checkpoint_dir.parent
        recorded = (read_record(run) or {}).get("frozen_text_from")
        if recorded is None and config.frozen_text_from is not None:
            raise FrozenTextError(f"{FLAG} {config.frozen_text_from}: {run} holds its own checkpoint, trained with a "
                                  f"trainable text arch; {FLAG} applies from step 0: train into a new --out")
        return FrozenText(None, recorded) if recorded is not None else None
    if config.frozen_text_from is None:
        return None
    source = resolve(config.frozen_text_from)
    check(source, config, store, sequences, rank=rank)
    return FrozenText(source, as_record(source))


def _stay_in_eval(module: nn.Module, mode: bool = True) -> nn.Module:
    """``train()`` of a frozen text arch: it and its children stay in eval mode."""
    return nn.Module.train(module, False)


def freeze(model) -> None:
    """Before sharding: the text arch's weights (all but the behaviour table, which the store supplies) stop
    requiring gradients, and the text arch stays in eval mode whatever ``train()`` the trainer calls."""
    text_arch = model.text_arch
    for name, parameter in text_arch.named_parameters():
        if not name.startswith(LOOKUP):
            parameter.requires_grad_(False)
    text_arch.train = types.MethodType(_stay_in_eval, text_arch)
    text_arch.eval()


def text_arch_keys(state: dict) -> list[str]:
    """The keys of a (DMP) state dict that :func:`load` reads: the text arch's, behaviour table left out."""
    return [key for key in state if TEXT_ARCH in key and FROZEN_MARKER not in key]


def load(source: InitSource, dmp) -> int:
    """RUN's text-arch weights into ``dmp`` (any world size; every other weight untouched). Returns the
    tensors loaded."""
    model_state = dmp.state_dict()
    keys = text_arch_keys(model_state)
    if not keys:
        raise FrozenTextError(f"{FLAG} {source.checkpoint}: this model has no text arch to load into")
    state = {"model": without_frozen({key: model_state[key] for key in keys})}
    load_checkpoint(state, source.checkpoint)
    merge_into(model_state, state["model"])
    dmp.load_state_dict(model_state)
    return len(keys)


def say_where_it_starts(frozen: FrozenText, start: int) -> None:
    """Rank 0: one line on what is frozen and where it came from."""
    record = frozen.record
    where = f"{record['checkpoint']} (step {record['step']} of {record['run']})"
    if start == 0:
        print(f"text arch frozen from {where}: its deep LLM layers, norms and projections loaded, no gradients, "
              "eval mode; ID tables, dense and over arch trained from the seed", flush=True)
    else:
        print(f"text arch kept frozen (from {where})", flush=True)


def is_frozen(model) -> bool:
    """Whether the model's text arch (all but the behaviour table) requires no gradient."""
    return all(not p.requires_grad for n, p in model.text_arch.named_parameters() if not n.startswith(LOOKUP))

