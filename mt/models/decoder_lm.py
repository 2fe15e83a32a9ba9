"""Decoder-only transformers: the causal language model P(x) and the prefix LM P(y | x).

They keep the encoder-decoder's interface, so training, search and scoring run them unchanged:
`forward(src, tgt_in, tgt_out)` -> logits of the target positions, `new_cache(src, max_len)`,
`step(tokens, cache)` -> next-token log-probs.

What `src` means here:
- prefix LM: the source sentence `x EOS`; the decoder reads `x EOS BOS y` and is trained on y
  only (the target positions). The cache is filled by one forward pass over the source.
- decoder-only LM: a prompt (B, S) without BOS/EOS, possibly empty; sequences are `BOS x EOS`, the
  prompt is a prefix of x. Training and scoring ignore `src` (it is empty).
Padded prefixes are right-padded; positions are counted per row over real tokens only, so a result
never depends on how a batch was padded. Shapes: B batch, S prefix, T target, D width, V vocabulary.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from mt.config import ModelConfig
from mt.models.cache import KVCache, StateCache
from mt.models.layers import EncoderLayer, SelfAttention, SequenceModel, sinusoids, tied_output
from mt.models.linear_attention import LinearAttention
from mt.models.sliding_window import SlidingWindowAttention
from mt.models.ssm import StateSpaceMixer
from mt.tokenizer import BOS, EOS, PAD


def make_mixer(cfg: ModelConfig) -> nn.Module:
    """The token mixer model.mixer names, for one decoder-only layer."""
    d, h, rotary = cfg.d_model, cfg.heads, cfg.positions == "rotary"
    if cfg.mixer == "sliding_window":
        return SlidingWindowAttention(d, h, cfg.attn_dropout, cfg.window, rotary)
    if cfg.mixer == "linear":
        return LinearAttention(d, h, gated=cfg.linear_gate, chunk=cfg.chunk)
    if cfg.mixer == "ssm":
        return StateSpaceMixer(d, h, state_size=cfg.state_size, chunk=cfg.chunk)
    return SelfAttention(d, h, cfg.attn_dropout, rotary)


class LMCache(KVCache):
    """KVCache plus what a decoder-only model needs per row: the next position and a pending first
    token (the prompt's last token, fed instead of search's BOS)."""

    def __init__(self, self_k, self_v, key_mask, pos, pending):
        super().__init__(self_k, self_v)
        self.key_mask, self.pos, self.pending = key_mask, pos, pending

    def positions(self, T: int) -> torch.Tensor:
        return self.pos[:, None]  # (B, 1): one token a step

    def advance(self, n: int) -> None:
        super().advance(n)
        self.pos = self.pos + n

    def expand(self, k: int) -> None:
        super().expand(k)  # repeats key_mask too
        self.pos = self.pos.repeat_interleave(k, 0)
        if self.pending is not None:
            self.pending = self.pending.repeat_interleave(k, 0)

    def reorder(self, new_order) -> None:
        super().reorder(new_order)  # reorders key_mask too
        self.pos = self.pos[new_order]
        if self.pending is not None:
            self.pending = self.pending[new_order]


def split_prompt(src):
    """Prompts (B, S) -> prefill ids (B, S) = BOS p_1..p_{n-1} (right-padded) and pending (B,) = p_n or BOS."""
    B = src.shape[0]
    lens = (src != PAD).sum(1)
    full = torch.cat([torch.full((B, 1), BOS, dtype=src.dtype, device=src.device), src], 1)  # (B, S+1)
    rows = torch.arange(B, device=src.device)
    pending = full[rows, lens].clone()
    full[rows, lens] = PAD
    return full[:, :src.shape[1]], pending


class DecoderLM(SequenceModel):
    """Causal transformer: P(x) (prefix_lm=False) or P(y | x) by reading `x EOS BOS y` (prefix_lm=True)."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, *, prefix_lm: bool, packed: bool = False):
        super().__init__(cfg, vocab_size)
        self.prefix_lm = prefix_lm
        # trained on a packed stream, the model never saw BOS: every line there starts after an EOS,
        # so a sequence starting with BOS (a prompt, a scored line) reads EOS in its place
        self.packed = packed and not prefix_lm
        self.reads_prompts = not prefix_lm  # a decoder-only LM continues prompts
        self.embed = nn.Embedding(vocab_size, cfg.d_model, padding_idx=PAD)
        self.register_buffer("positions", sinusoids(cfg.max_positions, cfg.d_model), persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(EncoderLayer(cfg, make_mixer(cfg)) for _ in range(cfg.dec_layers))  # causal
        self.norm = nn.LayerNorm(cfg.d_model)
        self.output = tied_output(self.embed)
        self.init_weights()

    def max_source_tokens(self) -> int:
        # a prefix LM reads source and target as one sequence: half the table each
        return self.cfg.max_positions // (2 if self.prefix_lm else 1) - 1

    def max_output_tokens(self, source_lengths):
        return self.cfg.max_positions - 2 - (source_lengths + 1)  # the prefix takes positions too

    def max_target_tokens(self, source_length: int) -> int:
        # a prefix LM's source and its EOS come first in the same table
        return self.cfg.max_positions - 1 - (source_length + 1 if self.prefix_lm else 0)

    def _run(self, ids, pos, *, mask=None, causal=False, cache=None):
        if self.packed:
            ids = ids.masked_fill(ids == BOS, EOS)
        x = self.embed(ids) * math.sqrt(self.cfg.d_model)
        if self.cfg.positions == "sinusoidal":  # rotary turns queries and keys inside the layers instead
            x = x + self.positions[pos]
        x = self.drop(x)
        for i, layer in enumerate(self.layers):
            x = layer(x, mask=mask, causal=causal, cache=cache, layer=i, pos=pos)
        return self.norm(x)

    def forward(self, src, tgt_in, tgt_out=None):
        """Logits of the target positions: (B, T, V), or (N, V) for the non-pad positions of tgt_out."""
        if not self.prefix_lm:
            hidden = self._run(tgt_in, torch.arange(tgt_in.shape[1], device=tgt_in.device), causal=True)
        else:
            ids = torch.cat([src, tgt_in], 1)                               # (B, S+T), pads inside
            real = ids != PAD
            pos = (real.cumsum(1) - 1).clamp(min=0)
            L = ids.shape[1]
            causal = torch.ones(L, L, dtype=torch.bool, device=ids.device).tril()
            mask = (causal & real[:, None, None, :]) | torch.eye(L, dtype=torch.bool, device=ids.device)
            hidden = self._run(ids, pos, mask=mask)[:, src.shape[1]:]
        if tgt_out is not None:
            hidden = hidden[tgt_out != PAD]
        return self.logits(hidden)

    def new_cache(self, src, max_len: int) -> LMCache | StateCache:
        """Fill the cache with one forward pass over the prefix (source, or BOS + prompt)."""
        if self.prefix_lm:
            prefix, pending = src, None
        else:
            prefix, pending = split_prompt(src)
        if self.cfg.mixer != "softmax":
            return self._new_state_cache(prefix, pending)
        B, S = prefix.shape
        H = self.cfg.heads
        shape = (B, H, S + max_len, self.cfg.d_model // H)
        L = len(self.layers)
        key_mask = torch.ones(B, 1, 1, S + max_len, dtype=torch.bool, device=src.device)
        key_mask[:, 0, 0, :S] = prefix != PAD
        real = (prefix != PAD).long()
        dtype = self.embed.weight.dtype
        cache = LMCache([prefix.new_empty(shape, dtype=dtype) for _ in range(L)],
                        [prefix.new_empty(shape, dtype=dtype) for _ in range(L)], key_mask, real.sum(1), pending)
        if S:
            self._run(prefix, (real.cumsum(1) - 1).clamp(min=0), cache=cache)
            KVCache.advance(cache, S)  # the prefix fills S columns; cache.pos already counts its real tokens
        return cache

    def _new_state_cache(self, prefix, pending) -> StateCache:
        """Fixed-size per-layer states, filled by one pass over the right-padded prefix."""
        B, S = prefix.shape
        real = prefix != PAD
        dtype = self.embed.weight.dtype
        cache = StateCache([layer.attn.new_state(B, prefix.device, dtype) for layer in self.layers],
                           real.sum(1), pending)
        if S:
            cache.real = real
            self._run(prefix, (real.cumsum(1) - 1).clamp(min=0), cache=cache)
            cache.real = None
        return cache

    def step(self, tokens, cache: LMCache | StateCache):
        """Feed one token per row (the pending prompt token first); log-probs of the next (B, V)."""
        if cache.pending is not None:
            tokens, cache.pending = cache.pending[:, None], None
        hidden = self._run(tokens, cache.positions(1), cache=cache)[:, -1]
        cache.advance(1)
        return self.log_probs(hidden)
