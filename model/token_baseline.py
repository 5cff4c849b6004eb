"""The token-level LLM-CTR baseline (the arm BAHE is measured against, bahe.md "The problem").

Every behaviour text of a user, of every sequence type, is tokenised and concatenated into ONE
token sequence ("bill: Purchase at ...; Search: ...") and run through layers 0..k+deep-1 of the
same LLM: the shallow k layers frozen (forward only, as BAHE's offline store is), the deep layers
trainable and pooled exactly as BAHE's aggregator. The item text goes through the same layers.
The N*M*K tokens per user are truncated to ``max_user_tokens``, keeping the most recent.

It emits 2 text features (user, item) of dim D for the same DLRM head, so the two arms differ only
in how text reaches the head.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from bahe.ctr_data.schema import ITEM_TEXT, SEQ_PREFIX
from bahe.model.batch import BaheBatch, SampleBatcher
from bahe.model.deep_layers import DeepLayerAggregator, llm_autocast, load_decoder_slice

USER_TOKENS, ITEM_TOKENS = "user_tokens", "item_tokens"


class TokenLevelTextArch(nn.Module):
    """Args:
        model_dir: the local Hugging Face decoder.
        k: frozen shallow layers; deep_layers: trainable layers after them (None: all the rest).
        embedding_dim: D of the head.
        max_user_tokens / max_item_tokens: T, the token caps (user texts are padded to the batch's longest).
        precision: compute precision of every LLM layer, shallow and deep (model/deep_layers.llm_autocast).
    """

    def __init__(self, model_dir: Path, k: int, deep_layers: int | None, embedding_dim: int, *,
                 max_user_tokens: int = 2048, max_item_tokens: int = 32, pooling: str = "mean",
                 attention: str = "causal", gradient_checkpointing: bool = False, precision: str = "auto"):
        super().__init__()
        self.shallow = load_decoder_slice(Path(model_dir), 0, k, keep_embeddings=True)
        self.shallow.norm = nn.Identity()  # the final norm belongs after the last layer, in `deep`
        self.shallow.requires_grad_(False)
        self.deep = DeepLayerAggregator(model_dir, k, deep_layers, pooling=pooling, attention=attention,
                                        gradient_checkpointing=gradient_checkpointing, precision=precision)
        self.max_tokens = {USER_TOKENS: max_user_tokens, ITEM_TOKENS: max_item_tokens}
        hidden = self.deep.hidden_size
        self.user_norm, self.item_norm = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.user_projection = nn.Linear(hidden, embedding_dim)
        self.item_projection = nn.Linear(hidden, embedding_dim)

    @property
    def num_text_features(self) -> int:
        return 2

    def _encode(self, features: KeyedJaggedTensor, key: str) -> torch.Tensor:
        jt = features[key]
        lengths = jt.lengths()
        width = self.max_tokens[key]
        if key == USER_TOKENS and lengths.numel():
            # users: pad to this batch's longest text, not to the cap (up to 2048): the padding would go
            # through every LLM layer and changes nothing (right padding, masked). The arm is a leaf of
            # the pipeline's fx trace, so the host-side max is allowed. Items keep their small cap.
            width = max(1, min(width, int(lengths.max())))
        ids = torch.ops.fbgemm.jagged_to_padded_dense(jt.values().unsqueeze(-1).float(), [jt.offsets()], [width], 0.0)
        ids = ids.squeeze(-1).long()  # B x T, right-padded
        mask = (torch.arange(width, device=ids.device).unsqueeze(0) < lengths.unsqueeze(1)) | \
            (torch.arange(width, device=ids.device).unsqueeze(0) == 0)
        with torch.no_grad(), llm_autocast(self.deep.precision, ids.device):  # frozen shallow layers: forward only
            shallow = self.shallow(input_ids=ids, attention_mask=mask.long(), use_cache=False).last_hidden_state
        shallow = shallow.float()  # the deep layers choose their own precision
        return self.deep(shallow, lengths)  # B x H

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """KJT with ``user_tokens`` and ``item_tokens`` -> B x 2 x D (user, item)."""
        user = self.user_projection(self.user_norm(self._encode(features, USER_TOKENS)))
        item = self.item_projection(self.item_norm(self._encode(features, ITEM_TOKENS)))
        return torch.stack([user, item], dim=1)


class TokenBatcher(SampleBatcher):
    """SampleBatcher whose ``behaviour_features`` are token ids: ``user_tokens`` (all sequence types,
    concatenated, most recent ``max_user_tokens`` kept) and ``item_tokens``.

    Each distinct text is tokenised once and cached; a row's token sequence is assembled from the cache.
    """

    def __init__(self, *args, tokenizer, max_user_tokens: int = 2048, max_item_tokens: int = 32, **kwargs):
        super().__init__(*args, **kwargs)
        self.tokenizer = tokenizer
        self.max_user_tokens, self.max_item_tokens = max_user_tokens, max_item_tokens
        self._cache: dict[str, list[int]] = {}
        self._separator = self._tokens("; ")

    def _tokens(self, text: str) -> list[int]:
        cached = self._cache.get(text)
        if cached is None:
            cached = self._cache[text] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return cached

    def _token_features(self, table: pa.Table) -> KeyedJaggedTensor:
        per_type = [(self._tokens(f"{name}: "), table.column(SEQ_PREFIX + name).to_pylist())
                    for name in self.sequence_names]
        user_values, user_lengths = [], []
        for row in range(table.num_rows):
            tokens: list[int] = []
            for prefix, column in per_type:
                texts = column[row][-self.max_behaviours:]
                if not texts:
                    continue
                tokens += prefix
                for i, text in enumerate(texts):
                    tokens += self._tokens(text) + (self._separator if i < len(texts) - 1 else [])
                tokens += self._separator
            tokens = tokens[-self.max_user_tokens:]  # most recent tokens
            user_values.append(tokens)
            user_lengths.append(len(tokens))
        items = [self._tokens(t)[: self.max_item_tokens] for t in table.column(ITEM_TEXT).to_pylist()]
        values = [t for row in user_values for t in row] + [t for row in items for t in row]
        lengths = user_lengths + [len(t) for t in items]
        return KeyedJaggedTensor.from_lengths_sync(
            keys=[USER_TOKENS, ITEM_TOKENS], values=torch.tensor(values, dtype=torch.long),
            lengths=torch.tensor(lengths, dtype=torch.long))

    def __call__(self, table: pa.Table) -> BaheBatch:
        batch = super().__call__(table)
        batch.behaviour_features = self._token_features(table)
        return batch
