"""Behaviour lookup layouts, measured side by side in one run (docs/decisions.md).

Four ways from store ids to the B x N x M x H padded behaviour tensor (and the item's B x 1 x H) that
the deep-layer aggregator takes, all from one frozen table ``behaviours``:

* ec: the repo's bahe.model.behaviour_lookup.BehaviourLookup (EmbeddingCollection, keys seq_<n> +
  item_text, stride B, jagged_to_padded_dense per key), then torch.stack over N as text_arch does;
* ec1: the same EC with ONE key, rows (n, b) then the B item rows (stride N*B + B), padded by one
  jagged_to_padded_dense straight into N x B x M x H (no stack; text_arch would flatten N x B);
* ebc: bags of one: an EmbeddingBagCollection (sum) on a KJT of stride B*M, keys as ec (the item
  in a sample's first bag, M-1 empty); (B*M) x (N+1)H -> permute + copy to B x N x M x H;
* ebc1: bags of one with ONE key, bags (n, b, m) then B item bags: the output rows ARE N x B x M x H.

Each runs as plain torchrec modules (plain) and under DistributedModelParallel, one gloo rank,
table-wise (dmp: fbgemm's fused CPU kernels, as in training), frozen as the repo freezes it
(in-backward SGD, lr=0; plain backward still builds the table's dense gradient). Timed: forward
under torch.no_grad, forward with grad, forward + backward of a fixed random output gradient, and
the KJT construction from the per-key flat ids + per-sample lengths the batcher holds. Median of 3
to --repeats repeats after a warm-up, every cell of a size interleaved in a rotating order.
Peak memory: torch.profiler(profile_memory=True), high-water mark of the running sum of the CPU
allocator's alloc/free records during one step (torch allocations only, from the step's start).
Correctness: every layout and mode equals direct indexing of the weights, bit for bit.

Since 2026-11-30 the repo's BehaviourLookup (ec) looks up under torch.no_grad (no backward can move the
frozen table), so its "fwd_bwd" cells time the forward only: what training pays for it. The other
layouts still run their backward into the table. docs/bench/lookup.json predates that change.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from bahe.model.behaviour_lookup import BEHAVIOUR_TABLE, BehaviourLookup
from bahe.model.sharding import shard_model
from bench.machine import machine, versions
from bench.memory import cpu_allocation_peak

B = 256
LAYOUTS = ("ec", "ec1", "ebc", "ebc1")
OTHERS = LAYOUTS[1:]
MODES = ("plain", "dmp")
MEASURES = ("no_grad", "fwd", "fwd_bwd")
# (rows, H, N, M): both H and small / large N x M at 10k rows (and the mixed N x M at H=576); at 200k rows
# (where plain backward builds a 460 MB dense table gradient per key) H=64 both, H=576 the largest
FULL = [(10_000, h, n, m) for h in (64, 576) for n, m in ((2, 20), (3, 50))]
FULL += [(10_000, 576, 2, 50), (10_000, 576, 3, 20), (200_000, 64, 2, 20), (200_000, 64, 3, 50), (200_000, 576, 3, 50)]
QUICK = [(10_000, 64, 2, 20), (10_000, 576, 2, 20)]
CELL_BUDGET_S = 0.35  # seconds of repeats per cell: fast cells get up to --repeats, slow ones (>= 3) fewer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.lookup_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"sizes {QUICK} only, JSON only with --json")
    p.add_argument("--repeats", type=int, default=None, help="most timed repeats per cell (default 15, --quick 7); "
                   f"a cell slower than {CELL_BUDGET_S}/repeats s gets fewer, never under 3")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared machine a descheduled OpenMP thread stalls 2-thread ops)")
    p.add_argument("--no-dmp", action="store_true", help="plain torchrec modules only")
    p.add_argument("--json", type=Path, default=None, help="where to write results (default docs/bench/lookup.json)")
    return p.parse_args(argv)


def sample_ids(rows: int, n: int, m: int, rng: np.random.Generator) -> dict:
    """The batcher's form: per sequence key flat ids + per-sample lengths (uniform in [0, M]); the item."""
    lengths = [rng.integers(0, m + 1, B) for _ in range(n)]
    has_item = (rng.random(B) < 0.95).astype(np.int64)
    return {"lengths": lengths, "values": [rng.integers(0, rows, int(x.sum())) for x in lengths],
            "item_lengths": has_item, "item_values": rng.integers(0, rows, int(has_item.sum()))}


def kjt_rows(s: dict, keys: list[str]) -> KeyedJaggedTensor:
    """ec (keys seq_<n> + item_text, stride B) and ec1 (one key, stride N*B + B): the same values and lengths."""
    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys, values=torch.from_numpy(np.concatenate([*s["values"], s["item_values"]])),
        lengths=torch.from_numpy(np.concatenate([*s["lengths"], s["item_lengths"]])))


def kjt_bags(s: dict, keys: list[str], m: int) -> KeyedJaggedTensor:
    """ebc (keys seq_<n> + item_text, stride B*M) or ebc1 (one key: N*B*M sequence bags, then B item bags)."""
    bags = [(np.arange(m) < x[:, None]).astype(np.int64).ravel() for x in s["lengths"]]
    item = s["item_lengths"]
    if len(keys) > 1:  # the item in each sample's first bag
        item = np.zeros((B, m), dtype=np.int64)
        item[:, 0] = s["item_lengths"]
    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys, values=torch.from_numpy(np.concatenate([*s["values"], s["item_values"]])),
        lengths=torch.from_numpy(np.concatenate([*bags, item.ravel()])))


class Bags(nn.Module):
    """The bags-of-one table: an EmbeddingBagCollection (sum), frozen like BehaviourLookup."""

    def __init__(self, rows: int, dim: int, keys: list[str], device: torch.device | None = None):
        super().__init__()
        self.ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
            name=BEHAVIOUR_TABLE, embedding_dim=dim, num_embeddings=rows, feature_names=keys)], device=device)
        _apply_optimizer_in_backward(torch.optim.SGD, self.ebc.parameters(), {"lr": 0.0})

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return self.ebc(kjt).values()


def arms(modules: dict, n: int, m: int, h: int) -> dict:
    """layout -> (KJT -> (B x N x M x H or its N x B x M x H view, B x 1 x H))."""
    def ec(kjt):
        out = modules["ec"](kjt)
        return torch.stack([out[f"seq_{i}"][0] for i in range(n)], dim=1), out["item_text"][0]

    def ec1(kjt):
        jt = getattr(modules["ec1"], "module", modules["ec1"]).embedding_collection(kjt)[BEHAVIOUR_TABLE]
        offsets = jt.offsets()  # the item rows' offsets start where the sequences end: no slicing, no sync
        seq = torch.ops.fbgemm.jagged_to_padded_dense(jt.values(), [offsets[:n * B + 1]], [m], 0.0)
        return seq.view(n, B, m, h), torch.ops.fbgemm.jagged_to_padded_dense(jt.values(), [offsets[n * B:]], [1], 0.0)

    def ebc(kjt):
        v = modules["ebc"](kjt).view(B, m, n + 1, h)
        return v[:, :, :n].permute(0, 2, 1, 3).contiguous(), v[:, 0, n:]

    def ebc1(kjt):
        v = modules["ebc1"](kjt)
        return v[:n * B * m].view(n, B, m, h), v[n * B * m:].unsqueeze(1)
    return {"ec": ec, "ec1": ec1, "ebc": ebc, "ebc1": ebc1}


def load_weights(module: nn.Module, weights: torch.Tensor) -> None:
    (t,) = [t for name, t in module.state_dict().items() if name.endswith(f"{BEHAVIOUR_TABLE}.weight")]
    with torch.no_grad():  # one rank, table-wise: one shard, the whole table
        (t.local_shards()[0].tensor if hasattr(t, "local_shards") else t).copy_(weights)


def build(mode: str, rows: int, h: int, n: int, m: int, weights: torch.Tensor) -> dict:
    seq = [f"seq_{i}" for i in range(n)]
    device = torch.device("meta" if mode == "dmp" else "cpu")
    modules = {"ec": BehaviourLookup(rows, h, [*seq, "item_text"], {**dict.fromkeys(seq, m), "item_text": 1}, device),
               "ec1": BehaviourLookup(rows, h, [BEHAVIOUR_TABLE], {BEHAVIOUR_TABLE: m}, device),
               "ebc": Bags(rows, h, [*seq, "item_text"], device), "ebc1": Bags(rows, h, [BEHAVIOUR_TABLE], device)}
    if mode == "dmp":
        with contextlib.redirect_stdout(sys.stderr):  # the plan's log line: stdout holds the bench's table alone
            modules = {k: shard_model(v, torch.device("cpu"), behaviour_sharding="table_wise", batch_size=B)
                       for k, v in modules.items()}
    for module in modules.values():
        load_weights(module, weights)
    return modules


def step(fn, kjt, measure: str, grads):
    if measure == "no_grad":
        with torch.no_grad():
            return fn(kjt)
    out = fn(kjt)
    if measure == "fwd_bwd":
        # BehaviourLookup (ec) looks up under torch.no_grad (the frozen table never sees a backward), so
        # its outputs need no gradient: backward only what requires one (nothing, for ec)
        pairs = [(o, g) for o, g in zip(out, grads) if o.requires_grad]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    return out


def peak_mib(thunk) -> float:
    return cpu_allocation_peak(thunk)[0] / 2**20


def bench_size(rows: int, h: int, n: int, m: int, modes: tuple[str, ...], repeats: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    s = sample_ids(rows, n, m, rng)
    keys = [*(f"seq_{i}" for i in range(n)), "item_text"]
    weights = torch.randn(rows, h, generator=torch.Generator().manual_seed(seed))
    one = [BEHAVIOUR_TABLE]
    builders = {"ec": lambda: kjt_rows(s, keys), "ec1": lambda: kjt_rows(s, one),
                "ebc": lambda: kjt_bags(s, keys, m), "ebc1": lambda: kjt_bags(s, one, m)}
    kjts = {k: f() for k, f in builders.items()}
    fns = {mode: arms(build(mode, rows, h, n, m, weights), n, m, h) for mode in modes}
    g_seq, g_item = torch.randn(B, n, m, h), torch.randn(B, 1, h)
    g_nb = g_seq.transpose(0, 1).contiguous()
    grads = {"ec": (g_seq, g_item), "ec1": (g_nb, g_item), "ebc": (g_seq, g_item), "ebc1": (g_nb, g_item)}
    # correctness: every layout and mode == direct indexing of the weights, bit for bit
    ref = torch.zeros(B, n, m, h)
    for i, (ids, lengths) in enumerate(zip(s["values"], s["lengths"])):
        ref[:, i][torch.from_numpy(np.arange(m) < lengths[:, None])] = weights[torch.from_numpy(ids)]
    ref_item = torch.zeros(B, 1, h)
    ref_item[torch.from_numpy(s["item_lengths"] == 1), 0] = weights[torch.from_numpy(s["item_values"])]
    exact = {}
    for mode, fn_by_layout in fns.items():
        for layout, fn in fn_by_layout.items():
            with torch.no_grad():
                seq, item = fn(kjts[layout])
            seq = seq if seq.shape[0] == B else seq.transpose(0, 1)
            exact[f"{mode}/{layout}"] = bool(torch.equal(seq, ref) and torch.equal(item, ref_item))
    cells = [("kjt", None, layout) for layout in LAYOUTS]
    cells += [(measure, mode, layout) for mode in modes for measure in MEASURES for layout in LAYOUTS]
    times: dict = {c: [] for c in cells}
    wanted = dict.fromkeys(cells, repeats)
    for rep in range(repeats + 1):  # rep 0 is the warm-up
        shift = rep % len(cells)
        for cell in cells[shift:] + cells[:shift]:
            measure, mode, layout = cell
            if rep > wanted[cell]:
                continue
            t0 = time.perf_counter()
            out = builders[layout]() if measure == "kjt" else step(fns[mode][layout], kjts[layout], measure, grads[layout])
            elapsed = time.perf_counter() - t0
            del out
            if rep:
                times[cell].append(elapsed)
            else:
                wanted[cell] = max(3, min(repeats, int(CELL_BUDGET_S / elapsed)))
    memory = {f"{mode}/{measure}/{layout}": peak_mib(lambda f=fns[mode][layout], k=kjts[layout], ms=measure, g=grads[layout]:
                                                     step(f, k, ms, g))
              for mode in modes for measure in ("no_grad", "fwd_bwd") for layout in LAYOUTS}
    return {"rows": rows, "H": h, "N": n, "M": m, "B": B, "filled_positions": int(sum(x.sum() for x in s["lengths"])),
            "exact": exact, "peak_mib": memory,
            "ms": {"/".join(x for x in c if x): 1e3 * statistics.median(v) for c, v in times.items()},
            "repeats": {"/".join(x for x in c if x): len(v) for c, v in times.items()}}


def structure() -> dict:
    """Facts read from the installed torchrec, checked here."""
    facts = {f"{name} sharding types on {dev}": sharder.sharding_types(dev)
             for name, sharder in (("EmbeddingCollectionSharder", EmbeddingCollectionSharder()),
                                   ("EmbeddingBagCollectionSharder", EmbeddingBagCollectionSharder()))
             for dev in ("cpu", "cuda")}
    lengths = torch.cat([torch.ones(4, dtype=torch.long), torch.ones(12, dtype=torch.long)])  # B=4 ids, B*M=12 bags
    mixed = KeyedJaggedTensor.from_lengths_sync(keys=["item_id", "seq"], values=torch.arange(16), lengths=lengths)
    facts["one KJT, keys of stride B=4 and B*M=12 (lengths 4 + 12)"] = (
        f"accepted silently with stride {mixed.stride()}, split as "
        f"{ {k: jt.lengths().numel() for k, jt in mixed.to_dict().items()} }: wrong")
    try:
        KeyedJaggedTensor(keys=["item_id", "seq"], values=torch.arange(16), lengths=lengths, stride=4).to_dict()
    except RuntimeError as e:
        facts["the same with stride=4"] = f"RuntimeError: {e}"
    vbe = KeyedJaggedTensor(keys=["a", "b"], values=torch.arange(16), lengths=lengths, stride_per_key_per_rank=[[4], [12]])
    ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=20,
                                                            feature_names=["a", "b"])])
    try:
        ebc(vbe)
    except RuntimeError as e:
        facts["variable-stride KJT (VBE) into a plain EBC"] = f"RuntimeError: {str(e)[:120]}"
    return facts


def _ratios(values: dict, prefix: str) -> str:
    base = values[f"{prefix}/ec"]
    return f"{base:9.2f} " + " ".join(f"{values[f'{prefix}/{lay}'] / base:5.2f}" for lay in OTHERS)


def report(results: list[dict], modes: tuple[str, ...], repeats: int) -> list[str]:
    size = f"{'rows':>7} {'H':>3} {'N':>1} {'M':>2}"
    head = f"{'ec':>9} " + " ".join(f"{lay:>5}" for lay in OTHERS)
    lines = [f"## forward / backward: B={B}, lengths uniform in [0, M]; ec in ms (median of 3..{repeats} "
             f"interleaved repeats), then layout/ec; threads={torch.get_num_threads()}",
             f"{size} {'mode':5} | " + " | ".join(f"{m:<26}" for m in MEASURES) + " | exact",
             f"{'':>16} {'':5} | " + " | ".join(head for _ in MEASURES) + " |"]
    ratio: dict = {}
    for r in results:
        for mode in modes:
            cells = [_ratios(r["ms"], f"{measure}/{mode}") for measure in MEASURES]
            for measure in MEASURES:
                for lay in OTHERS:
                    x = r["ms"][f"{measure}/{mode}/{lay}"] / r["ms"][f"{measure}/{mode}/ec"]
                    ratio.setdefault(f"{mode:5} {measure:7}", {}).setdefault(lay, []).append(x)
                ratio[f"{mode:5} {measure:7}"].setdefault("ebc1/ec1", []).append(
                    r["ms"][f"{measure}/{mode}/ebc1"] / r["ms"][f"{measure}/{mode}/ec1"])
            exact = all(v for k, v in r["exact"].items() if k.startswith(mode))
            lines.append(f"{r['rows']:>7} {r['H']:>3} {r['N']:>1} {r['M']:>2} {mode:5} | " + " | ".join(cells)
                         + f" | {exact}")
    lines += ["", "geometric mean over the sizes:               " + " ".join(f"{lay:>5}" for lay in OTHERS) + " ebc1/ec1"]
    for key, by_layout in ratio.items():
        lines.append(f"  {key:42}" + " ".join(f"{float(np.exp(np.mean(np.log(xs)))):5.2f}" for xs in by_layout.values()))
    lines += ["", "## KJT construction from the per-key flat ids + lengths (ms), and peak memory of one step "
              "(MiB, torch.profiler profile_memory); ec absolute, then layout/ec",
              f"{size} | {'kjt':<26}" + "".join(f" | {mode + ' ' + ms:<26}" for mode in modes
                                                 for ms in ("no_grad", "fwd_bwd")),
              f"{'':>16} | {head}" + f" | {head}" * 2 * len(modes)]
    for r in results:
        row = f"{r['rows']:>7} {r['H']:>3} {r['N']:>1} {r['M']:>2} | {_ratios(r['ms'], 'kjt')}"
        row += "".join(f" | {_ratios(r['peak_mib'], f'{mode}/{ms}')}" for mode in modes for ms in ("no_grad", "fwd_bwd"))
        lines.append(row)
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    repeats = args.repeats or (7 if args.quick else 15)
    torch.set_num_threads(args.threads)
    modes = ("plain",) if args.no_dmp else MODES
    if "dmp" in modes and not dist.is_initialized():
        dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    start, load = time.time(), os.getloadavg()[0]
    results = []
    for seed, size in enumerate(QUICK if args.quick else FULL):
        t0 = time.time()
        results.append({**bench_size(*size, modes, repeats, seed), "seconds": round(time.time() - t0, 1)})
    lines = report(results, modes, repeats)
    facts = structure()
    lines += ["", "## structure (installed torchrec)"] + [f"  {k}: {v}" for k, v in facts.items()]
    lines.append(f"\n{len(results)} sizes in {time.time() - start:.0f} s; load average {load:.1f} at start, "
                 f"{os.getloadavg()[0]:.1f} at end, {os.cpu_count()} CPUs")
    print("\n".join(lines))
    target = args.json or (None if args.quick else Path(__file__).resolve().parents[1] / "docs" / "bench" / "lookup.json")
    if target:
        target.write_text(json.dumps({
            "command": " ".join(["python -m bench.lookup_bench", *(argv if argv is not None else sys.argv[1:])]),
            "machine": machine(), "versions": versions(), "repeats": repeats, "results": results,
            "structure": facts, "table": lines}, indent=1))
    all_exact = all(v for r in results for v in r["exact"].values())
    return 0 if all_exact else 1


if __name__ == "__main__":
    sys.exit(main())
