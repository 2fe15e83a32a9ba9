"""Corpus scores through sacreBLEU's object API, always with their signatures, and perplexity."""
from __future__ import annotations

import math

from sacrebleu.metrics import BLEU, CHRF

from mt.errors import MTError


def corpus_scores(hyps: list[str], refs: list[str], *, bleu: bool = True, chrf: bool = False) -> dict:
    """{'bleu': {'score', 'signature', 'text'}, 'chrf': {...}} for the metrics asked for."""
    if len(hyps) != len(refs):
        raise MTError(f"{len(hyps)} hypotheses but {len(refs)} references: line counts must match")
    out = {}
    for name, metric, wanted in (("bleu", BLEU(), bleu), ("chrf", CHRF(), chrf)):
        if wanted:
            s = metric.corpus_score(hyps, [refs])
            out[name] = {"score": round(s.score, 2), "signature": str(metric.get_signature()),
                         "text": str(s)}
    return out


def perplexity(total_nll: float, total_tokens: int) -> float:
    """exp(total NLL / tokens): the per-token perplexity."""
    return math.exp(total_nll / max(total_tokens, 1))
