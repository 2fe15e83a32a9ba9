"""Validation during training: loss and perplexity by teacher forcing (mt.scoring's loop), greedy
BLEU (mt.decoding, as `mt translate --greedy` decodes), and the choice between the best single
weights and the average of the last snapshots."""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import torch

from mt import checkpoint
from mt.config import Config
from mt.decoding import decode_ids, encode_sources
from mt.metrics import corpus_scores, perplexity
from mt.scoring import bound_data, token_logprobs


def improves(metric: float, best: float | None, *, ties: bool = False) -> bool:
    """Whether a validation metric (higher is better) beats the best so far; ties count when `ties`
    (averaged weights are kept when they validate at least as well as the best single ones)."""
    return best is None or metric > best or (ties and metric == best)


def selection_metric(scores: dict, cfg: Config) -> float:
    """The number train.best_metric ranks weights by (higher is better)."""
    if cfg.train.best_metric == "bleu" and "valid_bleu" in scores:
        return scores["valid_bleu"]
    return -scores["valid_loss"]


def text_characters(lines: list[str], *, packed: bool) -> int:
    """Characters a language model's validation NLL covers: every line and its newline (its EOS);
    unpacked, the empty lines are not sentences and are skipped."""
    return max(sum(len(t) + 1 for t in lines if t or packed), 1)


@torch.no_grad()
def validate(model, tokenizer, valid, cfg: Config, device) -> dict:
    """Per-token loss (NLL of the decoding distribution; a diffusion model's NELBO, an upper bound)
    and perplexity, and greedy BLEU (a diffusion model: decode.steps passes), on the validation set."""
    src_text, ref_text, data = valid
    model.eval()
    nll_sum, ntok = 0.0, 0
    if not model.exact_likelihood:  # a diffusion model: its NELBO, with the same draws every time
        for s in bound_data(model, data, batch_tokens=cfg.train.batch_tokens, device=device,
                            samples=cfg.decode.bound_samples):
            nll_sum, ntok = nll_sum - s.logprob, ntok + s.tokens
    for _, tok_lp, mask in (token_logprobs(model, data, batch_tokens=cfg.train.batch_tokens, device=device)
                            if model.exact_likelihood else ()):
        nll_sum -= float(tok_lp.sum())
        ntok += int(mask.sum())
    scores = {"valid_loss": nll_sum / ntok, "valid_ppl": perplexity(nll_sum, ntok)}
    if cfg.model.language_model:  # per character (each line's newline included): comparable across tokenizers
        scores["valid_loss_per_char"] = nll_sum / text_characters(ref_text, packed=cfg.data.pack)
    if not cfg.model.language_model:
        src_ids = encode_sources(tokenizer, src_text, model=model)
        hyps = decode_ids(model, src_ids, len(src_text), options=replace(cfg.decode, beam_size=1, sample=False),
                          device=device)
        texts = tokenizer.decode([h[0].tokens if h else [] for h in hyps])
        refs = [r.lower() for r in ref_text] if cfg.data.lowercase else ref_text  # outputs are lowercase
        scores["valid_bleu"] = corpus_scores(texts, refs)["bleu"]["score"]
    model.train()
    return scores


def use_average(model, tokenizer, valid, cfg: Config, run: Path, progress, *, device, log) -> None:
    """Average the kept snapshots; the average becomes the run's model when it validates at least as
    well as the best single weights (or when there is no validation set)."""
    used = checkpoint.average_snapshots(run, cfg.train.average_last, run / "averaged.safetensors")
    if len(used) < 2:
        return
    checkpoint.load_weights(model, run / "averaged.safetensors")
    scores = validate(model, tokenizer, valid, cfg, device) if valid is not None else {}
    better = not scores or improves(selection_metric(scores, cfg), progress.best, ties=True)
    log({"step": progress.step, "averaged": len(used), "chosen": better, **scores})
    print(f"mt: average of the last {len(used)} snapshots" + (f": valid loss {scores['valid_loss']:.3f}" if scores else "")
          + (f" greedy BLEU {scores['valid_bleu']:.2f}" if "valid_bleu" in scores else "")
          + ("; it becomes the run's model" if better else "; the best single weights stay the run's model"),
          file=sys.stderr)
    if better:
        checkpoint.save_weights(model, run / "model.safetensors")
        checkpoint.save_config(cfg, run, vocab_size=len(tokenizer), step=progress.step, averaged=len(used), **scores)
