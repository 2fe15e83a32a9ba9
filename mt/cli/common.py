"""Options and helpers the `mt` subcommands share: decoding options, loading a run, stdin/stdout text."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import click

from mt.config import RANGES, Range
from mt.errors import MTError


class Bounded(click.ParamType):
    """An int or float option valid in a Range (a config key's, when named by its key): nan, inf and
    numbers outside it are usage errors (one line, exit code 2)."""

    def __init__(self, kind: type, valid: Range | str):
        self.kind, self.valid = kind, RANGES[valid] if isinstance(valid, str) else valid
        self.name = f"{'integer' if kind is int else 'number'} in {self.valid}"

    def convert(self, value, param, ctx):
        try:
            number = value if isinstance(value, self.kind) and not isinstance(value, bool) else self.kind(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not an {self.name}" if self.kind is int else f"{value!r} is not a {self.name}",
                      param, ctx)
        if not (math.isfinite(number) and number in self.valid):
            self.fail(f"{value} is not in {self.valid}", param, ctx)
        return number


def _runs(ctx, param, value):
    """() -> None, one run -> its path, several -> the list (an ensemble)."""
    return None if not value else value[0] if len(value) == 1 else list(value)


def decode_options(*, model_required: bool = True):
    """Options shared by the commands that decode with a run (translate, eval)."""
    opts = [
        click.option("-m", "--model", "run", required=model_required, multiple=True, type=click.Path(),
                     callback=_runs, help="Run directory; repeat it to decode with an ensemble of runs."),
        click.option("--beam", "beam_size", type=Bounded(int, "decode.beam_size"), default=None, help="Beam size."),
        click.option("--greedy", is_flag=True, help="Greedy search (beam size 1)."),
        click.option("--length-penalty", type=Bounded(float, "decode.length_penalty"), default=None, help="Score = log P / len ** this."),
        click.option("--max-len-a", type=Bounded(float, "decode.max_len_a"), default=None, help="Max output length = a * src len + b."),
        click.option("--max-len-b", type=Bounded(int, "decode.max_len_b"), default=None),
        click.option("--steps", type=Bounded(int, "decode.steps"), default=None,
                     help="Diffusion models: denoising passes per candidate length (default decode.steps, 10)."),
        click.option("--length-beam", type=Bounded(int, "decode.length_beam"), default=None,
                     help="Diffusion models: candidate lengths decoded, the best kept (default decode.length_beam, 3)."),
        click.option("--batch-tokens", type=Bounded(int, "decode.batch_tokens"), default=None,
                     help="Source tokens x beam per batch (default: the run's decode.batch_tokens)."),
        click.option("--batch-sentences", type=Bounded(int, "decode.max_batch_sentences"), default=None,
                     help="At most this many sentences per batch (default: decode.max_batch_sentences)."),
        click.option("--checkpoint", "weights", type=click.Choice(["model", "last", "averaged"]), default="model",
                     show_default=True, help="Best (model), latest (last) or averaged (mt average) weights."),
        click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)."),
        click.option("--quantize", type=click.Choice(["int8"]), default=None,
                     help="Dynamic int8 linear layers (CPU)."),
        aot_option,
    ]

    def decorate(f):
        for opt in reversed(opts):
            f = opt(f)
        return f
    return decorate


aot_option = click.option(
    "--aot", is_flag=True,
    help="Decode through the model's decoder step compiled ahead of time (CPU, float32; an ensemble member by "
         "member): batches for "
         "greedy search, sampling and beam search; with --batch-sentences 1, greedy search and sampling one "
         "sentence at a time, the lowest latency. A model compiles once (under a minute a step kind) and later "
         "runs load it from $MT_CACHE_DIR, default ~/.cache/mt, in seconds.")


def load_translator(run, weights, device, batch_tokens=None, quantize=None, batch_sentences=None, aot=False):
    from mt.translate import Translator

    t = Translator.load(run, device=device, weights=weights, quantize=quantize, aot=aot)
    if batch_tokens:
        t.cfg.decode.batch_tokens = batch_tokens
    if batch_sentences:
        t.cfg.decode.max_batch_sentences = batch_sentences
    return t


def search_options(beam_size, greedy, length_penalty, max_len_a, max_len_b, steps=None, length_beam=None) -> dict:
    """The search keywords of Translator.translate_batch from the shared options."""
    return dict(beam_size=1 if greedy else beam_size, length_penalty=length_penalty,
                max_len_a=max_len_a, max_len_b=max_len_b, steps=steps, length_beam=length_beam)


def one_line(text: str) -> str:
    """Output text with no character that a reader could take for a line break."""
    return " ".join(text.splitlines()) if text else text


def stdin_lines(limit: int | None = None, on_cut=None):
    """Lines of stdin as text without line ends, read lazily, at most `limit` characters each
    (mt.data.capped_lines); invalid UTF-8 becomes U+FFFD."""
    import io

    from mt.data import MAX_LINE_CHARS, capped_lines

    if sys.stdin is None:
        raise MTError("stdin is closed: give the input on stdin (a file or a pipe)")
    text = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="replace", newline="\n")
    return capped_lines(text, limit=limit or MAX_LINE_CHARS, name="stdin", on_cut=on_cut)


def interactive() -> bool:
    return sys.stdin is not None and sys.stdin.isatty()


max_line_chars_option = click.option(
    "--max-line-chars", type=Bounded(int, Range(1, 10**8)), default=None,
    help="Characters read per input line (default 20,000): a longer line is cut there, with a warning, "
         "and still answered by one output line; memory stays bounded.")


def sampling_options(f):
    opts = [
        click.option("--sample", is_flag=True, help="Ancestral sampling instead of search."),
        click.option("--temperature", type=Bounded(float, "decode.temperature"), default=None, help="Sampling temperature (default 1)."),
        click.option("--top-k", type=Bounded(int, "decode.top_k"), default=None, help="Sample among the k best (0: all)."),
        click.option("--top-p", type=Bounded(float, "decode.top_p"), default=None, help="Nucleus mass (1: all)."),
        click.option("--seed", type=Bounded(int, "decode.seed"), default=None, help="Sampling seed (default 0)."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def read_text(path: str, **capped) -> list[str]:
    """The lines of a text file (mt.data.read_lines: `limit`, `on_cut`)."""
    from mt.data import read_lines

    if not Path(path).is_file():
        raise MTError(f"file not found: {path}")
    return list(read_lines(path, **capped))


def format_ppl(v: dict) -> str:
    """One line of perplexities; a diffusion model's are upper bounds ('<=', from its NELBO)."""
    skipped = f"; {v['not_scored']} not scored: too long for the model" if v.get("not_scored") else ""
    le = "<= " if v.get("bound") else ""
    what = "NELBO" if v.get("bound") else "NLL"
    return (f"perplexity per token {le}{v['ppl_per_token']:.3f} ({what} {v['nll_per_token']:.4f} over {v['tokens']} "
            f"tokens), per sentence {le}{v['ppl_per_sentence']:.4g} ({v['sentences']} sentences{skipped})"
            + (f"; {what} per character {le}{v['nll_per_char']:.4f} ({v['characters']} characters)"
               if "nll_per_char" in v else ""))
