"""Batch-1 greedy search and sampling through an encoder and a decoder step compiled ahead of time
(torch.export and AOTInductor), for latency (`mt translate --compile`).

One sentence at a time, a decoder step is ~40 matrix-vector products: it should cost the time to read
the weights once (18 MB a step for recipes/multi30k.yaml's model, 1.0-1.3 ms at this CPU's bandwidth),
but eager PyTorch spends ~150 operator calls a step on it (~4.7 ms), and MKL's matrix-vector kernels
read at 7-10 GB/s. Here the whole step is one compiled graph with shapes that do not change from step
to step (self-attention over the preallocated cache under a position mask), and every matrix-vector
product is a multiply-and-sum that inductor turns into vectorised C++ loops streaming each weight
once. The encoder (and the decoder's cross-attention keys and values) is a second compiled graph: its
products have a row per source token, so they stay matrix products; fusing the rest made it 1.55x
faster. The weights are gathered into one flat tensor, passed in at each call. AOTInductor's runner
calls the compiled code from C++ without torch.compile's per-call Python machinery (guards, wrappers:
~0.2 ms a call on this CPU; 1.14-1.27x end to end, paired).

Compiling takes ~80 s the first time for a model shape on a machine; the compiled code is kept in
$MT_CACHE_DIR (default ~/.cache/mt, see cache_dir) and later processes load it in ~3 s. Sources and
output lengths of any size reuse it. Log-probs match the eager model's up to float rounding (sums run
in another order). Greedy search and sampling; beam search stays eager.
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


def _attend(q, k, v):
    """Attention for one query row per head: q (H, 1, Dh), k, v (H, T, Dh)."""
    return ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1) @ v


# compiled code built by another version of this file, torch or CPU is not reused (and is deleted)
_VERSION = hashlib.sha256("\n".join([Path(__file__).read_text(), torch.__version__, platform.machine(),
                                      str(torch.backends.cpu.get_cpu_capability())]).encode()).hexdigest()[:10]


def cache_dir() -> Path:
    """Where compiled encoders and decoder steps are kept: $MT_CACHE_DIR, else $XDG_CACHE_HOME/mt or ~/.cache/mt."""
    if os.environ.get("MT_CACHE_DIR"):
        return Path(os.environ["MT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mt"


class _Function(torch.nn.Module):
    """A CompiledDecoder method as a module, for torch.export (the weights come in as an argument)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


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
        self.enc_layers, self.eps = len(model.encoder), model.dec_norm.eps
        tensors = dict(model.named_parameters(), positions=model.positions)  # shared weights listed once
        self.offsets, start = {}, 0
        for name, t in tensors.items():
            self.offsets[name] = (start, tuple(t.shape))
            start += t.numel()
        tgt = "embed.weight" if model.tgt_embedding is None else "tgt_embedding.weight"
        self.offsets["tgt_embed"] = self.offsets[tgt]
        self.offsets["output"] = self.offsets["output.weight" if model.output is not None else tgt]
        with torch.no_grad():
            self.flat = torch.cat([t.detach().float().reshape(-1) for t in tensors.values()])
        self.runners = {}  # "step", "encoder": compiled (or loaded from the disk cache) at first use

    def encode(self, src) -> tuple[torch.Tensor, torch.Tensor]:
        """The compiled encoder (_encode) for src (1, S), S >= 2: cross-attention keys, values (L, H, S, Dh)."""
        kv = self._runner("encoder").boxed_run([src, self.flat])[0]
        # the compiled step reads its inputs as contiguous without checking (AOTInductor): make sure
        return tuple(kv.contiguous())

    def _runner(self, kind: str):
        if kind not in self.runners:
            self.runners[kind] = self._load_or_compile(kind)
        return self.runners[kind]

    def _load_or_compile(self, kind: str):
        """AOTInductor's runner for _step or _encode, from the disk cache or built: shapes fixed but for the
        cache and source lengths (self.offsets stay constants: dynamic offsets made a 2.0 instead of 1.5
        ms step)."""
        path = cache_dir() / f"{kind}-{self._key(kind)}.pt2"
        try:
            if path.exists():
                try:
                    return torch._inductor.aoti_load_package(str(path)).loader
                except Exception:  # a damaged or foreign file: build it again
                    path.unlink(missing_ok=True)
            L, H, Dh = self.layers, self.heads, self.width // self.heads
            source_len = torch.export.Dim("source_len", min=2, max=self.offsets["positions"][1][0])
            if kind == "step":
                example = (torch.tensor([BOS]), torch.tensor([0]), torch.zeros(L, H, 7, Dh),
                           torch.zeros(L, H, 7, Dh), torch.zeros(L, H, 5, Dh), torch.zeros(L, H, 5, Dh), self.flat)
                cache_len = torch.export.Dim("cache_len", min=2)
                lengths = (None, None, {2: cache_len}, {2: cache_len}, {2: source_len}, {2: source_len}, None)
            else:
                example, lengths = (torch.tensor([[4, 5, 6, 7, EOS]]), self.flat), ({1: source_len}, None)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".pt2", dir=path.parent)  # written whole, then renamed into place
            os.close(fd)
            try:
                with warnings.catch_warnings():  # torch's own deprecation notices, not the user's business
                    warnings.simplefilter("ignore", FutureWarning)
                    warnings.simplefilter("ignore", DeprecationWarning)
                    program = torch.export.export(_Function(self._step if kind == "step" else self._encode), example,
                                                  dynamic_shapes=(lengths,))
                    # small intermediates on the stack, not the heap: 1.03x a step, paired; a layer norm's
                    # output stored once, not recomputed for every row of the product that reads it
                    # (inductor inlines up to 50 ops on CPUs): 1.04-1.06x a token, paired
                    torch._inductor.aoti_compile_and_package(program, package_path=tmp, inductor_configs={
                        "aot_inductor.allow_stack_allocation": True, "realize_opcount_threshold": 16})
                os.replace(tmp, path)
                for old in path.parent.glob(f"{kind}-*.pt2"):  # left by other versions: never loaded again
                    if not old.name.startswith(f"{kind}-{_VERSION}-"):
                        old.unlink(missing_ok=True)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            return torch._inductor.aoti_load_package(str(path)).loader
        except Exception as e:  # e.g. no working C++ compiler for inductor: say so in one line
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            what = "decoder step" if kind == "step" else "encoder"
            raise MTError(f"--compile: compiling the {what} failed ({type(e).__name__}: {first[:200]}); "
                          "run without --compile") from e

    def _key(self, kind: str) -> str:
        """The file name's key: what the compiled code depends on. Its first part (this file's code, torch,
        the CPU) tells packages of this version from those an earlier version left behind."""
        shapes = (sorted(self.offsets.items()), self.layers, self.enc_layers, self.heads, self.width, self.eps)
        return f"{_VERSION}-{hashlib.sha256(repr((kind, shapes)).encode()).hexdigest()[:16]}"

    def _w(self, flat, name):
        start, shape = self.offsets[name]
        return flat[start:start + math.prod(shape)].view(shape)

    def _norm(self, x, flat, name):
        return F.layer_norm(x, (self.width,), self._w(flat, name + ".weight"), self._w(flat, name + ".bias"), self.eps)

    def _linear(self, x, flat, name):
        return _matvec(x, self._w(flat, name + ".weight"), self._w(flat, name + ".bias"))

    def _dense(self, x, flat, name):  # several rows: a real matrix product (torch's matmul)
        return F.linear(x, self._w(flat, name + ".weight"), self._w(flat, name + ".bias"))

    def _encode(self, src, flat):
        """src (1, S) -> the cross-attention keys and values (2, L, H, S, Dh) of every decoder layer: what
        Transformer.encode and cross_attn.project_memory give for one sentence (no padding to mask)."""
        H, D, S = self.heads, self.width, src.shape[1]
        Dh = D // H
        x = self._w(flat, "embed.weight")[src[0]] * math.sqrt(D) + self._w(flat, "positions")[:S]  # (S, D)
        for i in range(self.enc_layers):
            p = f"encoder.{i}."
            qkv = self._dense(self._norm(x, flat, p + "norm1"), flat, p + "attn.qkv")
            q, k, v = qkv.view(S, 3, H, Dh).permute(1, 2, 0, 3)
            y = F.scaled_dot_product_attention(q, k, v)  # (H, S, Dh)
            x = x + self._dense(y.transpose(0, 1).reshape(S, D), flat, p + "attn.out")
            h = torch.relu(self._dense(self._norm(x, flat, p + "norm2"), flat, p + "ffn.up"))
            x = x + self._dense(h, flat, p + "ffn.down")
        memory = self._norm(x, flat, "enc_norm")
        kv = torch.stack([self._dense(memory, flat, f"decoder.{i}.cross_attn.kv") for i in range(self.layers)])
        return kv.view(self.layers, S, 2, H, Dh).permute(2, 0, 3, 1, 4).contiguous()  # (2, L, H, S, Dh)

    def _step(self, token, pos, self_k, self_v, memory_k, memory_v, flat):
        """token, pos (1,); self_k/v (L, H, T, Dh) written at pos; memory_k/v (L, H, S, Dh).
        Returns the best next token, its log-prob, the log-prob of EOS (each (1,)) and all log-probs (1, V)."""
        H, D = self.heads, self.width
        Dh = D // H
        x = self._w(flat, "tgt_embed")[token] * math.sqrt(D) + self._w(flat, "positions")[pos]  # (1, D)
        earlier = torch.arange(self_k.shape[2], device=pos.device) < pos  # positions decoded before this one
        new_k, new_v = [], []
        for i in range(self.layers):
            p = f"decoder.{i}."
            q, k, v = self._linear(self._norm(x, flat, p + "norm1"), flat, p + "self_attn.qkv").view(3, H, 1, Dh)
            # attend over the cache and the new position without writing it yet: writing into a layer's
            # slice of the cache made inductor copy that slice at every step (1.04x, paired)
            scale = q.shape[-1] ** -0.5
            scores = torch.cat([((q @ self_k[i].transpose(-1, -2)) * scale).masked_fill(~earlier, float("-inf")),
                                (q * k).sum(-1, keepdim=True) * scale], -1).softmax(-1)
            y = scores[..., :-1] @ self_v[i] + scores[..., -1:] * v
            new_k.append(k)
            new_v.append(v)
            x = x + self._linear(y.reshape(1, D), flat, p + "self_attn.out")
            q = self._linear(self._norm(x, flat, p + "norm2"), flat, p + "cross_attn.q").view(H, 1, Dh)
            y = _attend(q, memory_k[i], memory_v[i])
            x = x + self._linear(y.reshape(1, D), flat, p + "cross_attn.out")
            h = torch.relu(self._linear(self._norm(x, flat, p + "norm3"), flat, p + "ffn.up"))
            x = x + self._linear(h, flat, p + "ffn.down")
        self_k.index_copy_(2, pos, torch.stack(new_k))  # written once, after every layer has read the cache
        self_v.index_copy_(2, pos, torch.stack(new_v))
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
        if src.shape[1] >= 2:
            memory_k, memory_v = self.encode(src)
        else:  # only EOS: eagerly, repeated, as one compiled step serves every source of 2 or more
            memory, _ = self.model.encode(src)
            kv = [layer.cross_attn.project_memory(memory) for layer in self.model.decoder]
            memory_k = torch.stack([k[0] for k, _ in kv]).repeat(1, 1, 2, 1)  # attention over two copies of one
            memory_v = torch.stack([v[0] for _, v in kv]).repeat(1, 1, 2, 1)  # position is attention over it
        shape = (self.layers, self.heads, max(max_len + 1, 2), self.width // self.heads)
        # zeros, not empty: masked positions get weight 0, and 0 x NaN from garbage would be NaN
        self_k, self_v = torch.zeros(shape), torch.zeros(shape)
        token, tokens, lps = torch.tensor([BOS]), [], []
        positions = torch.arange(max_len + 1)
        run = self._runner("step").boxed_run  # the compiled _step; it writes self_k, self_v in place
        for t in range(max_len + 1):
            token, lp, eos_lp, lps_all = run([token, positions[t:t + 1], self_k, self_v, memory_k, memory_v, self.flat])
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
