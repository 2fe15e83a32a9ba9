"""A selective state-space layer in the Mamba-2 form (Gu & Dao 2023; Dao & Gu 2024): an input-dependent
linear recurrence per head,

    h_t = exp(dt_t * A_h) h_{t-1} + dt_t B_t x_t^T,   y_t = C_t^T h_t + D_h x_t

with h_t of N x P numbers per head (N state width, P head width), B_t and C_t (N,) read from the input
and shared by the heads, dt_t > 0 a learned step size per head and A_h < 0. x first passes a short
causal depthwise convolution, and the output is gated by silu(z) (z another projection of the input).

Training runs the recurrence as the chunked parallel scan (mt.models.scan.chunked_scan: the
state-space duality, q = C, k = dt B, v = x, log decay dt A); decoding runs it one step at a time on
a fixed-size state (h, and the convolution's last K - 1 inputs). No position encoding is needed:
the recurrence is ordered. Shapes: B batch, T positions, H heads, P head width, N state width.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mt.models.scan import chunked_scan, recurrent_step

CONV = 4  # causal convolution width


class StateSpaceMixer(nn.Module):
    """Drop-in for SelfAttention in a decoder-only layer; about as many parameters (~4 d^2 when N = d/2)."""

    def __init__(self, d: int, heads: int, *, state_size: int = 0, chunk: int = 64):
        super().__init__()
        self.d, self.heads, self.chunk = d, heads, chunk
        self.N = state_size or max(d // 2, 1)
        self.conv_width = d + 2 * self.N                                    # x, B, C pass the convolution
        self.in_proj = nn.Linear(d, d + self.conv_width + heads)          # z, (x, B, C), dt
        self.conv = nn.Conv1d(self.conv_width, self.conv_width, CONV, groups=self.conv_width)
        # step sizes log-uniform in [1e-3, 1e-1] at init (stored through softplus's inverse)
        dt = torch.exp(torch.rand(heads) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        self.dt_shift = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.empty(heads).uniform_(1, 16)))
        self.skip = nn.Parameter(torch.ones(heads))                         # D
        self.norm = nn.RMSNorm(d, eps=1e-5)
        self.out = nn.Linear(d, d)

    def new_state(self, batch: int, device, dtype) -> dict:
        P = self.d // self.heads
        return {"h": torch.zeros(batch, self.heads, self.N, P, device=device, dtype=dtype),
                "conv": torch.zeros(batch, CONV - 1, self.conv_width, device=device, dtype=dtype)}

    def forward(self, x, *, mask=None, causal=True, cache=None, layer: int = 0, pos=None):
        B, T, _ = x.shape
        H, P, N = self.heads, self.d // self.heads, self.N
        z, xbc, dt = self.in_proj(x).split([self.d, self.conv_width, H], -1)
        state = None if cache is None else cache.layers[layer]
        real = None if cache is None else cache.real
        if state is not None and real is None:                              # one step: the kept inputs + this one
            window = torch.cat([state["conv"], xbc], 1)                     # (B, K, C)
            state["conv"] = window[:, 1:]
            xbc = (window * self.conv.weight[:, 0].T).sum(1, keepdim=True) + self.conv.bias
        else:
            padded = F.pad(xbc.transpose(1, 2), (CONV - 1, 0))             # (B, C, K - 1 + T)
            if state is not None:  # the last K - 1 real inputs of each right-padded row
                last = real.sum(1)[:, None] + torch.arange(CONV - 1, device=x.device)  # padded coordinates
                state["conv"] = padded.gather(2, last[:, None, :].expand(B, self.conv_width, CONV - 1)).transpose(1, 2)
            xbc = F.conv1d(padded, self.conv.weight, self.conv.bias, groups=self.conv_width).transpose(1, 2)
        xbc = F.silu(xbc)
        xs, Bt, Ct = xbc.split([self.d, N, N], -1)
        dt = F.softplus(dt + self.dt_shift)                                 # (B, T, H)
        g = (dt * -torch.exp(self.A_log)).transpose(1, 2)                   # (B, H, T) log decay
        v = xs.view(B, T, H, P).transpose(1, 2)                             # (B, H, T, P)
        q = Ct[:, None].expand(B, H, T, N)
        k = Bt[:, None] * dt.transpose(1, 2)[..., None]                     # (B, H, T, N)
        if state is None:
            y, _ = chunked_scan(q, k, v, g, chunk=self.chunk)
        elif real is not None:  # prefix: padded positions leave the state alone
            r = real[:, None, :].to(k.dtype)
            y, state["h"] = chunked_scan(q, k * r[..., None], v, g * r, chunk=self.chunk, state=state["h"])
        else:
            o, state["h"] = recurrent_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], g[:, :, 0], state["h"])
            y = o[:, :, None]
        y = y + self.skip[:, None, None] * v
        y = y.transpose(1, 2).reshape(B, T, self.d)
        return self.out(self.norm(y * F.silu(z)))
