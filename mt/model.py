"""Pre-norm transformer encoder-decoder with an explicit key/value cache for incremental decoding.

Training calls `forward(src, tgt_in)`. Decoding calls `new_cache` once per batch (encode, preallocate
the decoder's self-attention keys/values, project the encoder output for cross-attention once), then
`step` per generated token; the cache (mt.cache) branches and reorders rows for the search.
Attention goes through torch's scaled_dot_product_attention (`attention`).
Shapes: B batch, S source length, T target length, H heads, D width, Dh head width, V vocabulary.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mt.cache import KVCache, cached_mask
from mt.config import ModelConfig
from mt.dropout import Dropout, dropout
from mt.linear import Linear, PackedWeight
from mt.tokenizer import BOS, PAD

# cuDNN's attention builds a new plan for every new (batch, length) shape: ~0.4 s each on an H100,
# and token-budget batches bring new shapes all the time. Flash / memory-efficient kernels do not.
torch.backends.cuda.enable_cudnn_sdp(False)

# oneDNN's per-call cost outweighs its faster kernel for a layer's linears below this many rows (CPU)
LAYER_MIN_ROWS = 128


def sinusoids(n: int, d: int) -> torch.Tensor:
    """(n, d) sinusoidal position table (Vaswani et al. 2017)."""
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    inv = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / d))
    table = torch.zeros(n, d)
    table[:, 0::2] = torch.sin(pos * inv)
    table[:, 1::2] = torch.cos(pos * inv)
    return table


def count_parameters(model: nn.Module, exclude: list[nn.Module]) -> int:
    """Parameters of `model`, less those of the `exclude` modules (e.g. embeddings)."""
    return sum(p.numel() for p in model.parameters()) - sum(p.numel() for m in exclude for p in m.parameters())


def attention(q, k, v, **kwargs):
    """F.scaled_dot_product_attention, in float32 on a CPU under autocast: there torch's bfloat16
    flash-attention backward ran 10x slower than float32's (126 vs 13 ms a training step, AMX Xeon,
    torch 2.13), more than the rest of the step gained from bfloat16."""
    if q.device.type == "cpu" and q.dtype != torch.float32 and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kwargs).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


def normalize_logits(logits):
    """logits (..., V) -> log P(next token) in float32; PAD and BOS are never outputs.

    Writes into `logits` (a fresh output of the projection) rather than copying it.
    """
    logits = logits.float()
    logits[..., PAD] = float("-inf")
    logits[..., BOS] = float("-inf")
    return F.log_softmax(logits, dim=-1)


class SelfAttention(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = Linear(d, 3 * d, min_rows=LAYER_MIN_ROWS)  # fused projection: one matmul instead of three
        self.out = Linear(d, d, min_rows=LAYER_MIN_ROWS)

    def forward(self, x, *, mask=None, causal=False, cache: KVCache | None = None, layer: int = 0):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, T, Dh)
        if cache is not None:
            start = cache.length
            cache.self_k[layer][:, :, start:start + T] = k
            cache.self_v[layer][:, :, start:start + T] = v
            k = cache.self_k[layer][:, :, :start + T]
            v = cache.self_v[layer][:, :, :start + T]
            mask = cached_mask(cache, start, T, x.device)
            causal = False
        p = self.dropout if self.training else 0.0
        y = attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
        return self.out(y.transpose(1, 2).reshape(B, T, D))


class CrossAttention(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q = Linear(d, d, min_rows=LAYER_MIN_ROWS)
        self.kv = Linear(d, 2 * d, min_rows=LAYER_MIN_ROWS)
        self.out = Linear(d, d, min_rows=LAYER_MIN_ROWS)

    def project_memory(self, memory):
        """(B, S, D) -> keys, values (B, H, S, Dh): computed once per source batch when decoding."""
        B, S, D = memory.shape
        k, v = self.kv(memory).view(B, S, 2, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(self, x, k, v, mask, group: int = 1):
        """x (B*g, T, D) attends to k, v (B, H, S, Dh): the g rows of a group share one source."""
        BG, T, D = x.shape
        B = BG // group
        q = self.q(x).view(B, group * T, self.heads, D // self.heads).transpose(1, 2)  # (B, H, g*T, Dh)
        p = self.dropout if self.training else 0.0
        y = attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.out(y.transpose(1, 2).reshape(BG, T, D))


class FeedForward(nn.Module):
    def __init__(self, d: int, hidden: int, dropout: float):
        super().__init__()
        self.up = Linear(d, hidden, min_rows=LAYER_MIN_ROWS)
        self.down = Linear(hidden, d, min_rows=LAYER_MIN_ROWS)
        self.dropout = dropout

    def forward(self, x):
        h = F.relu(self.up(x))
        if self.dropout and self.training:  # skipped entirely when 0: dropout costs time on CPU
            h = dropout(h, self.dropout)
        return self.down(h)


class EncoderLayer(nn.Module):
    """Pre-norm self-attention + feed-forward: the encoder's layer, and a decoder-only model's (causal)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg.d_model, cfg.heads, cfg.attn_dropout)
        self.ffn = FeedForward(cfg.d_model, cfg.ffn, cfg.activation_dropout)
        self.drop = Dropout(cfg.dropout)

    def forward(self, x, mask=None, *, causal=False, cache=None, layer=0):
        x = x + self.drop(self.attn(self.norm1(x), mask=mask, causal=causal, cache=cache, layer=layer))
        return x + self.drop(self.ffn(self.norm2(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.self_attn = SelfAttention(d, cfg.heads, cfg.attn_dropout)
        self.cross_attn = CrossAttention(d, cfg.heads, cfg.attn_dropout)
        self.ffn = FeedForward(d, cfg.ffn, cfg.activation_dropout)
        self.drop = Dropout(cfg.dropout)

    def forward(self, x, memory_k, memory_v, memory_mask, *, cache=None, layer=0):
        x = x + self.drop(self.self_attn(self.norm1(x), causal=True, cache=cache, layer=layer))
        group = cache.group if cache is not None else 1
        x = x + self.drop(self.cross_attn(self.norm2(x), memory_k, memory_v, memory_mask, group))
        return x + self.drop(self.ffn(self.norm3(x)))


class Transformer(nn.Module):
    """Encoder-decoder translation model P(y | x) with tied embeddings."""

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        d = cfg.d_model
        self.embed = nn.Embedding(vocab_size, d, padding_idx=PAD)
        self.tgt_embedding = None if cfg.tie_embeddings else nn.Embedding(vocab_size, d, padding_idx=PAD)
        self.register_buffer("positions", sinusoids(cfg.max_positions, d), persistent=False)
        self.drop = Dropout(cfg.dropout)
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.enc_layers))
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.dec_layers))
        self.enc_norm, self.dec_norm = nn.LayerNorm(d), nn.LayerNorm(d)
        self.output = None if cfg.tie_embeddings else Linear(d, vocab_size, bias=False)
        self._tied_output = PackedWeight(one_row_transposed=True)
        self._init_weights()

    @property
    def tgt_embed(self) -> nn.Embedding:
        return self.embed if self.tgt_embedding is None else self.tgt_embedding

    def _embeddings(self) -> list[nn.Embedding]:
        return [self.embed] + ([self.tgt_embedding] if self.tgt_embedding is not None else [])

    def _init_weights(self):
        for name, p in self.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                nn.init.xavier_uniform_(p)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
        for emb in self._embeddings():
            nn.init.normal_(emb.weight, std=self.cfg.d_model ** -0.5)
            nn.init.zeros_(emb.weight[PAD])

    def num_parameters(self, non_embedding: bool = False) -> int:
        return count_parameters(self, self._embeddings() if non_embedding else [])

    def _embed(self, emb: nn.Embedding, ids, start: int = 0):
        T = ids.shape[1]
        return self.drop(emb(ids) * math.sqrt(self.cfg.d_model) + self.positions[start:start + T])

    def encode(self, src):
        """src (B, S) -> memory (B, S, D), memory_mask (B, 1, 1, S) with True where attention may look."""
        mask = (src != PAD)[:, None, None, :]
        x = self._embed(self.embed, src)
        for layer in self.encoder:
            x = layer(x, mask)
        return self.enc_norm(x), mask

    def decode(self, tgt_in, memory_kv, memory_mask, cache: KVCache | None = None):
        """tgt_in (B, T) -> hidden states (B, T, D); with a cache, T new positions after cache.length."""
        start = cache.length if cache is not None else 0
        x = self._embed(self.tgt_embed, tgt_in, start)
        for i, layer in enumerate(self.decoder):
            k, v = memory_kv[i]
            x = layer(x, k, v, memory_mask, cache=cache, layer=i)
        if cache is not None:
            cache.length += tgt_in.shape[1]
        return self.dec_norm(x)

    def logits(self, hidden):
        """(..., D) -> (..., V)."""
        if self.output is not None:  # untied, or an int8-quantized copy
            return self.output(hidden)
        return self._tied_output.linear(hidden, self.tgt_embed.weight)

    normalize = staticmethod(normalize_logits)

    def log_probs(self, hidden):
        """(..., D) -> log P(next token) (..., V), the distribution decoding and scoring both use."""
        return self.normalize(self.logits(hidden))

    def forward(self, src, tgt_in, tgt_out=None):
        """Teacher-forced logits: (B, T, V), or (N, V) for the N non-pad positions of tgt_out.

        Projecting only real target positions onto the vocabulary skips the padding's share of the
        most expensive matmul.
        """
        memory, mask = self.encode(src)
        kv = [layer.cross_attn.project_memory(memory) for layer in self.decoder]
        hidden = self.decode(tgt_in, kv, mask)
        if tgt_out is not None:
            hidden = hidden[tgt_out != PAD]
        return self.logits(hidden)

    # --- incremental decoding -------------------------------------------------------------
    def new_cache(self, src, max_len: int, group: int = 1) -> KVCache:
        """Encode `src` (B, S) once and preallocate room for `max_len` positions of B*group rows."""
        memory, mask = self.encode(src)
        # contiguous: cache.reorder moves rows of them in place, and attention reads them every step
        kv = [[t.contiguous() for t in layer.cross_attn.project_memory(memory)] for layer in self.decoder]
        B, H, L = src.shape[0] * group, self.cfg.heads, len(self.decoder)
        shape = (B, H, max_len, self.cfg.d_model // H)
        self_k = [memory.new_empty(shape) for _ in range(L)]
        self_v = [memory.new_empty(shape) for _ in range(L)]
        return KVCache(self_k, self_v, [k for k, _ in kv], [v for _, v in kv], mask, group)

    def step(self, tokens, cache: KVCache):
        """Feed tokens (B, n) after the cached prefix; return log-probs of the next token (B, V)."""
        kv = list(zip(cache.memory_k, cache.memory_v))
        hidden = self.decode(tokens, kv, cache.memory_mask, cache)[:, -1]
        return self.log_probs(hidden)


def build_model(cfg: ModelConfig, vocab_size: int) -> nn.Module:
    """The model `cfg.arch` names: encoder-decoder, decoder-only / prefix LM, or the linear baseline."""
    if cfg.arch == "transformer":
        return Transformer(cfg, vocab_size)
    from mt.lm import DecoderLM, LinearLM

    if cfg.arch == "linear":
        return LinearLM(cfg, vocab_size)
    return DecoderLM(cfg, vocab_size)
