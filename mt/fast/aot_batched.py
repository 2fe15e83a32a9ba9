"""Batched decoding through the model's own decoder step, exported (torch.export) with a dynamic
number of rows, source length and cache length and compiled ahead of time (AOTInductor): greedy
search, sampling and beam search of `--aot` (`mt.load(run, aot=True)`); one sentence alone takes the
batch-1 step of mt.fast.aot instead.

- The step is `Transformer.step` over `_Buffers`: the same layers, the self-attention keys/values in
  zero-filled buffers of the search's full length, written at a position given as a tensor and read
  under a position mask, so one compiled step serves every step of every batch.
- Between steps the buffers are an ordinary `KVCache` (`BatchedCache`): search expands and reorders
  them with the cache protocol, in place, as in eager decoding.
- One package per group size g (decoder rows per source row: 1 for greedy search and sampling and
  for beam search's first step, the beam size after it), rows = g x sentences; the cross-attention
  folds a group's queries as in eager decoding. Packages are cached on disk as mt.fast.aot's are.
- The encoder runs eagerly, once per batch, on the caller's model (its fast paths included).
Log-probs match the eager step's up to float rounding (sums run in another order).
"""
from __future__ import annotations

import copy
import hashlib
import platform
from pathlib import Path

import torch

from mt.fast.aot import AotDecoder, StaticCache, _Step as _OneStep, _VERSION
from mt.models.cache import KVCache

_BATCHED_VERSION = hashlib.sha256("\n".join([_VERSION, Path(__file__).read_text(), platform.machine()]).encode()
                                  ).hexdigest()[:10]


class _Buffers(StaticCache):
    """The layers' view of the cache inside the compiled step (the interface of KVCache they use):
    the new keys/values go to buffer rows 0..N-1 at position `pos`; the keys of row r at position t
    are read from buffer row rows_at[t, r]."""

    def __init__(self, self_k, self_v, rows_at, memory_k, memory_v, memory_mask, pos):
        self.self_k, self.self_v, self.rows_at, self.pos = self_k, self_v, rows_at, pos
        self.memory_k, self.memory_v, self.memory_mask = memory_k, memory_v, memory_mask

    def attend_to(self, layer: int, k, v):
        rows = torch.arange(k.shape[0], device=k.device)
        at = (self.pos.expand(k.shape[0]), rows)
        self.self_k[layer].index_put_(at, k[:, :, 0])
        self.self_v[layer].index_put_(at, v[:, :, 0])
        where = (torch.arange(self.rows_at.shape[0], device=k.device)[:, None], self.rows_at)  # (t, N)
        return (self.self_k[layer][where].permute(1, 2, 0, 3), self.self_v[layer][where].permute(1, 2, 0, 3),
                None)  # every position given is filled: no mask


class _Step(_OneStep):
    def forward(self, tokens, pos, rows_at, memory_mask, self_k, self_v, memory_k, memory_v):
        return self.model.step(tokens, _Buffers(self_k, self_v, rows_at, memory_k, memory_v, memory_mask, pos))


def _attention_as_sums(query, key, value, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None):
    """The flash-attention op as multiplies and sums: inductor fuses each with the gather of the keys
    and values (rows_at) into one loop that reads them once; a batched matmul would first copy the
    gathered keys, as a reorder would. Output laid out as the op's own, (B, L, H, E) in memory."""
    scores = (query[:, :, :, None, :] * key[:, :, None, :, :]).sum(-1) * (scale or query.shape[-1] ** -0.5)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    weights = scores.softmax(-1)
    out = (weights[..., None] * value[:, :, None, :, :]).sum(-2)  # (B, H, L, E)
    return out.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3), scores.logsumexp(-1)


class BatchedCache(KVCache):
    """Decoding state whose keys and values never move. Per layer, buffers (Tmax, R, H, Dh): the step at
    position t writes decoder row r's key at [t, r]; rows_at (Tmax, N) says, for each position and
    decoder row, which buffer row holds its key. Search's expand and reorder (beam search follows
    its hypotheses, finished sentences leave) rewrite that small table of row numbers, not the keys;
    the source side (memory_*) moves as in KVCache."""

    def __init__(self, self_k, self_v, memory_k, memory_v, memory_mask):
        super().__init__(self_k, self_v, memory_k, memory_v, memory_mask)
        T, R = self_k[0].shape[:2]
        self.rows_at = torch.zeros(T, R, dtype=torch.long)
        self.pos = torch.zeros(1, dtype=torch.long)

    def advance(self, n: int) -> None:
        super().advance(n)
        self.pos.fill_(self.length)

    def expand(self, k: int) -> None:
        n = self.length
        for store in (self.self_k, self.self_v):
            for i, buf in enumerate(store):
                grown = buf.new_zeros((buf.shape[0], buf.shape[1] * k) + buf.shape[2:])
                grown[:n, :buf.shape[1]] = buf[:n]
                store[i] = grown
        self.rows_at = self.rows_at.repeat_interleave(k, 1)
        self.group *= k

    def reorder(self, new_order: torch.Tensor) -> None:
        self.rows_at = self.rows_at[:, new_order]
        if self.memory_mask is not None:
            self._reorder_memory(new_order)


class BatchedAotDecoder(AotDecoder):
    """The model interface search uses (`new_cache`, `step`) for batches, through compiled code."""

    version = _BATCHED_VERSION

    def __init__(self, model, *, like: AotDecoder | None = None):
        super().__init__(model, like=like)
        self.encoder_model = model  # eager encoding on the caller's model (with mt.fast's paths, once enabled)

    @torch.no_grad()
    def new_cache(self, src, max_len: int) -> BatchedCache:
        """Encode src (B, S) eagerly; zeroed key/value buffers for max_len positions per row."""
        memory, mask = self.encoder_model.encode(src)
        kv = self.encoder_model.memory_kv(memory)
        memory_k, memory_v = [k.contiguous() for k, _ in kv], [v.contiguous() for _, v in kv]
        if src.shape[1] < 2:  # the step is compiled for 2+ source positions: add a masked one
            memory_k = [torch.cat([k, torch.zeros_like(k)], 2) for k in memory_k]
            memory_v = [torch.cat([v, torch.zeros_like(v)], 2) for v in memory_v]
            mask = torch.cat([mask, torch.zeros_like(mask)], 3)
        shape = (max(max_len, 1), src.shape[0], self.heads, self.dh)
        self_k = [torch.zeros(shape) for _ in range(self.layers)]
        self_v = [torch.zeros(shape) for _ in range(self.layers)]
        return BatchedCache(self_k, self_v, memory_k, memory_v, mask.contiguous())

    @torch.no_grad()
    def step(self, tokens, cache: BatchedCache):
        """tokens (B*g, 1) -> log-probs of the next token (B*g, V); writes the cache in place."""
        n, t = tokens.shape[0], cache.length
        cache.rows_at[t, :n] = torch.arange(n)  # this step's keys go to buffer rows 0..n-1
        lp = self._runner(f"batched-step-g{cache.group}").boxed_run(
            [tokens.contiguous(), cache.pos, cache.rows_at[:t + 1], cache.memory_mask,
             *cache.self_k, *cache.self_v, *cache.memory_k, *cache.memory_v])[0]
        cache.advance(1)
        return lp

    def _example(self, kind: str):
        if not kind.startswith("batched-step-g"):
            return super()._example(kind)
        g, L, H, Dh = int(kind.rsplit("g", 1)[1]), self.layers, self.heads, self.dh
        batch = torch.export.Dim("batch", min=1, max=2**20)
        rows = batch * g if g > 1 else batch
        cache_len = torch.export.Dim("cache_len", min=2, max=2**20)
        buffer_rows = torch.export.Dim("buffer_rows", min=1, max=2**20)
        filled = torch.export.Dim("filled", min=1, max=2**20)
        source_len = torch.export.Dim("source_len", min=2, max=2**20)
        B, S, T, R = 3, 6, 7, 3 * g + 2  # sizes other than 0 and 1, which export would take for constants
        example = (torch.full((B * g, 1), 4), torch.tensor([2]), torch.zeros(3, B * g, dtype=torch.long),
                   torch.ones(B, 1, 1, S, dtype=torch.bool),
                   [torch.zeros(T, R, H, Dh) for _ in range(L)], [torch.zeros(T, R, H, Dh) for _ in range(L)],
                   [torch.zeros(B, H, S, Dh) for _ in range(L)], [torch.zeros(B, H, S, Dh) for _ in range(L)])
        own, memory = {0: cache_len, 1: buffer_rows}, {0: batch, 2: source_len}
        lengths = ({0: rows}, None, {0: filled, 1: rows}, {0: batch, 3: source_len}, [own] * L, [own] * L,
                   [memory] * L, [memory] * L)
        return _Step(copy.deepcopy(self.model)), example, lengths, {}

    def _decompositions(self, kind: str) -> dict:
        if not kind.startswith("batched-step-g"):
            return super()._decompositions(kind)
        return {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default: _attention_as_sums}
