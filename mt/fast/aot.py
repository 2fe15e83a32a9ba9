"""Batch-1 greedy search and sampling through the model's own encoder and decoder step, exported
(torch.export) and compiled ahead of time (AOTInductor), for latency (`--aot`, `mt.load(run, aot=True)`).

One sentence at a time, a decoder step is ~40 matrix-vector products: it should cost the time to
read the weights once, but eager PyTorch spends ~150 operator calls a step on it, and MKL's
matrix-vector kernels stream weights far below the memory bandwidth. Here:
- the step is `Transformer.step` itself, exported over a `StaticCache`: the same layers, with the
  self-attention keys/values in fixed-size buffers written at a position given as a tensor and read
  under a position mask, so the shapes do not change from step to step;
- in the exported step every nn.Linear is a `MatVecLinear` (same parameters): a multiply-and-sum
  that inductor turns into vectorised loops streaming each weight once;
- the encoder (and the cross-attention keys/values) is `Transformer.encode` + `memory_kv`, exported
  with its products left as matrix products (a row per source token);
- AOTInductor's runner is one C++ call, without torch.compile's per-call guards and wrappers.
Search is mt.search.generate's own loop: `AotDecoder` offers the model interface (`new_cache`,
`step`). Compiling takes a minute or two per model; the packages are kept in $MT_CACHE_DIR (default
~/.cache/mt), keyed by this file, torch, the CPU, the model's shapes and a hash of its weights.
Log-probs match the eager model's up to float rounding (sums run in another order).
"""
from __future__ import annotations

import copy
import hashlib
import os
import platform
import stat
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from mt import checkpoint
from mt.errors import MTError
from mt.tokenizer import EOS

# compiled code built by another version of this file, torch or CPU is not reused (and is deleted)
_VERSION = hashlib.sha256("\n".join([Path(__file__).read_text(), torch.__version__, platform.machine(),
                                      str(torch.backends.cpu.get_cpu_capability())]).encode()).hexdigest()[:10]


# small intermediates on the stack, not the heap; a layer norm's output stored once, not recomputed
# for every row of the product reading it (docs/performance.md)
_CONFIGS = {"aot_inductor.allow_stack_allocation": True, "realize_opcount_threshold": 16}


def cache_dir() -> Path:
    """Where compiled encoders and decoder steps are kept: $MT_CACHE_DIR, else $XDG_CACHE_HOME/mt or ~/.cache/mt."""
    if os.environ.get("MT_CACHE_DIR"):
        return Path(os.environ["MT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mt"


def private_cache_dir() -> Path:
    """cache_dir(), created 0700 if new, and refused unless only this user can write it: a package
    there is native code this process runs, so nobody else may be able to plant one."""
    path = cache_dir()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir(mode=0o700, exist_ok=True)
        st = path.stat()
    except OSError as e:
        raise MTError(f"--aot: cannot use the compiled-code cache {path} ({e.strerror or e})") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MTError(f"--aot: the compiled-code cache {path} is not a directory; set MT_CACHE_DIR to one")
    if st.st_uid != os.getuid():
        raise MTError(f"--aot: the compiled-code cache {path} belongs to another user (uid {st.st_uid}); code "
                      "there would run as you: set MT_CACHE_DIR to a folder of your own")
    if st.st_mode & 0o022:
        raise MTError(f"--aot: the compiled-code cache {path} is writable by other users "
                      f"(mode {stat.S_IMODE(st.st_mode):o}); code planted there would run as you: "
                      f"chmod go-w it, or set MT_CACHE_DIR to a private folder")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _trusted(path: Path) -> bool:
    """A package this user compiled: a regular file of ours that nobody else can write, whose content
    hash is the one recorded beside it when it was written (a damaged or foreign file is not)."""
    try:
        st, record = path.lstat(), path.with_name(path.name + ".sha256")
        return (stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022
                and record.is_file() and record.read_text().strip() == _sha256(path))
    except OSError:
        return False


class MatVecLinear(nn.Linear):
    """nn.Linear as x . weight^T summed elementwise: for one row, inductor fuses it into a loop that
    reads the weight once (a matrix product kernel would be called instead)."""

    @classmethod
    def replace(cls, linear: nn.Linear) -> "MatVecLinear":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features, new.weight, new.bias = (linear.in_features, linear.out_features,
                                                                   linear.weight, linear.bias)
        return new

    def forward(self, x):
        y = (x[..., None, :] * self.weight).sum(-1)
        return y if self.bias is None else y + self.bias


class StaticCache:
    """The decoding cache of one sentence in fixed-size buffers (the interface layers use of
    mt.models.cache.KVCache): keys/values (L, 1, H, Tmax, Dh), the new position `pos` (1,)."""

    def __init__(self, self_k, self_v, memory_k, memory_v, pos):
        self.self_k, self.self_v, self.pos = self_k, self_v, pos
        self.memory_k, self.memory_v, self.memory_mask = list(memory_k), list(memory_v), None

    def attend_to(self, layer: int, k, v):
        self.self_k[layer].index_copy_(2, self.pos, k)
        self.self_v[layer].index_copy_(2, self.pos, v)
        seen = (torch.arange(self.self_k.shape[3], device=k.device) <= self.pos)[None, None, None, :]
        return self.self_k[layer], self.self_v[layer], seen

    def positions(self, T: int):
        return self.pos

    def advance(self, n: int) -> None:
        pass  # the caller passes the next position


class _Step(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, token, pos, self_k, self_v, memory_k, memory_v):
        return self.model.step(token.view(1, 1), StaticCache(self_k, self_v, memory_k, memory_v, pos))


class _Encode(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, src):
        memory, _ = self.model.encode(src)
        kv = torch.stack([torch.stack(pair) for pair in self.model.memory_kv(memory)], 1)  # (2, L, 1, H, S, Dh)
        return kv.contiguous()


class AotCache:
    """What search holds between steps: the static buffers, the next position (follows DecodingCache)."""

    def __init__(self, self_k, self_v, memory_k, memory_v):
        self.self_k, self.self_v, self.memory_k, self.memory_v = self_k, self_v, memory_k, memory_v
        self.length = 0
        self.pos = torch.zeros(1, dtype=torch.long)  # `length` as the step's input, updated in place

    def advance(self, n: int) -> None:
        self.length += n
        self.pos.fill_(self.length)

    def expand(self, k: int) -> None:
        raise MTError("--aot decodes one sentence with greedy search or sampling (no beam search)")

    def reorder(self, new_order) -> None:
        pass  # one row: a finished sentence ends the search


class AotDecoder:
    """The model interface search uses (`new_cache`, `step`), through compiled code; one sentence at a time.

    Built from a float32 Transformer on the CPU in eval mode; reads its weights once (rebuild it
    after changing them). like: a decoder of the same model whose plain copy and weights hash this
    one shares (no second copy, no second pass over the weights).
    """

    def __init__(self, model, *, like: "AotDecoder | None" = None):
        from mt.models import Transformer

        from mt.fast.int8 import is_quantized

        if type(model) is not Transformer or is_quantized(model):  # not a subclass (diffusion decodes otherwise)
            raise MTError("--aot compiles float32 encoder-decoder models (not with --quantize; an ensemble "
                          "member by member, in batches)")
        if next(model.parameters()).device.type != "cpu":
            raise MTError("--aot is for CPU decoding (batch-1 latency)")
        self.cfg = model.cfg
        self.layers, self.heads, self.dh = len(model.decoder), model.cfg.heads, model.cfg.d_model // model.cfg.heads
        self.runners = {}  # "step", "encoder": compiled (or loaded from the disk cache) at first use
        if like is not None:
            self.model, self.weights_hash = like.model, like.weights_hash
            return
        self.model = copy.deepcopy(model)  # plain layers, whatever mt.fast does to the caller's model later
        digest = hashlib.sha256()
        for name, t in model.state_dict().items():
            digest.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
            digest.update(t.detach().cpu().contiguous().numpy().tobytes())
        self.weights_hash = digest.hexdigest()[:16]

    version = _VERSION  # of the code that builds the packages (a subclass: its own file's too)
    # the questions decoding asks a model
    reads_prompts = False
    parallel_decoding = False
    exact_likelihood = True

    def max_source_tokens(self) -> int:
        return self.model.max_source_tokens()

    def max_output_tokens(self, source_lengths):
        return self.model.max_output_tokens(source_lengths)

    def key(self, kind: str) -> str:
        """The file name's key. Its first part (this file's code, torch, the CPU) tells packages of this
        version from those an earlier version left behind."""
        shapes = repr((kind, sorted(vars(self.cfg).items()), self.model.vocab_size))
        return f"{self.version}-{hashlib.sha256((shapes + self.weights_hash).encode()).hexdigest()[:16]}"

    @torch.no_grad()
    def new_cache(self, src, max_len: int) -> AotCache:
        """src (1, S): the compiled encoder (S >= 2), and zeroed buffers for max_len positions."""
        if src.shape[0] != 1:
            raise MTError("--aot decodes one sentence at a time")
        if src.shape[1] >= 2:
            kv = self._runner("encoder").boxed_run([src])[0]
            memory_k, memory_v = kv[0].contiguous(), kv[1].contiguous()  # the step reads them unchecked
        else:  # EOS alone: eagerly, repeated: attention over two copies of one position is attention over it
            memory, _ = self.model.encode(src)
            kv = self.model.memory_kv(memory)
            memory_k = torch.stack([k for k, _ in kv]).repeat(1, 1, 1, 2, 1).contiguous()
            memory_v = torch.stack([v for _, v in kv]).repeat(1, 1, 1, 2, 1).contiguous()
        shape = (self.layers, 1, self.heads, max(max_len, 2), self.dh)
        # zeros, not empty: masked positions get weight 0, and 0 x NaN from garbage would be NaN
        return AotCache(torch.zeros(shape), torch.zeros(shape), memory_k, memory_v)

    @torch.no_grad()
    def step(self, tokens, cache: AotCache):
        """tokens (1, 1) -> log-probs of the next token (1, V); writes the cache in place."""
        lp = self._runner("step").boxed_run([tokens.view(1), cache.pos, cache.self_k, cache.self_v,
                                             cache.memory_k, cache.memory_v])[0]
        cache.advance(1)
        return lp

    def _runner(self, kind: str):
        if kind not in self.runners:
            self.runners[kind] = self._load_or_compile(kind)
        return self.runners[kind]

    def _example(self, kind: str):
        L, H, Dh = self.layers, self.heads, self.dh
        source_len = torch.export.Dim("source_len", min=2, max=self.cfg.max_positions)
        if kind == "encoder":
            return _Encode(self.model), (torch.tensor([[4, 5, 6, 7, EOS]]),), ({1: source_len},), _CONFIGS
        stepper = copy.deepcopy(self.model)
        for parent in list(stepper.modules()):
            for name, child in parent.named_children():
                if isinstance(child, nn.Linear):
                    setattr(parent, name, MatVecLinear.replace(child))
        cache_len = torch.export.Dim("cache_len", min=2)
        example = (torch.tensor([4]), torch.tensor([0]), torch.zeros(L, 1, H, 7, Dh), torch.zeros(L, 1, H, 7, Dh),
                   torch.zeros(L, 1, H, 5, Dh), torch.zeros(L, 1, H, 5, Dh))
        lengths = (None, None, {3: cache_len}, {3: cache_len}, {3: source_len}, {3: source_len})
        return _Step(stepper), example, lengths, _CONFIGS

    def _decompositions(self, kind: str) -> dict:
        """Attention as plain products and a softmax, which inductor fuses into the step's loops (its
        fused-attention kernel is a separate call per layer)."""
        sdpa = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
        return {sdpa: torch._decomp.decomposition_table[sdpa]}

    def _load_or_compile(self, kind: str):
        """AOTInductor's runner from the disk cache, or exported, compiled and written there."""
        path = private_cache_dir() / f"{kind}-{self.key(kind)}.pt2"
        record = path.with_name(path.name + ".sha256")
        try:
            if path.exists() or path.is_symlink():
                if _trusted(path):
                    try:
                        return torch._inductor.aoti_load_package(str(path)).loader
                    except Exception:  # damaged after all: build it again
                        pass
                path.unlink(missing_ok=True)  # not ours, or damaged: never loaded
                record.unlink(missing_ok=True)
            module, example, lengths, configs = self._example(kind)
            fd, tmp = tempfile.mkstemp(suffix=".pt2", dir=path.parent)  # written whole, then renamed into place
            os.close(fd)
            try:
                with warnings.catch_warnings():  # torch's own deprecation notices, not the user's business
                    warnings.simplefilter("ignore", FutureWarning)
                    warnings.simplefilter("ignore", DeprecationWarning)
                    program = torch.export.export(module.eval(), example, dynamic_shapes=lengths)
                    if kind != "encoder":
                        program = program.run_decompositions(self._decompositions(kind))
                    torch._inductor.aoti_compile_and_package(program, package_path=tmp, inductor_configs=configs)
                checkpoint.atomic_write_text(record, _sha256(Path(tmp)) + "\n")
                os.replace(tmp, path)
                for old in path.parent.glob(f"{kind}-*.pt2*"):  # left by other versions: never loaded again
                    if not old.name.startswith(f"{kind}-{self.version}-"):
                        old.unlink(missing_ok=True)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            return torch._inductor.aoti_load_package(str(path)).loader
        except MTError:
            raise
        except Exception as e:  # e.g. no working C++ compiler for inductor: say so in one line
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            what = "encoder" if kind == "encoder" else "decoder step"
            raise MTError(f"--aot: compiling the {what} failed ({type(e).__name__}: {first[:200]}); "
                          "run without --aot") from e
