"""Rotary position embedding (Su et al. 2021): queries and keys are rotated by their position, so
attention scores depend on relative offsets only and positions past the training context stay
meaningful. Keys are rotated before they enter a cache, so a cached step at position p computes
what the full forward computes at p.

Shapes: B batch, H heads, T positions, Dh head width (even).
"""
from __future__ import annotations

import torch


def rotate(x: torch.Tensor, pos: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """x (B, H, T, Dh) rotated by positions pos: (T,) shared by every row, or (B, T) per row.

    Pairs (x_i, x_{i + Dh/2}) turn by pos * base^(-2i/Dh) (the GPT-NeoX / Llama layout)."""
    half = x.shape[-1] // 2
    inv = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = pos.to(torch.float32)[..., None] * inv                     # (T, half) or (B, T, half)
    if angles.dim() == 3:
        angles = angles[:, None]                                        # (B, 1, T, half)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], -1)
