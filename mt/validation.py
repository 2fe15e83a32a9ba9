"""Validation during training: teacher-forced loss and perplexity, greedy BLEU, and the choice
between the best single weights and the average of the last snapshots."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from mt import checkpoint, data as data_mod
from mt.config import LM_ARCHS, Config
from mt.metrics import corpus_scores, perplexity
from mt.tokenizer import PAD
from mt.translate import Translator


@torch.no_grad()
def validate(model, translator: Translator, valid, cfg: Config) -> dict:
    """Teacher-forced loss and perplexity, and greedy BLEU, on the validation set."""
    src_text, ref_text, data = valid
    model.eval()
    nll_sum, ntok = 0.0, 0
    for idx in data_mod.token_batches(data.src.lengths(), data.tgt.lengths(), cfg.train.batch_tokens,
                                      seed=0, epoch=0, shuffle=False):
        b = {k: v.to(translator.device) for k, v in data_mod.collate(data, idx).items()}
        logits = model(b["src"], b["tgt_in"], b["tgt_out"])
        target = b["tgt_out"][b["tgt_out"] != PAD]
        nll_sum += float(F.cross_entropy(logits.float(), target, reduction="sum"))
        ntok += len(target)
    scores = {"valid_loss": nll_sum / ntok, "valid_ppl": perplexity(nll_sum, ntok)}
    if cfg.model.arch not in LM_ARCHS:
        hyps = translator.translate(src_text, beam_size=1)
        refs = [r.lower() for r in ref_text] if cfg.data.lowercase else ref_text  # outputs are lowercase
        scores["valid_bleu"] = corpus_scores(hyps, refs)["bleu"]["score"]
    model.train()
    return scores


def use_average(model, translator, valid, cfg: Config, run: Path, progress, *, vocab_size: int, log) -> None:
    """Average the kept snapshots; the average becomes the run's model when it validates at least as
    well as the best single weights (or when there is no validation set)."""
    used = checkpoint.average_snapshots(run, cfg.train.average_last, run / "averaged.safetensors")
    if len(used) < 2:
        return
    checkpoint.load_weights(model, run / "averaged.safetensors")
    scores = validate(model, translator, valid, cfg) if valid is not None else {}
    metric = (scores.get("valid_bleu") if cfg.train.best_metric == "bleu" and "valid_bleu" in scores
              else -scores.get("valid_loss", 0.0))
    better = progress.best is None or not scores or metric >= progress.best
    log({"step": progress.step, "averaged": len(used), "chosen": better, **scores})
    print(f"mt: average of the last {len(used)} snapshots" + (f": valid loss {scores['valid_loss']:.3f}" if scores else "")
          + (f" greedy BLEU {scores['valid_bleu']:.2f}" if "valid_bleu" in scores else "")
          + ("; it becomes the run's model" if better else "; the best single weights stay the run's model"),
          file=sys.stderr)
    if better:
        checkpoint.save_weights(model, run / "model.safetensors")
        checkpoint.save_config(cfg, run, vocab_size=vocab_size, step=progress.step, averaged=len(used), **scores)
