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


def lc_tok_bleu(hyps: list[str], refs: list[str], lang: str) -> dict:
    """BLEU as the Multi30K papers report it: lowercased, Moses-normalised and Moses-tokenised text
    (sacremoses, for language `lang`), scored by sacreBLEU with its own tokenisation off."""
    if len(hyps) != len(refs):
        raise MTError(f"{len(hyps)} hypotheses but {len(refs)} references: line counts must match")
    try:
        import sacremoses
        from sacremoses import MosesPunctNormalizer, MosesTokenizer
    except ImportError:
        raise MTError("--lc-tok needs sacremoses: pip install 'mt[lctok]'") from None
    norm, tok = MosesPunctNormalizer(lang=lang), MosesTokenizer(lang=lang)

    def prep(text: str) -> str:
        return tok.tokenize(norm.normalize(text.lower()), escape=False, return_str=True)

    metric = BLEU(tokenize="none", lowercase=True, force=True)  # already lowercased: the signature says so
    s = metric.corpus_score([prep(h) for h in hyps], [[prep(r) for r in refs]])
    signature = f"{metric.get_signature()}|pre:lc+moses-norm+moses-tok.{lang}|sacremoses:{sacremoses.__version__}"
    return {"score": round(s.score, 2), "signature": signature, "text": f"lowercased tokenized {s}"}


def perplexity(total_nll: float, total_tokens: int) -> float:
    """exp(total NLL / tokens): the per-token perplexity."""
    return math.exp(total_nll / max(total_tokens, 1))
