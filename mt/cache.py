"""The decoder's key/value cache for incremental decoding, and the attention mask over it.

A cache holds, per decoder layer, the self-attention keys/values of the positions decoded so far
(preallocated, filled column by column) and the cross-attention keys/values of the encoder output
(computed once). Search routines drive it through two calls: `expand(k)` (beam search branches each
row into k hypotheses) and `reorder(index)` (follow the beam, drop finished sentences).
"""
from __future__ import annotations

import torch


class KVCache:
    """Decoder state for incremental decoding.

    self_k/self_v: per layer (B*g, H, Tmax, Dh), filled up to `length`. memory_k/memory_v: per layer
    (B, H, S, Dh), the encoder output projected once; memory_mask: (B, 1, 1, S), True = attend.
    g = `group` decoder rows (beam hypotheses) share one source row: their cross-attention queries
    are folded into one (B, H, g, Dh) query block, so the source is never copied per hypothesis.
    """

    def __init__(self, self_k, self_v, memory_k, memory_v, memory_mask, group: int = 1):
        self.self_k, self.self_v = self_k, self_v
        self.memory_k, self.memory_v, self.memory_mask = memory_k, memory_v, memory_mask
        self.group = group
        self.length = 0
        self.key_mask = None  # (B, 1, 1, Tmax) False at padded prefix positions (decoder-only models)

    def expand(self, k: int) -> None:
        """Repeat every decoder row k times (row r becomes rows r*k .. r*k+k-1): beam search runs its
        first step once per sentence, then branches. The source rows stay shared (group grows k-fold)."""
        n = self.length
        for store in (self.self_k, self.self_v):
            for i, buf in enumerate(store):
                grown = buf.new_empty((buf.shape[0] * k,) + buf.shape[1:])
                grown[:, :, :n] = buf[:, :, :n].repeat_interleave(k, 0)
                store[i] = grown
        if self.key_mask is not None:
            self.key_mask = self.key_mask.repeat_interleave(k, 0)
        self.group *= k

    def reorder(self, index: torch.Tensor, memory_index: torch.Tensor | None = None) -> None:
        """Keep decoder rows `index`; `memory_index` keeps source rows, needed only when sentences are
        dropped (rows of sentence b: b*g .. b*g+g-1). In place, into the first rows, copying only the
        rows that move and only the filled columns: no new buffer per step."""
        n = self.length
        moved, source = _moves(index)
        for store in (self.self_k, self.self_v):
            for i, buf in enumerate(store):
                if n:  # the right side is gathered first, so overlapping rows are safe
                    buf[moved, :, :n] = buf[source, :, :n]
                store[i] = buf[:len(index)]
        if memory_index is not None:
            moved, source = _moves(memory_index)
            for store in (self.memory_k, self.memory_v):
                for i, buf in enumerate(store):
                    buf[moved] = buf[source]
                    store[i] = buf[:len(memory_index)]
            self.memory_mask[moved] = self.memory_mask[source]
            self.memory_mask = self.memory_mask[:len(memory_index)]


def _moves(index: torch.Tensor):
    """Where the rows kept by `index` go and where each comes from: only the rows whose content changes
    (greedy search drops a few rows a step), or all of them at once when most move (beam search)."""
    moved = (index != torch.arange(len(index), device=index.device)).nonzero().squeeze(1)
    if 2 * len(moved) > len(index):
        return slice(0, len(index)), index
    return moved, index[moved]


def cached_mask(cache: KVCache, start: int, T: int, device):
    """Attention mask for T new positions after `start` cached ones: causal, minus padded prefix
    keys (cache.key_mask, decoder-only prefixes); each position always sees itself, so a padded
    query never meets an all-masked row (which would give NaN)."""
    key_mask = cache.key_mask[:, :, :, :start + T] if cache.key_mask is not None else None
    if T == 1:
        return key_mask
    causal = torch.ones(T, start + T, dtype=torch.bool, device=device).tril(start)
    if key_mask is None:
        return causal
    diag = torch.zeros(T, start + T, dtype=torch.bool, device=device)
    diag[:, start:] = torch.eye(T, dtype=torch.bool, device=device)
    return (causal & key_mask) | diag
