"""`mt bench`: throughput and memory of training and decoding (mt.tools.bench)."""
from __future__ import annotations

import json

import click

from mt.config import Range

from mt.cli.common import Bounded, aot_option, load_translator, read_text, sampling_options


@click.group()
def bench():
    """Throughput and memory of training and decoding (a benchmark, not a test)."""


@bench.command("train")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE")
@click.option("--steps", type=Bounded(int, Range(1, 10**6)), default=20, show_default=True, help="Timed updates per repeat.")
@click.option("--repeats", type=Bounded(int, Range(1, 10**4)), default=3, show_default=True)
@click.option("--synthetic", type=Bounded(int, Range(0, 2**20)), default=0, metavar="LEN",
              help="Random sentences of about LEN tokens instead of the recipe's corpus (no data needed).")
@click.option("--json", "as_json", is_flag=True)
def bench_train(recipe, overrides, steps, repeats, synthetic, as_json):
    """Training throughput of RECIPE's model and batches."""
    from mt import config
    from mt.tools import bench as b

    result = b.bench_train(config.load(recipe, overrides), steps=steps, repeats=repeats, synthetic=synthetic)
    click.echo(json.dumps(result)) if as_json else b.print_table(f"mt bench train {recipe}", result)


@bench.command("translate")
@click.option("-m", "--model", "run", required=True, type=click.Path())
@click.option("--src", required=True, type=click.Path(), help="Sentences to translate.")
@click.option("--beam", "beam_size", type=Bounded(int, "decode.beam_size"), default=5, show_default=True)
@click.option("--batch-tokens", type=Bounded(int, "decode.batch_tokens"), default=None,
              help="Source tokens x beam per batch (default: the run's decode.batch_tokens).")
@click.option("--batch-sentences", type=Bounded(int, "decode.max_batch_sentences"), default=None,
              help="At most this many sentences per batch (default: decode.max_batch_sentences).")
@click.option("--repeats", type=Bounded(int, Range(1, 10**4)), default=3, show_default=True)
@click.option("--device", default=None)
@click.option("--quantize", type=click.Choice(["int8"]), default=None, help="Dynamic int8 linear layers (CPU).")
@aot_option
@click.option("--latency", type=Bounded(int, Range(1, 10**6)), default=None, metavar="N",
              help="Batch-1 latency instead: the first N sentences one at a time, ms per token vs the time "
                   "to read a step's weights from main memory and at their own working-set read rate.")
@sampling_options
@click.option("--steps", type=Bounded(int, "decode.steps"), default=None, help="Diffusion models: denoising passes.")
@click.option("--length-beam", type=Bounded(int, "decode.length_beam"), default=None,
              help="Diffusion models: candidate lengths.")
@click.option("--profile", is_flag=True, help="Where the time goes instead: one pass under torch.profiler, "
              "each operator's time by part of the step (products, attention, cache, top-k, ...), the rest Python.")
@click.option("--vs-ctranslate2", "vs_ct2", is_flag=True,
              help="Side by side with CTranslate2 on the same model (exported to a temporary folder; needs the "
                   "ctranslate2 package): --repeats rounds of mt then CTranslate2 at each --ct2-batches size "
                   "(with --quantize int8: CTranslate2's int8; with --latency N: both at batch 1), medians, ratio.")
@click.option("--ct2-batches", default="32,64,128", show_default=True, help="CTranslate2's batch sizes (sentences).")
@click.option("--json", "as_json", is_flag=True)
def bench_translate(run, src, beam_size, batch_tokens, batch_sentences, repeats, device, quantize, aot,
                    latency, sample, temperature, top_k, top_p, seed, steps, length_beam, profile, vs_ct2,
                    ct2_batches, as_json):
    """Decoding speed: sentences/s and generated tokens/s (search, or --sample)."""
    from mt.tools import bench as b

    t = load_translator(run, "model", device, batch_tokens, quantize, batch_sentences, aot)
    if vs_ct2:
        from mt.tools.vs_ctranslate2 import compare, print_comparison

        try:
            batches = [int(b) for b in ct2_batches.split(",")]
        except ValueError:
            raise click.BadParameter(f"{ct2_batches!r} is not a comma-separated list of numbers",
                                     param_hint="--ct2-batches") from None
        result = compare(t, run, src, read_text(src), beam_size=beam_size, batches=batches, rounds=repeats,
                         compute_type=quantize or "float32", latency=latency or 0)
        click.echo(json.dumps(result)) if as_json else print_comparison(result)
        return
    if latency:
        result = b.bench_latency(t, read_text(src), beam_size=beam_size, n=latency, steps=steps, length_beam=length_beam)
        click.echo(json.dumps(result)) if as_json else b.print_table(f"mt bench translate --latency (beam {beam_size})", result)
        return
    if profile:
        from mt.tools.profile_decoding import print_profile, profile_translate

        result = profile_translate(t, read_text(src), beam_size=1 if sample else beam_size, sample=sample,
                                   temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, steps=steps,
                                   length_beam=length_beam)
        click.echo(json.dumps(result)) if as_json else print_profile(result)
        return
    result = b.bench_translate(t, read_text(src), beam_size=1 if sample else beam_size, repeats=repeats,
                               sample=sample, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                               steps=steps, length_beam=length_beam)
    click.echo(json.dumps(result)) if as_json else b.print_table(f"mt bench translate (beam {beam_size})", result)


@bench.command("context")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Applied to every mixer.")
@click.option("--lengths", default="256,1024,4096,8192", show_default=True, help="Generated lengths reported.")
@click.option("--batch", "batches", default="1,16", show_default=True, help="Batch sizes.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None, help="Write a PNG plot here.")
@click.option("--json", "as_json", is_flag=True)
def bench_context(recipe, overrides, lengths, batches, plot_path, as_json):
    """Decoding cost against generated length for each token mixer: ms per token and state bytes."""
    from mt.errors import MTError
    from mt.tools import bench_context as bc

    try:
        lengths = [int(x) for x in lengths.split(",")]
        batches = [int(x) for x in batches.split(",")]
    except ValueError:
        raise MTError("--lengths and --batch take comma-separated integers, e.g. 256,1024") from None
    if min(lengths + batches) < 1:
        raise MTError("--lengths and --batch must be positive")
    rows = bc.bench_context(recipe, overrides, lengths=lengths, batches=batches)
    if plot_path:
        bc.plot(rows, plot_path)
    if as_json:
        click.echo(json.dumps(rows))
        return
    click.echo(f"{'mixer':14s} {'batch':>5s} " + " ".join(f"{f'{L} ms/tok':>12s} {f'{L} state':>11s}" for L in lengths))
    for name in dict.fromkeys(r["mixer"] for r in rows):
        for batch in batches:
            cells = {r["length"]: r for r in rows if r["mixer"] == name and r["batch"] == batch and r["asked"]}
            click.echo(f"{name:14s} {batch:5d} " + " ".join(
                f"{cells[L]['ms_per_token']:12.3f} {cells[L]['cache_bytes'] / 2**20:9.2f}Mi" for L in lengths))
    for batch in batches:
        for name in dict.fromkeys(r["mixer"] for r in rows if r["mixer"] != "full"):
            at = bc.crossover(rows, name, batch)
            click.echo(f"batch {batch}: {name} is cheaper per step than full attention from length "
                       f"{at if at else 'none measured'}")
