"""Point estimation: log P(y | x) of given pairs by teacher forcing, and perplexities from it.

log P(y | x) = sum over target tokens, EOS included, of log P(y_i | y_<i, x), under exactly the
distribution decoding uses (model.normalize of the logits), so a score equals the sum of the
per-step log-probs search saw when it produced the same sequence. Validation uses the same loop.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from mt import data as data_mod
from mt.data import ParallelData, TokenArray
from mt.tokenizer import EOS, PAD


@dataclass
class PairScore:
    logprob: float   # log P(y | x), natural log, summed over target tokens including EOS; nan: not scored
    tokens: int      # target tokens scored (EOS included); 0: not scored (too long for the model)
    bound: bool = False   # logprob is a lower bound on log P(y | x) (minus a diffusion model's NELBO estimate)
    stderr: float = 0.0   # the bound's Monte-Carlo standard error

    @property
    def scored(self) -> bool:
        return self.tokens > 0

    @property
    def nll_per_token(self) -> float:
        return -self.logprob / self.tokens if self.scored else float("nan")


NOT_SCORED = PairScore(float("nan"), 0)


@torch.inference_mode()
def token_logprobs(model, data: ParallelData, *, batch_tokens: int, device) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
    """Teacher forcing over `data` in length-sorted token batches: yields (indices of the batch,
    log P of each target token (B, T) in float64 (0 at padding), the non-pad mask (B, T))."""
    for idx in data_mod.token_batches(data.src.lengths(), data.tgt.lengths(), batch_tokens,
                                      seed=0, epoch=0, shuffle=False):
        b = {k: v.to(device) for k, v in data_mod.collate(data, idx).items()}
        mask = b["tgt_out"] != PAD
        lprobs = model.normalize(model(b["src"], b["tgt_in"], b["tgt_out"]))   # (N, V)
        tok_lp = torch.zeros(mask.shape, dtype=torch.float64, device=device)  # (B, T)
        tok_lp[mask] = lprobs.gather(1, b["tgt_out"][mask][:, None]).squeeze(1).double()
        yield idx, tok_lp, mask


def score_data(model, data: ParallelData, *, batch_tokens: int, device) -> list[PairScore]:
    """A PairScore per pair of `data`, in its order."""
    out: list[PairScore | None] = [None] * len(data.tgt)
    for idx, tok_lp, mask in token_logprobs(model, data, batch_tokens=batch_tokens, device=device):
        for row, i in enumerate(idx.tolist()):
            out[i] = PairScore(float(tok_lp[row].sum()), int(mask[row].sum()))
    return out


def score_ids(model, src_ids: list[list[int]], tgt_ids: list[list[int]], *, batch_tokens: int,
              device, samples: int = 8, seed: int = 0, steps: int = 0) -> list[PairScore]:
    """Score id sequences (without BOS/EOS); results in input order. A model without an exact
    likelihood (masked diffusion) gets its bound (bound_data: `samples`, `seed`, `steps`)."""
    data = ParallelData(TokenArray.from_lists(src_ids), TokenArray.from_lists(tgt_ids))
    if not model.exact_likelihood:
        return bound_data(model, data, batch_tokens=batch_tokens, device=device, samples=samples, seed=seed,
                          steps=steps)
    return score_data(model, data, batch_tokens=batch_tokens, device=device)


@torch.inference_mode()
def bound_data(model, data: ParallelData, *, batch_tokens: int, device, samples: int, seed: int = 0,
               steps: int = 0) -> list[PairScore]:
    """Per pair, minus the NELBO of a masked-diffusion model (-log P(L | x) + the masked tokens'
    weighted NLL), estimated with `samples` stratified timesteps (steps = T: the T-step bound), as a
    PairScore with bound=True and the estimate's standard error. Draws are keyed by the pair's index,
    so the estimate does not depend on the batching."""
    out: list[PairScore | None] = [None] * len(data.tgt)
    for idx in data_mod.token_batches(data.src.lengths(), data.tgt.lengths(), batch_tokens,
                                      seed=0, epoch=0, shuffle=False):
        b = data_mod.collate(data, idx)
        y = b["tgt_out"].masked_fill(b["tgt_out"] == EOS, PAD).to(device)
        terms = model.nelbo(b["src"].to(device), y, samples=samples, seed=seed, ids=torch.as_tensor(idx), steps=steps)
        mean = terms.double().mean(1)
        err = terms.double().std(1) / math.sqrt(samples) if samples > 1 else torch.zeros_like(mean)
        for row, i in enumerate(idx.tolist()):
            out[i] = PairScore(-float(mean[row]), int((b["tgt_out"][row] != PAD).sum()), bound=True,
                               stderr=float(err[row]))
    return out


def perplexities(scores: list[PairScore], texts: list[str] | None = None) -> dict:
    """Per-token exp(total NLL / tokens), and per-sentence: the geometric mean over M sentences of
    Q(x^m)^(-1/M) = exp(-(1/M) sum_m log Q(x^m)); over the scored pairs (`not_scored` counts the rest).
    With the scored `texts`: NLL per character too (a line's EOS counts as its newline), which
    compares models whatever their tokenizers."""
    if texts is not None:
        chars = sum(len(t) + 1 for t, s in zip(texts, scores) if s.scored)
        nll = -sum(s.logprob for s in scores if s.scored)
        per_char = {"characters": chars, "nll_per_char": nll / chars if chars else float("nan")}
        return {**perplexities(scores), **per_char}
    scored = [s for s in scores if s.scored]
    total_lp = sum(s.logprob for s in scored)
    total_tok = sum(s.tokens for s in scored)
    M = max(len(scored), 1)
    if not total_tok:
        nan = float("nan")
        return {"sentences": 0, "not_scored": len(scores), "bound": False, "stderr": 0.0, "tokens": 0,
                "logprob": 0.0, "nll_per_token": nan,
                "ppl_per_token": nan, "ppl_per_sentence": nan}
    bound = any(s.bound for s in scored)  # a diffusion model's: perplexities are upper bounds
    return {"sentences": len(scored), "not_scored": len(scores) - len(scored), "bound": bound,
            "stderr": math.sqrt(sum(s.stderr ** 2 for s in scored)), "tokens": total_tok, "logprob": total_lp,
            "nll_per_token": -total_lp / max(total_tok, 1),
            "ppl_per_token": math.exp(-total_lp / max(total_tok, 1)),
            "ppl_per_sentence": _safe_exp(-total_lp / M)}


def _safe_exp(x: float) -> float:
    return math.exp(x) if x < 709 else float("inf")


__all__ = ["PairScore", "NOT_SCORED", "token_logprobs", "score_data", "score_ids", "bound_data", "perplexities"]
