"""Translator: a trained run as a library object (`mt.load(run)`), text in, text out.

Sentences are tokenized, sorted by length, cut into batches of at most `decode.batch_tokens` source
tokens x beam, decoded on the key/value cache (mt.search), and returned in input order. Empty or
whitespace-only inputs give empty outputs without touching the model. `translate_stream` reads an
iterable lazily, one window at a time, and yields results in input order as each window finishes.
"""
from __future__ import annotations

import copy
import itertools
import sys
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch.nn as nn

from mt.checkpoint import load_run
from mt.compiled import CompiledDecoder
from mt.config import LM_ARCHS, Config
from mt.ensemble import Ensemble
from mt.errors import MTError
from mt.linear import Linear
from mt.scoring import PairScore, perplexities, score_ids
from mt.search import Hypothesis, beam_search, generate
from mt.tokenizer import EOS, PAD, Tokenizer


def quantize_int8(model: nn.Module) -> nn.Module:
    """Dynamic int8 quantization of every linear layer, the tied output projection included: weights
    stored int8 with one scale per output row (per channel: a row far smaller than the largest keeps
    its precision), activations quantized per batch. CPU inference only. Returns a converted copy."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if type(m) is Linear:  # quantize_dynamic converts exact nn.Linear only; the parameters are the same
            m.__class__ = nn.Linear
    if getattr(model, "output", "absent") is None:  # tied: give the projection a weight of its own
        emb = model.tgt_embed if hasattr(model, "tgt_embed") else model.embed
        model.output = nn.Linear(emb.weight.shape[1], emb.weight.shape[0], bias=False)
        model.output.weight = nn.Parameter(emb.weight.detach().clone())
    per_channel = {nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}
    with warnings.catch_warnings():  # torch marks its quantized tensor types deprecated; they still work
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model, per_channel, dtype=torch.qint8, inplace=True)


def clean_line(text: str) -> str:
    """Drop line ends, NULs and other control characters that SentencePiece must not see."""
    text = text.rstrip("\r\n")
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else " " for ch in text)


class Translator:
    """Translate with a trained model. All options are keyword-only; None means the run's decode config."""

    def __init__(self, model, tokenizer: Tokenizer, cfg: Config, *, device: str = "cpu", compile: bool = False):
        self.model, self.tokenizer, self.cfg = model.to(device).eval(), tokenizer, cfg
        self.device = torch.device(device)
        # batch-1 greedy search and sampling through a compiled step (mt.compiled), for latency
        self.compiled = CompiledDecoder(self.model) if compile else None
        self._told_uncompiled = False
        # leave room for EOS; longer inputs are truncated (with a warning)
        self.lm = cfg.model.arch in LM_ARCHS  # inputs are prompts to continue, not sentences to translate
        # leave room for EOS and the output (prefix LMs read source and target as one sequence)
        self.max_src_tokens = cfg.model.max_positions // (2 if cfg.model.arch == "prefix_lm" else 1) - 1
        self.warn = lambda msg: print(f"mt: warning: {msg}", file=sys.stderr)

    @classmethod
    def load(cls, run: str | Path | list, *, device: str | None = None, weights: str = "model",
             quantize: str | None = None, compile: bool = False) -> "Translator":
        """`run`: a run directory, or a list of them to decode as an ensemble (mt.ensemble; the runs
        must share their tokenizer). quantize="int8": dynamic int8 linear layers (CPU inference only).
        compile: greedy search and sampling one sentence at a time through a compiled decoder step
        (mt.compiled: lowest latency per sentence on CPU; beam search is unaffected)."""
        runs = [run] if isinstance(run, (str, Path)) else list(run)
        if quantize not in (None, "int8"):
            raise ValueError(f"unknown quantization {quantize!r} (int8)")
        loaded = [load_run(r, weights=weights) for r in runs]
        cfg, model, tok = loaded[0]
        for r, (c, _, t) in zip(runs[1:], loaded[1:]):
            if not t.same_as(tok) or c.model.arch != cfg.model.arch:
                raise MTError(f"{r}: cannot ensemble with {runs[0]}: the runs must share tokenizer and model type")
        models = [quantize_int8(m) if quantize else m for _, m, _ in loaded]
        model = models[0] if len(models) == 1 else Ensemble(models)
        if quantize:
            device = "cpu"
        elif compile:
            device = device or "cpu"
        return cls(model, tok, cfg, device=device or ("cuda" if torch.cuda.is_available() else "cpu"),
                   compile=compile)

    # --- public API ------------------------------------------------------------------------
    def translate(self, sentences: list[str], *, beam_size: int | None = None,
                  length_penalty: float | None = None, max_len_a: float | None = None,
                  max_len_b: int | None = None) -> list[str]:
        """Translate a list of sentences; beam_size=1 is greedy search."""
        hyps = self.search(sentences, beam_size=beam_size, length_penalty=length_penalty,
                           max_len_a=max_len_a, max_len_b=max_len_b)
        return [self.tokenizer.decode([h[0].tokens])[0] if h else "" for h in hyps]

    def translate_stream(self, lines: Iterable[str], *, window: int = 1000, beam_size: int | None = None,
                         length_penalty: float | None = None, max_len_a: float | None = None,
                         max_len_b: int | None = None) -> Iterator[str]:
        """Translate an iterable lazily, `window` lines at a time, yielding outputs in input order."""
        for hyps in self.search_stream(lines, window=window, beam_size=beam_size, length_penalty=length_penalty,
                                       max_len_a=max_len_a, max_len_b=max_len_b):
            yield self.tokenizer.decode([hyps[0].tokens])[0] if hyps else ""

    def search_stream(self, lines: Iterable[str], *, window: int = 1000, **options) -> Iterator[list[Hypothesis]]:
        """`search` over an iterable, `window` lines at a time (options as for `search`); sampling
        draws are keyed by global line numbers, so they do not depend on the window."""
        it, start = iter(lines), 0
        while chunk := list(itertools.islice(it, window)):
            yield from self.search(chunk, ids=range(start, start + len(chunk)), **options)
            start += len(chunk)

    def sample(self, sentences: list[str], *, n: int = 4, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0, seed: int = 0, max_len_a: float | None = None,
               max_len_b: int | None = None) -> list[list[str]]:
        """`n` ancestral samples per sentence (temperature, then top-k, then nucleus top-p filtering).

        Draw j of sentence i is keyed by (seed, i * n + j): reproducible whatever the batching.
        """
        rep = [s for s in sentences for _ in range(n)]
        hyps = self.search(rep, sample=True, temperature=temperature, top_k=top_k, top_p=top_p,
                           seed=seed, max_len_a=max_len_a, max_len_b=max_len_b)
        # a language model's sample is the prompt and its continuation, decoded together
        prompts = self.tokenizer.encode([clean_line(s) for s in rep]) if self.lm else [[] for _ in rep]
        texts = self.tokenizer.decode([p + h[0].tokens if h else p for p, h in zip(prompts, hyps)])
        return [texts[i * n:(i + 1) * n] for i in range(len(sentences))]

    def score(self, sources: list[str], targets: list[str]) -> list[float]:
        """log P(target | source) per pair (natural log, EOS included)."""
        return [s.logprob for s in self.score_pairs(sources, targets)]

    def score_pairs(self, sources: list[str], targets: list[str]) -> list[PairScore]:
        """log P(y | x) and the number of target tokens scored, per pair."""
        if len(sources) != len(targets):
            raise ValueError(f"{len(sources)} sources but {len(targets)} targets")
        src_ids = [s[:self.max_src_tokens] for s in self.tokenizer.encode([clean_line(x) for x in sources])]
        tgt_ids = [t[:self.max_src_tokens] for t in self.tokenizer.encode([clean_line(y) for y in targets])]
        return score_ids(self.model, src_ids, tgt_ids, batch_tokens=self.cfg.decode.batch_tokens,
                         device=self.device)

    def score_texts(self, texts: list[str]) -> list[PairScore]:
        """Language models: log P(x) of each text (BOS x EOS; EOS included in the score)."""
        return self.score_pairs([""] * len(texts), texts)

    def perplexity(self, sources: list[str], targets: list[str]) -> dict:
        """Per-token and per-sentence perplexity of the targets given the sources (see mt.scoring)."""
        return perplexities(self.score_pairs(sources, targets))

    def search(self, sentences: list[str], *, beam_size: int | None = None,
               length_penalty: float | None = None, max_len_a: float | None = None,
               max_len_b: int | None = None, nbest: int = 1, sample: bool = False,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
               ids: list[int] | None = None) -> list[list[Hypothesis]]:
        """Hypotheses per sentence (empty list for an empty input), best first.

        `ids` key the sampling random numbers per sentence (default: positions in `sentences`).
        """
        dc = replace(self.cfg.decode, **{k: v for k, v in dict(
            beam_size=beam_size, length_penalty=length_penalty, max_len_a=max_len_a,
            max_len_b=max_len_b).items() if v is not None})
        texts = [clean_line(s) for s in sentences]
        ids = list(range(len(texts))) if ids is None else list(ids)
        out: list[list[Hypothesis]] = [[] for _ in texts]
        todo = [i for i, s in enumerate(texts) if s.strip() or self.lm]  # an LM continues an empty prompt
        encoded = self.tokenizer.encode([texts[i] for i in todo])
        src_ids = {}
        for i, ids_ in zip(todo, encoded):
            if len(ids_) > self.max_src_tokens:
                self.warn(f"input {ids[i] + 1} has {len(ids_)} tokens; truncated to {self.max_src_tokens}")
                ids_ = ids_[:self.max_src_tokens]
            src_ids[i] = ids_
        width = 1 if sample else dc.beam_size
        one_at_a_time = self.compiled is not None and (sample or dc.beam_size == 1)
        if self.compiled is not None and not one_at_a_time and not self._told_uncompiled:
            self.warn("--compile speeds up greedy search (--greedy) and sampling only; beam search runs uncompiled")
            self._told_uncompiled = True
        batches = ([i] for i in todo) if one_at_a_time else self._batches(todo, src_ids, width, dc)
        for batch in batches:
            src = self._pad([src_ids[i] for i in batch])
            lens = torch.tensor([len(src_ids[i]) for i in batch])
            max_lens = (dc.max_len_a * lens + dc.max_len_b).long()
            used = lens + 1 if self.cfg.model.arch != "transformer" else torch.zeros_like(lens)
            max_lens = torch.minimum(max_lens, self.cfg.model.max_positions - 2 - used)  # positions left
            if one_at_a_time:
                sampling = dict(ids=torch.tensor([ids[batch[0]]]), seed=seed, temperature=temperature, top_k=top_k,
                                top_p=top_p) if sample else None
                res = [[self.compiled.search(src, int(max_lens[0]), dc.length_penalty, sampling)]]
            elif sample or dc.beam_size == 1:
                res = generate(self.model, src, max_lens, sample=sample, ids=[ids[i] for i in batch],
                               seed=seed, temperature=temperature, top_k=top_k, top_p=top_p,
                               length_penalty=dc.length_penalty)
                res = [[h] for h in res]
            else:
                res = beam_search(self.model, src, max_lens, beam_size=dc.beam_size,
                                  length_penalty=dc.length_penalty, nbest=nbest)
            for i, hyps in zip(batch, res):
                out[i] = hyps
        return out

    # --- helpers ---------------------------------------------------------------------------
    def _batches(self, todo: list[int], src_ids: dict, width: int, dc) -> Iterator[list[int]]:
        """Longest first, at most batch_tokens (source tokens x width) and max_batch_sentences."""
        order = sorted(todo, key=lambda i: len(src_ids[i]), reverse=True)
        batch: list[int] = []
        longest = 0
        for i in order:
            n = len(src_ids[i]) + 1
            longest = max(longest, n)
            if batch and ((len(batch) + 1) * longest * width > dc.batch_tokens
                          or len(batch) >= dc.max_batch_sentences):
                yield batch
                batch, longest = [], n
            batch.append(i)
        if batch:
            yield batch

    def _pad(self, seqs: list[list[int]]) -> torch.Tensor:
        """x EOS (a prompt for an LM: x alone), right-padded: (B, S)."""
        eos = 0 if self.lm else 1
        S = max(len(s) for s in seqs) + eos
        src = torch.full((len(seqs), S), PAD, dtype=torch.long)
        for b, s in enumerate(seqs):
            src[b, :len(s)] = torch.tensor(s, dtype=torch.long)
            if eos:
                src[b, len(s)] = EOS
        return src.to(self.device)
