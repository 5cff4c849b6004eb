"""Behaviour aggregation: the LLM's deeper layers k..k+deep-1 over behaviour vectors (bahe.md, step 2).

:class:`DeepLayerAggregator` holds only those layers of a local Hugging Face decoder (Llama, Qwen2,
Mistral, Gemma 3, ... -- anything with rotary positions) plus its final norm; the token embeddings and
the layers below k are never built. It runs the model's OWN forward (its decoder layers, rotary
embeddings and mask construction) on ``inputs_embeds``: one vector per behaviour, rotary position =
behaviour index in time order, padding masked, causal by default or bidirectional, then pools the
real positions (mean, or the last behaviour's state).

Behaviour vectors are the model's own ``hidden_states[k]``, already past any embedding scaling: Gemma
multiplies token embeddings by sqrt(H) inside ``embed_tokens``, which is never run here, and its
forward passes ``inputs_embeds`` on unscaled, so the vectors are not scaled a second time
(tests/test_gemma.py holds both).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from bahe.embeddings.pretrained import ModelError, quiet_transformers, weight_files

POOLINGS = ("mean", "last")
ATTENTIONS = ("causal", "bidirectional")
PRECISIONS = ("auto", "bf16", "fp32")
_LAYER_KEY = re.compile(r"^(?:model\.)?layers\.(\d+)\.(.+)$")
_NORM_KEY = re.compile(r"^(?:model\.)?norm\.(.+)$")


def llm_autocast(precision: str, device: torch.device):
    """The compute precision of the LLM layers (weights stay fp32, the master copy the optimiser
    updates): ``bf16`` = ``torch.autocast(bfloat16)`` on any device (CUDA; CPUs with AMX / AVX512-BF16
    run the token-level arm about 2x faster), ``fp32`` = off, ``auto`` = bf16 on CUDA, fp32 elsewhere."""
    if precision not in PRECISIONS:
        raise ValueError(f"LLM precision must be one of {PRECISIONS}, got {precision!r}")
    enabled = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def load_decoder_slice(model_dir: Path, start: int, count: int, *, keep_embeddings: bool = False,
                       device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """The base decoder of ``model_dir`` with only layers [start, start + count) and its final norm.

    Modules are created on the meta device and only the slice's weights are read from the
    safetensors files, so the rest of the model never occupies memory.

    Returns:
        a ``transformers`` base model (e.g. LlamaModel) whose ``layers[i]`` is original layer start+i;
        ``embed_tokens`` is None unless ``keep_embeddings``.
    """
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    total = config.num_hidden_layers
    if start < 0 or count < 1 or start + count > total:
        raise ModelError(f"layers [{start}, {start + count}) asked of {model_dir.name}, which has {total} layers; "
                         f"need k + deep_layers <= {total}")
    config.num_hidden_layers = count
    config.use_cache = False
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types)[start:start + count]
    with quiet_transformers(), torch.device("meta"):
        model = AutoModel.from_config(config, dtype=dtype)
    if not hasattr(model, "rotary_emb") or not hasattr(model, "layers"):
        raise ModelError(f"{model_dir.name} ({type(model).__name__}) is not a decoder with rotary positions; "
                         "the deep-layer aggregator needs one (Llama, Qwen2, Mistral, SmolLM, ...)")
    if not keep_embeddings:
        model.embed_tokens = None
    model.to_empty(device=device)
    _restore_computed_buffers(model, config, device, model_dir)
    state = {}
    for path in weight_files(model_dir):
        with safe_open(path, framework="pt", device=str(device)) as handle:
            for key in handle.keys():  # noqa: SIM118 -- safe_open has no __iter__
                layer = _LAYER_KEY.match(key)
                if layer and start <= int(layer.group(1)) < start + count:
                    state[f"layers.{int(layer.group(1)) - start}.{layer.group(2)}"] = handle.get_tensor(key)
                elif _NORM_KEY.match(key):
                    state["norm." + _NORM_KEY.match(key).group(1)] = handle.get_tensor(key)
                elif keep_embeddings and key.endswith("embed_tokens.weight"):
                    state["embed_tokens.weight"] = handle.get_tensor(key)
    expected = set(model.state_dict())  # parameters and stored buffers; computed buffers are restored above
    missing = sorted(expected - set(state))
    if missing:
        raise ModelError(f"{model_dir} lacks weights for {missing[:4]}{'...' if len(missing) > 4 else ''}")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    return model


def _restore_computed_buffers(model: nn.Module, config, device: str | torch.device, model_dir: Path) -> None:
    """Buffers a model computes at construction and never stores (``to_empty`` leaves them as garbage):
    the rotary frequencies (rebuilt from the config; Gemma 3 keeps one set per layer type) and a scaled
    embedding's factor (Gemma: sqrt(H), applied by ``embed_tokens`` to token ids only, never to
    ``inputs_embeds``). Any other such buffer is refused rather than left uninitialised."""
    with torch.device(device):
        model.rotary_emb = type(model.rotary_emb)(config=config)
    for name, module in model.named_modules():
        if name == "rotary_emb" or name.startswith("rotary_emb."):
            continue
        for buffer in module._non_persistent_buffers_set:
            if buffer == "embed_scale" and hasattr(module, "scalar_embed_scale"):
                module.embed_scale.fill_(module.scalar_embed_scale)
            else:
                raise ModelError(f"{model_dir.name} ({type(model).__name__}): {name}.{buffer} is computed at "
                                 "construction and this loader cannot restore it; the architecture is not supported")


class DeepLayerAggregator(nn.Module):
    """Layers k..k+deep-1 of the LLM over sequences of behaviour vectors, pooled.

    Args:
        model_dir: the same local Hugging Face directory the behaviour store was encoded with.
        k: the store's shallow layers; this module starts at layer k.
        deep_layers: how many layers to run (None: all the rest, L - k).
        pooling: ``mean`` over the real behaviours, or the ``last`` one's state.
        attention: ``causal`` (how the LLM was trained) or ``bidirectional``.
        gradient_checkpointing: recompute layer activations in backward to save memory.
        precision: compute precision of the layers, see :func:`llm_autocast`.

    Example::

        agg = DeepLayerAggregator(model_dir, k=6, deep_layers=2)
        pooled = agg(vectors, lengths)   # (B*N) x M x H, (B*N,) -> (B*N) x H
    """

    def __init__(self, model_dir: Path, k: int, deep_layers: int | None = None, *, pooling: str = "mean",
                 attention: str = "causal", gradient_checkpointing: bool = False, precision: str = "auto"):
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        from transformers import AutoConfig

        total = AutoConfig.from_pretrained(model_dir, trust_remote_code=False).num_hidden_layers
        deep = total - k if deep_layers is None else deep_layers
        self.decoder = load_decoder_slice(Path(model_dir), k, deep)
        self.hidden_size = int(self.decoder.config.hidden_size)
        self.pooling, self.attention, self.k, self.deep_layers = pooling, attention, k, deep
        self.precision = precision
        if attention == "bidirectional":
            for layer in self.decoder.layers:
                layer.self_attn.is_causal = False
        if gradient_checkpointing:
            # transformers 5.x names it activation checkpointing (the old name warns, and goes in v6)
            enable = getattr(self.decoder, "activation_checkpointing_enable", None)
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.decoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def forward(self, vectors: torch.Tensor, lengths: torch.Tensor, pooled: bool = True) -> torch.Tensor:
        """
        Args:
            vectors: S x M x H behaviour vectors, right-padded (S = sequences, e.g. B*N).
            lengths: S real behaviours per sequence (0 = empty sequence).
            pooled: False returns the per-position states instead of pooling them (what target attention
                reads, model/text_levers.py; asked through the module call, so TorchRec's pipeline tracer
                keeps this module a leaf).

        Returns:
            S x H pooled states (:meth:`pool`; an empty sequence pools to zeros), or with ``pooled=False``
            the S x M x H states of :meth:`states`.
        """
        hidden = self.states(vectors, lengths)
        return self.pool(hidden, lengths) if pooled else hidden

    def states(self, vectors: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The deep layers' last states per position.

        Args:
            vectors: S x M x H behaviour vectors, right-padded.
            lengths: S real behaviours per sequence (0 = empty sequence).

        Returns:
            S x M x H float32 states. Only the real positions (m < length) mean anything: padding is masked
            from every real position, so a padded position's vector never changes a real position's state.
        """
        seqs, width, _ = vectors.shape
        positions = torch.arange(width, device=vectors.device)
        real = positions.unsqueeze(0) < lengths.unsqueeze(1)  # S x M
        # an empty sequence still attends to its first (padding) slot, so no row is fully masked
        visible = real | (positions.unsqueeze(0) == 0)
        if self.attention == "causal":
            mask = visible.long()
        else:
            mask = visible[:, None, None, :].expand(seqs, 1, width, width)  # S x 1 x M x M, True = attend
        with llm_autocast(self.precision, vectors.device):
            hidden = self.decoder(inputs_embeds=vectors, attention_mask=mask,
                                  position_ids=positions.unsqueeze(0).expand(seqs, width),
                                  use_cache=False).last_hidden_state  # S x M x H
        return hidden.float()

    def pool(self, hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """S x M x H states, S lengths -> S x H: the mean over the real positions or the last real one's
        state (``pooling``); an empty sequence pools to zeros."""
        seqs, width, _ = hidden.shape
        real = torch.arange(width, device=hidden.device).unsqueeze(0) < lengths.unsqueeze(1)  # S x M
        weights = real.to(hidden.dtype)
        if self.pooling == "mean":
            return (hidden * weights.unsqueeze(-1)).sum(1) / weights.sum(1, keepdim=True).clamp(min=1.0)
        last = (lengths - 1).clamp(min=0)
        pooled = hidden[torch.arange(seqs, device=hidden.device), last]
        return pooled * (lengths > 0).to(pooled.dtype).unsqueeze(-1)
