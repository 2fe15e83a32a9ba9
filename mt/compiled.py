"""Batch-1 greedy search and sampling through a decoder step compiled with torch.compile, for latency
(`mt translate --compile`).

One sentence at a time, a decoder step is ~40 matrix-vector products: it should cost the time to read
the weights once (18 MB a step for recipes/multi30k.yaml's model, 1.3 ms at this CPU's bandwidth), but
eager PyTorch spends ~150 operator calls a step on it (~4.7 ms), and MKL's matrix-vector kernels read
at 7-10 GB/s. Here the whole step is one compiled graph with shapes that do not change from step to
step (self-attention over the preallocated cache under a position mask), and every matrix-vector
product is a multiply-and-sum that inductor turns into vectorised C++ loops streaming each weight
once. The weights are gathered into one flat tensor, so each call checks one tensor, not sixty.

Compiling takes ~40 s once per process (~8 s when inductor's on-disk cache has it); sources and
output lengths of any size reuse the same compiled step. Log-probs match the eager step up to float
rounding (the sums run in another order). Greedy search and sampling; beam search stays eager.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from mt.errors import MTError
from mt.search import Hypothesis, _finish, sample_tokens
from mt.tokenizer import BOS, EOS, PAD


def _matvec(x, weight, bias=None):
    """x (..., in) . weight (out, in)^T, as a reduction inductor fuses and vectorises (batch 1 only:
    it reads the weight once per row of x)."""
    y = (x[..., None, :] * weight).sum(-1)
    return y if bias is None else y + bias


def _attend(q, k, v, mask=None):
    """Attention for one query row per head: q (H, 1, Dh), k, v (H, T, Dh)."""
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


class CompiledDecoder:
    """Greedy search or sampling, one sentence at a time, through a compiled decoder step (float32, CPU).

    Built from a Transformer in eval mode; reads its weights once (rebuild it after changing them).
    """

    def __init__(self, model):
        from mt.model import Transformer

        quantized = any(type(m).__module__.startswith("torch.ao") for m in model.modules())
        if type(model) is not Transformer or quantized:
            raise MTError("--compile supports one float32 encoder-decoder model (no ensemble, no --quantize)")
        if next(model.parameters()).device.type != "cpu":
            raise MTError("--compile is for CPU decoding (batch-1 latency)")
        self.model = model
        cfg = model.cfg
        self.layers, self.heads, self.width = len(model.decoder), cfg.heads, cfg.d_model
        self.eps = model.dec_norm.eps
        params = dict(model.named_parameters())
        names = [n for n in params if n.startswith("decoder.") and ".cross_attn.kv." not in n]
        names += ["dec_norm.weight", "dec_norm.bias"]
        tensors = [params[n] for n in names]
        names += ["embed", "positions"]
        tensors += [model.tgt_embed.weight, model.positions]
        if model.output is not None:  # untied output layer
            names.append("output")
            tensors.append(model.output.weight)
        self.offsets, start = {}, 0
        for name, t in zip(names, tensors):
            self.offsets[name] = (start, tuple(t.shape))
            start += t.numel()
        self.offsets.setdefault("output", self.offsets["embed"])  # tied embeddings: one copy
        with torch.no_grad():
            self.flat = torch.cat([t.detach().float().reshape(-1) for t in tensors])
        # shapes static but for the two lengths marked dynamic at each call (self.offsets must stay
        # constants: dynamic=True made them runtime arguments, a 2.0 instead of 1.5 ms step);
        # a C++ wrapper calls the kernels with less per-call cost than the Python one (7%)
        self.compiled_step = torch.compile(self._step, fullgraph=True, options={"cpp_wrapper": True})
        self.ready = False

    def step(self, *args):
        if self.ready:
            return self.compiled_step(*args)
        try:
            out = self.compiled_step(*args)
        except Exception as e:  # e.g. no working C++ compiler for inductor: say so in one line
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise MTError(f"--compile: torch.compile failed ({type(e).__name__}: {first[:200]}); "
                          "run without --compile") from e
        self.ready = True
        return out

    def _w(self, flat, name):
        start, shape = self.offsets[name]
        return flat[start:start + math.prod(shape)].view(shape)

    def _norm(self, x, flat, name):
        return F.layer_norm(x, (self.width,), self._w(flat, name + ".weight"), self._w(flat, name + ".bias"), self.eps)

    def _linear(self, x, flat, name):
        return _matvec(x, self._w(flat, name + ".weight"), self._w(flat, name + ".bias"))

    def _step(self, token, pos, self_k, self_v, memory_k, memory_v, flat):
        """token, pos (1,); self_k/v (L, H, T, Dh) written at pos; memory_k/v (L, H, S, Dh).
        Returns the best next token, its log-prob, the log-prob of EOS (each (1,)) and all log-probs (1, V)."""
        H, D = self.heads, self.width
        Dh = D // H
        x = self._w(flat, "embed")[token] * math.sqrt(D) + self._w(flat, "positions")[pos]  # (1, D)
        seen = torch.arange(self_k.shape[2], device=pos.device) <= pos  # positions decoded so far
        for i in range(self.layers):
            p = f"decoder.{i}."
            q, k, v = self._linear(self._norm(x, flat, p + "norm1"), flat, p + "self_attn.qkv").view(3, H, 1, Dh)
            self_k[i].index_copy_(1, pos, k)
            self_v[i].index_copy_(1, pos, v)
            y = _attend(q, self_k[i], self_v[i], seen)
            x = x + self._linear(y.reshape(1, D), flat, p + "self_attn.out")
            q = self._linear(self._norm(x, flat, p + "norm2"), flat, p + "cross_attn.q").view(H, 1, Dh)
            y = _attend(q, memory_k[i], memory_v[i])
            x = x + self._linear(y.reshape(1, D), flat, p + "cross_attn.out")
            h = torch.relu(self._linear(self._norm(x, flat, p + "norm3"), flat, p + "ffn.up"))
            x = x + self._linear(h, flat, p + "ffn.down")
        logits = _matvec(self._norm(x, flat, "dec_norm"), self._w(flat, "output"))
        logits[:, PAD] = float("-inf")
        logits[:, BOS] = float("-inf")
        lp = F.log_softmax(logits, -1)
        best, token = lp.max(-1)
        return token, best, lp[:, EOS], lp

    @torch.no_grad()
    def search(self, src: torch.Tensor, max_len: int, length_penalty: float = 0.0,
               sampling: dict | None = None) -> Hypothesis:
        """src (1, S) ids ending in EOS; at most max_len tokens before EOS, as mt.search.generate.
        sampling: draw each token instead of taking the best, with mt.search.sample_tokens's keyword
        arguments (ids (1,), seed, temperature, top_k, top_p): generate(sample=True)'s draws."""
        model = self.model
        memory, _ = model.encode(src)
        kv = [layer.cross_attn.project_memory(memory) for layer in model.decoder]
        memory_k = torch.stack([k[0] for k, _ in kv])
        memory_v = torch.stack([v[0] for _, v in kv])
        if memory_k.shape[2] == 1:  # a length-1 source would compile a second, specialised step:
            memory_k, memory_v = memory_k.repeat(1, 1, 2, 1), memory_v.repeat(1, 1, 2, 1)  # same attention
        shape = (self.layers, self.heads, max(max_len + 1, 2), self.width // self.heads)
        # zeros, not empty: masked positions get weight 0, and 0 x NaN from garbage would be NaN
        self_k, self_v = torch.zeros(shape), torch.zeros(shape)
        for t in (self_k, self_v, memory_k, memory_v):  # one compiled step for every length
            torch._dynamo.mark_dynamic(t, 2)
        token, tokens, lps = torch.tensor([BOS]), [], []
        with contextlib.ExitStack() as later_steps:
            for t in range(max_len + 1):
                token, lp, eos_lp, lps_all = self.step(token, torch.tensor([t]), self_k, self_v, memory_k, memory_v,
                                                       self.flat)
                if sampling is not None:
                    token = sample_tokens(lps_all, step=t, **sampling)
                    lp = lps_all[0, token]
                nxt = int(token)
                if nxt == EOS or t == max_len:  # the longest output allowed ends with EOS, as generate does
                    lps.append(float(lp if nxt == EOS else eos_lp))
                    break
                tokens.append(nxt)
                lps.append(float(lp))
                if t == 0:  # the next steps pass tensors of the shapes just checked: skip re-checking (~0.1 ms)
                    later_steps.enter_context(torch.compiler.set_stance("default", skip_guard_eval_unsafe=True))
        return _finish(tokens, lps, length_penalty)
