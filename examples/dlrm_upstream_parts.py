"""The modules upstream's dlrm_main.py imports beside itself, as examples/dlrm_main_upstream.py needs them.

Upstream (facebookresearch/dlrm, torchrec_dlrm/, the commit named in examples/dlrm_main_upstream.py)
imports three things from sibling modules: ``get_dataloader`` (data/dlrm_dataloader.py),
``LRPolicyScheduler`` (lr_scheduler.py) and ``Multihot`` / ``RestartableMap`` (multi_hot.py). They are
written here from what those modules do (not copied):

* ``get_dataloader(args, backend, stage)``: stages ``train`` / ``val`` / ``test``; torchrec's
  ``RandomRecDataset`` over the 26 Criteo keys and 13 dense features when no Criteo path is given
  (``limit_<stage>_batches`` batches), else torchrec's ``InMemoryBinaryCriteoIterDataPipe`` over the
  preprocessed day_{0..23}_{dense,sparse,labels}.npy files (days 0-22 train, day 23 both val and test;
  the datapipe halves it), sharded by the GLOBAL rank. ``--test_batch_size`` sizes val and test.
* ``LRPolicyScheduler``: linear warm-up, then a quadratic decay to a floor of 1e-7, the same factor
  for every param group of the optimizer it is given.
* NOT mirrored: upstream's synthetic multi-hot data (``--synthetic_multi_hot_criteo_path``, its
  MultiHotCriteoIterDataPipe) and the 1-hot -> multi-hot conversion (``Multihot``); both raise here,
  naming the flag.
"""

from __future__ import annotations

import argparse
import os
import sys

from torch import distributed as dist
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader
from torchrec.datasets.criteo import (
    CAT_FEATURE_COUNT,
    DAYS,
    DEFAULT_CAT_NAMES,
    DEFAULT_INT_NAMES,
    InMemoryBinaryCriteoIterDataPipe,
)
from torchrec.datasets.random import RandomRecDataset

STAGES = ("train", "val", "test")
LR_FLOOR = 1e-7  # the policy never decays a learning rate below this


def _batch_size(args: argparse.Namespace, stage: str) -> int:
    if stage != "train" and args.test_batch_size is not None:
        return args.test_batch_size
    return args.batch_size


def _random_loader(args: argparse.Namespace, stage: str) -> DataLoader:
    dataset = RandomRecDataset(
        keys=DEFAULT_CAT_NAMES,
        batch_size=_batch_size(args, stage),
        hash_size=args.num_embeddings,
        hash_sizes=getattr(args, "num_embeddings_per_feature", None),
        manual_seed=getattr(args, "seed", None),
        ids_per_feature=1,
        num_dense=len(DEFAULT_INT_NAMES),
        num_batches=getattr(args, f"limit_{stage}_batches"),
    )
    return DataLoader(dataset, batch_size=None, batch_sampler=None, pin_memory=args.pin_memory, num_workers=0)


def _criteo_files(folder: str, stage: str) -> list[list[str]]:
    days = range(DAYS - 1) if stage == "train" else [DAYS - 1]
    return [[os.path.join(folder, f"day_{day}_{part}.npy") for day in days] for part in ("dense", "sparse", "labels")]


def _in_memory_loader(args: argparse.Namespace, stage: str) -> DataLoader:
    if args.in_memory_binary_criteo_path is None:
        raise SystemExit("--synthetic_multi_hot_criteo_path: upstream's multi-hot Criteo reader is not mirrored "
                         "in examples/; use --in_memory_binary_criteo_path or the random data")
    hashes = args.num_embeddings_per_feature if args.num_embeddings is None else [args.num_embeddings] * CAT_FEATURE_COUNT
    datapipe = InMemoryBinaryCriteoIterDataPipe(
        stage,
        *_criteo_files(args.in_memory_binary_criteo_path, stage),
        batch_size=_batch_size(args, stage),
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        drop_last=bool(args.drop_last_training_batch) if stage == "train" else False,
        shuffle_batches=bool(args.shuffle_batches),
        shuffle_training_set=bool(args.shuffle_training_set),
        shuffle_training_set_random_seed=args.seed or 0,
        mmap_mode=bool(args.mmap_mode),
        hashes=hashes,
    )
    return DataLoader(datapipe, batch_size=None, pin_memory=args.pin_memory, collate_fn=lambda batch: batch)


def get_dataloader(args: argparse.Namespace, backend: str, stage: str) -> DataLoader:
    """The loader of one dlrm_main stage (``train``, ``val`` or ``test``): random data unless a Criteo
    path is given. ``backend`` decides pinned memory when ``--pin_memory`` was not given (nccl: pinned)."""
    stage = stage.lower()
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r}: expected one of {list(STAGES)}")
    if getattr(args, "pin_memory", None) is None:
        args.pin_memory = backend == "nccl"
    if args.in_memory_binary_criteo_path is None and args.synthetic_multi_hot_criteo_path is None:
        return _random_loader(args, stage)
    return _in_memory_loader(args, stage)


class LRPolicyScheduler(LRScheduler):
    """dlrm_main's learning-rate policy, one factor for every param group of ``optimizer``.

    Steps 1 .. warm-up - 1 scale the base rates by step / warm-up; from ``decay_start`` the factor is
    ((decay_start + decay_steps - step) / decay_steps) ** 2, never below 1e-7; after the decay (or
    between warm-up and decay) the last rates are kept. Without decay steps, the base rates follow the
    warm-up.
    """

    def __init__(self, optimizer, num_warmup_steps: int, decay_start_step: int, num_decay_steps: int):
        if decay_start_step < num_warmup_steps:
            sys.exit("Learning rate warmup must finish before the decay starts")
        self.num_warmup_steps, self.num_decay_steps = num_warmup_steps, num_decay_steps
        self.decay_start_step, self.decay_end_step = decay_start_step, decay_start_step + num_decay_steps
        self.last_lr = None
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        step = self._step_count
        if step < self.num_warmup_steps:
            self.last_lr = [base * step / self.num_warmup_steps for base in self.base_lrs]
        elif self.decay_start_step <= step < self.decay_end_step:
            left = (self.decay_end_step - step) / self.num_decay_steps
            self.last_lr = [max(LR_FLOOR, base * left**2) for base in self.base_lrs]
        elif self.num_decay_steps <= 0:
            return list(self.base_lrs)
        return list(self.last_lr if self.last_lr is not None else self.base_lrs)


class RestartableMap:
    """``map(fn, iterable)`` that can be iterated again (dlrm_main iterates its loaders more than once)."""

    def __init__(self, fn, iterable):
        self.fn, self.iterable = fn, iterable

    def __iter__(self):
        return (self.fn(item) for item in self.iterable)

    def __len__(self) -> int:
        return len(self.iterable)


class Multihot:
    """Upstream's 1-hot -> multi-hot conversion (``--multi_hot_sizes``) is not mirrored in examples/."""

    def __init__(self, *args, **kwargs):
        raise SystemExit("--multi_hot_sizes: upstream's multi_hot.py is not mirrored in examples/; run without it")
