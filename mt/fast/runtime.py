"""Process-wide settings for speed, applied only when asked (`tune_process`): the CLI, `mt.load`
and training call it; importing mt changes nothing.

- Allocator: glibc serves every allocation over 32 MB (the (tokens x 8k) logits and their gradient,
  big activations) with a fresh mmap and unmaps it on free, so each training step pays for page
  faults on newly zeroed memory. Serving them from the heap and never trimming it lets the next step
  reuse the same pages: +10-12% target tokens/s on 2 CPU cores, for ~8% more peak RSS. Linux with
  glibc only; MT_MALLOC=system leaves the allocator alone.
- oneDNN kernel caches: oneDNN and torch's ideep layer each keep a compiled kernel per input shape
  (~0.6 MB each, up to 1,024 by default). Decoding meets a new row count at almost every step, so
  big caches hold memory (+0.3 GB over a test set's beam search) and little else; 16 entries cover
  a step's layers. Read at their first use; a value the user set wins.
- cuDNN attention builds a new plan for every new (batch, length) shape (~0.4 s each on an H100),
  and token-budget batches bring new shapes all the time; flash / memory-efficient kernels do not.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

import torch

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Switch glibc to heap-only allocation without trimming; True if it was applied."""
    if os.environ.get("MT_MALLOC") == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def tune_process() -> None:
    """Apply the settings above to this process (idempotent)."""
    keep_freed_memory()
    for cache in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        os.environ.setdefault(cache, "16")
    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(False)
