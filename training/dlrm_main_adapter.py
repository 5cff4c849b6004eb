"""What a dlrm_main.py-style trainer imports to train BAHE, text on, on the project's data.

The whole change from upstream's ``torchrec_dlrm/dlrm_main.py`` is the diff in docs/migration.md (a
test regenerates it from examples/dlrm_main_upstream.py and examples/dlrm_main_upstream_text.py).
Each name here stands where dlrm_main has its own:

* :func:`add_arguments` -- the text flags (``--bahe_data_dir``, ``--store``, ``--llm``,
  ``--max_behaviours``, ``--deep_layers``, ``--text_learning_rate``);
* :func:`check_args` -- every dlrm_main option this trainer cannot honour is refused at start-up,
  in one line naming the option and what to do (:data:`REFUSED`);
* :func:`get_dataloader` -- ``get_dataloader(args, backend, stage)``: dlrm_main's stages ``train`` /
  ``val`` / ``test`` read train / valid / test.parquet (bahe-data), each rank its share by the GLOBAL
  rank (dlrm_main's own ``rank`` is the local one), train shuffled, ``--batch_size`` /
  ``--test_batch_size`` per rank, ``len()`` and re-iterable, no default cap on the batches;
* :func:`feature_names` -- (ID features, dense features) of the data, where dlrm_main has Criteo's
  ``DEFAULT_CAT_NAMES`` / ``DEFAULT_INT_NAMES``; ``--num_embeddings_per_feature`` is checked against them;
* :func:`build_text_arch` -- the text arch and its store (None, None without ``--store``);
* :func:`load_store_rows` -- the store's rows into the frozen, sharded behaviour table, after DMP;
* :func:`without_text` / :func:`text_optimizers` -- the optimizer recipe (below).

**The optimizer recipe** (measured in docs/migration.md). What the DLRM had keeps dlrm_main's optimizers
and LR policy: the ID tables (fused, in backward, at ``--learning_rate``) and the dense and over arch
(dlrm_main's SGD or Adagrad at ``--learning_rate``). What BAHE adds, its text arch (the LLM's deep
layers, the norms and the H -> D projections), trains on its own AdamW at ``--text_learning_rate``,
joined to the CombinedOptimizer AFTER the LR policy scheduler is built, so the policy never touches
it; and its projections start at zero, so BAHE starts as the DLRM. The frozen behaviour table is in
neither: its lookup runs under no_grad and ``in_backward_optimizer_filter`` leaves its lr=0 in-backward
optimizer out of the dense groups.
"""

from __future__ import annotations

import argparse
import functools
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torchrec.optim.keyed import KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from bahe.ctr_data.parquet_io import SampleReader
from bahe.embeddings.store import BehaviourStore
from bahe.model import behaviour_lookup
from bahe.model.batch import SampleBatcher, id_feature_names
from bahe.model.config import TextConfig
from bahe.model.factory import build_text_arch as _build_text_arch
from bahe.model.sharding import BEHAVIOUR_TABLE_CONSTRAINTS
from bahe.training.dataloader import BaheDataLoader

__all__ = ["BEHAVIOUR_TABLE_CONSTRAINTS", "REFUSED", "STAGE_FILES", "add_arguments", "build_text_arch", "check_args",
           "feature_names", "get_dataloader", "load_store_rows", "start_at_zero", "text_optimizers",
           "without_text"]

STAGE_FILES = {"train": "train.parquet", "val": "valid.parquet", "test": "test.parquet"}
DEFAULT_DEEP_LAYERS = 1  # make demo's cpu preset (launchers/demo.py): the project's measured default
DEFAULT_TEXT_LEARNING_RATE = 3e-4  # measured: docs/migration.md, "The optimizer recipe"

_CRITEO = "this trainer reads the project's Parquet (--bahe_data_dir); Criteo carries no text: convert it with " \
          "`bahe-data criteo` and pass that folder, or train Criteo .npy files with the unpatched dlrm_main.py"
_MULTI_HOT = "upstream's Multihot rebuilds the batch from Criteo's 26 keys and would drop the behaviours: run without it"

# (option, when it is refused, what to do): checked by check_args, in this order (getattr: a dlrm_main of
# another commit may lack an option)
REFUSED = (
    ("--in_memory_binary_criteo_path", lambda a: getattr(a, "in_memory_binary_criteo_path", None) is not None, _CRITEO),
    ("--synthetic_multi_hot_criteo_path", lambda a: getattr(a, "synthetic_multi_hot_criteo_path", None) is not None, _CRITEO),
    ("--multi_hot_sizes", lambda a: getattr(a, "multi_hot_sizes", None) is not None, _MULTI_HOT),
    ("--collect_multi_hot_freqs_stats", lambda a: bool(getattr(a, "collect_multi_hot_freqs_stats", False)), _MULTI_HOT),
    ("--interaction_type", lambda a: str(getattr(a, "interaction_type", "original")) != "original",
     "BAHE has DLRM's dot-product interaction only (no DCN or projection counterpart): use --interaction_type "
     "original, or train dcn / projection without text"),
    ("--undersampling_rate", lambda a: getattr(a, "undersampling_rate", None) is not None,
     "not applied to Parquet input (upstream's loaders ignore it too): undersample when you build the data"),
    ("--bahe_data_dir", lambda a: a.bahe_data_dir is None,
     "required: the folder of train/valid/test.parquet written by bahe-data"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """BAHE's flags, in dlrm_main's style (underscores)."""
    add = parser.add_argument
    add("--bahe_data_dir", type=Path, default=None, help="train/valid/test.parquet (bahe-data): the stages "
        "train/val/test")
    add("--store", default=None, help="the behaviour store (bahe-encode build); without it, text is off")
    add("--llm", default="smollm2-135m", help="the model the store was encoded with")
    add("--max_behaviours", type=int, default=50, help="M: most recent behaviours kept per sequence")
    add("--deep_layers", type=int, default=DEFAULT_DEEP_LAYERS,
        help=f"trainable LLM layers above the store's k (default {DEFAULT_DEEP_LAYERS}; each costs step time)")
    add("--text_learning_rate", type=float, default=DEFAULT_TEXT_LEARNING_RATE,
        help=f"AdamW for the text arch (LLM deep layers, norms, projections), outside dlrm_main's LR policy "
             f"(default {DEFAULT_TEXT_LEARNING_RATE:g})")


def check_args(args: argparse.Namespace) -> None:
    """Refuse, in one line naming the option and what to do, every dlrm_main option this trainer cannot
    honour (:data:`REFUSED`), and a ``--num_embeddings_per_feature`` that does not fit the data.

    What works as in dlrm_main: --batch_size, --test_batch_size (val and test), --limit_*_batches (no
    default cap: the 10-batch default is the random data's), --epochs, --learning_rate, --adagrad, the
    LR policy flags, --embedding_dim, --num_embeddings, --dense/over_arch_layer_sizes,
    --validation_freq_within_epoch, --seed (the train shuffle), --pin_memory, --print_lr,
    --print_sharding_plan, --allow_tf32. Always on: the train split is shuffled (--shuffle_batches,
    --shuffle_training_set), the rows past the last full global batch are left out of each pass
    (--drop_last_training_batch; val and test too, fewer than batch x ranks rows), the Parquet is
    streamed (--mmap_mode). Without effect, as in upstream: --dataset_name, --multi_hot_distribution_type.
    """
    for option, refused, what_to_do in REFUSED:
        if refused(args):
            raise SystemExit(f"{option}: {what_to_do}")
    for option in ("batch_size", "test_batch_size", "max_behaviours", "deep_layers", "epochs"):
        value = getattr(args, option, None)
        if value is not None and value < 1:
            raise SystemExit(f"--{option} {value}: must be at least 1")
    for stage in STAGE_FILES:
        if not (args.bahe_data_dir / STAGE_FILES[stage]).is_file():
            raise SystemExit(f"--bahe_data_dir {args.bahe_data_dir}: no {STAGE_FILES[stage]} (dlrm_main's {stage} "
                             "stage); write the splits with bahe-data")
    feature_names(args)


def _schema(data_dir: Path):
    return SampleReader(Path(data_dir) / STAGE_FILES["train"]).schema


def feature_names(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(ID features, dense features) of the data: dlrm_main's DEFAULT_CAT_NAMES / DEFAULT_INT_NAMES.
    A ``--num_embeddings_per_feature`` list must give one size per ID feature, in this order."""
    schema = _schema(args.bahe_data_dir)
    names = id_feature_names(schema)
    sizes = args.num_embeddings_per_feature
    if sizes is not None:
        sizes = [sizes] if isinstance(sizes, int) else sizes
        if len(sizes) != len(names) or any(not isinstance(s, int) or s < 1 for s in sizes):
            raise SystemExit(f"--num_embeddings_per_feature {','.join(map(str, sizes))}: give {len(names)} "
                             f"positive sizes, one per ID feature of the data, in this order: {','.join(names)}")
    return names, list(schema.dense)


def _table_sizes(args: argparse.Namespace, names: list[str]) -> dict[str, int]:
    if args.num_embeddings is not None:
        return dict.fromkeys(names, args.num_embeddings)
    sizes = args.num_embeddings_per_feature
    return dict(zip(names, [sizes] if isinstance(sizes, int) else sizes))


@functools.lru_cache(maxsize=4)
def _open_store(root: str) -> BehaviourStore:
    return BehaviourStore.open(root)


def get_dataloader(args: argparse.Namespace, backend: str, stage: str) -> BaheDataLoader:
    """The loader of dlrm_main's ``stage`` ("train", "val" or "test") over the project's Parquet:
    ``len()`` batches of ``--batch_size`` (val/test: ``--test_batch_size`` when given) rows per rank,
    the same count on every rank, each rank its share by the GLOBAL rank. ``backend`` is dlrm_main's
    (unused: batches are pinned when ``--pin_memory`` is given)."""
    stage = stage.lower()
    if stage not in STAGE_FILES:
        raise ValueError(f"stage {stage!r}: expected one of {list(STAGE_FILES)}")
    names, _dense = feature_names(args)
    schema = _schema(args.bahe_data_dir)
    store = _open_store(str(args.store)) if args.store is not None else None
    sequences = tuple(schema.sequences) if store is not None else None
    batcher = SampleBatcher(schema, _table_sizes(args, names), store.text_index if store is not None else None,
                            sequences, args.max_behaviours)
    if getattr(args, "pin_memory", None):
        batcher = _pinned(batcher)
    test_batch_size = getattr(args, "test_batch_size", None)
    batch_size = test_batch_size if stage != "train" and test_batch_size is not None else args.batch_size
    return BaheDataLoader(args.bahe_data_dir / STAGE_FILES[stage], batcher, batch_size=batch_size,
                          rank=dist.get_rank(), world=dist.get_world_size(), shuffle=stage == "train",
                          seed=getattr(args, "seed", None) or 0)


def _pinned(batcher):
    def pin(table):
        return batcher(table).pin_memory()

    pin.id_features = getattr(batcher, "id_features", ())
    return pin


def build_text_arch(args: argparse.Namespace) -> tuple[torch.nn.Module | None, BehaviourStore | None]:
    """(text arch, store) for ``BAHE(..., text_arch=...)``; (None, None) without ``--store``. The store is
    checked against ``--llm`` and its k; the behaviour table is built on meta (DMP places it).

    The user and item projections (H -> D) start at zero (the recipe): the text features enter the
    interaction at 0, so BAHE starts as the DLRM and the text's share grows as it trains -- the same
    principle as the warm start's zeroed new columns (docs/migration.md, step 2)."""
    if args.store is None:
        return None, None
    text = TextConfig(store=str(args.store), llm=args.llm, max_behaviours=args.max_behaviours,
                      deep_layers=args.deep_layers)
    arch, store = _build_text_arch(text, _schema(args.bahe_data_dir), args.embedding_dim, device=torch.device("meta"))
    return start_at_zero(arch), store


def start_at_zero(text_arch: torch.nn.Module) -> torch.nn.Module:
    """Zero the text arch's user and item projections (weights and biases), in place; returns it. For a
    model from :func:`bahe.model.factory.build_model`: ``start_at_zero(model.text_arch)`` before DMP."""
    with torch.no_grad():
        for projection in (text_arch.user_projection, text_arch.item_projection):
            for parameter in projection.parameters():
                parameter.zero_()
    return text_arch


def load_store_rows(model: torch.nn.Module, store: BehaviourStore | None) -> None:
    """The store's rows into the frozen behaviour table: every rank, after DMP (nothing without a store).

    torch deprecates ShardedTensor in favour of DTensor and warns at the loader's ``tensor.size()`` on the
    sharded table (model/behaviour_lookup.py); the warning says nothing about this run (DMP's tables are
    ShardedTensors in upstream's dlrm_main too, it just never calls a torch function on one), so it is
    silenced here, for this call only, to add no warning to upstream's."""
    if store is None:
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Please use DTensor instead", category=FutureWarning)
        behaviour_lookup.load_store_rows(model, store)


def _in_text_arch(name: str) -> bool:
    return ".text_arch." in "." + name


def without_text(named_parameters) -> dict[str, torch.nn.Parameter]:
    """dlrm_main's dense parameters (``in_backward_optimizer_filter(model.named_parameters())``) without
    BAHE's text arch: what dlrm_main's own dense optimizer and LR policy keep (the DLRM's dense and over
    arch)."""
    return {name: p for name, p in named_parameters if not _in_text_arch(name)}


def text_optimizers(model: torch.nn.Module, args: argparse.Namespace) -> list[tuple[str, KeyedOptimizerWrapper]]:
    """[("text", AdamW over the text arch -- the LLM's deep layers, norms and projections -- at
    --text_learning_rate)], or [] without a text arch (text off). Join it to the CombinedOptimizer after
    dlrm_main's LR policy scheduler is built, which then never touches it. The frozen behaviour table is
    not in it (``in_backward_optimizer_filter`` leaves out its lr=0 in-backward optimizer)."""
    params = {name: p for name, p in in_backward_optimizer_filter(model.named_parameters())
              if _in_text_arch(name) and p.requires_grad}
    if not params:
        return []
    return [("text", KeyedOptimizerWrapper(params, lambda ps: torch.optim.AdamW(ps, lr=args.text_learning_rate)))]
