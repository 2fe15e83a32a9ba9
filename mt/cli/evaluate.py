"""`mt score` and `mt eval`: point estimation, corpus metrics and perplexity."""
from __future__ import annotations

import json
import math
from pathlib import Path

import click

from mt.config import Range

from mt.cli.common import (Bounded, decode_options, format_ppl, load_translator, max_line_chars_option, read_text, search_options,
                           stdin_lines)
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
@max_line_chars_option
@click.option("--samples", type=Bounded(int, "decode.bound_samples"), default=None,
              help="Diffusion models: timesteps per pair of the NELBO estimate (default decode.bound_samples, 8).")
@click.option("--bound-steps", type=Bounded(int, Range(0, 1024)), default=0,
              help="Diffusion models: the T-step bound for this T (default 0: the continuous-time bound).")
def score(run, src, tgt, text, weights, device, as_json, max_line_chars, samples, bound_steps):
    """log P(y|x) (or log P(x) with --text) per line: 'log P<TAB>tokens<TAB>NLL per token'; summary on stderr.

    A pair the model cannot score exactly (longer than its position table, or a line cut at
    --max-line-chars) prints 'nan<TAB>0<TAB>nan' (null in --json), with a warning naming it.
    A diffusion model has no exact log P: each line is minus its NELBO (a lower bound on log P)
    and a fourth column, the estimate's standard error; perplexities are upper bounds ('ppl <=')."""
    from mt.scoring import NOT_SCORED, perplexities

    cut: set[int] = set()  # 0-based lines cut at the character cap: their numbers would be wrong

    def on_cut(name):
        def told(number, length):
            cut.add(number - 1)
            click.echo(f"mt: warning: {name} line {number} has {length:,} characters, more than --max-line-chars "
                       f"reads: not scored", err=True)
        return told

    read = dict(limit=max_line_chars) if max_line_chars else {}
    if text is not None:
        targets = read_text(text, on_cut=on_cut(text), **read)
        sources = [""] * len(targets)
    elif (src is None) != (tgt is None):
        raise MTError("give both --src and --tgt, or neither (tab-separated pairs on stdin)")
    elif src is not None:
        sources, targets = read_text(src, on_cut=on_cut(src), **read), read_text(tgt, on_cut=on_cut(tgt), **read)
        if len(sources) != len(targets):
            raise MTError(f"{src} has {len(sources)} lines but {tgt} has {len(targets)}")
    else:
        pairs = [line.split("\t", 1) for line in stdin_lines(max_line_chars, on_cut=on_cut("stdin"))]
        sources = [p[0] for p in pairs]
        targets = [p[1] if len(p) > 1 else "" for p in pairs]
    t = load_translator(run, weights, device)
    scored = t.score_batch(sources, targets, samples=samples, steps=bound_steps)
    results = [NOT_SCORED if i in cut else r for i, r in enumerate(scored)]
    bound = not t.model.exact_likelihood
    for r in results:
        if as_json:
            record = ({"logprob": r.logprob, "tokens": r.tokens, "nll_per_token": r.nll_per_token}
                      if r.scored else {"logprob": None, "tokens": 0, "nll_per_token": None})
            click.echo(json.dumps({**record, "bound": True, "stderr": r.stderr} if bound else record))
        else:
            click.echo(f"{r.logprob:.4f}\t{r.tokens}\t{r.nll_per_token:.4f}" + (f"\t{r.stderr:.4f}" if bound else ""))
    summary = perplexities(results, targets)
    if as_json:
        click.echo(json.dumps({k: v if math.isfinite(v) else None for k, v in summary.items()}), err=True)
    else:
        skipped = f" ({summary['not_scored']} not scored: too long for the model)" if summary["not_scored"] else ""
        le, what = ("<= ", f" (a bound: minus the NELBO, standard error {summary['stderr']:.2f})") if summary["bound"] else ("", "")
        click.echo(f"mt: {summary['sentences']} pairs{skipped}, {summary['tokens']} target tokens, "
                   f"log P {'>= ' if summary['bound'] else ''}{summary['logprob']:.2f}{what}, per-token perplexity "
                   f"{le}{summary['ppl_per_token']:.3f}, per-sentence perplexity {le}{summary['ppl_per_sentence']:.3f}, "
                   f"NLL per character {le}{summary['nll_per_char']:.4f}", err=True)


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
             steps, length_beam, batch_tokens, batch_sentences, weights, device, quantize, aot, as_json):
    """Score hypotheses (--hyp) or a model's translations of --src against --ref."""
    from mt.metrics import corpus_scores, lc_tok_bleu
    from mt.scoring import perplexities

    if text is not None:  # language model perplexity: log P(x) of each line
        if run is None:
            raise MTError("--text needs -m RUN")
        texts = read_text(text)
        t = load_translator(run, weights, device, batch_tokens, quantize, batch_sentences, aot)
        result = perplexities(t.score_batch([""] * len(texts), texts), texts)
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
        t = load_translator(run, weights, device, batch_tokens, quantize, batch_sentences, aot)
    elif ppl:
        raise MTError("--ppl needs -m RUN and --src FILE")
    if want_bleu or chrf:
        if hyp is not None:
            hyps = read_text(hyp)
            if len(hyps) != len(refs):
                raise MTError(f"{hyp} has {len(hyps)} lines but {ref} has {len(refs)}")
        else:
            hyps = t.translate(sources, **search_options(beam_size, greedy, length_penalty, max_len_a, max_len_b,
                                                         steps, length_beam))
        results.update(corpus_scores(hyps, refs, bleu=want_bleu, chrf=chrf))
        if lc_tok:
            suffix = Path(ref).suffix.lstrip(".")
            lang = lang or (t.cfg.data.tgt_lang if t is not None else suffix if len(suffix) == 2 else "en")
            results["bleu_lc_tok"] = lc_tok_bleu(hyps, refs, lang)
    if ppl:
        results["ppl"] = perplexities(t.score_batch(sources, refs), refs)
    if as_json:
        click.echo(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "text"} for k, v in results.items()}))
        return
    for name, v in results.items():
        if name == "ppl":
            click.echo(format_ppl(v))
        else:
            click.echo(f"{v['text']}\n  signature: {v['signature']}")
