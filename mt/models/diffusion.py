"""Masked (absorbing-state) discrete diffusion for translation: the CMLM / MDLM / RDM family.

P(y | x) = P(L | x) P(y | x, L). A length head on the mean-pooled encoder states gives P(L | x); a
denoiser (the Transformer's decoder with its self-attention not causal) reads a target z_t in which
each token of y is replaced by [MASK] with probability t, cross-attends to the source, and predicts
every position. Training minimises the continuous-time negative ELBO of that noising process (the
linear schedule alpha_t = 1 - t, so the weight -alpha'_t / (1 - alpha_t) is 1/t):

    -log P(y | x) <= -log P(L | x) + E_{t ~ U(0, 1)} [ (1/t) sum_{l masked in z_t} -log p(y_l | z_t, x, L) ]

Integrating t out given the number k of masked tokens (the Beta integral of t^(k-1) (1-t)^(L-k))
gives the same bound as

    -log P(L | x) + sum_{k=1..L} (1/k) E_{|m| = k} [ sum_{l in m} -log p(y_l | z_m, x, L) ]
    = -log P(L | x) + L E_{k ~ U{1..L}} [ the mean NLL of k uniformly chosen masked tokens ],

the estimator training and `nelbo` use: unbiased for the same NELBO, with weights L/k <= L instead of
1/t, which a small t makes huge (one masked token weighted 1000 at t = 0.001 swamps a CPU-sized
batch; trained that way the model of recipes/multi30k_diffusion.yaml stalled at a NELBO of 5.2 nats
a token). k is stratified across a batch (low-discrepancy, as t would be). With T steps (t on the
grid 1/T .. 1, masks drawn token by token) the sum bounds the T-step generative process, more loosely.
Label smoothing, if any, is added to the training loss only; the bound is the unsmoothed sum.

[MASK] is the id one past the tokenizer's pieces (`mask_id` = vocab_size), with an embedding of its
own, so tokenizers and runs of the other families are unchanged. The denoiser never outputs PAD,
BOS, EOS or [MASK]: the end of the sentence is the length, whose term stands for EOS.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from mt.config import ModelConfig
from mt.models.transformer import Transformer
from mt.tokenizer import BOS, EOS, PAD

def normalize_denoiser(logits: torch.Tensor) -> torch.Tensor:
    """logits (..., V) -> log p(token) in float32 over the real tokens (no PAD, BOS or EOS)."""
    logits = logits.float()
    logits[..., PAD] = logits[..., BOS] = logits[..., EOS] = float("-inf")
    return F.log_softmax(logits, dim=-1)


def stratified_counts(lengths: torch.Tensor, u: torch.Tensor | float) -> torch.Tensor:
    """Per row a number of tokens to mask, uniform in 1 .. L (0 for an empty row), stratified across
    the rows: k = 1 + floor(L g) for g = (u + i/n) mod 1."""
    n = len(lengths)
    return counts_at(lengths, (torch.as_tensor(u, dtype=torch.float64) + torch.arange(n, dtype=torch.float64) / n) % 1.0)


def counts_at(lengths: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """k = 1 + floor(L g) for uniforms g in [0, 1): uniform in 1 .. L (0 for an empty row)."""
    k = 1 + torch.floor(g.double() * lengths.double().cpu()).long()
    return torch.minimum(k, lengths.cpu()).to(lengths.device)


def mask_of_size(real: torch.Tensor, k: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Per row, the k real positions with the smallest uniforms: a uniformly random subset of size k."""
    order = uniforms.masked_fill(~real, 2.0).argsort(dim=1, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(real.shape[1], device=real.device)
                                            .expand_as(order).contiguous())
    return (rank < k[:, None]) & real


@dataclass
class DiffusionTerms:
    """What a training forward pass returns instead of logits: the masked positions' logits and
    targets with their weights 1/t, and the length log-probs with the true lengths."""
    logits: torch.Tensor        # (N, V) at the masked positions
    targets: torch.Tensor       # (N,)
    weights: torch.Tensor       # (N,) 1/t of each masked position's sentence
    length_logprobs: torch.Tensor  # (B, max_positions) log P(L | x)
    lengths: torch.Tensor       # (B,)

    def loss(self, label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(training loss, NELBO) summed over the batch; the loss adds label smoothing to the token terms."""
        logp = normalize_denoiser(self.logits)
        nll_tok = -logp.gather(1, self.targets[:, None]).squeeze(1)
        length_nll = -self.length_logprobs.gather(1, self.lengths[:, None]).squeeze(1)
        nelbo = (self.weights * nll_tok).sum() + length_nll.sum()
        if not label_smoothing:
            return nelbo, nelbo.detach()
        allowed = torch.isfinite(logp)
        smooth = -(logp.masked_fill(~allowed, 0).sum(-1) / allowed.sum(-1))
        tok = (1 - label_smoothing) * nll_tok + label_smoothing * smooth
        return (self.weights * tok).sum() + length_nll.sum(), nelbo.detach()


class DiffusionTranslator(Transformer):
    """The Transformer's encoder and layers, a non-causal denoiser and a length head."""

    parallel_decoding = True  # decoding is mt.search.mask_predict, not left to right
    exact_likelihood = False  # score_batch reports an upper bound on -log P(y | x)

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__(cfg, vocab_size)
        d = cfg.d_model
        self.mask_id = vocab_size
        self.mask_embedding = nn.Parameter(torch.randn(d) * d ** -0.5)
        self.length_head = nn.Linear(d, cfg.max_positions)  # lengths 0 .. max_positions - 1
        nn.init.zeros_(self.length_head.bias)

    normalize = staticmethod(normalize_denoiser)

    def max_output_tokens(self, source_lengths: torch.Tensor) -> torch.Tensor:
        return torch.full_like(source_lengths, self.cfg.max_positions - 1)

    def max_target_tokens(self, source_length: int) -> int:
        return self.cfg.max_positions - 1

    # --- the two factors -------------------------------------------------------------------
    def length_log_probs(self, memory, memory_mask) -> torch.Tensor:
        """log P(L | x) (B, max_positions) from the mean of the encoder states over real positions."""
        real = memory_mask[:, 0, 0, :, None].to(memory.dtype)   # (B, S, 1)
        pooled = (memory * real).sum(1) / real.sum(1).clamp(min=1)
        return F.log_softmax(self.length_head(pooled).float(), dim=-1)

    def denoise(self, z, memory_kv, memory_mask) -> torch.Tensor:
        """z (B, L): tokens, [MASK] and PAD (beyond a row's length) -> logits (B, L, V)."""
        return self.logits(self.denoise_hidden(z, memory_kv, memory_mask))

    def denoise_hidden(self, z, memory_kv, memory_mask) -> torch.Tensor:
        """The denoiser's final states (B, L, D), before the output projection."""
        masked = (z == self.mask_id)[..., None]
        emb = self.tgt_embed(z.masked_fill(masked[..., 0], PAD))
        emb = torch.where(masked, self.mask_embedding.to(emb.dtype), emb)
        x = self.drop(emb * math.sqrt(self.cfg.d_model) + self.positions[:z.shape[1]])
        self_mask = (z != PAD)[:, None, None, :]
        for i, layer in enumerate(self.decoder):
            k, v = memory_kv[i]
            x = layer(x, k, v, memory_mask, self_mask=self_mask)
        return self.dec_norm(x)

    def corrupt(self, y, t, uniforms):
        """z_t: each real token of y (B, L) masked where its uniform (B, L) is below its row's t (B,)."""
        masked = (uniforms < t[:, None].to(uniforms.dtype)) & (y != PAD)
        return y.masked_fill(masked, self.mask_id), masked

    # --- training --------------------------------------------------------------------------
    def forward(self, src, tgt_in, tgt_out=None) -> DiffusionTerms:
        """One NELBO sample per sentence (tgt_out = y EOS, padded; tgt_in is not read): k ~ U{1..L}
        masked tokens, stratified across the batch, weighted L/k; draws from torch's generator
        (seeded, saved on resume)."""
        y = tgt_out.masked_fill(tgt_out == EOS, PAD)
        lengths = (y != PAD).sum(1)
        B, L = y.shape
        k = stratified_counts(lengths, torch.rand(()))
        masked = mask_of_size(y != PAD, k, torch.rand(B, L, device=y.device))
        z = y.masked_fill(masked, self.mask_id)
        memory, memory_mask = self.encode(src)
        hidden = self.denoise_hidden(z, self.memory_kv(memory), memory_mask)
        weights = (lengths / k.clamp(min=1))[:, None].expand(B, L).float()
        # only masked positions are projected onto the vocabulary: the costliest product, on a t-th of them
        return DiffusionTerms(self.logits(hidden[masked]), y[masked], weights[masked],
                              self.length_log_probs(memory, memory_mask), lengths)

    # --- the bound -------------------------------------------------------------------------
    @torch.no_grad()
    def nelbo(self, src, y, *, samples: int, seed: int, ids, steps: int = 0) -> torch.Tensor:
        """Monte-Carlo NELBO terms (B, samples): sample s of sentence b is -log P(L | x) + (L/k) x the
        NLL of k uniformly chosen masked tokens, k = 1 + floor(L g_s) for antithetic (stratified)
        g_s = (u_b + s/K) mod 1; or with steps = T, (1/t) x the masked NLL of a token-by-token mask at
        t = i/T on the grid (the T-step bound). Draws are keyed by (seed, ids[b]): a sentence's
        estimate does not depend on its batch. y (B, L) without EOS, padded."""
        from mt.search import _uniform

        B, L = y.shape
        lengths = (y != PAD).sum(1)
        memory, memory_mask = self.encode(src)
        kv = self.memory_kv(memory)
        length_nll = -self.length_log_probs(memory, memory_mask).gather(1, lengths[:, None])  # (B, 1)
        ids = torch.as_tensor(ids, dtype=torch.long)
        u = _uniform(seed, ids, -1)
        out = torch.empty(B, samples)
        for s in range(samples):
            grid = (u + s / samples) % 1.0
            position_keys = ids[:, None] * (L + 1) + torch.arange(L)[None, :]
            uniforms = _uniform(seed, position_keys.flatten(), s).view(B, L).to(y.device)
            if steps:  # t = i/T, i uniform in 1..T
                t = (torch.ceil(grid * steps).clamp(min=1) / steps).float().to(y.device)
                z, masked = self.corrupt(y, t, uniforms)
                weight = 1 / t
            else:
                k = counts_at(lengths, grid)
                masked = mask_of_size(y != PAD, k, uniforms)
                z = y.masked_fill(masked, self.mask_id)
                weight = lengths / k.clamp(min=1)
            logp = normalize_denoiser(self.denoise(z, kv, memory_mask))
            tok_nll = -logp.gather(2, y.clamp(min=0)[..., None]).squeeze(2)
            tok_nll = torch.where(masked, tok_nll, torch.zeros_like(tok_nll))
            out[:, s] = (length_nll[:, 0] + tok_nll.sum(1) * weight).cpu()
        return out
