"""Ids in, hypotheses out: the batching around mt.search that translation, sampling and validation share.

Sources are sorted by length, cut into batches of at most `decode.batch_tokens` source tokens x beam
(and `decode.max_batch_sentences`), padded, decoded, and returned in input order. The model answers
what decoding needs to know (`reads_prompts`, `max_source_tokens`, `max_output_tokens`); no text here
but `encode_sources`, which turns lines into the ids this module decodes.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch

from mt.config import DecodeConfig
from mt.search import Hypothesis, beam_search, generate, mask_predict
from mt.tokenizer import EOS, PAD, Tokenizer


def clean_line(text: str) -> str:
    """Drop line ends, NULs and other control characters that SentencePiece must not see."""
    text = text.rstrip("\r\n")
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else " " for ch in text)


def encode_sources(tokenizer: Tokenizer, texts: list[str], *, model, line_numbers=None,
                   warn: Callable[[str], None] = lambda msg: None) -> dict[int, list[int]]:
    """{position in texts: ids} of the inputs to decode: empty lines are left out (an LM continues an
    empty prompt, so it keeps them); inputs longer than the model takes are truncated, with a warning
    naming the line (`line_numbers`: 0-based numbers to name, default the positions)."""
    texts = [clean_line(s) for s in texts]
    todo = [i for i, s in enumerate(texts) if s.strip() or model.reads_prompts]
    limit = model.max_source_tokens()
    out = {}
    for i, ids in zip(todo, tokenizer.encode([texts[i] for i in todo])):
        if len(ids) > limit:
            n = (line_numbers[i] if line_numbers is not None else i) + 1
            warn(f"input {n} has {len(ids)} tokens; truncated to {limit}")
            ids = ids[:limit]
        out[i] = ids
    return out


def decode_ids(model, src_ids: dict[int, list[int]], count: int, *, options: DecodeConfig, device,
               num_hypotheses: int = 1, ids=None, single=None,
               stop_at_eos: bool = True) -> list[list[Hypothesis]]:
    """Hypotheses for each of `count` inputs, best first (an empty list where src_ids has no entry).

    Search: beam search (options.beam_size > 1, the `num_hypotheses` best), greedy search, or with
    options.sample `num_hypotheses` draws per input, draw j of input i keyed by (seed, ids[i] *
    num_hypotheses + j) (`ids`: sentence numbers, default 0 .. count-1), so draws do not depend on
    the batching. `single`: what greedy search and sampling of a batch of one sentence run on instead
    of `model` (the batch-1 compiled step), or None.
    stop_at_eos=False (greedy search, sampling): EOS is a line break and every output runs its length.
    """
    ids = list(range(count)) if ids is None else list(ids)
    if options.sample and num_hypotheses > 1:  # every draw is a row of its own
        n = num_hypotheses
        rows = {i * n + j: src_ids[i] for i in src_ids for j in range(n)}
        draws = decode_ids(model, rows, count * n, options=options, device=device,
                           ids=[ids[r // n] * n + r % n for r in range(count * n)], single=single,
                           stop_at_eos=stop_at_eos)
        return [[h for j in range(n) for h in draws[i * n + j]] for i in range(count)]
    out: list[list[Hypothesis]] = [[] for _ in range(count)]
    width = options.length_beam if model.parallel_decoding else 1 if options.sample else options.beam_size
    todo = list(src_ids)
    for batch in token_batches(todo, src_ids, width, options):
        src = pad_sources([src_ids[i] for i in batch], eos=not model.reads_prompts).to(device)
        lens = torch.tensor([len(src_ids[i]) for i in batch])
        max_lens = torch.minimum((options.max_len_a * lens + options.max_len_b).long(), model.max_output_tokens(lens))
        if model.parallel_decoding:
            res = mask_predict(model, src, max_lens, steps=options.steps, length_beam=options.length_beam,
                               nbest=num_hypotheses, sample=options.sample, temperature=options.temperature,
                               ids=[ids[i] for i in batch], seed=options.seed)
        elif width == 1:
            stepper = single if single is not None and len(batch) == 1 else model
            res = [[h] for h in generate(stepper, src, max_lens, sample=options.sample, ids=[ids[i] for i in batch],
                                         seed=options.seed, temperature=options.temperature, top_k=options.top_k,
                                         top_p=options.top_p, length_penalty=options.length_penalty,
                                         stop_at_eos=stop_at_eos)]
        else:
            res = beam_search(model, src, max_lens, beam_size=width, length_penalty=options.length_penalty,
                              nbest=num_hypotheses)
        for i, hyps in zip(batch, res):
            out[i] = hyps
    return out


def token_batches(todo: list[int], src_ids: dict, width: int, options: DecodeConfig) -> Iterator[list[int]]:
    """Longest first, at most batch_tokens (source tokens x width) and max_batch_sentences."""
    order = sorted(todo, key=lambda i: len(src_ids[i]), reverse=True)
    batch: list[int] = []
    longest = 0
    for i in order:
        n = len(src_ids[i]) + 1
        longest = max(longest, n)
        if batch and ((len(batch) + 1) * longest * width > options.batch_tokens
                      or len(batch) >= options.max_batch_sentences):
            yield batch
            batch, longest = [], n
        batch.append(i)
    if batch:
        yield batch


def pad_sources(seqs: list[list[int]], *, eos: bool) -> torch.Tensor:
    """x EOS (a prompt for an LM: x alone, eos=False), right-padded: (B, S)."""
    S = max(len(s) for s in seqs) + int(eos)
    src = torch.full((len(seqs), S), PAD, dtype=torch.long)
    for b, s in enumerate(seqs):
        src[b, :len(s)] = torch.tensor(s, dtype=torch.long)
        if eos:
            src[b, len(s)] = EOS
    return src
