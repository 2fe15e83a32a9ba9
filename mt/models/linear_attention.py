"""Causal linear attention (Katharopoulos et al. 2020), with an optional learned decay gate per head
(gated linear attention, Yang et al. 2024; RetNet's decay when the gate is a constant).

softmax(q k^T) is replaced by phi(q) phi(k)^T with phi = elu + 1 > 0, so attention is a running sum:

    S_t = a_t S_{t-1} + phi(k_t) v_t^T,   z_t = a_t z_{t-1} + phi(k_t),   y_t = phi(q_t) S_t / phi(q_t) z_t

with a_t = 1 (plain) or a_t = sigmoid(w . x_t + b_h) (gated). Training runs the chunked parallel form
(mt.models.scan.chunked_scan); decoding carries (S, z): a state of H x Dh x (Dh + 1) numbers per
layer, whatever the length. z rides along as an extra value column of ones.
Shapes: B batch, H heads, T positions, Dh head width.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mt.models.scan import chunked_scan, recurrent_step


class LinearAttention(nn.Module):
    """Drop-in for SelfAttention in a decoder-only layer (qkv, out; gated: also gate, decay_logit)."""

    def __init__(self, d: int, heads: int, *, gated: bool = False, chunk: int = 64):
        super().__init__()
        self.heads, self.chunk = heads, chunk
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.gate = nn.Linear(d, heads) if gated else None
        if gated:  # heads start with different memories: decay 1 - 2^-3 .. 1 - 2^-8 per step
            keep = 1 - 2.0 ** -torch.linspace(3, 8, heads)
            self.decay_logit = nn.Parameter(torch.log(keep / (1 - keep)))

    def new_state(self, batch: int, device, dtype) -> dict:
        Dh = self.qkv.in_features // self.heads
        return {"S": torch.zeros(batch, self.heads, Dh, Dh + 1, device=device, dtype=dtype)}

    def forward(self, x, *, mask=None, causal=True, cache=None, layer: int = 0, pos=None):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        q, k = F.elu(q) + 1, F.elu(k) + 1
        v = torch.cat([v, torch.ones_like(v[..., :1])], -1)                # last column: the normaliser z
        if self.gate is not None:
            g = F.logsigmoid(self.gate(x) + self.decay_logit).transpose(1, 2)  # (B, H, T) log decay
        else:
            g = x.new_zeros(B, self.heads, T)
        if cache is None:
            out, _ = chunked_scan(q, k, v, g, chunk=self.chunk)
        else:
            state = cache.layers[layer]
            if cache.real is not None:  # prefix: padded positions leave the state alone
                real = cache.real[:, None, :].to(k.dtype)
                out, state["S"] = chunked_scan(q, k * real[..., None], v, g * real, chunk=self.chunk, state=state["S"])
            else:
                o, state["S"] = recurrent_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], g[:, :, 0], state["S"])
                out = o[:, :, None]
        y = out[..., :-1] / (out[..., -1:] + 1e-6)
        return self.out(y.transpose(1, 2).reshape(B, T, D))
