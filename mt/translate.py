"""Translator: a trained run as a library object (`mt.load(run)`), text in, text out.

Modelled on CTranslate2's Python API: keyword-only options, None meaning the run's `decode` config
(mt.config.DecodeConfig, sampling defaults included).
- `translate_batch(sources)` -> per source a list of Translation (best first);
- `translate_iterable(lines)` streams: reads `window` lines at a time, yields in input order;
- `score_batch(sources, targets)` -> log P(y | x) per pair (PairScore);
- `generate_batch(prompts, num_samples=n)` -> samples (for a language model: prompt + continuation);
- `translate(sources, beam_size=5)` -> the best translations as strings (a thin alias).
Empty or whitespace-only sources give no hypotheses (an empty line) without touching the model.
"""
from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator

import torch

from mt.checkpoint import load_run
from mt.config import Config, DecodeConfig, check_numbers
from mt.decoding import clean_line, decode_ids, encode_sources
from mt.ensemble import Ensemble
from mt.errors import MTError
from mt.scoring import NOT_SCORED, PairScore, score_ids
from mt.search import Hypothesis
from mt.tokenizer import EOS, Tokenizer


@dataclass
class Translation:
    text: str               # detokenized output
    tokens: list[int]       # output ids, without BOS and EOS
    logprob: float          # log P(y | x), EOS included
    score: float            # logprob / len(y + EOS) ** length_penalty


class Translator:
    """Decode and score with a model and its tokenizer. `decoder`: what search runs on instead of the
    model (mt.fast.aot_batched.BatchedAotDecoder), or None; `single`: what greedy search and sampling
    of one sentence alone run on (mt.fast.aot.AotDecoder), or None."""

    def __init__(self, model, tokenizer: Tokenizer, cfg: Config, *, device: str = "cpu", decoder=None,
                 single=None):
        self.model, self.tokenizer, self.cfg = model.to(device).eval(), tokenizer, cfg
        self.device = torch.device(device)
        self.decoder, self.single = decoder, single

    @classmethod
    def load(cls, run: str | Path | list, *, device: str | None = None, weights: str = "model",
             quantize: str | None = None, aot: bool = False, fast: bool = True) -> "Translator":
        """`run`: a run directory, or a list of them to decode as an ensemble (mt.ensemble; the runs
        must share their tokenizer). quantize="int8": dynamic int8 linear layers (CPU inference only).
        aot: search through the model's decoder step compiled ahead of time (CPU): batches through
        mt.fast.aot_batched, one sentence alone (greedy search, sampling) through mt.fast.aot's
        batch-1 step, the lowest latency. fast: the CPU speed paths of mt.fast (same results)."""
        from mt import fast as fast_paths
        from mt.fast.int8 import quantize_int8

        runs = [run] if isinstance(run, (str, Path)) else list(run)
        if quantize not in (None, "int8"):
            raise MTError(f"unknown quantization {quantize!r} (int8)")
        loaded = [load_run(r, weights=weights) for r in runs]
        cfg, model, tok = loaded[0]
        for r, (c, _, t) in zip(runs[1:], loaded[1:]):
            if not t.same_as(tok) or c.model.arch != cfg.model.arch:
                raise MTError(f"{r}: cannot ensemble with {runs[0]}: the runs must share tokenizer and model type")
        models = [m for _, m, _ in loaded]
        if quantize:
            models, device = [quantize_int8(m) for m in models], "cpu"
        elif aot:
            device = device or "cpu"
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        decoder = single = None
        if aot:
            from mt.fast.aot import AotDecoder
            from mt.fast.aot_batched import BatchedAotDecoder

            if len(models) == 1:
                single = AotDecoder(models[0])
                decoder = BatchedAotDecoder(models[0], like=single)  # one plain copy of the model for both
            else:  # each member's own compiled step; one sentence alone goes through them too
                decoder = Ensemble(models, steppers=[BatchedAotDecoder(m) for m in models])
        if fast:
            for m in models:
                fast_paths.enable(m)  # and the process settings (tune_process)
        model = models[0] if len(models) == 1 else Ensemble(models)
        return cls(model, tok, cfg, device=device, decoder=decoder, single=single)

    # --- the API ---------------------------------------------------------------------------
    def translate_batch(self, sources: list[str], *, beam_size: int | None = None, num_hypotheses: int = 1,
                        length_penalty: float | None = None, max_len_a: float | None = None,
                        max_len_b: int | None = None, sample: bool | None = None, temperature: float | None = None,
                        top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                        steps: int | None = None, length_beam: int | None = None,
                        line_numbers: list[int] | None = None) -> list[list[Translation]]:
        """Per source, its `num_hypotheses` best translations (or samples with sample=True), best first.

        beam_size 1 is greedy search; a diffusion model decodes with `steps` passes over
        `length_beam` candidate lengths instead. Draw j of source i is keyed by (seed, line i, j), so
        samples do not depend on the batching; `line_numbers` (0-based) number the sources for that and for
        warnings (default: their positions).
        """
        options = self.options(beam_size=beam_size, length_penalty=length_penalty, max_len_a=max_len_a,
                                max_len_b=max_len_b, sample=sample, temperature=temperature, top_k=top_k,
                                top_p=top_p, seed=seed, steps=steps, length_beam=length_beam)
        if not options.sample:  # room for num_hypotheses in the beam (a diffusion model: its lengths)
            options = replace(options, beam_size=max(options.beam_size, num_hypotheses),
                              length_beam=max(options.length_beam, num_hypotheses))
        _, hyps = self._decode(sources, options, num_hypotheses, line_numbers)
        texts = self.tokenizer.decode([h.tokens for hs in hyps for h in hs])
        it = iter(texts)
        return [[Translation(next(it), h.tokens, h.logprob, h.score) for h in hs] for hs in hyps]

    def translate_iterable(self, lines: Iterable[str], *, window: int = 1000, beam_size: int | None = None,
                           num_hypotheses: int = 1, length_penalty: float | None = None,
                           max_len_a: float | None = None, max_len_b: int | None = None, sample: bool | None = None,
                           temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                           seed: int | None = None, steps: int | None = None,
                           length_beam: int | None = None) -> Iterator[list[Translation]]:
        """translate_batch over an iterable read lazily, `window` lines at a time (sorted by length
        within it), yielding each line's translations in input order as its window finishes."""
        it, start = iter(lines), 0
        while chunk := list(itertools.islice(it, window)):
            yield from self.translate_batch(
                chunk, beam_size=beam_size, num_hypotheses=num_hypotheses, length_penalty=length_penalty,
                max_len_a=max_len_a, max_len_b=max_len_b, sample=sample, temperature=temperature, top_k=top_k,
                top_p=top_p, seed=seed, steps=steps, length_beam=length_beam,
                line_numbers=list(range(start, start + len(chunk))))
            start += len(chunk)

    def generate_batch(self, prompts: list[str], *, num_samples: int = 4, temperature: float | None = None,
                       top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                       max_len_a: float | None = None, max_len_b: int | None = None,
                       document: bool = False) -> list[list[str]]:
        """`num_samples` ancestral samples per prompt (temperature, then top-k, then nucleus top-p):
        for a language model the prompt and its continuation, for a translation model translations.
        document: a language model trained on a packed stream (data.pack) writes past its EOS, which
        is a line break there; a sample is then several lines, joined by newlines."""
        if document and not (self.model.reads_prompts and self.cfg.data.pack):
            raise MTError("--document needs a language model trained with data.pack (its EOS is a line break)")
        options = self.options(sample=True, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                               max_len_a=max_len_a, max_len_b=max_len_b)
        src_ids, hyps = self._decode(prompts, options, num_samples, None, stop_at_eos=not document)
        # a language model's sample is the prompt and its continuation, decoded together
        prefix = (lambda i: src_ids.get(i, [])) if self.model.reads_prompts else (lambda i: [])
        return [[self._text(prefix(i) + h.tokens) for h in hs] for i, hs in enumerate(hyps)]

    def _text(self, ids: list[int]) -> str:
        """Text of ids; EOS inside them (a document sample) is a line break."""
        lines, start = [], 0
        for j, t in enumerate(ids + [EOS]):
            if t == EOS:
                lines.append(ids[start:j])
                start = j + 1
        return "\n".join(self.tokenizer.decode(lines))

    def score_batch(self, sources: list[str], targets: list[str], *, samples: int | None = None,
                    steps: int = 0) -> list[PairScore]:
        """log P(target | source) and the number of target tokens scored (EOS included), per pair;
        a language model scores log P(target) (give empty sources). A pair longer than the model's
        position table is not scored (NOT_SCORED: logprob nan, 0 tokens), with a warning naming it:
        a truncated pair's number would be another pair's. A masked-diffusion model has no exact
        log P: its score is minus its NELBO (bound=True), estimated with `samples` timesteps per pair
        (default decode.bound_samples; the standard error in `stderr`); steps=T: the looser T-step
        bound."""
        if len(sources) != len(targets):
            raise MTError(f"{len(sources)} sources but {len(targets)} targets")
        src_ids = self.tokenizer.encode([clean_line(x) for x in sources])
        tgt_ids = self.tokenizer.encode([clean_line(y) for y in targets])
        max_src = self.model.max_source_tokens()
        fits = []
        for i, (s, t) in enumerate(zip(src_ids, tgt_ids)):
            max_tgt = self.model.max_target_tokens(len(s))
            if len(s) <= max_src and len(t) <= max_tgt:
                fits.append(i)
            else:
                warn(f"pair {i + 1} is not scored: {len(s)} source and {len(t)} target tokens, but the model "
                     f"scores at most {max_src} and {max(max_tgt, 0)} (its position table)")
        scored = score_ids(self.model, [src_ids[i] for i in fits], [tgt_ids[i] for i in fits],
                           batch_tokens=self.cfg.decode.batch_tokens, device=self.device,
                           samples=samples or self.cfg.decode.bound_samples, seed=self.cfg.decode.seed, steps=steps)
        results = [NOT_SCORED] * len(sources)
        for i, r in zip(fits, scored):
            results[i] = r
        return results

    def translate(self, sources: list[str], *, beam_size: int | None = None, length_penalty: float | None = None,
                  max_len_a: float | None = None, max_len_b: int | None = None, steps: int | None = None,
                  length_beam: int | None = None) -> list[str]:
        """The best translation of each source (beam_size=1: greedy search)."""
        results = self.translate_batch(sources, beam_size=beam_size, length_penalty=length_penalty,
                                       max_len_a=max_len_a, max_len_b=max_len_b, steps=steps, length_beam=length_beam)
        return [r[0].text if r else "" for r in results]

    def default_window(self, *, interactive: bool = False, beam_size: int | None = None,
                       sample: bool | None = None, num_hypotheses: int = 1) -> int:
        """Lines translate_iterable should read ahead: 1 for a terminal, or where the batch-1 compiled
        step decodes one line at a time anyway (so each line is answered as it arrives), else 1000."""
        options = self.options(beam_size=beam_size, sample=sample)
        return 1 if interactive or self._one_at_a_time(options, num_hypotheses) else 1000

    # --- helpers ---------------------------------------------------------------------------
    def _one_at_a_time(self, options: DecodeConfig, num_hypotheses: int = 1) -> bool:
        """Whether the batch-1 compiled step decodes every sentence alone: asked for with batches of
        one sentence (decode.max_batch_sentences 1), for greedy search or sampling."""
        return (self.single is not None and options.max_batch_sentences == 1
                and (options.sample or options.beam_size == 1 and num_hypotheses == 1))

    def options(self, **given) -> DecodeConfig:
        """The run's decode options with the given ones (those not None) in their place, each checked
        against its valid range (mt.config.RANGES)."""
        options = replace(self.cfg.decode, **{k: v for k, v in given.items() if v is not None})
        check_numbers(options, "decode", "decoding option")
        return options

    def _decode(self, sources: list[str], options: DecodeConfig, num_hypotheses: int,
                line_numbers, *, stop_at_eos: bool = True) -> tuple[dict[int, list[int]], list[list[Hypothesis]]]:
        """The inputs' ids (mt.decoding.encode_sources) and each input's hypotheses."""
        src_ids = encode_sources(self.tokenizer, sources, model=self.model, line_numbers=line_numbers, warn=warn)
        return src_ids, decode_ids(self.decoder or self.model, src_ids, len(sources), options=options,
                                   device=self.device, num_hypotheses=num_hypotheses, ids=line_numbers,
                                   single=self.single,
                                   stop_at_eos=stop_at_eos)


def warn(msg: str) -> None:
    print(f"mt: warning: {msg}", file=sys.stderr)
