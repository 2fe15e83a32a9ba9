"""The cache protocol every model's decoding state follows, and the transformer's key/value cache.

Search routines (mt.search) drive a cache through three calls only:
- `expand(k)`: repeat every decoder row k times (row r becomes rows r*k .. r*k+k-1); beam search runs
  its first step once per sentence, then branches;
- `reorder(new_order)`: keep decoder rows `new_order` (follow the beam, drop finished sentences);
  the cache itself works out which source rows follow;
- `advance(n)`: the cache moves its own length on by n positions; the model calls it after a step.
Models create a cache in `new_cache(src, max_len)` and read or write it in `step(tokens, cache)`.
Shapes: B batch, g decoder rows per source row, H heads, T positions, S source length, Dh head width.
"""
from __future__ import annotations

from typing import Protocol

import torch


class DecodingCache(Protocol):
    """What search needs of a model's decoding state."""

    def expand(self, k: int) -> None: ...

    def reorder(self, new_order: torch.Tensor) -> None: ...

    def advance(self, n: int) -> None: ...


class KVCache:
    """Decoder state of a transformer: self-attention keys/values of the positions decoded so far
    (preallocated, filled column by column), and the encoder output projected once for
    cross-attention.

    self_k/self_v: per layer (B*g, H, Tmax, Dh), filled up to `length`. memory_k/memory_v: per layer
    (B, H, S, Dh); memory_mask: (B, 1, 1, S), True = attend. The g = `group` decoder rows (beam
    hypotheses) of a source row share it: their cross-attention queries are folded into one query
    block, so the source is never copied per hypothesis.
    key_mask: (B*g, 1, 1, Tmax), False at padded prefix positions (decoder-only models' prompts).
    """

    def __init__(self, self_k, self_v, memory_k=(), memory_v=(), memory_mask=None, group: int = 1):
        self.self_k, self.self_v = list(self_k), list(self_v)
        self.memory_k, self.memory_v, self.memory_mask = list(memory_k), list(memory_v), memory_mask
        self.group = group
        self.length = 0
        self.key_mask = None

    # --- what layers call -------------------------------------------------------------------
    def attend_to(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write the keys/values (B*g, H, T, Dh) of T new positions after `length`; return the keys,
        values of every position so far and the attention mask for the new queries (None: all)."""
        start, T = self.length, k.shape[2]
        self.self_k[layer][:, :, start:start + T] = k
        self.self_v[layer][:, :, start:start + T] = v
        return (self.self_k[layer][:, :, :start + T], self.self_v[layer][:, :, :start + T],
                cached_mask(self.key_mask, start, T, k.device))

    def positions(self, T: int) -> slice:
        """Rows of the position table for the next T positions."""
        return slice(self.length, self.length + T)

    # --- the protocol -----------------------------------------------------------------------
    def advance(self, n: int) -> None:
        self.length += n

    def expand(self, k: int) -> None:
        n = self.length
        for store in (self.self_k, self.self_v):
            for i, buf in enumerate(store):
                grown = buf.new_empty((buf.shape[0] * k,) + buf.shape[1:])
                grown[:, :, :n] = buf[:, :, :n].repeat_interleave(k, 0)
                store[i] = grown
        if self.key_mask is not None:
            self.key_mask = self.key_mask.repeat_interleave(k, 0)
        self.group *= k

    def reorder(self, new_order: torch.Tensor) -> None:
        """In place, into the first rows, copying only the rows that move and only the filled
        columns: no new buffer per step. Source rows follow when sentences are dropped or moved
        (decoder rows b*g .. b*g+g-1 belong to source row b)."""
        n = self.length
        moved, source = _moves(new_order)
        for store in (self.self_k, self.self_v):
            for i, buf in enumerate(store):
                if n:  # the right side is gathered first, so overlapping rows are safe
                    buf[moved, :, :n] = buf[source, :, :n]
                store[i] = buf[:len(new_order)]
        if self.key_mask is not None:
            self.key_mask = self.key_mask[new_order]
        if self.memory_mask is not None:
            self._reorder_memory(new_order)

    def _reorder_memory(self, new_order: torch.Tensor) -> None:
        g = self.group
        sentences = new_order[::g] // g  # the source row of each kept block of g rows
        if len(sentences) == self.memory_mask.shape[0] and bool(
                (sentences == torch.arange(len(sentences), device=sentences.device)).all()):
            return  # the same sentences in the same order: beams moved within their sentence
        moved, source = _moves(sentences)
        for store in (self.memory_k, self.memory_v):
            for i, buf in enumerate(store):
                buf[moved] = buf[source]
                store[i] = buf[:len(sentences)]
        self.memory_mask[moved] = self.memory_mask[source]
        self.memory_mask = self.memory_mask[:len(sentences)]


def _moves(index: torch.Tensor):
    """Where the rows kept by `index` go and where each comes from: only the rows whose content changes
    (greedy search drops a few rows a step), or all of them at once when most move (beam search)."""
    moved = (index != torch.arange(len(index), device=index.device)).nonzero().squeeze(1)
    if 2 * len(moved) > len(index):
        return slice(0, len(index)), index
    return moved, index[moved]


def cached_mask(key_mask, start: int, T: int, device):
    """Attention mask for T new positions after `start` cached ones: causal, minus padded prefix
    keys (key_mask (B, 1, 1, Tmax), decoder-only prompts); each position always sees itself, so a
    padded query never meets an all-masked row (which would give NaN)."""
    key_mask = key_mask[:, :, :, :start + T] if key_mask is not None else None
    if T == 1:
        return key_mask
    causal = torch.ones(T, start + T, dtype=torch.bool, device=device).tril(start)
    if key_mask is None:
        return causal
    diag = torch.zeros(T, start + T, dtype=torch.bool, device=device)
    diag[:, start:] = torch.eye(T, dtype=torch.bool, device=device)
    return (causal & key_mask) | diag


class StateCache:
    """Decoding state of a decoder-only model whose layers keep a fixed-size state instead of every
    key and value: a sliding window's W-slot ring, linear attention's (S, z), a state-space layer's h
    and convolution inputs. layers: one dict of tensors per layer, batch first.

    pos (B,): each row's next position (its real tokens so far); pending (B,) or None: the prompt's
    last token, fed first. While the prefix is read, `real` (B, S) marks its non-pad tokens (layers
    skip the pads); it is None afterwards, when the model feeds one token a step.
    """

    def __init__(self, layers: list[dict], pos: torch.Tensor, pending=None):
        self.layers, self.pos, self.pending = layers, pos, pending
        self.real = None

    def positions(self, T: int) -> torch.Tensor:
        return self.pos[:, None]  # (B, 1): one token a step

    def nbytes(self) -> int:
        """Memory the state holds (it does not grow with the generated length)."""
        return sum(t.numel() * t.element_size() for state in self.layers for t in state.values())

    def advance(self, n: int) -> None:
        self.pos = self.pos + n

    def _map(self, f) -> None:
        self.layers = [{name: f(t) for name, t in state.items()} for state in self.layers]
        self.pos = f(self.pos)
        if self.pending is not None:
            self.pending = f(self.pending)

    def expand(self, k: int) -> None:
        self._map(lambda t: t.repeat_interleave(k, 0))

    def reorder(self, new_order: torch.Tensor) -> None:
        self._map(lambda t: t[new_order])
