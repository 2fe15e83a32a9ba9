"""The transformer's building blocks, shared by every model family: attention (with an optional
cache), feed-forward, pre-norm encoder and decoder layers, sinusoidal positions, and the common
base class (initialisation, output projection, the next-token distribution).

Plain torch modules (nn.Linear, nn.Dropout): the CPU speed paths of mt.fast replace them on request.
Shapes: B batch, S source length, T target length, H heads, D width, Dh head width, V vocabulary.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mt.config import ModelConfig
from mt.models.rotary import rotate
from mt.tokenizer import BOS, PAD


def sinusoids(n: int, d: int) -> torch.Tensor:
    """(n, d) sinusoidal position table (Vaswani et al. 2017)."""
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    inv = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / d))
    table = torch.zeros(n, d)
    table[:, 0::2] = torch.sin(pos * inv)
    table[:, 1::2] = torch.cos(pos * inv)
    return table


def attention(q, k, v, **kwargs):
    """F.scaled_dot_product_attention, in float32 on a CPU under autocast: there torch's bfloat16
    flash-attention backward is far slower than float32's (docs/performance.md)."""
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
    def __init__(self, d: int, heads: int, dropout: float, rotary: bool = False):
        super().__init__()
        self.heads, self.dropout, self.rotary = heads, dropout, rotary
        self.qkv = nn.Linear(d, 3 * d)  # fused projection: one matmul instead of three
        self.out = nn.Linear(d, d)

    def project(self, x, pos=None):
        """x (B, T, D) -> queries, keys, values (B, H, T, Dh); rotary: queries and keys turned by
        their positions `pos` ((T,) or (B, T); default 0..T-1) before any cache sees them."""
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        if self.rotary:
            pos = torch.arange(T, device=x.device) if pos is None else pos
            q, k = rotate(q, pos), rotate(k, pos)
        return q, k, v

    def forward(self, x, *, mask=None, causal=False, cache=None, layer: int = 0, pos=None):
        """With a cache: x holds T new positions; their keys/values join the cached ones."""
        B, T, D = x.shape
        q, k, v = self.project(x, pos)
        if cache is not None:
            k, v, mask = cache.attend_to(layer, k, v)
            causal = False
        p = self.dropout if self.training else 0.0
        y = attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
        return self.out(y.transpose(1, 2).reshape(B, T, D))


class CrossAttention(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.out = nn.Linear(d, d)

    def project_memory(self, memory):
        """(B, S, D) -> keys, values (B, H, S, Dh): computed once per source batch when decoding."""
        B, S, D = memory.shape
        k, v = self.kv(memory).view(B, S, 2, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(self, x, k, v, mask):
        """x (B*g, T, D) attends to k, v (B, H, S, Dh): the g rows of a group share one source."""
        BG, T, D = x.shape
        B = k.shape[0]
        group = BG // B
        q = self.q(x).view(B, group * T, self.heads, D // self.heads).transpose(1, 2)  # (B, H, g*T, Dh)
        p = self.dropout if self.training else 0.0
        y = attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.out(y.transpose(1, 2).reshape(BG, T, D))


class FeedForward(nn.Module):
    def __init__(self, d: int, hidden: int, dropout: float):
        super().__init__()
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        h = F.relu(self.up(x))
        if self.drop.p and self.training:  # skipped entirely when 0: dropout costs time on CPU
            h = self.drop(h)
        return self.down(h)


class EncoderLayer(nn.Module):
    """Pre-norm self-attention + feed-forward: the encoder's layer, and a decoder-only model's (causal).
    `mixer` replaces the self-attention (a decoder-only model's sliding-window, linear or state-space
    layer: mt.models.decoder_lm.make_mixer); it keeps the name `attn`."""

    def __init__(self, cfg: ModelConfig, mixer: nn.Module | None = None):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = mixer if mixer is not None else SelfAttention(cfg.d_model, cfg.heads, cfg.attn_dropout)
        self.ffn = FeedForward(cfg.d_model, cfg.ffn, cfg.activation_dropout)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, mask=None, *, causal=False, cache=None, layer=0, pos=None):
        x = x + self.drop(self.attn(self.norm1(x), mask=mask, causal=causal, cache=cache, layer=layer, pos=pos))
        return x + self.drop(self.ffn(self.norm2(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.self_attn = SelfAttention(d, cfg.heads, cfg.attn_dropout)
        self.cross_attn = CrossAttention(d, cfg.heads, cfg.attn_dropout)
        self.ffn = FeedForward(d, cfg.ffn, cfg.activation_dropout)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, memory_k, memory_v, memory_mask, *, cache=None, layer=0, self_mask=None):
        """Causal self-attention, or with `self_mask` (B, 1, 1, T) attention to every real position
        (a denoiser reads the whole target at once)."""
        causal = self_mask is None
        x = x + self.drop(self.self_attn(self.norm1(x), mask=self_mask, causal=causal, cache=cache, layer=layer))
        x = x + self.drop(self.cross_attn(self.norm2(x), memory_k, memory_v, memory_mask))
        return x + self.drop(self.ffn(self.norm3(x)))


class SequenceModel(nn.Module):
    """What every model family shares: the output projection `output` (tied to an embedding unless
    the config unties it), the next-token distribution, parameter counts and initialisation.

    Subclasses set `embeddings` (the nn.Embedding modules) and build `output`; they implement
    `forward(src, tgt_in, tgt_out)` -> logits, `new_cache(src, max_len)`, `step(tokens, cache)`.
    Questions the rest of mt asks a model instead of reading its architecture name:
    `reads_prompts` (inputs are prompts to continue, not sentences to translate),
    `max_source_tokens()`, `max_output_tokens(source_lengths)`, `max_target_tokens(source_length)`.
    """

    reads_prompts = False
    parallel_decoding = False  # True: decoded by mt.search.mask_predict, not left to right
    exact_likelihood = True    # False: score_batch gives an upper bound on -log P (a diffusion model)

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        # a tied output weight is the embedding's: stored once (as its embedding), filled in on load
        self._register_state_dict_hook(_drop_tied_output)
        self.register_load_state_dict_pre_hook(_fill_tied_output)

    def tied_embedding_name(self) -> str | None:
        """The embedding whose weight the output projection shares, or None when untied."""
        weight = getattr(getattr(self, "output", None), "weight", None)
        return next((name for name, m in self.named_children()
                     if isinstance(m, nn.Embedding) and m.weight is weight), None)

    normalize = staticmethod(normalize_logits)

    def logits(self, hidden):
        """(..., D) -> (..., V)."""
        return self.output(hidden)

    def log_probs(self, hidden):
        """(..., D) -> log P(next token) (..., V), the distribution decoding and scoring both use."""
        return normalize_logits(self.logits(hidden))

    def embedding_modules(self) -> list[nn.Embedding]:
        return [m for m in self.modules() if isinstance(m, nn.Embedding)]

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Parameters, less those of the embeddings when non_embedding (a tied output counts once)."""
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= sum(p.numel() for m in self.embedding_modules() for p in m.parameters())
        return total

    def init_weights(self, *, xavier: bool = True) -> None:
        """Xavier-uniform matrices and zero biases (xavier), normal(0, D^-1/2) embeddings with a zero PAD row."""
        if xavier:
            for name, p in self.named_parameters():
                if p.dim() == 2 and "embed" not in name:
                    nn.init.xavier_uniform_(p)
                elif name.endswith("bias"):
                    nn.init.zeros_(p)
        for emb in self.embedding_modules():
            nn.init.normal_(emb.weight, std=self.cfg.d_model ** -0.5)
            nn.init.zeros_(emb.weight[PAD])

    def max_source_tokens(self) -> int:
        """Longest source (or prompt) in tokens, room for EOS left."""
        return self.cfg.max_positions - 1

    def max_output_tokens(self, source_lengths: torch.Tensor) -> torch.Tensor:
        """Longest output per source before EOS (positions left in the table)."""
        return torch.full_like(source_lengths, self.cfg.max_positions - 2)

    def max_target_tokens(self, source_length: int) -> int:
        """Longest target (before EOS) teacher forcing scores exactly after a source of this length:
        BOS + target fill the position table."""
        return self.cfg.max_positions - 1


def _drop_tied_output(model, state_dict, prefix, local_metadata):
    if model.tied_embedding_name() is not None:
        state_dict.pop(prefix + "output.weight", None)


def _fill_tied_output(model, state_dict, prefix, *args):
    name = model.tied_embedding_name()
    if name is not None and prefix + "output.weight" not in state_dict and prefix + f"{name}.weight" in state_dict:
        state_dict[prefix + "output.weight"] = state_dict[prefix + f"{name}.weight"]


def tied_output(embedding: nn.Embedding) -> nn.Linear:
    """An output projection whose weight is `embedding`'s (one tensor, stored once)."""
    out = nn.Linear(embedding.embedding_dim, embedding.num_embeddings, bias=False, device="meta")
    out.weight = embedding.weight
    return out
