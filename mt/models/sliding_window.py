"""Sliding-window causal attention: each position attends to itself and the W - 1 positions before it
(Beltagy et al. 2020; Mistral's rolling cache). Cost O(T * W) instead of O(T^2) when training, and a
decoding state of W key/value slots, however long the sequence grows.

- training: queries in blocks of W attend to their own block and the one before it (2W keys, a
  banded mask): the same function as the full T x T band mask, without its T^2 cost. W >= T is
  plain causal attention, bit for bit.
- decoding: a ring of W slots per layer; position p lives in slot p mod W, so the slots always hold
  the last W positions. Keys are rotated (rotary positions) before they enter the ring.
Shapes: B batch, H heads, T positions, W window, Dh head width, n blocks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mt.models.layers import SelfAttention, attention


def band_mask(pos_q, pos_k, window: int):
    """True where a query at pos_q may see a key at pos_k: pos_q - W < pos_k <= pos_q."""
    diff = pos_q[..., :, None] - pos_k[..., None, :]
    return (diff >= 0) & (diff < window)


def blocked_attention(q, k, v, window: int, dropout: float = 0.0):
    """Causal attention limited to the last `window` positions, by blocks of W queries (T > W)."""
    B, H, T, Dh = q.shape
    W = window
    pad = (-T) % W
    if pad:  # padded queries sit after every real one: causally invisible, cut afterwards
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    n = (T + pad) // W
    q, k, v = (x.view(B, H, n, W, Dh) for x in (q, k, v))
    prev = lambda x: torch.cat([torch.zeros_like(x[:, :, :1]), x[:, :, :-1]], 2)
    keys, values = torch.cat([prev(k), k], 3), torch.cat([prev(v), v], 3)  # (B, H, n, 2W, Dh)
    a = torch.arange(W, device=q.device)
    b = torch.arange(2 * W, device=q.device)
    mask = (b[None, :] > a[:, None]) & (b[None, :] <= a[:, None] + W)    # key b of query a: (a, W + a]
    mask = mask.expand(n, W, 2 * W).clone()
    mask[0, :, :W] = False                                                # block 0 has no block before it
    y = attention(q, keys, values, attn_mask=mask, dropout_p=dropout)
    return y.reshape(B, H, n * W, Dh)[:, :, :T]


class SlidingWindowAttention(SelfAttention):
    """SelfAttention (its parameters, projection and rotary positions) limited to a window, always causal."""

    def __init__(self, d: int, heads: int, dropout: float, window: int, rotary: bool = False):
        super().__init__(d, heads, dropout, rotary)
        self.window = window

    def new_state(self, batch: int, device, dtype) -> dict:
        Dh = self.qkv.in_features // self.heads
        shape = (batch, self.heads, self.window, Dh)
        return {"k": torch.zeros(shape, device=device, dtype=dtype), "v": torch.zeros(shape, device=device, dtype=dtype)}

    def forward(self, x, *, mask=None, causal=True, cache=None, layer: int = 0, pos=None):
        B, T, D = x.shape
        q, k, v = self.project(x, pos)
        p = self.dropout if self.training else 0.0
        if cache is None:
            if self.window >= T:
                y = attention(q, k, v, dropout_p=p, is_causal=True)
            else:
                y = blocked_attention(q, k, v, self.window, p)
        elif cache.real is not None:
            y = self._prefill(q, k, v, pos, cache.real, cache.layers[layer])
        else:
            y = self._step(q, k, v, cache.pos, cache.layers[layer])
        return self.out(y.transpose(1, 2).reshape(B, T, D))

    def _prefill(self, q, k, v, pos, real, state):
        """A right-padded prefix (B, S): attend within the band over real keys, then leave each row's
        last W real positions in their ring slots."""
        B, H, S, Dh = q.shape
        pos = pos.expand(B, S)
        mask = band_mask(pos, pos, self.window) & real[:, None, :]
        mask = (mask | torch.eye(S, dtype=torch.bool, device=q.device))[:, None]  # a pad sees itself: no NaN
        y = attention(q, k, v, attn_mask=mask)
        n = real.sum(1)                                                     # (B,) real positions
        s = torch.arange(self.window, device=q.device)
        last = s + self.window * torch.div(n[:, None] - 1 - s, self.window, rounding_mode="floor")
        written = last >= 0                                                  # (B, W): slot s holds position last
        index = last.clamp(min=0, max=S - 1)[:, None, :, None].expand(B, H, self.window, Dh)
        for name, t in (("k", k), ("v", v)):
            state[name] = torch.where(written[:, None, :, None], t.gather(2, index), state[name])
        return y

    def _step(self, q, k, v, pos, state):
        """One new position per row at pos (B,): write slot pos mod W, attend to the filled slots."""
        B = q.shape[0]
        rows = torch.arange(B, device=q.device)
        slot = pos % self.window
        state["k"][rows, :, slot] = k[:, :, 0]
        state["v"][rows, :, slot] = v[:, :, 0]
        filled = torch.arange(self.window, device=q.device)[None, :] <= pos[:, None]  # all once pos >= W - 1
        return attention(q, state["k"], state["v"], attn_mask=filled[:, None, None, :])
