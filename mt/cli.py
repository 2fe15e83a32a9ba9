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
        click.option("--quantize", type=click.Choice(["int8"]), default=None,
                     help="Dynamic int8 linear layers (CPU)."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def load_translator(run, weights, device, batch_tokens, quantize=None):
    from mt.translate import Translator

    t = Translator.load(run, device=device, weights=weights, quantize=quantize)
    if batch_tokens:
        t.cfg.decode.batch_tokens = batch_tokens
    return t


def search_kwargs(beam_size, greedy, length_penalty, max_len_a, max_len_b) -> dict:
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
        click.option("--temperature", type=click.FloatRange(min=0), default=1.0, show_default=True),
        click.option("--top-k", type=click.IntRange(min=0), default=0, help="Sample among the k best (0: all)."),
        click.option("--top-p", type=click.FloatRange(0, 1), default=1.0, help="Nucleus mass (1: all)."),
        click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


@main.command()
@decode_options
@sampling_options
@click.option("--nbest", type=click.IntRange(min=1), default=None,
              help="N hypotheses (or samples) per input: 'index<TAB>hyp<TAB>log P<TAB>normalised score'.")
@click.option("--scores", is_flag=True, help="Add log P(y|x) as a second, tab-separated column.")
@click.option("--window", type=click.IntRange(min=1), default=None,
              help="Lines read ahead and sorted by length (default 1000; 1 when stdin is a terminal).")
def translate(run, beam_size, greedy, length_penalty, max_len_a, max_len_b, batch_tokens, weights,
              device, quantize, sample, temperature, top_k, top_p, seed, nbest, scores, window):
    """Translate stdin to stdout, one output line per input line (N with --nbest), in order."""
    t = load_translator(run, weights, device, batch_tokens, quantize)
    window = window or (1 if sys.stdin.isatty() else 1000)
    kwargs = search_kwargs(beam_size, greedy, length_penalty, max_len_a, max_len_b)
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


# --- score ------------------------------------------------------------------------------------
@main.command()
@click.option("-m", "--model", "run", required=True, type=click.Path(), help="Run directory.")
@click.option("--src", type=click.Path(), default=None, help="Sources, one per line.")
@click.option("--tgt", type=click.Path(), default=None, help="Targets, one per line (else TSV pairs on stdin).")
@click.option("--text", type=click.Path(), default=None, help="Language models: texts to score, one per line.")
@click.option("--checkpoint", "weights", type=click.Choice(["model", "last"]), default="model")
@click.option("--device", default=None)
@click.option("--json", "as_json", is_flag=True, help="JSON lines on stdout, JSON summary on stderr.")
def score(run, src, tgt, text, weights, device, as_json):
    """log P(y|x) (or log P(x) with --text) per line: 'log P<TAB>tokens<TAB>NLL per token'; summary on stderr."""
    from mt.scoring import perplexities

    t = load_translator(run, weights, device, None)
    if text is not None:
        targets = read_text(text)
        sources = [""] * len(targets)
    elif (src is None) != (tgt is None):
        raise MTError("give both --src and --tgt, or neither (tab-separated pairs on stdin)")
    elif src is not None:
        sources, targets = read_text(src), read_text(tgt)
        if len(sources) != len(targets):
            raise MTError(f"{src} has {len(sources)} lines but {tgt} has {len(targets)}")
    else:
        pairs = [line.rstrip("\r\n").split("\t", 1) for line in stdin_lines()]
        sources = [p[0] for p in pairs]
        targets = [p[1] if len(p) > 1 else "" for p in pairs]
    results = t.score_pairs(sources, targets)
    for r in results:
        if as_json:
            click.echo(json.dumps({"logprob": r.logprob, "tokens": r.tokens, "nll_per_token": r.nll_per_token}))
        else:
            click.echo(f"{r.logprob:.4f}\t{r.tokens}\t{r.nll_per_token:.4f}")
    summary = perplexities(results)
    if as_json:
        click.echo(json.dumps(summary), err=True)
    else:
        click.echo(f"mt: {summary['sentences']} pairs, {summary['tokens']} target tokens, log P {summary['logprob']:.2f}, "
                   f"per-token perplexity {summary['ppl_per_token']:.3f}, "
                   f"per-sentence perplexity {summary['ppl_per_sentence']:.3f}", err=True)


# --- eval -------------------------------------------------------------------------------------
def read_text(path: str) -> list[str]:
    from mt.data import read_lines

    if not Path(path).is_file():
        raise MTError(f"file not found: {path}")
    return list(read_lines(path))


@main.command("eval")
@click.option("--bleu", is_flag=True, help="sacreBLEU BLEU (default when no metric is named).")
@click.option("--chrf", is_flag=True, help="sacreBLEU chrF.")
@click.option("--ppl", is_flag=True, help="Per-token and per-sentence perplexity of --ref given --src (needs -m).")
@click.option("--hyp", type=click.Path(), default=None, help="Hypotheses, one per line.")
@click.option("--ref", type=click.Path(), default=None, help="References, one per line.")
@click.option("--text", type=click.Path(), default=None, help="Language models: text for --ppl.")
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
def evaluate(bleu, chrf, ppl, hyp, ref, text, src, run, beam_size, greedy, length_penalty, max_len_a, max_len_b,
             batch_tokens, weights, device, as_json):
    """Score hypotheses (--hyp) or a model's translations of --src against --ref."""
    from mt.metrics import corpus_scores

    if text is not None:  # language model perplexity: log P(x) of each line
        if run is None:
            raise MTError("--text needs -m RUN")
        texts = read_text(text)
        result = load_translator(run, weights, device, batch_tokens).perplexity([""] * len(texts), texts)
        click.echo(json.dumps({"ppl": result}) if as_json else format_ppl(result))
        return
    if hyp is None and run is None:
        raise MTError("give --hyp FILE, or -m RUN with --src FILE")
    if ref is None:
        raise MTError("--ref FILE is required (or --text FILE for a language model)")
    refs = read_text(ref)
    want_bleu = bleu or (not chrf and not ppl)
    results: dict = {}
    t = None
    if run is not None:
        if src is None:
            raise MTError("-m RUN needs --src FILE")
        sources = read_text(src)
        if len(sources) != len(refs):
            raise MTError(f"{src} has {len(sources)} lines but {ref} has {len(refs)}")
        t = load_translator(run, weights, device, batch_tokens)
    elif ppl:
        raise MTError("--ppl needs -m RUN and --src FILE")
    if want_bleu or chrf:
        if hyp is not None:
            hyps = read_text(hyp)
            if len(hyps) != len(refs):
                raise MTError(f"{hyp} has {len(hyps)} lines but {ref} has {len(refs)}")
        else:
            hyps = t.translate(sources, **search_kwargs(beam_size, greedy, length_penalty, max_len_a, max_len_b))
        results.update(corpus_scores(hyps, refs, bleu=want_bleu, chrf=chrf))
    if ppl:
        results["ppl"] = t.perplexity(sources, refs)
    if as_json:
        click.echo(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "text"} for k, v in results.items()}))
        return
    for name, v in results.items():
        if name == "ppl":
            click.echo(format_ppl(v))
        else:
            click.echo(f"{v['text']}\n  signature: {v['signature']}")


def format_ppl(v: dict) -> str:
    return (f"perplexity per token {v['ppl_per_token']:.3f} (NLL {v['nll_per_token']:.4f} over {v['tokens']} "
            f"tokens), per sentence {v['ppl_per_sentence']:.4g} ({v['sentences']} sentences)")


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
@click.option("--checkpoint", "weights", type=click.Choice(["model", "last"]), default="model")
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


# --- bench ------------------------------------------------------------------------------------
@main.group()
def bench():
    """Throughput and memory of training and decoding (a benchmark, not a test)."""


@bench.command("train")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE")
@click.option("--steps", type=click.IntRange(min=1), default=20, show_default=True, help="Timed updates per repeat.")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def bench_train(recipe, overrides, steps, repeats, as_json):
    """Training throughput of RECIPE's model and batches."""
    from mt import bench as b, config

    result = b.bench_train(config.load(recipe, overrides), steps=steps, repeats=repeats)
    click.echo(json.dumps(result)) if as_json else b.print_table(f"mt bench train {recipe}", result)


@bench.command("translate")
@click.option("-m", "--model", "run", required=True, type=click.Path())
@click.option("--src", required=True, type=click.Path(), help="Sentences to translate.")
@click.option("--beam", "beam_size", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--batch-tokens", type=click.IntRange(min=1), default=None)
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--device", default=None)
@click.option("--quantize", type=click.Choice(["int8"]), default=None, help="Dynamic int8 linear layers (CPU).")
@click.option("--json", "as_json", is_flag=True)
def bench_translate(run, src, beam_size, batch_tokens, repeats, device, quantize, as_json):
    """Decoding speed: sentences/s and generated tokens/s."""
    from mt import bench as b

    t = load_translator(run, "model", device, batch_tokens, quantize)
    result = b.bench_translate(t, read_text(src), beam_size=beam_size, repeats=repeats)
    click.echo(json.dumps(result)) if as_json else b.print_table(f"mt bench translate (beam {beam_size})", result)


if __name__ == "__main__":
    main()
