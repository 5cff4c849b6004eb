"""`bahe-encode`: build, refresh, inspect and verify a behaviour embedding store.

  bahe-encode build --store stores/ml --data data/ml/train.parquet data/ml/valid.parquet --k 6
  bahe-encode build --store stores/ml --data data/new_day.parquet   # refresh: encodes only new texts
  bahe-encode build --store stores/ml-w --data ... --pooling mean_skip_first --post-transform whiten
  bahe-encode info stores/ml
  bahe-encode verify stores/ml

`build` under torchrun splits the encoding across ranks:
  torchrun --nproc_per_node 2 -m bahe.embeddings.cli build --store ... --data ...
An interrupted build resumes from its finished chunks when run again with the same arguments. One
build per store at a time: a second is refused at once (exit 2), naming the first's PID and host.
`info`, `verify` and every reader refuse an edited manifest and files linked from outside the store.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bahe.ctr_data.schema import DataError
from bahe.embeddings.encoding import POOLINGS, describe_choices
from bahe.embeddings.post_transform import POST_TRANSFORMS
from bahe.embeddings.pretrained import DEFAULT_MODEL, ModelError
from bahe.embeddings.process_group import add_timeout_flag
from bahe.embeddings.store import STORE_DTYPES, BehaviourStore, StoreError, latest_version
from bahe.embeddings.store_stats import TOP_CHANNELS, store_anisotropy

# encoding choices a refresh takes from the store when their flag is not given (flag dest = config field = manifest field)
INHERITED = ("pooling", "massive_factor", "post_transform", "whiten_eps")


def _encoding_choices(args: argparse.Namespace) -> dict:
    """The pooling and post-transform choices: the flags given, else the LATEST version's (a refresh), else
    EncoderConfig's defaults (a new store); a choice the store does not use (its factor, its eps) is not
    inherited."""
    store = args.store if latest_version(args.store) else None
    encoding = BehaviourStore.open(store).encoding if store else {}
    return {field: getattr(args, field) if getattr(args, field) is not None else encoding[field]
            for field in INHERITED if getattr(args, field) is not None or encoding.get(field) is not None}


def _build(args: argparse.Namespace) -> int:
    from bahe.embeddings.build import build_store
    from bahe.embeddings.encoder import EncoderConfig

    config = EncoderConfig(model=args.model, k=args.k, dtype=args.dtype, device=args.device,
                           max_tokens=args.max_tokens, batch_tokens=args.batch_tokens,
                           fixed_shapes=not args.dynamic_shapes, trust_remote_code=args.trust_remote_code,
                           **_encoding_choices(args))
    from bahe.embeddings.process_group import close_process_group, set_timeout

    set_timeout(args.pg_timeout)  # the group a torchrun build creates (build._rank_world)
    import torch.distributed as dist

    callers_group = dist.is_initialized()  # a caller's group is the caller's to end
    report = build_store(args.store, args.data, config, chunk_texts=args.chunk_texts, show_progress=not args.quiet,
                         store_dtype=args.store_dtype)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(json.dumps(vars(report), indent=2) if args.json else report.format())
    if not callers_group:
        close_process_group()  # a torchrun build's own group: gloo's threads joined before interpreter exit
    return 0


def _info(args: argparse.Namespace) -> int:
    store = BehaviourStore.open(args.store, args.version)
    manifest = dict(store.manifest)
    stats = store_anisotropy(store, args.sample) if getattr(args, "stats", False) else None
    if args.json:
        print(json.dumps({**manifest, "encoding": store.encoding, **({"stats": stats} if stats else {})}, indent=2))
    else:
        enc, model = store.encoding, manifest["model"]
        added = enc["special_tokens"]
        tokenizer = "tokenizer not recorded (a store written before it was)" if enc["tokenizer_sha256"] is None else (
            f"tokenizer sha256 {enc['tokenizer_sha256'][:12]}..., adds {added['prefix'] or 'nothing'} before a text "
            f"and {added['suffix'] or 'nothing'} after it (BOS prepended: {'yes' if enc['bos_prepended'] else 'no'})")
        print(f"{store.path}: {manifest['rows']:,} rows x {manifest['dim']} ({manifest['store_dtype']}), "
              f"parent {manifest['parent'] or 'none'}, created {manifest['created_utc']}\n"
              f"model {model['name']} ({model['architecture']}, {model['num_layers']} layers, sha256 "
              f"{model['sha256'][:12]}...), k={enc['k']}, {describe_choices(enc)}, dtype {enc['dtype']}, "
              f"max_tokens {enc['max_tokens']}\n{tokenizer}")
        if stats:
            print(f"anisotropy of {stats['rows']:,} sampled texts (rows as stored, post-transform "
                  f"{enc['post_transform']}): mean cosine between texts "
                  f"{stats['mean_cosine']:.3f}, top-{TOP_CHANNELS} channels hold {stats['top_channel_energy']:.1%} "
                  f"of the energy, effective rank {stats['effective_rank']:.1f} of {manifest['dim']}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    store = BehaviourStore.open(args.store, args.version)
    chunks = store.row_chunks
    if chunks is None:
        print(f"note: {store.path} was written before per-chunk checksums: its whole files are checked (a refresh "
              "with bahe-encode build writes them)")
    store.verify()
    detail = f" ({len(chunks.stops)} row chunk(s) and every file)" if chunks is not None else ""
    print(f"{store.path}: every checksum matches{detail}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bahe-encode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="create a store, or refresh its LATEST version with the new texts of --data")
    build.add_argument("--store", type=Path, required=True, help="store root folder (created if missing)")
    build.add_argument("--data", type=Path, nargs="+", required=True,
                       help="sample .parquet files (bahe-data); every sequence text and item text is collected")
    build.add_argument("--model", default=DEFAULT_MODEL,
                       help=f"model alias (smollm2-135m, minilm-l6) or local Hugging Face folder (default {DEFAULT_MODEL})")
    build.add_argument("--k", type=int, default=6, help="shallow frozen layers that encode a text (default 6)")
    build.add_argument("--pooling", choices=POOLINGS, default=None,
                       help="token pooling: mean, last, mean_skip_first (position 0, the attention sink, left out) or "
                            "mean_skip_massive (tokens of norm > --massive-factor x the text's smallest left out); "
                            "default: the store's own for a refresh, else mean")
    build.add_argument("--massive-factor", type=float, default=None,
                       help="mean_skip_massive's factor (default: the store's own, else 4)")
    build.add_argument("--post-transform", choices=POST_TRANSFORMS, default=None,
                       help="a transform of the rows fitted on the first build's texts and frozen: none, center "
                            "(minus the mean) or whiten (ZCA); default: the store's own for a refresh, else none")
    build.add_argument("--whiten-eps", type=float, default=None,
                       help="whitening's regulariser, a fraction of the mean eigenvalue (default: the store's own, "
                            "else 1e-4)")
    build.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                       help="compute dtype of the encoder (default float32); see --store-dtype for the rows on disk")
    build.add_argument("--store-dtype", choices=tuple(STORE_DTYPES), default=None,
                       help="dtype of the stored rows: float32, float16 or bfloat16 (half the bytes; bfloat16 is kept "
                            "as its raw 16 bits). Default: the store's own for a refresh (a refresh keeps its "
                            "parent's and refuses another), else float32")
    add_timeout_flag(build)
    build.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    build.add_argument("--max-tokens", type=int, default=64, help="longer texts are truncated (default 64)")
    build.add_argument("--batch-tokens", type=int, default=128,
                       help="tokens per micro-batch; fixes the batch shape per text length (default 128; raise it on a GPU)")
    build.add_argument("--dynamic-shapes", action="store_true",
                       help="skip the filler rows that keep batch shapes fixed: less compute on small stores, "
                            "but vectors are no longer byte-identical across refreshes, resumes and ranks")
    build.add_argument("--chunk-texts", type=int, default=4096,
                       help="texts per resumable chunk and per unit of work across ranks (default 4096)")
    build.add_argument("--trust-remote-code", action="store_true", help="let transformers run the model's own code")
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    build.add_argument("--json", action="store_true", help="print the report as JSON")
    build.set_defaults(run=_build)
    for name, run, text in (("info", _info, "print a version's manifest"),
                            ("verify", _verify, "recompute a version's checksums")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("store", type=Path, help="store root folder")
        cmd.add_argument("--version", default=None, help="a version name such as v000002 (default LATEST)")
        cmd.add_argument("--json", action="store_true", help="JSON output")
        if name == "info":
            cmd.add_argument("--stats", action="store_true",
                             help="also print the vectors' anisotropy: mean cosine between texts, energy share of "
                                  f"the top {TOP_CHANNELS} channels, effective rank (embeddings/store_stats.py)")
            cmd.add_argument("--sample", type=int, default=2000, help="texts sampled for --stats (default 2000)")
        cmd.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (StoreError, ModelError, DataError, ValueError, FileNotFoundError) as err:
        print(f"bahe-encode: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
