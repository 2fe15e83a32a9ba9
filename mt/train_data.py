"""What a training reads: the tokenizer (trained on the training corpus when the run has none) and
the encoded training and validation data, checked before anything slow starts."""
from __future__ import annotations

import sys
from pathlib import Path

from accelerate import Accelerator

from mt import data as data_mod
from mt.config import Config
from mt.errors import MTError
from mt.tokenizer import Tokenizer, train_tokenizer


def load_data(cfg: Config, run: Path, accelerator: Accelerator):
    """Tokenizer (trained on the training corpus if the run has none) and encoded train/valid data.

    Returns (tokenizer, train, valid, resample). valid is (source texts, reference texts, encoded
    pairs) or None; language models have empty sources and their text as targets. resample(epoch)
    re-segments the training data for that epoch when data.spm_alpha > 0 (else it is None; only then
    are the raw texts kept in memory).
    """
    lm = cfg.model.language_model
    if lm:
        tgt = data_mod.read_text_split(cfg.data, "train")
        src = []
    else:
        src, tgt = data_mod.read_split(cfg.data, "train")
    if not tgt:
        raise MTError("the training corpus is empty")
    valid_text = None
    if cfg.data.valid or cfg.data.hf_dataset:  # read now: a problem shows before the tokenizer trains
        if lm:
            v_tgt = data_mod.read_text_split(cfg.data, "valid")
            v_src = [""] * len(v_tgt)
        else:
            v_src, v_tgt = data_mod.read_split(cfg.data, "valid")
        if not v_tgt:
            where = cfg.data.valid or f"{cfg.data.hf_dataset} split {cfg.data.hf_valid_split}"
            raise MTError(f"the validation set {where} is empty (fill it, or leave data.valid unset)")
        valid_text = (v_src, v_tgt)
    spm_path = run / "spm.model"
    if accelerator.is_main_process and not spm_path.is_file():
        accelerator.print(f"mt: training a {cfg.data.vocab_size}-piece SentencePiece model", file=sys.stderr)
        text = (s.lower() for s in src + tgt) if cfg.data.lowercase else iter(src + tgt)
        train_tokenizer(text, spm_path, vocab_size=cfg.data.vocab_size,
                        model_type=cfg.data.spm_model_type, seed=cfg.train.seed,
                        character_coverage=cfg.data.spm_character_coverage,
                        max_sentences=cfg.data.spm_max_sentences)
    accelerator.wait_for_everyone()
    tok = Tokenizer(spm_path, lowercase=cfg.data.lowercase)

    def encode(src_text, tgt_text, max_len=0, max_ratio=0.0, **sampling):
        if lm:
            d = data_mod.encode_mono(tok, tgt_text, max_len=max_len, keep_empty=cfg.data.pack, **sampling)
            return data_mod.pack(d, cfg.data.context) if cfg.data.pack else d
        return data_mod.encode_parallel(tok, src_text, tgt_text, max_len=max_len, max_ratio=max_ratio, **sampling)

    limits = dict(max_len=cfg.data.max_len, max_ratio=cfg.data.max_len_ratio)
    def sampled(epoch: int):  # subword regularisation: this epoch's segmentation, reproducibly
        seed = (cfg.train.seed * 1_000_003 + epoch) * 10_000_019 % 2**31
        return encode(src, tgt, alpha=cfg.data.spm_alpha, seed=seed, **limits)

    resample = sampled if cfg.data.spm_alpha > 0 else None
    train = encode(src, tgt, **limits) if resample is None else resample(0)
    if len(train.tgt) == 0:
        raise MTError("no training examples left after length filtering (data.max_len, data.max_len_ratio)")
    valid = None if valid_text is None else (*valid_text, encode(*valid_text))
    return tok, train, valid, resample
