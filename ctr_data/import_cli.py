"""The flags of ``bahe-data import`` (see :mod:`bahe.ctr_data.importer`, docs/byo_data.md).

  bahe-data import --mapping examples/byo_data/mapping.toml --out data/byo
  bahe-data import --input logs.parquet --user-id uid --item-id iid --label click --timestamp ts \\
      --item-text title --dense price --categorical device --sequence queries=recent_queries --out data/logs

A mapping (TOML) says everything; the flags cover the common cases without one, and override its keys when
both are given (files named by flags are relative to the working folder, those of the TOML to its folder).
Event tables (a behaviour sequence joined per user by time) and the item table are TOML only.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

DEFAULT_COLD_SHARE = 0.2  # bahe-data movielens --cold-share's default


def _named(values: list[str] | None, flag: str) -> dict[str, str]:
    """NAME=COLUMN (or NAME: the column of that name) -> {NAME: COLUMN}."""
    out = {}
    for value in values or []:
        name, _, column = value.partition("=")
        if not name:
            raise ValueError(f"{flag} {value!r}: give NAME=COLUMN (or NAME for a column of that name)")
        out[name] = column or name
    return out


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("import", help="your own logs (Parquet, CSV, JSON lines) -> train/valid/test.parquet",
                       description=__doc__ + "\n" + __import__("bahe.ctr_data.importer", fromlist=["_"]).__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output folder: train/valid/test.parquet (older ones there "
                   "are replaced only once all three are complete)")
    p.add_argument("--mapping", type=Path, help="the mapping TOML (docs/byo_data.md lists its keys)")
    p.add_argument("--input", type=Path, nargs="+", metavar="FILE", help="the impressions file(s), in time order "
                   "([input] files)")
    p.add_argument("--format", choices=("csv", "jsonl", "parquet"), help="of --input (default: from the extension)")
    for key in ("user_id", "item_id", "label", "timestamp", "item_text"):
        p.add_argument(f"--{key.replace('_', '-')}", dest=key, metavar="COLUMN", help=f"the column giving {key}")
    p.add_argument("--dense", nargs="+", metavar="NAME=COLUMN", help="dense_NAME from COLUMN (NAME alone: its own column)")
    p.add_argument("--categorical", nargs="+", metavar="NAME=COLUMN", help="cat_NAME from COLUMN")
    p.add_argument("--sequence", nargs="+", metavar="NAME=COLUMN", help="seq_NAME from a list column of the row")
    p.add_argument("--sep", help="how a text cell of a --sequence column separates its texts (e.g. '|'; CSV needs it)")
    p.add_argument("--hash-ids", nargs="+", choices=("user_id", "item_id"), help="ids given as texts, hashed")
    split = p.add_mutually_exclusive_group()
    split.add_argument("--split-fractions", type=float, nargs=3, metavar=("TRAIN", "VALID", "TEST"),
                       help="split by time, over the rows in time order (default 0.8 0.1 0.1)")
    split.add_argument("--split-cuts", type=int, nargs=2, metavar=("T1", "T2"),
                       help="split by time: train before T1, valid before T2, test from T2")
    split.add_argument("--split-column", metavar="COLUMN", help="your own split column: train / valid / test")
    p.add_argument("--split", choices=("time", "item_cold"), default=None,
                   help="time: every row split by time (the default); item_cold: a seeded share of the items has every "
                        "row in valid or test (none in train), the other items' rows split by time (fractions or "
                        "cuts) -- as bahe-data movielens --split item_cold (docs/byo_data.md)")
    p.add_argument("--cold-share", type=float, default=None,
                   help=f"--split item_cold: the share of the items held out of train (default {DEFAULT_COLD_SHARE})")
    p.add_argument("--seed", type=int, default=None, help="--split item_cold: which items are held out (default 0)")
    p.add_argument("--dataset", help="the dataset name recorded in the files")
    p.add_argument("--batch-rows", type=int, help="rows read and converted at a time (default 65536)")
    return p


def overrides_from_args(args: argparse.Namespace) -> dict:
    """The flags given, as mapping keys in the TOML's shape."""
    raw: dict = {}
    if args.input:
        raw["input"] = {"files": [str(p) for p in args.input]}
    if args.format:
        raw.setdefault("input", {})["format"] = args.format
    columns = {k: getattr(args, k) for k in ("user_id", "item_id", "label", "timestamp", "item_text")
               if getattr(args, k) is not None}
    if columns:
        raw["columns"] = columns
    if args.dense:
        raw["dense"] = _named(args.dense, "--dense")
    if args.categorical:
        raw["categorical"] = _named(args.categorical, "--categorical")
    if args.sequence:
        raw["sequences"] = {name: {"column": column, **({"sep": args.sep} if args.sep else {})}
                            for name, column in _named(args.sequence, "--sequence").items()}
    if args.hash_ids:
        raw["hash_ids"] = list(args.hash_ids)
    given = {"fractions": args.split_fractions, "cuts": args.split_cuts, "column": args.split_column}
    if any(v is not None for v in given.values()):
        raw["split"] = given  # None removes the mapping's other split keys
    if args.split is None and (args.cold_share is not None or args.seed is not None):
        raise ValueError("--cold-share and --seed go with --split item_cold")
    if args.split == "time":  # the mapping's item_cold keys removed
        raw.setdefault("split", {}).update(cold_share=None, seed=None)
    elif args.split == "item_cold":  # the share and seed given, else the mapping's (else 0.2 and 0: run)
        raw.setdefault("split", {}).update({k: v for k, v in (("cold_share", args.cold_share), ("seed", args.seed))
                                            if v is not None})
    if args.dataset:
        raw["dataset"] = args.dataset
    if args.batch_rows is not None:
        raw["batch_rows"] = args.batch_rows
    return raw


def run(args: argparse.Namespace) -> list[Path]:
    from bahe.ctr_data.import_mapping import load_mapping
    from bahe.ctr_data.importer import import_logs

    if args.mapping is None and not args.input:
        raise ValueError("bahe-data import needs --mapping TOML, or --input FILE with --user-id, --item-id, --label, "
                         "--timestamp and --item-text")
    mapping = load_mapping(args.mapping, overrides_from_args(args))
    if args.split == "item_cold" and mapping.split.cold_share is None:
        mapping = dataclasses.replace(mapping, split=dataclasses.replace(mapping.split, cold_share=DEFAULT_COLD_SHARE))
    result = import_logs(mapping, args.out)
    rows = result["rows"]
    print(f"imported {sum(rows.values())} rows into {args.out}: train {rows['train']}, valid {rows['valid']}, "
          f"test {rows['test']}", file=sys.stderr)
    return list(result["paths"].values())
