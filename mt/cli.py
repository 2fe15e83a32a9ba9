"""The `mt` command line: argument parsing and calls into the library, nothing else.

stdout carries only results; logs, warnings and progress go to stderr. A user error (MTError) is one
line on stderr and exit code 2.
"""
from __future__ import annotations

import sys

import click

from mt import cli_eval, cli_scaling
from mt.cli_common import (decode_options, load_translator, one_line, sampling_options, search_kwargs,
                           stdin_lines)
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
    from mt.runtime import keep_freed_memory

    keep_freed_memory()  # CPU: reuse freed memory across steps (MT_MALLOC=system to opt out)


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


@main.command()
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--last", type=click.IntRange(min=1), default=5, show_default=True, help="How many snapshots.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Default: RUN/averaged.safetensors.")
def average(run, last, out):
    """Average the last N weight snapshots of RUN (kept when train.average_last > 0).

    Use the result with `--checkpoint averaged` (translate, eval, score)."""
    from pathlib import Path

    from mt.checkpoint import average_snapshots, read_meta

    run = Path(run)
    read_meta(run)
    out = Path(out) if out else run / "averaged.safetensors"
    used = average_snapshots(run, last, out)
    click.echo(f"mt: averaged {len(used)} snapshots ({used[0].stem} .. {used[-1].stem}) into {out}", err=True)


@main.command()
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--to", "fmt", type=click.Choice(["ctranslate2"]), default="ctranslate2", show_default=True)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="New model directory.")
@click.option("--checkpoint", "weights", type=click.Choice(["model", "last", "averaged"]), default="model",
              show_default=True, help="Which weights of RUN.")
@click.option("--quantization", type=click.Choice(["int8", "int8_float32", "int16", "float16"]), default=None,
              help="Store the weights quantized (CTranslate2 can also quantize at load time).")
def export(run, fmt, out, weights, quantization):
    """Export RUN for another runtime: CTranslate2 (pip install "mt[ctranslate2]"); an encoder-decoder
    serves with its Translator, a decoder-only or prefix LM with its Generator."""
    from mt.export import export_ctranslate2

    path = export_ctranslate2(run, out, weights=weights, quantization=quantization)
    click.echo(f"mt: wrote a CTranslate2 model to {path} (tokenizer: {path}/spm.model; input format: "
               f"`python -c 'import mt.export; help(mt.export)'`)", err=True)


# --- translate --------------------------------------------------------------------------------
@main.command()
@decode_options()
@sampling_options
@click.option("--nbest", type=click.IntRange(min=1), default=None,
              help="N hypotheses (or samples) per input: 'index<TAB>hyp<TAB>log P<TAB>normalised score'.")
@click.option("--scores", is_flag=True, help="Add log P(y|x) as a second, tab-separated column.")
@click.option("--window", type=click.IntRange(min=1), default=None,
              help="Lines read ahead and sorted by length (default 1000; 1 when stdin is a terminal, or for "
                   "--compile's greedy search and sampling, which decode one line at a time anyway).")
def translate(run, beam_size, greedy, length_penalty, max_len_a, max_len_b, batch_tokens, batch_sentences,
              weights, device, quantize, compile_, sample, temperature, top_k, top_p, seed, nbest, scores, window):
    """Translate stdin to stdout, one output line per input line (N with --nbest), in order."""
    t = load_translator(run, weights, device, batch_tokens, quantize, batch_sentences, compile_)
    kwargs = search_kwargs(beam_size, greedy, length_penalty, max_len_a, max_len_b)
    one_at_a_time = compile_ and (sample or not nbest and (kwargs["beam_size"] or t.cfg.decode.beam_size) == 1)
    window = window or (1 if sys.stdin.isatty() or one_at_a_time else 1000)
    n = nbest or 1
    if nbest and not sample:
        kwargs["beam_size"] = max(nbest, kwargs["beam_size"] or t.cfg.decode.beam_size)
    lines = stdin_lines()
    if sample and n > 1:  # N draws per input: repeat each line, draws keyed by (line, j)
        lines = (line for line in stdin_lines() for _ in range(n))
    stream = t.search_stream(lines, window=window * (n if sample else 1), nbest=n, sample=sample,
                             temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, **kwargs)
    out = sys.stdout
    for i, hyps in enumerate(stream):
        texts = [one_line(h) for h in t.tokenizer.decode([h.tokens for h in hyps])]
        if nbest:
            index = i // n if sample else i
            if not hyps:  # empty input: one empty hypothesis keeps the index sequence complete
                out.write(f"{index}\t\t0.0000\t0.0000\n")
            for h, text in zip(hyps, texts):
                out.write(f"{index}\t{text}\t{h.logprob:.4f}\t{h.score:.4f}\n")
        elif scores:
            out.write(f"{texts[0]}\t{hyps[0].logprob:.4f}\n" if hyps else "\t0.0000\n")
        else:
            out.write((texts[0] if hyps else "") + "\n")
        out.flush()


# --- sample -----------------------------------------------------------------------------------
@main.command("sample")
@click.option("-m", "--model", "run", required=True, type=click.Path(), help="Run directory.")
@click.option("-n", "num", type=click.IntRange(min=1), default=10, show_default=True, help="Samples per prompt.")
@click.option("--prompt", default="", help="Text to continue (a source sentence for a translation model); "
                                           "'-' reads one prompt per line from stdin.")
@click.option("--temperature", type=click.FloatRange(min=0), default=1.0, show_default=True)
@click.option("--top-k", type=click.IntRange(min=0), default=0, help="Sample among the k best (0: all).")
@click.option("--top-p", type=click.FloatRange(0, 1), default=1.0, help="Nucleus mass (1: all).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--max-len", type=click.IntRange(min=1), default=None, help="Most tokens generated.")
@click.option("--checkpoint", "weights", type=click.Choice(["model", "last", "averaged"]), default="model")
@click.option("--device", default=None)
def sample_cmd(run, num, prompt, temperature, top_k, top_p, seed, max_len, weights, device):
    """Draw samples, one per line (prompt + continuation for a language model)."""
    t = load_translator(run, weights, device, None)
    prompts = list(stdin_lines()) if prompt == "-" else [prompt]
    lengths = dict(max_len_a=0.0, max_len_b=max_len) if max_len else {}
    draws = t.sample(prompts, n=num, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, **lengths)
    for samples in draws:
        for s in samples:
            click.echo(one_line(s))


main.add_command(cli_eval.score)
main.add_command(cli_eval.evaluate)
main.add_command(cli_eval.bench)
main.add_command(cli_scaling.scaling)


if __name__ == "__main__":
    main()
