"""The `mt` command line: argument parsing, calls into the library and output formatting, nothing else.

stdout carries only results; logs, warnings and progress go to stderr. A user error (MTError) is one
line on stderr and exit code 2.
"""
from __future__ import annotations

import sys

import click

from mt.cli import bench, evaluate, scaling, translate as translate_cmd
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
    """mt: train, run and evaluate sequence models (translation and language models)."""
    from mt.fast.runtime import tune_process

    tune_process()  # CPU: reuse freed memory across steps (MT_MALLOC=system to opt out), and the like


# --- data -------------------------------------------------------------------------------------
@main.group()
def data():
    """Fetch corpora."""


@data.command("multi30k")
@click.option("--out", "out", default="data/multi30k", show_default=True, help="Output folder.")
@click.option("--from", "source_dir", default=None, help="Copy from this local folder instead of downloading.")
def data_multi30k(out, source_dir):
    """Multi30K task 1 (raw): train, val, test_2016_flickr in en, de, fr, cs."""
    from mt.tools.download import multi30k

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
    from mt.tools.export import export_ctranslate2

    path = export_ctranslate2(run, out, weights=weights, quantization=quantization)
    click.echo(f"mt: wrote a CTranslate2 model to {path} (tokenizer: {path}/spm.model; input format: "
               f"`python -c 'import mt.tools.export; help(mt.tools.export)'`)", err=True)


main.add_command(translate_cmd.translate)
main.add_command(translate_cmd.sample)
main.add_command(evaluate.score)
main.add_command(evaluate.evaluate)
main.add_command(bench.bench)
main.add_command(scaling.scaling)


if __name__ == "__main__":
    main()
