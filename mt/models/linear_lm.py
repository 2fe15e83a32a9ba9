"""The bag-of-words baseline language model: P(next | prefix) = softmax(V^T W (1/N) sum_t e_t).

W (the embedding) maps each one-hot token e_t to a vector; their mean over the N prefix tokens (BOS
included) is mapped to logits by V. Order-blind by construction. Same interface as the transformers
(mt.models.layers.SequenceModel); its decoding state is a running sum, not a key/value cache.
"""
from __future__ import annotations

import sys

import torch
import torch.nn as nn

from mt.config import ModelConfig
from mt.models.decoder_lm import split_prompt
from mt.models.layers import SequenceModel
from mt.tokenizer import PAD


class LinearCache:
    """Running sum of prefix embeddings and their count, per row (follows mt.models.cache.DecodingCache)."""

    def __init__(self, total, count, pending):
        self.total, self.count, self.pending, self.length = total, count, pending, 0

    def advance(self, n: int) -> None:
        self.length += n

    def expand(self, k: int) -> None:
        self.total, self.count = self.total.repeat_interleave(k, 0), self.count.repeat_interleave(k, 0)
        if self.pending is not None:
            self.pending = self.pending.repeat_interleave(k, 0)

    def reorder(self, new_order) -> None:
        self.total, self.count = self.total[new_order], self.count[new_order]
        if self.pending is not None:
            self.pending = self.pending[new_order]


class LinearLM(SequenceModel):
    reads_prompts = True

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__(cfg, vocab_size)
        self.embed = nn.Embedding(vocab_size, cfg.d_model, padding_idx=PAD)   # W
        self.output = nn.Linear(cfg.d_model, vocab_size, bias=False)       # V^T
        self.init_weights(xavier=False)

    def max_output_tokens(self, source_lengths):
        return self.cfg.max_positions - 2 - (source_lengths + 1)

    def max_target_tokens(self, source_length: int) -> int:
        return sys.maxsize  # a running mean of embeddings has no position table: any length is exact

    def forward(self, src, tgt_in, tgt_out=None):
        e = self.embed(tgt_in)                                             # (B, T, D)
        count = torch.arange(1, tgt_in.shape[1] + 1, device=tgt_in.device)
        hidden = e.cumsum(1) / count[None, :, None]                         # prefix means (B, T, D)
        if tgt_out is not None:
            hidden = hidden[tgt_out != PAD]
        return self.output(hidden)

    def new_cache(self, src, max_len: int) -> LinearCache:
        prefix, pending = split_prompt(src)
        return LinearCache(self.embed(prefix).sum(1), (prefix != PAD).sum(1), pending)

    def step(self, tokens, cache: LinearCache):
        if cache.pending is not None:
            tokens, cache.pending = cache.pending[:, None], None
        cache.total = cache.total + self.embed(tokens[:, 0])
        cache.count = cache.count + 1
        cache.advance(1)
        return self.log_probs(cache.total / cache.count[:, None])
