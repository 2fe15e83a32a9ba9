"""Corpora, compact token storage and token-budget batching.

A corpus is local parallel files (PREFIX.LANG or PREFIX.LANG.gz, paired by line number) or a Hugging
Face `datasets` dataset (hub name, or a directory written by `save_to_disk`). Encoded corpora live in
one flat int32 array per side plus offsets (`TokenArray`): no Python lists of Python ints.
Batches hold a token budget of padded source+target tokens, are built from length-sorted sentences so
padding stays small, and are shuffled per epoch from (seed, epoch) alone, so every process and every
resumed run sees the same order.
"""
from __future__ import annotations

import gzip
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from mt.config import DataConfig
from mt.errors import MTError
from mt.tokenizer import BOS, EOS, PAD, Tokenizer


def corpus_file(prefix: str, lang: str) -> Path:
    """PREFIX.LANG, or PREFIX.LANG.gz if only that exists."""
    for cand in (Path(f"{prefix}.{lang}"), Path(f"{prefix}.{lang}.gz")):
        if cand.is_file():
            return cand
    raise MTError(f"corpus file not found: {prefix}.{lang} (nor {prefix}.{lang}.gz)")


MAX_LINE_CHARS = 20_000  # characters read per input line: far past any model's positions, and it
                         # bounds memory (a 20 MB line would otherwise be read, encoded and held whole)


def capped_lines(stream, *, limit: int = MAX_LINE_CHARS, name: str = "input",
                 on_cut: Callable[[int, int], None] | None = None) -> Iterator[str]:
    """Lines of a text stream without line ends, each cut to its first `limit` characters; the rest of
    a longer line is read in bounded pieces and dropped, so it is still exactly one line.
    on_cut(line number (1-based), length in characters) hears of each cut line (default: a warning)."""
    if on_cut is None:
        def on_cut(number, length):
            warn(f"{name} line {number} has {length:,} characters; only its first {limit:,} are read")
    number = 0
    while line := stream.readline(limit + 1):
        number += 1
        text = line.rstrip("\r\n")
        if len(text) > limit:
            length, tail = len(text), line
            while not tail.endswith("\n") and (tail := stream.readline(1 << 20)):
                length += len(tail.rstrip("\r\n"))
            on_cut(number, length)
            text = text[:limit]
        yield text


def read_lines(path: str | Path, *, limit: int = MAX_LINE_CHARS, on_cut=None) -> Iterator[str]:
    """Lines of a UTF-8 text file (plain or gzip) without line ends, at most `limit` characters each
    (capped_lines); bad bytes become U+FFFD."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace", newline="\n") as f:
            yield from capped_lines(f, limit=limit, name=str(path), on_cut=on_cut)
    except (OSError, EOFError) as e:  # EOFError: a truncated gzip file
        raise MTError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None


def warn(msg: str) -> None:
    print(f"mt: warning: {msg}", file=sys.stderr)


def read_parallel(prefix: str, src_lang: str, tgt_lang: str, limit: int = 0) -> tuple[list[str], list[str]]:
    src_path, tgt_path = corpus_file(prefix, src_lang), corpus_file(prefix, tgt_lang)
    src, tgt = list(read_lines(src_path)), list(read_lines(tgt_path))
    if len(src) != len(tgt):
        raise MTError(f"{src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}")
    if limit:
        src, tgt = src[:limit], tgt[:limit]
    return src, tgt


def load_hf_split(cfg: DataConfig, split: str, column: str, limit: int = 0):
    """Column `column` of a split of the `datasets` dataset cfg.hf_dataset (a hub name, or a
    save_to_disk directory), its first `limit` rows when limit > 0."""
    import datasets  # heavy import: only when a hub corpus is used

    try:
        if Path(cfg.hf_dataset).is_dir():
            ds = datasets.load_from_disk(cfg.hf_dataset)
            ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            ds = datasets.load_dataset(cfg.hf_dataset, cfg.hf_config or None, split=split)
    except (FileNotFoundError, ValueError, KeyError, ConnectionError) as e:
        raise MTError(f"dataset {cfg.hf_dataset!r} split {split!r}: {str(e).splitlines()[0]}") from None
    if limit:
        ds = ds.select(range(min(limit, len(ds))))
    if column not in ds.column_names:
        raise MTError(f"dataset {cfg.hf_dataset!r}: no column {column!r} (has {ds.column_names})")
    return ds[column]


def read_hf(cfg: DataConfig, split: str, limit: int = 0) -> tuple[list[str], list[str]]:
    """Pairs from a `datasets` dataset whose `hf_field` column holds {lang: text} dicts."""
    src, tgt = [], []
    for row in load_hf_split(cfg, split, cfg.hf_field, limit):
        for lang in (cfg.src_lang, cfg.tgt_lang):
            if lang not in row:
                raise MTError(f"dataset {cfg.hf_dataset!r}: language {lang!r} not in {sorted(row)}")
        src.append(row[cfg.src_lang])
        tgt.append(row[cfg.tgt_lang])
    return src, tgt


def read_split(cfg: DataConfig, split: str) -> tuple[list[str], list[str]]:
    """split is 'train' or 'valid'."""
    limit = cfg.max_sentences if split == "train" else cfg.max_valid_sentences
    if cfg.hf_dataset:
        return read_hf(cfg, cfg.hf_train_split if split == "train" else cfg.hf_valid_split, limit)
    prefix = cfg.train if split == "train" else cfg.valid
    if not prefix:
        raise MTError(f"data.{split} is not set (a file prefix, or set data.hf_dataset)")
    return read_parallel(prefix, cfg.src_lang, cfg.tgt_lang, limit)


def read_text_split(cfg: DataConfig, split: str) -> list[str]:
    """Monolingual text for language models: PREFIX.SRC_LANG[.gz] (or the file PREFIX itself), or the
    `hf_text_field` column of a `datasets` split."""
    limit = cfg.max_sentences if split == "train" else cfg.max_valid_sentences
    if cfg.hf_dataset:
        name = cfg.hf_train_split if split == "train" else cfg.hf_valid_split
        return list(load_hf_split(cfg, name, cfg.hf_text_field, limit))
    prefix = cfg.train if split == "train" else cfg.valid
    if not prefix:
        raise MTError(f"data.{split} is not set (a file prefix, or set data.hf_dataset)")
    path = Path(prefix) if Path(prefix).is_file() else corpus_file(prefix, cfg.src_lang)
    texts = list(read_lines(path))
    return texts[:limit] if limit else texts


class TokenArray:
    """Variable-length int sequences in one flat int32 array plus int64 offsets."""

    def __init__(self, flat: np.ndarray, offsets: np.ndarray):
        self.flat, self.offsets = flat, offsets

    @classmethod
    def from_lists(cls, seqs: list[list[int]]) -> "TokenArray":
        lens = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
        offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        flat = np.fromiter((t for s in seqs for t in s), dtype=np.int32, count=int(offsets[-1]))
        return cls(flat, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.flat[self.offsets[i]:self.offsets[i + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def select(self, keep: np.ndarray) -> "TokenArray":
        return TokenArray.from_lists([self[i].tolist() for i in keep]) if len(keep) < len(self) else self


@dataclass
class ParallelData:
    src: TokenArray
    tgt: TokenArray
    packed: bool = False  # tgt holds fixed windows of a token stream (no BOS/EOS added per row)


def _encode(tok: Tokenizer, texts: list[str], alpha: float, seed: int) -> list[list[int]]:
    return tok.encode(texts, alpha=alpha, seed=seed) if alpha > 0 else tok.encode(texts)


def encode_mono(tok: Tokenizer, texts: list[str], *, max_len: int = 0, chunk: int = 100_000,
                alpha: float = 0.0, seed: int = 0, keep_empty: bool = False) -> ParallelData:
    """Language-model data: empty sources, one target sentence per non-empty text line (every line
    with keep_empty: a stream to pack, where an empty line is one more EOS, a blank line kept).
    alpha > 0 samples segmentations (subword regularisation) from `seed`."""
    arrays = []
    for start in range(0, len(texts), chunk):
        ids = [t for t in _encode(tok, texts[start:start + chunk], alpha, seed + start)
               if (t or keep_empty) and (not max_len or len(t) <= max_len)]
        arrays.append(TokenArray.from_lists(ids))
    tgt = _concat(arrays)
    return ParallelData(TokenArray(np.zeros(0, np.int32), np.zeros(len(tgt) + 1, np.int64)), tgt)


def pack(data: ParallelData, context: int) -> ParallelData:
    """One stream `s1 EOS s2 EOS ...` cut into windows of context + 1 tokens overlapping by one:
    each window trains context next-token predictions (document-level language modelling)."""
    lens = data.tgt.lengths()
    stream = np.empty(len(data.tgt.flat) + len(lens), dtype=np.int32)
    ends = np.cumsum(lens + 1) - 1
    mask = np.ones(len(stream), dtype=bool)
    mask[ends] = False
    stream[mask], stream[ends] = data.tgt.flat, EOS
    starts = np.arange(0, max(len(stream) - 1, 0), context)
    offsets = np.append(starts, len(stream) - 1)
    flat = np.concatenate([stream[a:b + 1] for a, b in zip(offsets[:-1], offsets[1:])]) if len(starts) else stream[:0]
    win_off = np.concatenate([[0], np.cumsum(np.diff(offsets) + 1)]).astype(np.int64)
    src = TokenArray(np.zeros(0, np.int32), np.zeros(len(starts) + 1, np.int64))
    return ParallelData(src, TokenArray(flat, win_off), packed=True)


def encode_parallel(tok: Tokenizer, src: list[str], tgt: list[str], *, max_len: int = 0,
                    max_ratio: float = 0.0, chunk: int = 100_000, alpha: float = 0.0,
                    seed: int = 0) -> ParallelData:
    """Encode in chunks (bounded memory) and drop empty, over-long or badly proportioned pairs.
    alpha > 0 samples segmentations (subword regularisation) from `seed`."""
    src_arrays, tgt_arrays = [], []
    for start in range(0, len(src), chunk):
        s_ids = _encode(tok, src[start:start + chunk], alpha, 2 * (seed + start))
        t_ids = _encode(tok, tgt[start:start + chunk], alpha, 2 * (seed + start) + 1)
        keep = [i for i, (s, t) in enumerate(zip(s_ids, t_ids))
                if s and t and (not max_len or (len(s) <= max_len and len(t) <= max_len))
                and (not max_ratio or max(len(s), len(t)) <= max_ratio * min(len(s), len(t)) + 5)]
        src_arrays.append(TokenArray.from_lists([s_ids[i] for i in keep]))
        tgt_arrays.append(TokenArray.from_lists([t_ids[i] for i in keep]))
    return ParallelData(_concat(src_arrays), _concat(tgt_arrays))


def _concat(arrays: list[TokenArray]) -> TokenArray:
    if not arrays:
        return TokenArray(np.zeros(0, np.int32), np.zeros(1, np.int64))
    flat = np.concatenate([a.flat for a in arrays])
    offsets, base = [np.zeros(1, np.int64)], 0
    for a in arrays:
        offsets.append(a.offsets[1:] + base)
        base += int(a.offsets[-1])
    return TokenArray(flat, np.concatenate(offsets))


def token_batches(src_lens: np.ndarray, tgt_lens: np.ndarray, batch_tokens: int, *, seed: int,
                  epoch: int, shuffle: bool = True) -> list[np.ndarray]:
    """Indices grouped so that n * max(longest source, longest target) <= batch_tokens.

    The budget counts padded positions per side, as fairseq's --max-tokens does (EOS/BOS included).
    Sentences are sorted by source then target length (random tie-break) so a batch holds similar
    lengths, then the batch order is shuffled. Deterministic in (seed, epoch).
    """
    rng = np.random.default_rng([seed, epoch])
    n = len(src_lens)
    order = rng.permutation(n) if shuffle else np.arange(n)
    s, t = src_lens[order] + 1, tgt_lens[order] + 1
    order = order[np.lexsort((t, s))]  # primary key: source length
    width = np.maximum(src_lens[order], tgt_lens[order]) + 1
    batches, start, longest = [], 0, 0
    for pos, w in enumerate(width.tolist()):
        longest = max(longest, w)
        if pos > start and (pos - start + 1) * longest > batch_tokens:
            batches.append(order[start:pos])
            start, longest = pos, w
    if start < n:
        batches.append(order[start:n])
    if shuffle:
        batches = [batches[j] for j in rng.permutation(len(batches))]
    return batches


def collate(data: ParallelData, idx: np.ndarray) -> dict[str, torch.Tensor]:
    """src = x EOS; tgt_in = BOS y; tgt_out = y EOS; right-padded with PAD. Shapes (B, S), (B, T).

    Packed windows w give tgt_in = w[:-1], tgt_out = w[1:] and an empty source (B, 0).
    """
    srcs = [data.src[i] for i in idx]
    tgts = [data.tgt[i] for i in idx]
    B = len(idx)
    S = 0 if data.packed else max(len(x) for x in srcs) + 1
    T = max(len(y) for y in tgts) - (1 if data.packed else -1)
    src = np.full((B, S), PAD, dtype=np.int64)
    tgt_in = np.full((B, T), PAD, dtype=np.int64)
    tgt_out = np.full((B, T), PAD, dtype=np.int64)
    for b, (x, y) in enumerate(zip(srcs, tgts)):
        if data.packed:
            tgt_in[b, :len(y) - 1], tgt_out[b, :len(y) - 1] = y[:-1], y[1:]
            continue
        src[b, :len(x)] = x
        src[b, len(x)] = EOS
        tgt_in[b, 0] = BOS
        tgt_in[b, 1:len(y) + 1] = y
        tgt_out[b, :len(y)] = y
        tgt_out[b, len(y)] = EOS
    return {"src": torch.from_numpy(src), "tgt_in": torch.from_numpy(tgt_in),
            "tgt_out": torch.from_numpy(tgt_out)}
