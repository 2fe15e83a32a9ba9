"""`mt translate` (stdin to stdout, one line out per line in) and `mt sample`."""
from __future__ import annotations

import sys

import click

from mt.config import Range

from mt.cli.common import (Bounded, decode_options, interactive, load_translator, max_line_chars_option, one_line,
                           sampling_options, search_options, stdin_lines)


@click.command()
@decode_options()
@sampling_options
@click.option("--nbest", type=Bounded(int, Range(1, 1024)), default=None,
              help="N hypotheses (or samples) per input: 'index<TAB>hyp<TAB>log P<TAB>normalised score'.")
@click.option("--scores", is_flag=True, help="Add log P(y|x) as a second, tab-separated column.")
@click.option("--window", type=Bounded(int, Range(1, 10**6)), default=None,
              help="Lines read ahead and sorted by length (default 1000; 1 when stdin is a terminal, or for "
                   "--aot --batch-sentences 1's greedy search and sampling, which decode one line at a time).")
@max_line_chars_option
def translate(run, beam_size, greedy, length_penalty, max_len_a, max_len_b, steps, length_beam, batch_tokens,
              batch_sentences, weights, device, quantize, aot, sample, temperature, top_k, top_p, seed, nbest, scores,
              window, max_line_chars):
    """Translate stdin to stdout, one output line per input line (N with --nbest), in order."""
    lines = stdin_lines(max_line_chars)
    t = load_translator(run, weights, device, batch_tokens, quantize, batch_sentences, aot)
    options = search_options(beam_size, greedy, length_penalty, max_len_a, max_len_b, steps, length_beam)
    n = nbest or 1
    window = window or t.default_window(interactive=interactive(), beam_size=options["beam_size"],
                                        sample=sample, num_hypotheses=n)
    stream = t.translate_iterable(lines, window=window, num_hypotheses=n, sample=sample or None,
                                  temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, **options)
    out = sys.stdout
    for index, results in enumerate(stream):
        if nbest:
            if not results:  # empty input: empty hypotheses keep the index sequence complete
                out.write(f"{index}\t\t0.0000\t0.0000\n" * (n if sample else 1))
            for r in results:
                out.write(f"{index}\t{one_line(r.text)}\t{r.logprob:.4f}\t{r.score:.4f}\n")
        elif scores:
            out.write(f"{one_line(results[0].text)}\t{results[0].logprob:.4f}\n" if results else "\t0.0000\n")
        else:
            out.write((one_line(results[0].text) if results else "") + "\n")
        out.flush()


@click.command("sample")
@click.option("-m", "--model", "run", required=True, type=click.Path(), help="Run directory.")
@click.option("-n", "num", type=Bounded(int, Range(1, 10**6)), default=10, show_default=True, help="Samples per prompt.")
@click.option("--prompt", default="", help="Text to continue (a source sentence for a translation model); "
                                           "'-' reads one prompt per line from stdin.")
@click.option("--temperature", type=Bounded(float, "decode.temperature"), default=1.0, show_default=True)
@click.option("--top-k", type=Bounded(int, "decode.top_k"), default=0, help="Sample among the k best (0: all).")
@click.option("--top-p", type=Bounded(float, "decode.top_p"), default=1.0, help="Nucleus mass (1: all).")
@click.option("--seed", type=Bounded(int, "decode.seed"), default=0, show_default=True)
@click.option("--max-len", type=Bounded(int, Range(1, 2**20)), default=None, help="Most tokens generated.")
@click.option("--document", is_flag=True, help="A language model trained on a packed stream: write through "
                                               "line breaks (its EOS) to --max-len tokens; a sample is a block "
                                               "of lines after a '==> prompt I sample J <==' line.")
@click.option("--checkpoint", "weights", type=click.Choice(["model", "last", "averaged"]), default="model")
@click.option("--device", default=None)
def sample(run, num, prompt, temperature, top_k, top_p, seed, max_len, document, weights, device):
    """Draw samples, one per line (prompt + continuation for a language model)."""
    t = load_translator(run, weights, device)
    prompts = list(stdin_lines()) if prompt == "-" else [prompt]
    lengths = dict(max_len_a=0.0, max_len_b=max_len) if max_len else {}
    draws = t.generate_batch(prompts, num_samples=num, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                             document=document, **lengths)
    for i, samples in enumerate(draws, 1):
        for j, s in enumerate(samples, 1):
            # a document sample has line breaks (blank lines too): each comes after a header, as `head` does
            click.echo(f"==> prompt {i} sample {j} <==\n{s}" if document else one_line(s))
