"""Opt-in CPU speed paths, kept out of the textbook model code (mt.models).

`enable(model)` swaps a model's plain layers, in place, for faster ones with the same parameters
and the same results: nn.Linear -> PackedLinear (oneDNN for inference; the vocabulary projection
always, a layer's linears from 128 rows) and nn.Dropout -> CheapDropout (a cheaper CPU mask; same
statistics), and applies the process settings of mt.fast.runtime. mt.load, the CLI and training
call it; a model built by hand runs the plain layers until it is called.
Also here: int8 (dynamic int8 quantization) and aot (the batch-1 ahead-of-time compiled step).
Why each exists and what it buys: docs/performance.md.
"""
from __future__ import annotations

import torch.nn as nn

from mt.fast.dropout import CheapDropout
from mt.fast.linear import LAYER_MIN_ROWS, PackedLinear
from mt.fast.runtime import tune_process


def enable(model: nn.Module) -> nn.Module:
    """Switch `model`'s layers (and an ensemble's members') to the fast paths; returns `model`."""
    tune_process()
    for parent in list(model.modules()):
        vocab_projection = getattr(parent, "output", None) if hasattr(parent, "log_probs") else None
        for name, child in parent.named_children():
            if type(child) is nn.Linear:
                vocabulary = child is vocab_projection
                new = PackedLinear.replace(child, min_rows=1 if vocabulary else LAYER_MIN_ROWS,
                                           one_row_transposed=vocabulary)
            elif type(child) is nn.Dropout:
                new = CheapDropout(child.p)
            else:
                continue
            setattr(parent, name, new.train(child.training))  # an eval model stays in eval mode
    return model


__all__ = ["enable", "tune_process", "PackedLinear", "CheapDropout"]
