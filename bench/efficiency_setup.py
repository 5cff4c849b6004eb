"""What bench/efficiency_bench.py measures with: model presets, a random Llama writer with a word-level
tokenizer, the synthetic data per text length, the behaviour stores, FLOP formulas, matmul rate, memory.

Nothing here imports torchrec, so the torchrec-free fallback arms (efficiency_arms.py) run where only
torch and transformers exist (e.g. a GPU image without fbgemm-gpu).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from bahe.ctr_data.synthetic import SyntheticConfig, write_synthetic
from bahe.embeddings.build import build_store
from bahe.embeddings.encoder import EncoderConfig, ShallowEncoder
from bahe.embeddings.vocabulary import count_texts
from bench.memory import cpu_allocation_peak

MIB = 2**20
SEQUENCE_TYPES = ("bill", "search", "app_visit", "review", "watch", "visit", "pay", "like")
# Llama-architecture shapes. k: frozen shallow layers (the store's encoder, the token arm's lower part);
# deep: trainable layers k..k+deep-1 that both arms train. vocab: embedding rows (tokens used are far fewer).
PRESETS = {
    "tiny": {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 128, "vocab_size": 4096, "k": 2, "deep_layers": 2},
    "cpu-small": {"hidden_size": 384, "num_hidden_layers": 8, "num_attention_heads": 6, "num_key_value_heads": 2,
                  "intermediate_size": 1024, "vocab_size": 32000, "k": 4, "deep_layers": 4},
    # Qwen2-0.5B's shapes (hidden 896, 24 layers, 14 heads, 2 kv heads, intermediate 4864, vocab 151936)
    "gpu-0.5b": {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                 "intermediate_size": 4864, "vocab_size": 151936, "k": 12, "deep_layers": 12},
}


def model_config(spec: str) -> dict:
    """A preset name, or a JSON object overriding cpu-small's fields (k and deep_layers default to L/2)."""
    if spec in PRESETS:
        return dict(PRESETS[spec], preset=spec)
    given = json.loads(spec)
    unknown = set(given) - set(PRESETS["cpu-small"])
    if unknown:
        raise SystemExit(f"--model-config: unknown fields {sorted(unknown)}; known: {sorted(PRESETS['cpu-small'])}")
    out = {**PRESETS["cpu-small"], **given, "preset": "custom"}
    if "k" not in given:
        out["k"] = out["num_hidden_layers"] // 2
    if "deep_layers" not in given:
        out["deep_layers"] = out["num_hidden_layers"] - out["k"]
    if out["k"] < 1 or out["deep_layers"] < 1 or out["k"] + out["deep_layers"] > out["num_hidden_layers"]:
        raise SystemExit(f"--model-config: need k >= 1, deep_layers >= 1, k + deep_layers <= layers; got {out}")
    return out


def llama_params(mc: dict) -> dict:
    """Parameter counts of the Llama config (embeddings tied to the output head)."""
    h, i = mc["hidden_size"], mc["intermediate_size"]
    kv = h // mc["num_attention_heads"] * mc["num_key_value_heads"]
    layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return {"per_layer": layer, "layers": layer * mc["num_hidden_layers"], "embeddings": mc["vocab_size"] * h,
            "total": layer * mc["num_hidden_layers"] + mc["vocab_size"] * h + h}


# Data ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shape:
    """One measured configuration: N sequence types x M behaviours x K tokens per user."""

    n: int
    m: int
    k: int
    target: int  # the text length asked for (--lengths); n * m * k is what runs

    @property
    def tokens(self) -> int:
        return self.n * self.m * self.k

    @property
    def name(self) -> str:
        return f"L{self.tokens}_K{self.k}"


def shape_for(length: int, k: int, n: int) -> Shape:
    return Shape(n=n, m=max(1, round(length / (n * k))), k=k, target=length)


def write_data(shape: Shape, folder: Path, samples: int, distinct: int, items: int, seed: int) -> Path:
    """The synthetic samples of one shape: every sequence has exactly M behaviours of exactly K words.

    The world (distinct texts, items, users) depends on K but not on M, so the shapes of one K share it.
    """
    config = SyntheticConfig(num_users=max(100, samples // 4), num_items=items, num_samples=samples,
                             sequence_types=SEQUENCE_TYPES[:shape.n], behaviours_per_sequence=shape.m,
                             min_behaviours_per_sequence=shape.m, tokens_per_behaviour=shape.k,
                             distinct_behaviours=distinct, seed=seed)
    path = folder / f"{shape.name}.parquet"
    write_synthetic(config, path)
    return path


def data_stats(path: Path, samples: int) -> dict:
    """Distinct texts (behaviours + item titles) vs their occurrences in one shape's data."""
    counts = count_texts([path])
    occurrences = sum(counts.values())
    return {"samples": samples, "distinct_texts": len(counts), "occurrences": occurrences,
            "duplication": occurrences / max(1, len(counts)), "_counts": counts}


def words_of(counts: Counter) -> set[str]:
    return {word for text in counts for word in text.split()}


def write_model(path: Path, mc: dict, words: set[str], seed: int, save_dtype: torch.dtype) -> dict:
    """A random-weight Llama causal LM (safetensors) with a word-level tokenizer over ``words``.

    One whitespace-separated word = one token, so a behaviour of K words is exactly K tokens in both
    arms (the store's encoder and the token-level baseline). Vocabulary ids beyond the words exist
    (the preset's vocab size) but are never produced.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1}
    for word in sorted(words):
        vocab[word] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")
    vocab_size = max(mc["vocab_size"], len(vocab))
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=mc["hidden_size"], intermediate_size=mc["intermediate_size"],
                         num_hidden_layers=mc["num_hidden_layers"], num_attention_heads=mc["num_attention_heads"],
                         num_key_value_heads=mc["num_key_value_heads"], max_position_embeddings=8192,
                         tie_word_embeddings=True, pad_token_id=0)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).to(save_dtype).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return {"vocab_size": vocab_size, "tokenizer_words": len(vocab), "saved_dtype": str(save_dtype)}


# Offline encoding -----------------------------------------------------------------------------------

def encoder_config(model_dir: Path, mc: dict, k_tokens: int, device: torch.device, bf16: bool) -> EncoderConfig:
    max_tokens = max(64, k_tokens + 8)  # a rare duplicate text gets a "#j" suffix word
    return EncoderConfig(model=str(model_dir), k=mc["k"], dtype="bfloat16" if bf16 else "float32",
                         device=str(device), max_tokens=max_tokens,
                         batch_tokens=8192 if device.type == "cuda" else max(128, max_tokens))


def build_store_for(root: Path, files: list[Path], config: EncoderConfig, cache: dict) -> dict:
    """The real store build (bahe.embeddings.build.build_store) over the shapes' files of one K, plus the
    FLOPs of that encode: FlopCounterMode on one fixed-shape micro-batch per text length, times the
    micro-batches the encoder runs (its fixed shapes fill each length's last batch). ``cache`` keeps
    the counting encoder's layers between calls (only max_tokens / batch_tokens differ)."""
    from bahe.embeddings.store import BehaviourStore

    report = build_store(root, files, config, show_progress=False)
    if "encoder" not in cache:
        cache["encoder"] = ShallowEncoder(config)
    encoder = cache["encoder"]
    encoder.config = config  # tokenize() truncates to config.max_tokens; rows_per_batch() reads batch_tokens

    texts = BehaviourStore.open(root).vocabulary.texts[2:]  # the reserved PAD / UNKNOWN rows are not encoded
    lengths = Counter(len(ids) for ids in encoder.tokenize(texts)[0])
    flops = 0
    for length, n in lengths.items():
        rows = encoder.rows_per_batch(length)
        ids = torch.zeros(rows, length, dtype=torch.long, device=encoder.device)
        with FlopCounterMode(display=False, custom_mapping=ATTENTION_FORMULAS) as counter, torch.no_grad():
            encoder.model(input_ids=ids)
        flops += math.ceil(n / rows) * counter.get_total_flops()
    return {"texts_encoded": report.new_texts, "tokens_encoded": report.tokens_encoded,
            "padding_waste": report.padding_waste, "seconds": report.seconds, "flops": flops,
            "seconds_per_text": report.seconds / max(1, report.new_texts), "flops_per_text": flops / max(1, report.new_texts),
            "length_histogram": dict(sorted(lengths.items())), "encoder": dataclasses.asdict(config)}


# FLOPs ------------------------------------------------------------------------------------------------

def _attention_forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """Scores + weighted values, at the query's head count (grouped kv heads are broadcast), every
    (query, key) pair counted -- as torch's own SDPA formulas do, causal or not."""
    b, h, s_q, d = query
    s_k, d_v = key[-2], value[-1]
    return 2 * b * h * s_q * s_k * (d + d_v)


def _attention_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    """torch's SDPA backward count: scores recomputed, grad scores, grad v, grad q, grad k."""
    b, h, s_q, d = query
    s_k, d_v = key[-2], value[-1]
    return 2 * b * h * s_q * s_k * (3 * d + 2 * d_v)


def _attention_formulas() -> dict:
    """FlopCounterMode has no formula for the CPU SDPA kernel (its attention would count as 0), and older
    torch's CUDA formulas reject grouped kv heads; these cover both, at torch's own conventions."""
    out = {}
    for name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention"):
        for suffix, formula in (("", _attention_forward), ("_backward", _attention_backward)):
            op = getattr(torch.ops.aten, name + suffix, None)
            if op is not None:
                out[op] = formula
    return out


ATTENTION_FORMULAS = _attention_formulas()
ATTENTION_OPS = {str(op) for op in ATTENTION_FORMULAS}


def split_flops(counter: FlopCounterMode) -> dict:
    """Total FLOPs of a counted region and the attention (SDPA kernels) share."""
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    return {"total": counter.get_total_flops(), "attention": sum(n for op, n in by_op.items() if op in ATTENTION_OPS),
            "by_op": by_op}


# Machine -------------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, dtype: torch.dtype, size: int | None = None, repeats: int = 5) -> float:
    """GFLOP/s of one large square F.linear (fp32 on CPU by default, bf16 on CUDA), median of repeats."""
    n = size or (8192 if device.type == "cuda" else 2048)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for i in range(repeats + 2):
        sync(device)
        start = time.perf_counter()
        F.linear(a, b)
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def state_bytes(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Bytes held between steps: parameters, buffers and optimizer state (each storage once)."""
    seen: set[int] = set()

    def size(tensors) -> int:
        total = 0
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.numel() and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                total += t.untyped_storage().nbytes()
        return total

    params = size(module.parameters())
    buffers = size(module.buffers())
    opt = size(v for state in optimizer.state.values() for v in state.values())
    return {"params": params, "buffers": buffers, "optimizer": opt, "total": params + buffers + opt}


def step_peak_bytes(step, device: torch.device) -> int:
    """High-water mark of torch's allocations during one call of ``step`` above what was live before it.

    CUDA: max_memory_allocated - memory_allocated. CPU: torch.profiler(profile_memory=True), running
    sum of the allocator's alloc/free records (the records of what was live before the step are frees
    that can only lower the sum, so the high-water mark is the step's own)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    return cpu_allocation_peak(step)[0]


@contextlib.contextmanager
def deadline(seconds: int):
    """Raise TimeoutError in the main thread after ``seconds`` (0: no limit)."""
    import signal

    if seconds <= 0:
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"over the per-configuration limit of {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
