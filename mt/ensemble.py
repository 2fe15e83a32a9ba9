"""Ensembles: several trained models that share a vocabulary, decoded and scored as one.

The ensemble's next-token distribution is the mean of its members' probabilities,
log P(y_i | y_<i, x) = log (1/n) sum_m P_m(y_i | y_<i, x), so it is a proper distribution: beam search,
greedy search, sampling and scoring use it through the same `new_cache` / `step` / `forward` calls as a
single model (mt.search, mt.scoring), and log P(y | x) of a sequence is still the sum of its steps.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from mt.errors import MTError


class EnsembleCache:
    """One decoding cache per member; reordered together (beam search, finished sentences)."""

    def __init__(self, caches: list):
        self.caches = caches

    def expand(self, k: int) -> None:
        for cache in self.caches:
            cache.expand(k)

    def reorder(self, new_order: torch.Tensor) -> None:
        for cache in self.caches:
            cache.reorder(new_order)

    def advance(self, n: int) -> None:
        pass  # each member's step advances its own cache


class Ensemble(nn.Module):
    parallel_decoding = False  # members decode left to right (a diffusion model is refused)
    exact_likelihood = True

    def __init__(self, models: list[nn.Module], steppers: list | None = None):
        """steppers: what decodes each member (its `new_cache` / `step`; default the member itself):
        the members' compiled decoders (`--aot`, mt.fast.aot_batched), one per member, in order."""
        super().__init__()
        if len(models) < 2:
            raise ValueError("an ensemble needs at least two models")
        if any(getattr(m, "parallel_decoding", False) for m in models):
            raise MTError("ensembles combine left-to-right models: a diffusion model decodes alone")
        self.members = nn.ModuleList(models)
        if steppers is not None and len(steppers) != len(models):
            raise ValueError("one stepper per member")
        self.steppers = list(steppers) if steppers is not None else list(self.members)
        self.cfg = models[0].cfg
        self.reads_prompts = models[0].reads_prompts

    def max_source_tokens(self) -> int:
        return min(m.max_source_tokens() for m in self.members)

    def max_output_tokens(self, source_lengths):
        return self.members[0].max_output_tokens(source_lengths)

    def max_target_tokens(self, source_length: int) -> int:
        return min(m.max_target_tokens(source_length) for m in self.members)

    def _mean(self, logprobs: list[torch.Tensor]) -> torch.Tensor:
        """log of the mean of the members' probabilities."""
        return torch.logsumexp(torch.stack(logprobs), dim=0) - math.log(len(logprobs))

    def new_cache(self, src, max_len: int) -> EnsembleCache:
        return EnsembleCache([m.new_cache(src, max_len) for m in self.steppers])

    def step(self, tokens, cache: EnsembleCache):
        return self._mean([m.step(tokens, c) for m, c in zip(self.steppers, cache.caches)])

    def forward(self, src, tgt_in, tgt_out=None):
        """Teacher-forced log-probs (already normalised, unlike a single model's logits)."""
        return self._mean([m.normalize(m(src, tgt_in, tgt_out)) for m in self.members])

    @staticmethod
    def normalize(logprobs):
        return logprobs  # forward already returns log-probabilities
