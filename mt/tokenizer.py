"""SentencePiece tokenizer with pinned special ids: pad=0, unk=1, bos=2, eos=3.

`train_tokenizer` learns a joint model from an iterator of sentences; `Tokenizer` encodes batches of
text to id lists and decodes id sequences back to text. BOS/EOS are never added here: data code adds
them visibly where a sequence needs them.
"""
from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Iterable

import sentencepiece as spm

from mt.errors import MTError

PAD, UNK, BOS, EOS = 0, 1, 2, 3


def train_tokenizer(sentences: Iterable[str], path: str | Path, *, vocab_size: int,
                    model_type: str = "bpe", character_coverage: float = 1.0,
                    max_sentences: int = 2_000_000, seed: int = 1) -> "Tokenizer":
    """Train a SentencePiece model on `sentences` and write it to `path`."""
    # Reservoir-sample so huge corpora never sit in memory twice.
    rng = random.Random(seed)
    sample: list[str] = []
    for i, s in enumerate(sentences):
        if not s:
            continue
        if len(sample) < max_sentences:
            sample.append(s)
        else:
            j = rng.randrange(i + 1)
            if j < max_sentences:
                sample[j] = s
    if not sample:
        raise MTError("cannot train a tokenizer: the training corpus is empty")
    model = io.BytesIO()
    # char: one piece per character and the text kept exactly (no normalisation, every space), so a
    # character model's tokens are the text's characters; vocab_size is then an upper bound
    exact = dict(hard_vocab_limit=False, normalization_rule_name="identity", remove_extra_whitespaces=False,
                 add_dummy_prefix=False) if model_type == "char" else {}
    try:
        spm.SentencePieceTrainer.train(**exact,
            sentence_iterator=iter(sample), model_writer=model, vocab_size=vocab_size,
            model_type=model_type, character_coverage=character_coverage,
            pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOS,
            pad_piece="<pad>", unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
            input_sentence_size=max_sentences, shuffle_input_sentence=True,
            max_sentence_length=1 << 16, num_threads=2, minloglevel=2)
    except RuntimeError as e:
        msg = str(e).splitlines()[-1] if str(e) else "failed"
        raise MTError(f"SentencePiece training failed (vocab_size={vocab_size}): {msg}") from None
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(model.getvalue())
    tmp.replace(path)
    return Tokenizer(path)


class Tokenizer:
    """Batched text <-> id conversion around one SentencePiece model file."""

    def __init__(self, path: str | Path, *, lowercase: bool = False):
        self.path, self.lowercase = Path(path), lowercase
        if not self.path.is_file():
            raise MTError(f"tokenizer model not found: {self.path}")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.load(str(self.path))
        except (OSError, RuntimeError):
            raise MTError(f"{self.path}: not a valid SentencePiece model") from None
        if (self.sp.pad_id(), self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id()) != (PAD, UNK, BOS, EOS):
            raise MTError(f"{self.path}: special ids must be pad=0 unk=1 bos=2 eos=3")

    def __len__(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, texts: list[str], *, alpha: float = 0.0, seed: int = 0) -> list[list[int]]:
        """Ids of each text; alpha > 0 samples a segmentation (subword regularisation), reproducibly
        for a given seed (one thread, so the sampling order is fixed)."""
        if self.lowercase:
            texts = [t.lower() for t in texts]
        if alpha <= 0:
            if len(texts) < 64:  # the list call starts a thread pool: ~0.13 ms, 30x one line
                return [self.sp.encode(t, out_type=int) for t in texts]
            return self.sp.encode(texts, out_type=int, num_threads=2)
        spm.set_random_generator_seed(seed)
        return self.sp.encode(texts, out_type=int, enable_sampling=True, alpha=alpha, nbest_size=-1,
                              num_threads=1)

    def same_as(self, other: "Tokenizer") -> bool:
        """True when both map text to the same ids (same SentencePiece model and casing)."""
        return (self.lowercase == other.lowercase
                and self.sp.serialized_model_proto() == other.sp.serialized_model_proto())

    def decode(self, ids: list[list[int]]) -> list[str]:
        return [self.sp.decode([i for i in seq if i > EOS]) for seq in ids]
