"""Pre-norm transformer encoder-decoder P(y | x), with an explicit key/value cache for incremental decoding.

Training calls `forward(src, tgt_in, tgt_out)`. Decoding calls `new_cache` once per batch (encode,
preallocate the decoder's self-attention keys/values, project the encoder output for cross-attention
once), then `step` per generated token; the cache (mt.models.cache) branches and reorders rows for
the search. Shapes: B batch, S source length, T target length, D width, V vocabulary.
"""
from __future__ import annotations

import math

import torch.nn as nn

from mt.config import ModelConfig
from mt.models.cache import KVCache
from mt.models.layers import DecoderLayer, EncoderLayer, SequenceModel, sinusoids, tied_output
from mt.tokenizer import PAD


class Transformer(SequenceModel):
    """Encoder-decoder translation model with tied embeddings (source, target, output) by default."""

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__(cfg, vocab_size)
        d = cfg.d_model
        self.embed = nn.Embedding(vocab_size, d, padding_idx=PAD)
        self.tgt_embedding = None if cfg.tie_embeddings else nn.Embedding(vocab_size, d, padding_idx=PAD)
        self.register_buffer("positions", sinusoids(cfg.max_positions, d), persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.enc_layers))
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.dec_layers))
        self.enc_norm, self.dec_norm = nn.LayerNorm(d), nn.LayerNorm(d)
        self.output = tied_output(self.embed) if cfg.tie_embeddings else nn.Linear(d, vocab_size, bias=False)
        self.init_weights()

    @property
    def tgt_embed(self) -> nn.Embedding:
        return self.embed if self.tgt_embedding is None else self.tgt_embedding

    def _embed(self, emb: nn.Embedding, ids, positions=None):
        """Scaled embeddings plus positions (rows `positions` of the table, else 0 .. T-1)."""
        table = self.positions[:ids.shape[1]] if positions is None else self.positions[positions]
        return self.drop(emb(ids) * math.sqrt(self.cfg.d_model) + table)

    def encode(self, src):
        """src (B, S) -> memory (B, S, D), memory_mask (B, 1, 1, S) with True where attention may look."""
        mask = (src != PAD)[:, None, None, :]
        x = self._embed(self.embed, src)
        for layer in self.encoder:
            x = layer(x, mask)
        return self.enc_norm(x), mask

    def memory_kv(self, memory):
        """The cross-attention keys and values of every decoder layer: [(k, v)], each (B, H, S, Dh)."""
        return [layer.cross_attn.project_memory(memory) for layer in self.decoder]

    def decode(self, tgt_in, memory_kv, memory_mask, cache=None):
        """tgt_in (B, T) -> hidden states (B, T, D); with a cache, T new positions after the cached ones."""
        T = tgt_in.shape[1]
        x = self._embed(self.tgt_embed, tgt_in, cache.positions(T) if cache is not None else None)
        for i, layer in enumerate(self.decoder):
            k, v = memory_kv[i]
            x = layer(x, k, v, memory_mask, cache=cache, layer=i)
        if cache is not None:
            cache.advance(T)
        return self.dec_norm(x)

    def forward(self, src, tgt_in, tgt_out=None):
        """Teacher-forced logits: (B, T, V), or (N, V) for the N non-pad positions of tgt_out.

        Projecting only real target positions onto the vocabulary skips the padding's share of the
        most expensive matmul.
        """
        memory, mask = self.encode(src)
        hidden = self.decode(tgt_in, self.memory_kv(memory), mask)
        if tgt_out is not None:
            hidden = hidden[tgt_out != PAD]
        return self.logits(hidden)

    # --- incremental decoding -------------------------------------------------------------
    def new_cache(self, src, max_len: int) -> KVCache:
        """Encode `src` (B, S) once and preallocate room for `max_len` decoder positions per row."""
        memory, mask = self.encode(src)
        # contiguous: cache.reorder moves rows of them in place, and attention reads them every step
        kv = [[t.contiguous() for t in pair] for pair in self.memory_kv(memory)]
        H, L = self.cfg.heads, len(self.decoder)
        shape = (src.shape[0], H, max_len, self.cfg.d_model // H)
        self_k = [memory.new_empty(shape) for _ in range(L)]
        self_v = [memory.new_empty(shape) for _ in range(L)]
        return KVCache(self_k, self_v, [k for k, _ in kv], [v for _, v in kv], mask)

    def step(self, tokens, cache: KVCache):
        """Feed tokens (B, n) after the cached prefix; return log-probs of the next token (B, V)."""
        kv = list(zip(cache.memory_k, cache.memory_v))
        hidden = self.decode(tokens, kv, cache.memory_mask, cache)[:, -1]
        return self.log_probs(hidden)
