"""`mt score`, `mt eval` and `mt bench`: point estimation, corpus metrics and benchmarks."""
from __future__ import annotations

import json
from pathlib import Path

import click

from mt.cli_common import (decode_options, format_ppl, load_translator, read_text, sampling_options,
                           search_kwargs, stdin_lines)
from mt.errors import MTError


# --- score ------------------------------------------------------------------------------------
@click.command()
@click.option("-m", "--model", "run", required=True, type=click.Path(), help="Run directory.")
@click.option("--src", type=click.Path(), default=None, help="Sources, one per line.")
@click.option("--tgt", type=click.Path(), default=None, help="Targets, one per line (else TSV pairs on stdin).")
@click.option("--text", type=click.Path(), default=None, help="Language models: texts to score, one per line.")
@click.option("--checkpoint", "weights", type=click.Choice(["model", "last", "averaged"]), default="model")
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
@click.command("eval")
@click.option("--bleu", is_flag=True, help="sacreBLEU BLEU (default when no metric is named).")
@click.option("--chrf", is_flag=True, help="sacreBLEU chrF.")
@click.option("--lc-tok", "lc_tok", is_flag=True,
              help="Also lowercased, Moses-tokenised BLEU (the Multi30K papers' convention; needs sacremoses).")
@click.option("--lang", default=None, help="Target language for --lc-tok (default: the run's, or --ref's suffix).")
@click.option("--ppl", is_flag=True, help="Per-token and per-sentence perplexity of --ref given --src (needs -m).")
@click.option("--hyp", type=click.Path(), default=None, help="Hypotheses, one per line.")
@click.option("--ref", type=click.Path(), default=None, help="References, one per line.")
@click.option("--text", type=click.Path(), default=None, help="Language models: text for --ppl.")
@click.option("--src", type=click.Path(), default=None, help="Source to translate with -m first.")
@decode_options(model_required=False)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def evaluate(bleu, chrf, lc_tok, lang, ppl, hyp, ref, text, src, run, beam_size, greedy, length_penalty, max_len_a, max_len_b,
             batch_tokens, batch_sentences, weights, device, quantize, compile_, as_json):
    """Score hypotheses (--hyp) or a model's translations of --src against --ref."""
    from mt.metrics import corpus_scores, lc_tok_bleu

    if text is not None:  # language model perplexity: log P(x) of each line
        if run is None:
            raise MTError("--text needs -m RUN")
        texts = read_text(text)
        t = load_translator(run, weights, device, batch_tokens, quantize, batch_sentences, compile_)
        result = t.perplexity([""] * len(texts), texts)
        click.echo(json.dumps({"ppl": result}) if as_json else format_ppl(result))
        return
    if hyp is None and run is None:
        raise MTError("give --hyp FILE, or -m RUN with --src FILE")
    if ref is None:
        raise MTError("--ref FILE is required (or --text FILE for a language model)")
    refs = read_text(ref)
    want_bleu = bleu or lc_tok or (not chrf and not ppl)
    results: dict = {}
    t = None
    if run is not None:
        if src is None:
            raise MTError("-m RUN needs --src FILE")
        sources = read_text(src)
        if len(sources) != len(refs):
            raise MTError(f"{src} has {len(sources)} lines but {ref} has {len(refs)}")
        t = load_translator(run, weights, device, batch_tokens, quantize, batch_sentences, compile_)
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
        if lc_tok:
            suffix = Path(ref).suffix.lstrip(".")
            lang = lang or (t.cfg.data.tgt_lang if t is not None else suffix if len(suffix) == 2 else "en")
            results["bleu_lc_tok"] = lc_tok_bleu(hyps, refs, lang)
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


# --- bench ------------------------------------------------------------------------------------
@click.group()
def bench():
    """Throughput and memory of training and decoding (a benchmark, not a test)."""


@bench.command("train")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE")
@click.option("--steps", type=click.IntRange(min=1), default=20, show_default=True, help="Timed updates per repeat.")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--synthetic", type=click.IntRange(min=0), default=0, metavar="LEN",
              help="Random sentences of about LEN tokens instead of the recipe's corpus (no data needed).")
@click.option("--json", "as_json", is_flag=True)
def bench_train(recipe, overrides, steps, repeats, synthetic, as_json):
    """Training throughput of RECIPE's model and batches."""
    from mt import bench as b, config

    result = b.bench_train(config.load(recipe, overrides), steps=steps, repeats=repeats, synthetic=synthetic)
    click.echo(json.dumps(result)) if as_json else b.print_table(f"mt bench train {recipe}", result)


@bench.command("translate")
@click.option("-m", "--model", "run", required=True, type=click.Path())
@click.option("--src", required=True, type=click.Path(), help="Sentences to translate.")
@click.option("--beam", "beam_size", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--batch-tokens", type=click.IntRange(min=1), default=None,
              help="Source tokens x beam per batch (default: the run's decode.batch_tokens).")
@click.option("--batch-sentences", type=click.IntRange(min=1), default=None,
              help="At most this many sentences per batch (default: decode.max_batch_sentences).")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--device", default=None)
@click.option("--quantize", type=click.Choice(["int8"]), default=None, help="Dynamic int8 linear layers (CPU).")
@click.option("--compile", "compile_", is_flag=True,
              help="Greedy search and sampling through a compiled step (see mt translate).")
@click.option("--latency", type=click.IntRange(min=1), default=None, metavar="N",
              help="Batch-1 latency instead: the first N sentences one at a time, ms per token vs the time "
                   "to read a step's weights from main memory and at their own working-set read rate.")
@sampling_options
@click.option("--json", "as_json", is_flag=True)
def bench_translate(run, src, beam_size, batch_tokens, batch_sentences, repeats, device, quantize, compile_,
                    latency, sample, temperature, top_k, top_p, seed, as_json):
    """Decoding speed: sentences/s and generated tokens/s (search, or --sample)."""
    from mt import bench as b

    t = load_translator(run, "model", device, batch_tokens, quantize, batch_sentences, compile_)
    if latency:
        result = b.bench_latency(t, read_text(src), beam_size=beam_size, n=latency)
        click.echo(json.dumps(result)) if as_json else b.print_table(f"mt bench translate --latency (beam {beam_size})", result)
        return
    result = b.bench_translate(t, read_text(src), beam_size=1 if sample else beam_size, repeats=repeats,
                               sample=sample, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    click.echo(json.dumps(result)) if as_json else b.print_table(f"mt bench translate (beam {beam_size})", result)
