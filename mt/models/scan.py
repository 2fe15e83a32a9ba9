"""The gated linear recurrence shared by linear attention and the state-space layer, in two forms
that compute the same function:

    S_t = exp(g_t) * S_{t-1} + k_t v_t^T        (state S: K x V per head)
    o_t = q_t^T S_t

- `chunked_scan`: the training form. The sequence is cut into chunks of C positions; inside a chunk
  the outputs are one masked (C x C) matmul, and only the chunk states are carried from chunk to
  chunk (T / C steps of a small loop, never a loop over positions). This is the chunkwise form of
  gated linear attention (Yang et al. 2024) and Mamba-2's state-space duality (Dao & Gu 2024).
- `recurrent_step`: the decoding form, one position at a time on a state of fixed size.

g_t <= 0 is a log decay (0: no decay, plain linear attention). A position with k = 0 and g = 0 leaves
the state as it was: that is how padding is skipped.
Shapes: B batch, H heads, T positions, K key width, V value width, n chunks, C chunk length.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def chunked_scan(q, k, v, g, *, chunk: int = 64, state=None):
    """q, k (B, H, T, K), v (B, H, T, V), g (B, H, T) -> outputs (B, H, T, V), final state (B, H, K, V).

    `state` (B, H, K, V) is the state before position 0 (None: zeros)."""
    B, H, T, K = q.shape
    V = v.shape[-1]
    C = min(chunk, max(T, 1))
    pad = (-T) % C
    if pad:  # padded positions: k = 0, g = 0, so the state passes through them unchanged
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g = F.pad(g, (0, pad))
    n = (T + pad) // C
    q, k, v = (x.reshape(B, H, n, C, x.shape[-1]) for x in (q, k, v))
    G = g.reshape(B, H, n, C).float().cumsum(-1)                       # decay from the chunk start
    # inside a chunk: o_i = sum_{j <= i} (q_i . k_j) exp(G_i - G_j) v_j
    diff = G[..., :, None] - G[..., None, :]                            # (B, H, n, C, C)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    decay = diff.masked_fill(~causal, float("-inf")).exp().to(q.dtype)
    out = ((q @ k.transpose(-1, -2)) * decay) @ v                       # (B, H, n, C, V)
    # each chunk's own contribution to the state at its end: sum_j exp(G_C - G_j) k_j v_j^T
    to_end = (G[..., -1:] - G).exp().to(k.dtype)                        # (B, H, n, C)
    local = (k * to_end[..., None]).transpose(-1, -2) @ v               # (B, H, n, K, V)
    whole = G[..., -1].exp().to(q.dtype)                                # (B, H, n): decay over a chunk
    S = q.new_zeros(B, H, K, V) if state is None else state.to(q.dtype)
    starts = []
    for c in range(n):  # T / C steps: the state entering each chunk
        starts.append(S)
        S = whole[:, :, c, None, None] * S + local[:, :, c]
    starts = torch.stack(starts, 2)                                     # (B, H, n, K, V)
    out = out + (q * G.exp().to(q.dtype)[..., None]) @ starts           # what came before the chunk
    return out.reshape(B, H, n * C, V)[:, :, :T], S


def recurrent_step(q, k, v, g, state):
    """One position: q, k (B, H, K), v (B, H, V), g (B, H), state (B, H, K, V) -> output (B, H, V), new state."""
    state = g.exp()[..., None, None].to(state.dtype) * state + k[..., :, None] * v[..., None, :]
    return (q[..., None, :] @ state).squeeze(-2), state
