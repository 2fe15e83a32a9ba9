"""Linear layers whose float32 CPU inference runs on oneDNN with the weight packed once.

On AVX2 CPUs torch's default matmul (MKL) is slow for wide, short products: the vocabulary
projection (8,000 x 256) ran 5x faster at 5 rows and 1.3x at 450 rows through oneDNN on a
pre-packed weight. But each oneDNN call costs ~45 us more, so small layers at few rows stay on MKL,
and one row (batch-1 decoding) of the vocabulary projection reads a transposed copy
(docs/performance.md). Training keeps `F.linear` (autograd; no gain at training sizes).
`MT_ONEDNN=0` turns the path off.

`PackedLinear.replace(linear, ...)` gives a module holding the same Parameter objects (so tied
weights stay tied and checkpoints keep their names); mt.fast.enable does it for a whole model.
"""
from __future__ import annotations

import copy
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

# oneDNN's per-call cost outweighs its faster kernel for a layer's linears below this many rows
LAYER_MIN_ROWS = 128


def onednn_ops():
    """oneDNN's (private) weight-packing and packed-linear ops, or None where this build lacks them."""
    if not torch.backends.mkldnn.is_available() or os.environ.get("MT_ONEDNN") == "0":
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight, torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


def packable(x: torch.Tensor, weight: torch.Tensor, ops) -> bool:
    """Whether a cached copy of the weight may serve x @ weight^T: float32 CPU inference (no autograd,
    no autocast, a weight with a version counter)."""
    return (ops is not None and not torch.is_grad_enabled() and x.device.type == "cpu"
            and x.dtype == torch.float32 and weight.dtype == torch.float32 and not weight.is_inference()
            and not torch.is_autocast_enabled("cpu"))


class PackedLinear(nn.Linear):
    """nn.Linear (same parameters, same checkpoints) whose inference goes through a packed copy of
    its weight once the input has `min_rows` rows, rebuilt when the weight changes (its version).

    `one_row_transposed`: a single input row (batch-1 decoding) is a bandwidth-bound matrix-vector
    product, where MKL reading a contiguous (in, out) copy was faster than oneDNN and F.linear;
    worth its memory for the vocabulary projection only. The copies are a cache, not state: a deep
    copy starts empty (the packed tensor is opaque).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, min_rows: int = 1,
                 one_row_transposed: bool = False):
        super().__init__(in_features, out_features, bias)
        self._setup(min_rows, one_row_transposed)

    def _setup(self, min_rows: int, one_row_transposed: bool) -> None:
        self.min_rows, self.one_row_transposed = min_rows, one_row_transposed
        self.ops = onednn_ops()
        self.key, self.packed, self.transposed = None, None, None

    @classmethod
    def replace(cls, linear: nn.Linear, *, min_rows: int, one_row_transposed: bool = False) -> "PackedLinear":
        """A PackedLinear holding `linear`'s own weight and bias Parameters."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias
        new._setup(min_rows, one_row_transposed)
        return new

    def __deepcopy__(self, memo):
        new = PackedLinear.replace(self, min_rows=self.min_rows, one_row_transposed=self.one_row_transposed)
        memo[id(self)] = new
        new.weight = copy.deepcopy(self.weight, memo)  # through memo: a tied weight stays tied
        new.bias = copy.deepcopy(self.bias, memo)
        return new

    def train(self, mode: bool = True) -> "PackedLinear":
        # a fused optimizer (torch.optim.AdamW(fused=True)) updates weights without bumping their
        # version, so the copies are also dropped whenever the mode changes: validation during
        # training (model.eval()) always packs the current weights
        self.key, self.packed, self.transposed = None, None, None
        return super().train(mode)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", min_rows={self.min_rows}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(x.shape[-1], 1)
        if rows < self.min_rows or not packable(x, self.weight, self.ops):  # the cheap test first
            return F.linear(x, self.weight, self.bias)
        weight = self.weight
        key = (weight.data_ptr(), weight._version)
        if key != self.key:
            self.key, self.packed, self.transposed = key, None, None
        if rows == 1 and self.one_row_transposed:
            if self.transposed is None:
                self.transposed = weight.detach().t().contiguous()
            y = x @ self.transposed
            return y if self.bias is None else y + self.bias
        if self.packed is None:
            self.packed = self.ops[0](weight.detach(), None)
        return self.ops[1](x, self.packed, self.bias, "none", [], "")
