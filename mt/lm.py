"""Decoder-only models: the causal transformer LM (and prefix LM) and the linear bag-of-words baseline.

They keep the encoder-decoder's interface, so training, search and scoring run them unchanged:
`forward(src, tgt_in, tgt_out)` -> logits of the target positions, `new_cache(src, max_len, group)`,
`step(tokens, cache)` -> next-token log-probs, `normalize(logits)`.

What `src` means here:
- arch prefix_lm: the source sentence `x EOS`; the decoder reads `x EOS BOS y` and is trained on y
  only (the target positions). The cache is filled by one forward pass over the source.
- arch decoder_only / linear: a prompt (B, S) without BOS/EOS, possibly empty; sequences are
  `BOS x EOS`, the prompt is a prefix of x. Training and scoring ignore `src` (it is empty).
Padded prefixes are right-padded; positions are counted per row over real tokens only, so a result
never depends on how a batch was padded. Shapes: B batch, S prefix, T target, D width, V vocabulary.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mt.cache import KVCache
from mt.config import ModelConfig
from mt.dropout import Dropout
from mt.linear import Linear, PackedWeight
from mt.model import EncoderLayer, count_parameters, normalize_logits, sinusoids
from mt.tokenizer import BOS, PAD


class LMCache(KVCache):
    """KVCache plus what a decoder-only model needs per row: next position, padded-prefix mask,
    and a pending first token (the prompt's last token, fed instead of search's BOS)."""

    def __init__(self, self_k, self_v, key_mask, pos, pending):
        super().__init__(self_k, self_v, [], [], None)
        self.key_mask, self.pos, self.pending = key_mask, pos, pending

    def expand(self, k: int) -> None:
        super().expand(k)  # repeats key_mask too
        self.pos = self.pos.repeat_interleave(k, 0)
        if self.pending is not None:
            self.pending = self.pending.repeat_interleave(k, 0)

    def reorder(self, index, memory_index=None):
        super().reorder(index)
        self.key_mask, self.pos = self.key_mask[index], self.pos[index]
        if self.pending is not None:
            self.pending = self.pending[index]


def split_prompt(src):
    """Prompts (B, S) -> prefill ids (B, S) = BOS p_1..p_{n-1} (right-padded) and pending (B,) = p_n or BOS."""
    B = src.shape[0]
    lens = (src != PAD).sum(1)
    full = torch.cat([torch.full((B, 1), BOS, dtype=src.dtype, device=src.device), src], 1)  # (B, S+1)
    rows = torch.arange(B, device=src.device)
    pending = full[rows, lens].clone()
    full[rows, lens] = PAD
    return full[:, :src.shape[1]], pending


class DecoderLM(nn.Module):
    """Causal transformer: P(x) (arch decoder_only) or P(y | x) by reading `x EOS BOS y` (prefix_lm)."""

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        self.prefix_lm = cfg.arch == "prefix_lm"
        self.embed = nn.Embedding(vocab_size, cfg.d_model, padding_idx=PAD)
        self.register_buffer("positions", sinusoids(cfg.max_positions, cfg.d_model), persistent=False)
        self.drop = Dropout(cfg.dropout)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.dec_layers))  # used causally
        self.norm = nn.LayerNorm(cfg.d_model)
        self.output = None  # tied to the embedding; a separate (quantized) copy only for int8 inference
        self._tied_output = PackedWeight(one_row_transposed=True)
        for name, p in self.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                nn.init.xavier_uniform_(p)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
        nn.init.normal_(self.embed.weight, std=cfg.d_model ** -0.5)
        nn.init.zeros_(self.embed.weight[PAD])

    normalize = staticmethod(normalize_logits)

    def num_parameters(self, non_embedding: bool = False) -> int:
        return count_parameters(self, [self.embed] if non_embedding else [])

    def logits(self, hidden):
        return self.output(hidden) if self.output is not None else self._tied_output.linear(hidden, self.embed.weight)

    def log_probs(self, hidden):
        return normalize_logits(self.logits(hidden))

    def _run(self, ids, pos, *, mask=None, causal=False, cache=None):
        x = self.drop(self.embed(ids) * math.sqrt(self.cfg.d_model) + self.positions[pos])
        for i, layer in enumerate(self.layers):
            x = layer(x, mask=mask, causal=causal, cache=cache, layer=i)
        if cache is not None:
            cache.length += ids.shape[1]
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

    def new_cache(self, src, max_len: int, group: int = 1) -> LMCache:
        """Fill the cache with one forward pass over the prefix (source, or BOS + prompt)."""
        if self.prefix_lm:
            prefix, pending = src, None
        else:
            prefix, pending = split_prompt(src)
        prefix = prefix.repeat_interleave(group, 0)
        pending = pending.repeat_interleave(group, 0) if pending is not None else None
        B, S = prefix.shape
        H = self.cfg.heads
        shape = (B, H, S + max_len, self.cfg.d_model // H)
        L = len(self.layers)
        key_mask = torch.ones(B, 1, 1, S + max_len, dtype=torch.bool, device=src.device)
        key_mask[:, 0, 0, :S] = prefix != PAD
        real = (prefix != PAD).long()
        cache = LMCache([prefix.new_empty(shape, dtype=self.embed.weight.dtype) for _ in range(L)],
                        [prefix.new_empty(shape, dtype=self.embed.weight.dtype) for _ in range(L)],
                        key_mask, real.sum(1), pending)
        if S:
            self._run(prefix, (real.cumsum(1) - 1).clamp(min=0), cache=cache)
        return cache

    def step(self, tokens, cache: LMCache):
        """Feed one token per row (the pending prompt token first); log-probs of the next (B, V)."""
        if cache.pending is not None:
            tokens, cache.pending = cache.pending[:, None], None
        hidden = self._run(tokens, cache.pos[:, None], cache=cache)[:, -1]
        cache.pos = cache.pos + 1
        return self.log_probs(hidden)


class LinearCache:
    """Running sum of prefix embeddings and their count, per row."""

    def __init__(self, total, count, pending):
        self.total, self.count, self.pending, self.length = total, count, pending, 0

    def expand(self, k: int) -> None:
        self.total, self.count = self.total.repeat_interleave(k, 0), self.count.repeat_interleave(k, 0)
        if self.pending is not None:
            self.pending = self.pending.repeat_interleave(k, 0)

    def reorder(self, index, memory_index=None):
        self.total, self.count = self.total[index], self.count[index]
        if self.pending is not None:
            self.pending = self.pending[index]


class LinearLM(nn.Module):
    """The bag-of-words baseline: P(next | prefix) = softmax(V^T W (1/N) sum_t e_t).

    W (the embedding) maps each one-hot token e_t to a vector; their mean over the N prefix tokens
    (BOS included) is mapped to logits by V. Order-blind by construction.
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        self.embed = nn.Embedding(vocab_size, cfg.d_model, padding_idx=PAD)   # W
        self.output = Linear(cfg.d_model, vocab_size, bias=False)         # V^T
        nn.init.normal_(self.embed.weight, std=cfg.d_model ** -0.5)
        nn.init.zeros_(self.embed.weight[PAD])

    normalize = staticmethod(normalize_logits)

    def num_parameters(self, non_embedding: bool = False) -> int:
        return count_parameters(self, [self.embed] if non_embedding else [])

    def forward(self, src, tgt_in, tgt_out=None):
        e = self.embed(tgt_in)                                             # (B, T, D)
        count = torch.arange(1, tgt_in.shape[1] + 1, device=tgt_in.device)
        hidden = e.cumsum(1) / count[None, :, None]                         # prefix means (B, T, D)
        if tgt_out is not None:
            hidden = hidden[tgt_out != PAD]
        return self.output(hidden)

    def new_cache(self, src, max_len: int, group: int = 1) -> LinearCache:
        prefix, pending = split_prompt(src)
        prefix, pending = prefix.repeat_interleave(group, 0), pending.repeat_interleave(group, 0)
        return LinearCache(self.embed(prefix).sum(1), (prefix != PAD).sum(1), pending)

    def step(self, tokens, cache: LinearCache):
        if cache.pending is not None:
            tokens, cache.pending = cache.pending[:, None], None
        cache.total = cache.total + self.embed(tokens[:, 0])
        cache.count = cache.count + 1
        cache.length += 1
        return normalize_logits(self.output(cache.total / cache.count[:, None]))
