"""The model families. `build_model` holds the one `if` on `model.arch`; everything else asks the
model (mt.models.layers.SequenceModel) what it needs to know.

A new family is a file here (a SequenceModel subclass and, if it decodes differently, a cache class
following mt.models.cache.DecodingCache) and one branch below.
"""
from __future__ import annotations

import torch.nn as nn

from mt.config import ModelConfig
from mt.models.cache import DecodingCache, KVCache
from mt.models.decoder_lm import DecoderLM
from mt.models.diffusion import DiffusionTranslator
from mt.models.layers import SequenceModel
from mt.models.linear_lm import LinearLM
from mt.models.transformer import Transformer


def build_model(cfg: ModelConfig, vocab_size: int, *, packed: bool = False) -> nn.Module:
    """The model `cfg.arch` names: encoder-decoder, masked diffusion, decoder-only / prefix LM, or
    the linear baseline. packed: a decoder-only LM trained on a packed stream (data.pack)."""
    if cfg.arch == "transformer":
        return Transformer(cfg, vocab_size)
    if cfg.arch == "linear":
        return LinearLM(cfg, vocab_size)
    if cfg.arch == "diffusion":
        return DiffusionTranslator(cfg, vocab_size)
    return DecoderLM(cfg, vocab_size, prefix_lm=cfg.arch == "prefix_lm", packed=packed)


__all__ = ["build_model", "DecodingCache", "KVCache", "SequenceModel", "Transformer", "DiffusionTranslator", "DecoderLM", "LinearLM"]
