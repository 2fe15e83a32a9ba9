"""Batch-1 greedy search and sampling through a decoder step compiled ahead of time (torch.export and
AOTInductor), for latency (`mt translate --compile`).

One sentence at a time, a decoder step is ~40 matrix-vector products: it should cost the time to read
the weights once (18 MB a step for recipes/multi30k.yaml's model, 1.3 ms at this CPU's bandwidth), but
eager PyTorch spends ~150 operator calls a step on it (~4.7 ms), and MKL's matrix-vector kernels read
at 7-10 GB/s. Here the whole step is one compiled graph with shapes that do not change from step to
step (self-attention over the preallocated cache under a position mask), and every matrix-vector
product is a multiply-and-sum that inductor turns into vectorised C++ loops streaming each weight
once. The weights are gathered into one flat tensor, passed in at each call. AOTInductor's runner
calls the compiled step from C++ without torch.compile's per-call Python machinery (guards, wrappers:
~0.2 ms a call on this CPU; 1.14-1.27x end to end, paired).

Compiling takes ~50 s the first time for a model shape on a machine; the compiled step is kept in
$MT_CACHE_DIR (default ~/.cache/mt, see cache_dir) and later processes load it in ~0.5 s. Sources and output lengths
of any size reuse it. Log-probs match the eager step up to float rounding (the sums run in another
order). Greedy search and sampling; beam search stays eager.
"""
from __future__ import annotations

import hashlib
import math
import os
import platform
import tempfile
import warnings
from pathlib import Path

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


def cache_dir() -> Path:
    """Where compiled decoder steps are kept: $MT_CACHE_DIR, else $XDG_CACHE_HOME/mt or ~/.cache/mt."""
    if os.environ.get("MT_CACHE_DIR"):
        return Path(os.environ["MT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mt"


class _StepModule(torch.nn.Module):
    """CompiledDecoder._step as a module, for torch.export."""

    def __init__(self, decoder: "CompiledDecoder"):
        super().__init__()
        self.decoder = decoder  # a plain object: no parameters of its own (the weights come in as `flat`)

    def forward(self, token, pos, self_k, self_v, memory_k, memory_v, flat):
        return self.decoder._step(token, pos, self_k, self_v, memory_k, memory_v, flat)


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
        self.runner = None  # compiled (or loaded from the disk cache) at the first search

    def step(self, *args) -> list[torch.Tensor]:
        """The compiled _step on these tensors (the self-attention cache is written in place)."""
        if self.runner is None:
            self.runner = self._load_or_compile()
        return self.runner.boxed_run(list(args))

    def _load_or_compile(self):
        """AOTInductor's runner for _step: shapes fixed but for the cache and source lengths (self.offsets
        stay constants: dynamic offsets made a 2.0 instead of 1.5 ms step), from the disk cache or built."""
        path = cache_dir() / f"decoder-step-{self._key()}.pt2"
        try:
            if path.exists():
                try:
                    return torch._inductor.aoti_load_package(str(path)).loader
                except Exception:  # a damaged or foreign file: build it again
                    path.unlink(missing_ok=True)
            L, H, Dh = self.layers, self.heads, self.width // self.heads
            example = (torch.tensor([BOS]), torch.tensor([0]), torch.zeros(L, H, 7, Dh), torch.zeros(L, H, 7, Dh),
                       torch.zeros(L, H, 5, Dh), torch.zeros(L, H, 5, Dh), self.flat)
            cache_len, source_len = torch.export.Dim("cache_len", min=2), torch.export.Dim("source_len", min=2)
            lengths = (None, None, {2: cache_len}, {2: cache_len}, {2: source_len}, {2: source_len}, None)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".pt2", dir=path.parent)  # written whole, then renamed into place
            os.close(fd)
            try:
                with warnings.catch_warnings():  # torch's own deprecation notices, not the user's business
                    warnings.simplefilter("ignore", FutureWarning)
                    warnings.simplefilter("ignore", DeprecationWarning)
                    program = torch.export.export(_StepModule(self), example, dynamic_shapes=lengths)
                    torch._inductor.aoti_compile_and_package(program, package_path=tmp)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            return torch._inductor.aoti_load_package(str(path)).loader
        except Exception as e:  # e.g. no working C++ compiler for inductor: say so in one line
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise MTError(f"--compile: compiling the decoder step failed ({type(e).__name__}: {first[:200]}); "
                          "run without --compile") from e

    def _key(self) -> str:
        """What the compiled step depends on: this file's code, the model's shapes, torch, the CPU."""
        parts = [Path(__file__).read_text(), repr(sorted(self.offsets.items())), repr((self.layers, self.heads,
                 self.width, self.eps)), torch.__version__, platform.machine(),
                 str(torch.backends.cpu.get_cpu_capability())]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]

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
        token, tokens, lps = torch.tensor([BOS]), [], []
        positions = torch.arange(max_len + 1)
        for t in range(max_len + 1):
            token, lp, eos_lp, lps_all = self.step(token, positions[t:t + 1], self_k, self_v, memory_k, memory_v,
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
        return _finish(tokens, lps, length_penalty)
