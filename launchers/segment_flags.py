"""The segment metric flags of ``bahe-train``, ``bahe-evaluate`` and ``bahe-predict``: one definition.

``add_segment_flags`` adds --segment-thresholds, --history-thresholds, --bootstrap, --confidence and
--segment-seed to a parser; ``segment_spec`` turns the parsed values into the
:class:`~bahe.training.segments.SegmentSpec` every report takes. Bad values raise ValueError naming the
flag (SegmentSpec's own checks), which each launcher prints as its one-line error. docs/segments.md.
"""

from __future__ import annotations

import argparse


def add_segment_flags(parser: argparse.ArgumentParser) -> None:
    """--segment-thresholds, --history-thresholds, --bootstrap, --confidence, --segment-seed (training/segments.py)."""
    from bahe.training.segments import SegmentSpec

    d = SegmentSpec()
    g = parser.add_argument_group("segment metrics (docs/segments.md)")
    g.add_argument("--segment-thresholds", type=int, nargs="+", default=list(d.item_thresholds), metavar="N",
                   help="ascending training-row counts bounding the item popularity segments (default "
                        f"{' '.join(map(str, d.item_thresholds))}: cold 0, tail <= 20, torso <= 200, head above)")
    g.add_argument("--history-thresholds", type=int, nargs="+", default=list(d.history_thresholds), metavar="N",
                   help="ascending behaviour counts (all of the row's sequences) bounding the history length "
                        f"segments (default {' '.join(map(str, d.history_thresholds))})")
    g.add_argument("--bootstrap", type=int, default=d.bootstrap,
                   help=f"bootstrap resamples per segment interval (default {d.bootstrap}; 0: no intervals)")
    g.add_argument("--confidence", type=float, default=d.confidence,
                   help=f"the intervals' central share (default {d.confidence})")
    g.add_argument("--segment-seed", type=int, default=d.seed, help=f"the resampling seed (default {d.seed})")


def segment_spec(args: argparse.Namespace):
    """The SegmentSpec of the parsed flags; ValueError (naming the flag) on a bad value."""
    from bahe.training.segments import SegmentSpec

    return SegmentSpec(item_thresholds=tuple(args.segment_thresholds), history_thresholds=tuple(args.history_thresholds),
                       bootstrap=args.bootstrap, confidence=args.confidence, seed=args.segment_seed)
