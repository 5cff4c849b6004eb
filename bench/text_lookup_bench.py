"""Text -> store row per batch at 10k to 4M store texts: the store's text index (issue 28, item 1) against the
vocabulary in every process's heap, side by side in one run.

    python -m bench.text_lookup_bench --sizes 10000 1000000 4000000 --out docs/bench/text_lookup

For each size a store is written through the real writer (``bahe.embeddings.build._assemble``: vocabulary,
random vectors of ``--dim`` floats, text index, checksums, manifest) by :func:`write_random_store`, a
bench-only helper: only the text -> row path matters here, not the vectors. Then, for each way of resolving
texts, a fresh process opens the store, builds the batcher and resolves the same ``--batches`` batches
(``SampleBatcher._behaviour_features``: texts -> store rows -> the behaviour KJT), and reports:

* ``before``: the code before issue 28, copied here: the whole vocabulary loaded as Python objects, and each
  of the batcher's 4 lookups per batch (one per sequence type, one for the item texts) handing every store
  text to ``pyarrow.compute.index_in`` as its value set, which hashes all of them on every call;
* ``vocab_dict``: the vocabulary still loaded as Python objects, looked up per batch through its dict
  (``BehaviourVocabulary.lookup_array`` now): the per-batch cost is fixed, the memory is not;
* ``index``: the store's memory-mapped text index (``BehaviourStore.text_index``): no vocabulary in memory.

A batch holds ``--batch-size`` rows of 2 sequence types of ``--seq-len`` texts plus an item text; its texts
are drawn from ``--distinct`` store texts picked uniformly over the whole store (the same number of distinct
texts at every size, spread over all of the index's pages), with 2% texts the store has not encoded and 2%
empty texts. Per batch: the median wall time over the timed batches after one warm-up batch. Memory: the
process's resident set (VmRSS, and its anonymous and file-backed parts) after opening the store and the
resolver, and after the batches; open: seconds to open the store and the resolver.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
TEXT_INDEX_FILES = ("text_hashes.npy", "text_rows.npy", "text_offsets.npy", "text_bytes.npy", "text_buckets.npy")
MODES = ("before", "vocab_dict", "index")
WORDS = ("coffee", "flight", "metro", "movie", "noodles", "taxi", "hotel", "books", "Purchase", "Starbucks", "Pay",
         "order")
SEQUENCES = ("clicked", "bought")


def text_of(i: int) -> str:
    """The i-th store text (normalised; sorted by i, so text i is store row i + 2)."""
    return f"behaviour {i:09d} {WORDS[i % 12]} {WORDS[(i // 12) % 12]} at shop {i % 997}"


# -- bench-only: a store of random vectors, written through the real writer -----------------------------------
def write_random_store(root: Path, n: int, dim: int, seed: int = 0) -> Path:
    """A store of ``n`` texts (:func:`text_of`) and random ``dim``-float rows, written by the store's writer
    (``bahe.embeddings.build._assemble``): vocabulary, vectors, text index, checksums, manifest, LATEST.
    Bench-only: the rows are no encoder's; nothing reads them here."""
    from bahe.embeddings.build import _assemble
    from bahe.embeddings.store import FORMAT
    from bahe.embeddings.vocabulary import RESERVED, BehaviourVocabulary

    shutil.rmtree(root, ignore_errors=True)
    work = root / ".work" / "v000001"
    work.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    chunk = 1 << 20
    n_chunks = -(-n // chunk)
    for c in range(n_chunks):
        rows = min(chunk, n - c * chunk)
        np.save(work / f"chunk-{c:06d}.npy", rng.standard_normal((rows, dim), dtype=np.float32))
    texts = [*RESERVED, *(text_of(i) for i in range(n))]
    vocab = BehaviourVocabulary(texts, [0, 0] + [1] * n)
    manifest = {"format": FORMAT, "version": "v000001", "parent": None, "created_utc": "bench",
                "model": {"name": "bench-random-vectors", "sha256": "0" * 64, "architecture": "none",
                          "num_layers": 0, "hidden_size": dim},
                "encoder": {"k": 0, "note": "bench/text_lookup_bench.py: random vectors"}, "dim": dim, "rows": len(vocab),
                "store_dtype": "float32", "stats": {}}
    _assemble(root, work, "v000001", None, vocab, n_chunks, dim, manifest, None)
    shutil.rmtree(root / ".work", ignore_errors=True)
    return root


def write_batches(path: Path, n: int, batches: int, batch_size: int, seq_len: int, distinct: int, seed: int,
                  text=text_of) -> None:
    """``batches`` sample tables (the sequence and item text columns) into one Parquet file, a row group each;
    ``text(i)``: the store's i-th text (bench/store_scale.py passes its stores' own)."""
    rng = np.random.default_rng(seed)
    pool = rng.choice(n, size=min(distinct, n), replace=False)
    schema = pa.schema([*(pa.field(f"seq_{s}", pa.list_(pa.string())) for s in SEQUENCES),
                        pa.field("item_text", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        for b in range(batches):
            slots = batch_size * (len(SEQUENCES) * seq_len + 1)
            picked = pool[rng.integers(0, len(pool), slots)]
            kind = rng.random(slots)
            texts = [("" if k < 0.02 else f"never encoded {b} {i}" if k < 0.04 else text(int(p)))
                     for i, (p, k) in enumerate(zip(picked, kind))]
            columns, at = {}, 0
            for s in SEQUENCES:
                flat = pa.array(texts[at:at + batch_size * seq_len], pa.string())
                offsets = pa.array(np.arange(0, batch_size * seq_len + 1, seq_len, dtype=np.int32))
                columns[f"seq_{s}"] = pa.ListArray.from_arrays(offsets, flat)
                at += batch_size * seq_len
            columns["item_text"] = pa.array(texts[at:], pa.string())
            writer.write_table(pa.table(columns, schema=schema))


# -- the code before issue 28, copied (embeddings/vocabulary.py and model/batch.py at 05253a8) -------------------
class VocabularyBefore:
    """``BehaviourVocabulary.lookup_array`` before issue 28: every store text handed to ``pc.index_in`` as its
    value set on every call."""

    def __init__(self, vocabulary):
        from bahe.embeddings.vocabulary import RESERVED

        self.texts, self.reserved = vocabulary.texts, len(RESERVED)
        self.value_set = pa.array(self.texts[self.reserved:], pa.string())

    def lookup_array(self, texts):
        from bahe.embeddings.vocabulary import PAD_ID, UNKNOWN_ID, normalize_texts

        norm = normalize_texts(texts)
        found = pc.index_in(norm, value_set=self.value_set)
        empty = pc.equal(norm, "").to_numpy(zero_copy_only=False)
        ids = found.fill_null(UNKNOWN_ID - self.reserved).to_numpy(zero_copy_only=False).astype(np.int64)
        ids += self.reserved
        ids[empty] = PAD_ID
        return ids


def behaviour_features_before(batcher, table):
    """``SampleBatcher._behaviour_features`` before issue 28: one lookup per sequence type, one for the items."""
    import torch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from bahe.embeddings.vocabulary import PAD_ID, UNKNOWN_ID
    from bahe.model.batch import keep_most_recent

    values, lengths = [], []
    for name in batcher.sequence_names:
        column = table.column("seq_" + name).combine_chunks()
        ids = batcher.vocabulary.lookup_array(pc.list_flatten(column))
        count = pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)
        padless = ids != PAD_ID
        if not padless.all():
            owners = np.repeat(np.arange(len(count)), count)
            count = np.bincount(owners[padless], minlength=len(count)).astype(np.int64)
            ids = ids[padless]
        keep, capped = keep_most_recent(count, batcher.max_behaviours)
        ids, count = ids[keep], capped
        np.count_nonzero(ids == UNKNOWN_ID)
        values.append(ids)
        lengths.append(count)
    item = batcher.vocabulary.lookup_array(table.column("item_text"))
    values.append(item[item != PAD_ID])
    lengths.append((item != PAD_ID).astype(np.int64))
    return KeyedJaggedTensor.from_lengths_sync(keys=batcher.behaviour_keys, values=torch.from_numpy(np.concatenate(values)),
                                               lengths=torch.from_numpy(np.concatenate(lengths)))


# -- one measurement, in a fresh process -------------------------------------------------------------------------
def memory() -> dict:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024  # MiB
    return fields


def measure(store_root: Path, batches_path: Path, mode: str, seq_len: int) -> dict:
    from bahe.ctr_data.schema import SampleSchema
    from bahe.embeddings.store import BehaviourStore
    from bahe.model.batch import SampleBatcher

    tables = [pq.ParquetFile(batches_path).read_row_group(i) for i in range(pq.ParquetFile(batches_path).num_row_groups)]
    rss_before = memory()
    start = time.perf_counter()
    store = BehaviourStore.open(store_root)
    if mode == "index":
        resolver = store.text_index
    elif mode == "vocab_dict":
        resolver = store.vocabulary
    else:
        resolver = VocabularyBefore(store.vocabulary)
    open_s = time.perf_counter() - start
    rss_open = memory()
    schema = SampleSchema(sequences=SEQUENCES)
    batcher = SampleBatcher(schema, {"user_id": 1}, resolver, max_behaviours=seq_len)
    run = (lambda t: behaviour_features_before(batcher, t)) if mode == "before" else batcher._behaviour_features
    seconds, out = [], None
    for table in tables:
        t0 = time.perf_counter()
        out = run(table)
        seconds.append(time.perf_counter() - t0)
    return {"mode": mode, "rows": store.rows_count, "open_s": open_s, "batch_s": seconds[1:], "warmup_s": seconds[0],
            "median_batch_s": statistics.median(seconds[1:]), "texts_per_batch": sum(len(t.column("item_text")) * (
                1 + len(SEQUENCES) * seq_len) for t in tables[:1]),
            "values_per_batch": int(out.values().numel()), "rss_before_mib": rss_before, "rss_open_mib": rss_open,
            "rss_end_mib": memory()}


def measure_interleaved(stores: list[Path], batch_files: list[Path], seq_len: int, rounds: int) -> dict:
    """The index at every size in ONE process, batch by batch in a rotating order: the machine's load drifts over
    all sizes alike. Wall and CPU (process) seconds per batch, per size."""
    from bahe.ctr_data.schema import SampleSchema
    from bahe.embeddings.store import BehaviourStore
    from bahe.model.batch import SampleBatcher

    schema = SampleSchema(sequences=SEQUENCES)
    runs = []
    for root, path in zip(stores, batch_files):
        store = BehaviourStore.open(root)
        file = pq.ParquetFile(path)
        batcher = SampleBatcher(schema, {"user_id": 1}, store.text_index, max_behaviours=seq_len)
        tables = [file.read_row_group(i) for i in range(file.num_row_groups)]
        batcher._behaviour_features(tables[0])  # warm-up
        runs.append((store.rows_count - 2, batcher, tables[1:]))  # store texts: rows less <pad>, <unknown>
    wall = {rows: [] for rows, _, _ in runs}
    cpu = {rows: [] for rows, _, _ in runs}
    for r in range(rounds):
        for i in range(max(len(t) for _, _, t in runs)):
            for rows, batcher, tables in runs[(i + r) % len(runs):] + runs[:(i + r) % len(runs)]:
                table = tables[i % len(tables)]
                w, c = time.perf_counter(), time.process_time()
                batcher._behaviour_features(table)
                cpu[rows].append(time.process_time() - c)
                wall[rows].append(time.perf_counter() - w)
    return {"wall_s": wall, "cpu_s": cpu}


# -- the run ------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000, 4_000_000])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--batches", type=int, default=20, help="batches timed per cell and round, after one warm-up")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over every size (`before` over 100k: one)")
    parser.add_argument("--before-batches", type=int, default=3, help="batches for `before` at sizes over 100k")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--seq-len", type=int, default=50)
    parser.add_argument("--distinct", type=int, default=5000, help="distinct store texts the batches draw from")
    parser.add_argument("--dim", type=int, default=8)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bahe-text-lookup-bench"))
    parser.add_argument("--keep-stores", action="store_true", help="reuse stores already in --work")
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    parser.add_argument("--measure", nargs=3, metavar=("STORE", "BATCHES", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--interleaved", nargs="+", metavar="STORE=BATCHES", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(Path(args.measure[0]), Path(args.measure[1]), args.measure[2], args.seq_len)))
        return 0
    if args.interleaved:
        pairs = [item.split("=", 1) for item in args.interleaved]
        print(json.dumps(measure_interleaved([Path(a) for a, _ in pairs], [Path(b) for _, b in pairs], args.seq_len,
                                             args.rounds)))
        return 0

    from bench.machine import machine, versions

    started = time.perf_counter()
    info = {"machine": machine(), "versions": versions(), "args": {k: str(v) for k, v in vars(args).items()}}
    roots, builds = {}, {}
    for n in args.sizes:
        roots[n] = args.work / f"store-{n}"
        t0 = time.perf_counter()
        if not (args.keep_stores and (roots[n] / "LATEST").is_file()):
            write_random_store(roots[n], n, args.dim)
        builds[n] = time.perf_counter() - t0
    cells: dict[tuple[int, str], dict] = {}
    for round_ in range(args.rounds):  # sizes interleaved round by round: the machine's load drifts over all of them
        for n in args.sizes:
            for mode in args.modes:
                if mode == "before" and n > 100_000 and round_:
                    continue  # seconds per batch: one round tells
                batches = args.batches if mode != "before" or n <= 100_000 else args.before_batches
                path = args.work / f"batches-{n}-{batches}.parquet"
                if not path.is_file():
                    write_batches(path, n, batches + 1, args.batch_size, args.seq_len, args.distinct, seed=1)
                out = subprocess.run([sys.executable, "-m", "bench.text_lookup_bench", "--seq-len", str(args.seq_len),
                                      "--measure", str(roots[n]), str(path), mode], cwd=ROOT, capture_output=True,
                                     text=True, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
                if out.returncode:
                    print(out.stderr[-3000:], file=sys.stderr)
                    return 1
                cell = json.loads(out.stdout.strip().splitlines()[-1])
                if (n, mode) in cells:  # pool the timed batches; memory and open time from the first round
                    cells[(n, mode)]["batch_s"] += cell["batch_s"]
                    cells[(n, mode)]["median_batch_s"] = statistics.median(cells[(n, mode)]["batch_s"])
                else:
                    cells[(n, mode)] = cell
                cell = cells[(n, mode)]
                cell.update(size=n, build_s=builds[n], index_mib=sum(
                    (roots[n] / "v000001" / f).stat().st_size for f in TEXT_INDEX_FILES) / 2**20)
                print(f"round {round_}: {n:>9,} {mode:>10}: {cell['median_batch_s'] * 1e3:9.1f} ms/batch, open "
                      f"{cell['open_s']:6.2f} s, RSS after open {cell['rss_open_mib']['VmRSS']:8.1f} MiB (anon "
                      f"{cell['rss_open_mib']['RssAnon']:.1f})", flush=True)
    cells = [cells[(n, mode)] for n in args.sizes for mode in args.modes]
    pairs = [f"{roots[n]}={args.work / f'batches-{n}-{args.batches}.parquet'}" for n in args.sizes]
    for n in args.sizes:
        if not (args.work / f"batches-{n}-{args.batches}.parquet").is_file():
            write_batches(args.work / f"batches-{n}-{args.batches}.parquet", n, args.batches + 1, args.batch_size,
                          args.seq_len, args.distinct, seed=1)
    out = subprocess.run([sys.executable, "-m", "bench.text_lookup_bench", "--seq-len", str(args.seq_len), "--rounds",
                          str(args.rounds), "--interleaved", *pairs], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    if out.returncode:
        print(out.stderr[-3000:], file=sys.stderr)
        return 1
    interleaved = json.loads(out.stdout.strip().splitlines()[-1])
    report = table(cells, args) + "\n\n" + interleaved_table(interleaved, args)
    print(report)
    if args.out:
        info.update(cells=cells, interleaved=interleaved, seconds=time.perf_counter() - started,
                    loadavg_end=os.getloadavg())
        args.out.with_suffix(".json").write_text(json.dumps(info, indent=2))
        args.out.with_suffix(".md").write_text(page(report, cells, interleaved, info, args))
    return 0


def page(report: str, cells: list[dict], interleaved: dict, info: dict, args) -> str:
    """docs/bench/text_lookup.md: the command, the machine, the tables and what they say."""
    sizes = sorted(args.sizes)
    small, large = sizes[0], sizes[-1]
    cpu = {int(n): statistics.median(v) for n, v in interleaved["cpu_s"].items()}
    wall = {int(n): statistics.median(v) for n, v in interleaved["wall_s"].items()}
    cell = {(c["size"], c["mode"]): c for c in cells}
    index, before = cell.get((large, "index")), cell.get((large, "before"))
    vocab = cell.get((large, "vocab_dict"))
    m = info["machine"]
    lines = [
        "# Text -> store row per batch: the text index vs the vocabulary in memory (issue 28, item 1)", "",
        f"Produced by `python -m bench.text_lookup_bench --sizes {' '.join(str(n) for n in args.sizes)} --out "
        f"{args.out}` in {info['seconds']:.0f} s on {m['cpu_model']} ({m['cpu_count']} CPUs, shared; load average "
        f"{m['loadavg_start'][0]:.2f} at start, {info['loadavg_end'][0]:.2f} at end), pyarrow "
        f"{info['versions'].get('pyarrow')}, numpy {info['versions'].get('numpy')}. Every figure in "
        f"`{args.out.name}.json`.", "",
        "Each store is written through the store's writer (vocabulary, random vectors of "
        f"{args.dim} floats, text index, checksums, manifest: `write_random_store`, bench-only). A batch is what "
        "the batcher resolves per training step: `SampleBatcher._behaviour_features` (texts -> store rows -> the "
        "behaviour KJT). `before` is the code before issue 28 (copied into the bench): the vocabulary loaded as "
        "Python objects, and each of the batcher's 4 lookups per batch hashing every store text "
        "(`pyarrow.compute.index_in` with all of them as its value set). `vocab_dict`: the vocabulary still in "
        "memory, looked up through its dict per distinct text (`BehaviourVocabulary.lookup_array` now). `index`: "
        "the store's memory-mapped text index (`BehaviourStore.text_index`, what the trainer's batcher and "
        "pre-flight use now). Each cell runs in a fresh process.", "",
        "## Per batch and memory, one process per cell", "", report, "",
        "## Reading", "",
        f"* **Per-batch cost at {large:,} texts vs {small:,}** (target <= 1.5x): the index's CPU time per batch is "
        f"{cpu[large] / cpu[small]:.2f}x (wall {wall[large] / wall[small]:.2f}x) its cost at {small:,}, measured in "
        "one process with every size's batches in turn, so the machine's load falls on all sizes alike (the "
        "per-process cells above move with the load of this shared machine; their ratios are "
        + ", ".join(f"{cell[(n, 'index')]['median_batch_s'] / cell[(small, 'index')]['median_batch_s']:.2f}x"
                    for n in sizes[1:] if (n, "index") in cell) + "). What grows is the handful of cache and TLB "
        "misses per distinct text of a lookup in a larger file (its bucket of hashes, its row, its offsets, its "
        "bytes), not a pass over the store.",
    ]
    if index and before:
        lines.append(
            f"* **Against the code before**: at {large:,} texts a batch took {before['median_batch_s']:.2f} s "
            f"before, {index['median_batch_s'] * 1e3:.0f} ms through the index (x{before['median_batch_s'] / index['median_batch_s']:.0f}); "
            f"at {small:,}, {cell[(small, 'before')]['median_batch_s'] * 1e3:.0f} ms vs "
            f"{cell[(small, 'index')]['median_batch_s'] * 1e3:.0f} ms. The batch's texts are now normalised, "
            "hashed and looked up once per distinct text, in one lookup per batch.")
    if index and vocab:
        lines.append(
            f"* **Memory**: after opening, the index process holds {index['rss_open_mib']['RssAnon']:.0f} MiB "
            f"anonymous at {large:,} texts, as at {small:,} ({cell[(small, 'index')]['rss_open_mib']['RssAnon']:.0f} "
            f"MiB: the interpreter, torch, pyarrow); the vocabulary in memory costs "
            f"{vocab['rss_open_mib']['RssAnon'] - index['rss_open_mib']['RssAnon']:.0f} MiB more "
            f"({(vocab['rss_open_mib']['RssAnon'] - index['rss_open_mib']['RssAnon']) * 2**20 / large:.0f} bytes per "
            f"text; `before` {(before['rss_open_mib']['RssAnon'] - index['rss_open_mib']['RssAnon']) * 2**20 / large:.0f}"
            f" bytes per text; the two differ by what the allocator still held after loading) and {vocab['open_s']:.1f} s to load, in every process (each rank, and before this "
            f"change twice per rank: pre-flight and batcher). The index opens in {index['open_s']:.2f} s (its "
            f"files' checksums: {index['index_mib']:.0f} MiB read once per process). What the batches touch of the "
            f"mapped files shows as file-backed RSS ({index['rss_end_mib']['RssFile'] - index['rss_open_mib']['RssFile']:.0f}"
            " MiB here after the batches: the kernel maps the pages around each fault that are in the page cache, "
            "and the files were just written): page cache shared by every rank on the host and given back under "
            "memory pressure, not a per-rank copy; the anonymous memory does not grow with the store.")
    lines += ["", "Command to reproduce (stores of 10k, 1M and 4M texts, about 0.5 GiB of disk in --work and "
              "2.5 GiB of memory at most, in the `vocab_dict` and `before` cells at 4M):", "", "```bash",
              f"python -m bench.text_lookup_bench --sizes {' '.join(str(n) for n in args.sizes)} --out {args.out}",
              "```", ""]
    return "\n".join(lines)


def interleaved_table(found: dict, args) -> str:
    """The index's per-batch cost at every size, measured in one process, batch by batch in turn."""
    sizes = sorted(int(n) for n in found["wall_s"])
    wall = {n: statistics.median(found["wall_s"][str(n)]) for n in sizes}
    cpu = {n: statistics.median(found["cpu_s"][str(n)]) for n in sizes}
    lines = [f"The index alone, every size in one process, batch by batch in turn ({len(found['wall_s'][str(sizes[0])])} "
             "batches per size): median per batch.", "",
             f"| store texts | wall ms per batch | vs {sizes[0]:,} | CPU ms per batch | vs {sizes[0]:,} |",
             "|---|---|---|---|---|"]
    for n in sizes:
        lines.append(f"| {n:,} | {wall[n] * 1e3:.1f} | {wall[n] / wall[sizes[0]]:.2f}x | {cpu[n] * 1e3:.1f} | "
                     f"{cpu[n] / cpu[sizes[0]]:.2f}x |")
    return "\n".join(lines)


def table(cells: list[dict], args) -> str:
    smallest = min(args.sizes)
    base = {c["mode"]: c["median_batch_s"] for c in cells if c["size"] == smallest}
    lines = [f"Batches of {args.batch_size} rows x ({len(SEQUENCES)} sequences x {args.seq_len} texts + 1 item text), "
             f"drawn from {args.distinct:,} distinct store texts (2% unknown, 2% empty); median of the timed batches.",
             "",
             "| store texts | resolver | ms per batch | vs its cost at " + f"{smallest:,}" +
             " | vs `before` | RSS after open, MiB (anon / file) | RSS after the batches, MiB (anon / file) | open s"
             " | index files MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        before = next((x["median_batch_s"] for x in cells if x["size"] == c["size"] and x["mode"] == "before"), None)
        ratio = c["median_batch_s"] / base[c["mode"]] if c["mode"] in base else float("nan")
        vs = f"{c['median_batch_s'] / before:.4f}" if before else "-"
        o, e = c["rss_open_mib"], c["rss_end_mib"]
        lines.append(f"| {c['size']:,} | {c['mode']} | {c['median_batch_s'] * 1e3:.1f} | {ratio:.2f}x | {vs} | "
                     f"{o['VmRSS']:.0f} ({o['RssAnon']:.0f} / {o['RssFile']:.0f}) | "
                     f"{e['VmRSS']:.0f} ({e['RssAnon']:.0f} / {e['RssFile']:.0f}) | "
                     f"{c['open_s']:.2f} | {c['index_mib']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
