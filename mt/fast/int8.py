"""Dynamic int8 quantization for CPU inference (`--quantize int8`, `mt.load(run, quantize="int8")`).

Every nn.Linear, the output projection included (a tied one gets an int8 copy of the embedding),
stores its weight int8 with one scale per output row (per channel: a row far smaller than the
largest keeps its precision); activations are quantized per batch. What it buys: docs/performance.md.
"""
from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn


def quantize_int8(model: nn.Module) -> nn.Module:
    """A converted copy of a plain (not mt.fast.enable'd) float32 model."""
    model = copy.deepcopy(model)
    per_channel = {nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}
    with warnings.catch_warnings():  # torch marks its quantized tensor types deprecated; they still work
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model, per_channel, dtype=torch.qint8, inplace=True)


def is_quantized(model: nn.Module) -> bool:
    return any(type(m).__module__.startswith("torch.ao") for m in model.modules())
