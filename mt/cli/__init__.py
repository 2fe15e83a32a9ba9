"""The `mt` command line: argument parsing, calls into the library and output formatting, nothing else.

stdout carries only results; logs, warnings and progress go to stderr. A user error (MTError) is one
line on stderr and exit code 2.
"""
from __future__ import annotations

import sys

import click

from mt.cli import bench, evaluate, scaling, translate as translate_cmd
from mt.cli.common import Bounded, _runs
from mt.config import Range
from mt.errors import MTError


class Group(click.Group):
    """Every failure the user can act on is one line on stderr: MTError and usage errors (bad options,
    values out of range) exit 2; a closed or full stdout, or a closed stdin, exits 1."""

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as e:
            fail(f"{e.ctx.command_path if e.ctx else 'mt'}: {e.format_message()}", 2)

    def invoke(self, ctx):
        try:
            result = super().invoke(ctx)
            flush_stdout()
            return result
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as e:
            fail(f"{e.ctx.command_path if e.ctx else 'mt'}: {e.format_message()}", 2)
        except MTError as e:
            fail(str(e), 2)
        except BrokenPipeError:  # a reader that stopped early (| head): nothing to report
            quiet_stdout()
            sys.exit(1)
        except OSError as e:
            if e.filename is not None or not std_stream_error(e):
                raise
            quiet_stdout()
            fail(f"cannot write the output to stdout ({e.strerror})", 1)
        except (MemoryError, RuntimeError) as e:  # sizes valid one by one, too big together
            if not out_of_memory(e):
                raise
            fail(f"out of memory ({str(e).splitlines()[0][:160] if str(e) else type(e).__name__}): use a smaller "
                 "model, batch (batch_tokens) or beam", 1)


def fail(message: str, code: int):
    """One line on stderr, then exit."""
    if sys.stderr is not None:
        print(f"mt: error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(code)


def flush_stdout():
    if sys.stdout is not None:
        sys.stdout.flush()


def std_stream_error(e: OSError) -> bool:
    """Whether an OSError without a file name came from writing stdout (e.g. > /dev/full)."""
    import errno

    return e.errno in (errno.ENOSPC, errno.EIO, errno.EBADF, errno.EDQUOT, errno.EFBIG)


def out_of_memory(e: BaseException) -> bool:
    """MemoryError, torch's OutOfMemoryError (CUDA), or the CPU allocator's RuntimeError."""
    return (isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError"
            or "can't allocate memory" in str(e) or "out of memory" in str(e).lower())


def quiet_stdout():
    """Point stdout at /dev/null so that the interpreter's final flush cannot fail a second time."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, AttributeError, ValueError):
        pass


@click.group(cls=Group)
@click.version_option(package_name="mt")
def main():
    """mt: train, run and evaluate sequence models (translation and language models)."""
    from mt.fast.runtime import tune_process

    if sys.stdout is None:  # started with stdout closed (>&-): results would have nowhere to go
        fail("stdout is closed: redirect it to a file or a pipe", 1)

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


@data.command("tinyshakespeare")
@click.option("--out", "out", default="data/tinyshakespeare", show_default=True, help="Output folder.")
@click.option("--from", "source", default=None, help="Read this local input.txt(.gz) instead of downloading.")
def data_tinyshakespeare(out, source):
    """Tiny Shakespeare: train.txt (first 90% of the characters) and valid.txt (last 10%)."""
    from mt.tools.download import tinyshakespeare

    for path in tinyshakespeare(out, source=source):
        click.echo(str(path))


# --- train ------------------------------------------------------------------------------------
@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override a recipe key.")
@click.option("--resume", is_flag=True, help="Continue the run in train.out_dir from its saved state.")
@click.option("--overwrite", is_flag=True, help="Replace the trained run in train.out_dir (else refused).")
def train(recipe, overrides, resume, overwrite):
    """Train the model a RECIPE (YAML) describes into train.out_dir (a new or empty directory, or a
    run to --resume or to --overwrite)."""
    from mt import config
    from mt.train import train as run_training

    run_training(config.load(recipe, overrides), resume=resume, overwrite=overwrite)


@main.command()
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--last", type=Bounded(int, Range(1, 10**4)), default=5, show_default=True, help="How many snapshots.")
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
@click.option("--overwrite", is_flag=True, help="Replace an earlier export at --out (else refused).")
def export(run, fmt, out, weights, quantization, overwrite):
    """Export RUN for another runtime: CTranslate2 (pip install "mt[ctranslate2]"); an encoder-decoder
    serves with its Translator, a decoder-only or prefix LM with its Generator."""
    from mt.tools.export import export_ctranslate2

    path = export_ctranslate2(run, out, weights=weights, quantization=quantization, overwrite=overwrite)
    click.echo(f"mt: wrote a CTranslate2 model to {path} (tokenizer: {path}/spm.model; input format: "
               f"`python -c 'import mt.tools.export; help(mt.tools.export)'`)", err=True)


@main.command()
@click.option("-m", "--model", "run", required=True, multiple=True, type=click.Path(), callback=_runs,
              help="Teacher run directory; repeat it for an ensemble of teachers.")
@click.option("--train", "prefix", required=True, help="Corpus PREFIX: reads PREFIX.SRC (or PREFIX.SRC.gz).")
@click.option("--out", required=True, help="Output PREFIX: writes OUT.SRC (a copy) and OUT.TGT (the translations).")
@click.option("--beam", "beam_size", type=Bounded(int, "decode.beam_size"), default=5, show_default=True)
@click.option("--window", type=Bounded(int, Range(1, 10**6)), default=1000, show_default=True,
              help="Lines translated (and written) together.")
@click.option("--device", default=None)
def distill(run, prefix, out, beam_size, window, device):
    """Sequence-level knowledge distillation: the teacher's beam translations of a training corpus,
    as a corpus (train a student with data.train=OUT). Resumable: rerun the same command."""
    from mt.cli.common import load_translator
    from mt.tools.distill import distill as run_distill

    t = load_translator(run, "model", device)
    src, tgt = run_distill(t, prefix, t.cfg.data.src_lang, t.cfg.data.tgt_lang, out, beam_size=beam_size,
                           window=window)
    click.echo(f"mt: wrote {src} and {tgt}", err=True)


main.add_command(translate_cmd.translate)
main.add_command(translate_cmd.sample)
main.add_command(evaluate.score)
main.add_command(evaluate.evaluate)
main.add_command(bench.bench)
main.add_command(scaling.scaling)


if __name__ == "__main__":
    main()
