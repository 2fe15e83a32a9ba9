"""The `mt` command line: argument parsing and calls into the library, nothing else.

stdout carries only results; logs, warnings and progress go to stderr. A user error (MTError) is one
line on stderr and exit code 2.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from mt.errors import MTError


class Group(click.Group):
    """Turns MTError into one line and exit code 2, and a closed stdout into a quiet exit."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MTError as e:
            click.echo(f"mt: error: {e}", err=True)
            sys.exit(2)
        except BrokenPipeError:
            sys.stderr.close()
            sys.exit(1)


@click.group(cls=Group)
@click.version_option(package_name="mt")
def main():
    """mt: train, run and evaluate autoregressive sequence models."""


# --- data -------------------------------------------------------------------------------------
@main.group()
def data():
    """Fetch corpora."""


@data.command("multi30k")
@click.option("--out", "out", default="data/multi30k", show_default=True, help="Output folder.")
@click.option("--from", "source_dir", default=None, help="Copy from this local folder instead of downloading.")
def data_multi30k(out, source_dir):
    """Multi30K task 1 (raw): train, val, test_2016_flickr in en, de, fr, cs."""
    from mt.download import multi30k

    for path in multi30k(out, source_dir=source_dir):
        click.echo(str(path))


# --- train ------------------------------------------------------------------------------------
@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override a recipe key.")
@click.option("--resume", is_flag=True, help="Continue the run in train.out_dir from its saved state.")
def train(recipe, overrides, resume):
    """Train the model a RECIPE (YAML) describes."""
    from mt import config
    from mt.train import train as run_training

    run_training(config.load(recipe, overrides), resume=resume)


# --- translate --------------------------------------------------------------------------------
def decode_options(f):
    """Options shared by translate and eval."""
    opts = [
        click.option("-m", "--model", "run", required=True, type=click.Path(), help="Run directory."),
        click.option("--beam", "beam_size", type=click.IntRange(min=1), default=None, help="Beam size."),
        click.option("--greedy", is_flag=True, help="Greedy search (beam size 1)."),
        click.option("--length-penalty", type=float, default=None, help="Score = log P / len ** this."),
        click.option("--max-len-a", type=float, default=None, help="Max output length = a * src len + b."),
        click.option("--max-len-b", type=int, default=None),
        click.option("--batch-tokens", type=click.IntRange(min=1), default=None,
                     help="Source tokens x beam per batch."),
        click.option("--checkpoint", "weights", type=click.Choice(["model", "last"]), default="model",
                     show_default=True, help="Best (model) or latest (last) weights."),
        click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def load_translator(run, weights, device, batch_tokens):
    from mt.translate import Translator

    t = Translator.load(run, device=device, weights=weights)
    if batch_tokens:
        t.cfg.decode.batch_tokens = batch_tokens
    return t


def search_kwargs(beam_size, greedy, length_penalty, max_len_a, max_len_b) -> dict:
    return dict(beam_size=1 if greedy else beam_size, length_penalty=length_penalty,
                max_len_a=max_len_a, max_len_b=max_len_b)


def stdin_lines():
    """Lines of stdin as text, read lazily; invalid UTF-8 becomes U+FFFD."""
    for raw in sys.stdin.buffer:
        yield raw.decode("utf-8", errors="replace")


@main.command()
@decode_options
@click.option("--window", type=click.IntRange(min=1), default=None,
              help="Lines read ahead and sorted by length (default 1000; 1 when stdin is a terminal).")
def translate(run, beam_size, greedy, length_penalty, max_len_a, max_len_b, batch_tokens, weights,
              device, window):
    """Translate stdin to stdout, one output line per input line, in order."""
    t = load_translator(run, weights, device, batch_tokens)
    window = window or (1 if sys.stdin.isatty() else 1000)
    out = sys.stdout
    for hyp in t.translate_stream(stdin_lines(), window=window,
                                  **search_kwargs(beam_size, greedy, length_penalty, max_len_a, max_len_b)):
        out.write(hyp.replace("\n", " ") + "\n")
        out.flush()


# --- eval -------------------------------------------------------------------------------------
def read_text(path: str) -> list[str]:
    from mt.data import read_lines

    if not Path(path).is_file():
        raise MTError(f"file not found: {path}")
    return list(read_lines(path))


@main.command("eval")
@click.option("--bleu", is_flag=True, help="sacreBLEU BLEU (default when no metric is named).")
@click.option("--chrf", is_flag=True, help="sacreBLEU chrF.")
@click.option("--hyp", type=click.Path(), default=None, help="Hypotheses, one per line.")
@click.option("--ref", type=click.Path(), required=True, help="References, one per line.")
@click.option("--src", type=click.Path(), default=None, help="Source to translate with -m first.")
@click.option("-m", "--model", "run", type=click.Path(), default=None, help="Run directory (with --src).")
@click.option("--beam", "beam_size", type=click.IntRange(min=1), default=None)
@click.option("--greedy", is_flag=True)
@click.option("--length-penalty", type=float, default=None)
@click.option("--max-len-a", type=float, default=None)
@click.option("--max-len-b", type=int, default=None)
@click.option("--batch-tokens", type=click.IntRange(min=1), default=None)
@click.option("--checkpoint", "weights", type=click.Choice(["model", "last"]), default="model")
@click.option("--device", default=None)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def evaluate(bleu, chrf, hyp, ref, src, run, beam_size, greedy, length_penalty, max_len_a, max_len_b,
             batch_tokens, weights, device, as_json):
    """Score hypotheses (--hyp) or a model's translations of --src against --ref."""
    from mt.metrics import corpus_scores

    if (hyp is None) == (run is None):
        raise MTError("give either --hyp FILE, or -m RUN with --src FILE")
    refs = read_text(ref)
    if run is not None:
        if src is None:
            raise MTError("-m RUN needs --src FILE to translate")
        sources = read_text(src)
        if len(sources) != len(refs):
            raise MTError(f"{src} has {len(sources)} lines but {ref} has {len(refs)}")
        t = load_translator(run, weights, device, batch_tokens)
        hyps = t.translate(sources, **search_kwargs(beam_size, greedy, length_penalty, max_len_a, max_len_b))
    else:
        hyps = read_text(hyp)
        if len(hyps) != len(refs):
            raise MTError(f"{hyp} has {len(hyps)} lines but {ref} has {len(refs)}")
    scores = corpus_scores(hyps, refs, bleu=bleu or not chrf, chrf=chrf)
    if as_json:
        click.echo(json.dumps({k: {"score": v["score"], "signature": v["signature"]} for k, v in scores.items()}))
    else:
        for v in scores.values():
            click.echo(f"{v['text']}\n  signature: {v['signature']}")


if __name__ == "__main__":
    main()
