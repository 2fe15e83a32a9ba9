"""Options and helpers the `mt` subcommands share: decoding options, loading a run, stdin/stdout text."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from mt.errors import MTError


def _runs(ctx, param, value):
    """() -> None, one run -> its path, several -> the list (an ensemble)."""
    return None if not value else value[0] if len(value) == 1 else list(value)


def decode_options(*, model_required: bool = True):
    """Options shared by the commands that decode with a run (translate, eval)."""
    opts = [
        click.option("-m", "--model", "run", required=model_required, multiple=True, type=click.Path(),
                     callback=_runs, help="Run directory; repeat it to decode with an ensemble of runs."),
        click.option("--beam", "beam_size", type=click.IntRange(min=1), default=None, help="Beam size."),
        click.option("--greedy", is_flag=True, help="Greedy search (beam size 1)."),
        click.option("--length-penalty", type=float, default=None, help="Score = log P / len ** this."),
        click.option("--max-len-a", type=float, default=None, help="Max output length = a * src len + b."),
        click.option("--max-len-b", type=int, default=None),
        click.option("--batch-tokens", type=click.IntRange(min=1), default=None,
                     help="Source tokens x beam per batch (default: the run's decode.batch_tokens)."),
        click.option("--batch-sentences", type=click.IntRange(min=1), default=None,
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
    help="Greedy search and sampling one sentence at a time through the model's encoder and decoder step "
         "compiled ahead of time: lowest latency (CPU; a model compiles once, a minute or two, and later runs "
         "load it from $MT_CACHE_DIR, default ~/.cache/mt, in seconds).")


def load_translator(run, weights, device, batch_tokens=None, quantize=None, batch_sentences=None, aot=False):
    from mt.translate import Translator

    t = Translator.load(run, device=device, weights=weights, quantize=quantize, aot=aot)
    if batch_tokens:
        t.cfg.decode.batch_tokens = batch_tokens
    if batch_sentences:
        t.cfg.decode.max_batch_sentences = batch_sentences
    return t


def search_options(beam_size, greedy, length_penalty, max_len_a, max_len_b) -> dict:
    """The search keywords of Translator.translate_batch from the shared options."""
    return dict(beam_size=1 if greedy else beam_size, length_penalty=length_penalty,
                max_len_a=max_len_a, max_len_b=max_len_b)


def one_line(text: str) -> str:
    """Output text with no character that a reader could take for a line break."""
    return " ".join(text.splitlines()) if text else text


def stdin_lines():
    """Lines of stdin as text, read lazily; invalid UTF-8 becomes U+FFFD."""
    for raw in sys.stdin.buffer:
        yield raw.decode("utf-8", errors="replace")


def sampling_options(f):
    opts = [
        click.option("--sample", is_flag=True, help="Ancestral sampling instead of search."),
        click.option("--temperature", type=click.FloatRange(min=0), default=None, help="Sampling temperature (default 1)."),
        click.option("--top-k", type=click.IntRange(min=0), default=None, help="Sample among the k best (0: all)."),
        click.option("--top-p", type=click.FloatRange(0, 1), default=None, help="Nucleus mass (1: all)."),
        click.option("--seed", type=int, default=None, help="Sampling seed (default 0)."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def read_text(path: str) -> list[str]:
    from mt.data import read_lines

    if not Path(path).is_file():
        raise MTError(f"file not found: {path}")
    return list(read_lines(path))


def format_ppl(v: dict) -> str:
    return (f"perplexity per token {v['ppl_per_token']:.3f} (NLL {v['nll_per_token']:.4f} over {v['tokens']} "
            f"tokens), per sentence {v['ppl_per_sentence']:.4g} ({v['sentences']} sentences)")
