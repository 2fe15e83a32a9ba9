"""Linear layers whose float32 CPU inference can run on oneDNN with the weight packed once.

On this project's CPU (AMD EPYC, AVX2), torch's default matmul (MKL) is slow for wide, short products:
the vocabulary projection (8,000 x 256) ran 5x faster at 5 rows and 1.3x at 450 rows through oneDNN
on a pre-packed weight. But each oneDNN call costs ~45 us more, so small layers at few rows stay on
MKL, and one row (batch-1 decoding) of the vocabulary projection reads a transposed copy (docs/tuning.md).
oneDNN keeps a compiled kernel per input shape; its caches are capped below to bound memory.
`MT_ONEDNN=0` turns the path off. Training keeps `F.linear` (autograd; no gain at training sizes).
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F


def _onednn_ops():
    if not torch.backends.mkldnn.is_available() or os.environ.get("MT_ONEDNN") == "0":
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight, torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):  # a build without these (private) ops: plain F.linear
        return None


_ONEDNN = _onednn_ops()

# oneDNN and torch's ideep layer each cache a compiled kernel per input shape (~0.6 MB each, up to 1,024
# by default). Decoding meets a new row count at almost every step, so big caches hold memory (+0.3 GB
# over a test set's beam search) and little else; 16 entries cover a step's layers. Both are read at
# their first use, after this import; a value the user set wins.
for _cache in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
    os.environ.setdefault(_cache, "16")


def packable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a cached copy of the weight may serve x @ weight^T: float32 CPU inference (no autograd,
    no autocast, a weight with a version counter)."""
    return (_ONEDNN is not None and not torch.is_grad_enabled() and x.device.type == "cpu"
            and x.dtype == torch.float32 and weight.dtype == torch.float32 and not weight.is_inference()
            and not torch.is_autocast_enabled("cpu"))


class PackedWeight:
    """oneDNN's packed copy of one weight, rebuilt when the weight changes (its version counter).

    `one_row_transposed`: a single input row (batch-1 decoding) is a bandwidth-bound matrix-vector
    product, where MKL reading a contiguous (in, out) copy was faster than oneDNN and F.linear (8,000 x
    256: 0.45-0.57 vs 0.61-0.82 and 1.0-1.3 ms); worth its memory for the vocabulary projection only.
    A cache, not state: copies and pickles of its owner start empty (the packed tensor is opaque).
    """

    def __init__(self, one_row_transposed: bool = False):
        self.one_row_transposed = one_row_transposed
        self.key, self.packed, self.transposed = None, None, None

    def __deepcopy__(self, memo):
        return PackedWeight(self.one_row_transposed)

    def __getstate__(self):
        return {"one_row_transposed": self.one_row_transposed}

    def __setstate__(self, state):
        self.__init__(**state)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               min_rows: int = 1) -> torch.Tensor:
        """F.linear(x, weight, bias); from a cached copy when `packable` and x has >= min_rows rows."""
        rows = x.numel() // max(x.shape[-1], 1)
        if rows < min_rows or not packable(x, weight):  # the cheap test first: batch-1 steps are short
            return F.linear(x, weight, bias)
        key = (weight.data_ptr(), weight._version)
        if key != self.key:
            self.key, self.packed, self.transposed = key, None, None
        if rows == 1 and self.one_row_transposed:
            if self.transposed is None:
                self.transposed = weight.detach().t().contiguous()
            y = x @ self.transposed
            return y if bias is None else y + bias
        if self.packed is None:
            self.packed = _ONEDNN[0](weight.detach(), None)
        return _ONEDNN[1](x, self.packed, bias, "none", [], "")


class Linear(nn.Linear):
    """nn.Linear (same parameters, same checkpoints) whose inference goes through a PackedWeight once
    the input has `min_rows` rows. The default suits a vocabulary projection: always packed, one row
    from a transposed copy; a model's layers pass min_rows=LAYER_MIN_ROWS and no transposed copy."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, min_rows: int = 1):
        super().__init__(in_features, out_features, bias)
        self.min_rows, self.packed = min_rows, PackedWeight(one_row_transposed=min_rows == 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() < self.min_rows * self.in_features:  # few rows (batch-1 steps): straight to MKL
            return F.linear(x, self.weight, self.bias)
        return self.packed.linear(x, self.weight, self.bias, self.min_rows)
