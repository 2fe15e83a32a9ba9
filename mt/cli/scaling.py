"""`mt scaling run` and `mt scaling fit`: scaling laws from a sweep of small models."""
from __future__ import annotations

import json
import sys

import click

from mt.cli.common import Bounded
from mt.config import Range


@click.group()
def scaling():
    """Fit L(C) = a C^b + c on a sweep of small models and predict larger ones."""


@scaling.command("run")
@click.argument("sweep_recipe", type=click.Path(dir_okay=False))
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None, help="Overrides the sweep's out_dir.")
@click.option("--only", multiple=True, metavar="NAME", help="Train only these runs (e.g. one process per GPU).")
def run(sweep_recipe, out_dir, only):
    """Train every run of SWEEP_RECIPE (finished runs skipped, unfinished resumed)."""
    from mt.tools import scaling as s
    from mt.errors import MTError

    sweep = s.read_sweep(sweep_recipe)
    if only:
        unknown = set(only) - {r["name"] for r in sweep["runs"]}
        if unknown:
            raise MTError(f"--only {sorted(unknown)[0]}: no such run in {sweep_recipe}")
        sweep["runs"] = [r for r in sweep["runs"] if r["name"] in only]
    records = s.run_sweep(sweep, out_dir=out_dir, log=lambda m: click.echo(m, err=True))
    for r in records:
        click.echo(f"{r['name']:12s} N={r['non_embedding_params']:>11,} D={r['tokens']:>11,} "
                   f"C={r['compute']:.3e} loss={r['valid_loss']:.4f} wall={r['wall_s'] / 60:.1f} min")
    click.echo(f"total training time {sum(r['wall_s'] for r in records) / 60:.1f} min", err=True)


@scaling.command("fit")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--x", "axis", type=click.Choice(["compute", "params"]), default="compute", show_default=True,
              help="Fit L(C) against compute, or L(N) against non-embedding parameters.")
@click.option("--holdout", type=click.Choice(["none", "largest"]), default="none", show_default=True,
              help="Fit without the largest run and predict its loss.")
@click.option("--holdout-count", type=Bounded(int, Range(1, 10**6)), default=1, show_default=True,
              help="How many of the largest runs --holdout largest leaves out.")
@click.option("--bootstrap", "samples", type=Bounded(int, Range(0, 10**6)), default=200, show_default=True,
              help="Resamples for the uncertainty of a, b, c (0: none).")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Write a log-log PNG here.")
@click.option("--json", "as_json", is_flag=True)
def fit(folder, axis, holdout, holdout_count, samples, plot, as_json):
    """Fit the law to the finished runs under FOLDER."""
    from mt.tools import scaling as s
    from mt.errors import MTError

    records = s.read_records(folder)
    key = "compute" if axis == "compute" else "non_embedding_params"
    records = sorted(records, key=lambda r: r[key])
    x, y = [float(r[key]) for r in records], [float(r["valid_loss"]) for r in records]
    held = list(range(len(x) - holdout_count, len(x))) if holdout == "largest" else []
    used = [i for i in range(len(x)) if i not in held]
    if len(used) < 3:
        raise MTError(f"{len(used)} runs left for the fit: it needs at least 3")
    law = s.fit_law([x[i] for i in used], [y[i] for i in used])
    spread = s.bootstrap([x[i] for i in used], [y[i] for i in used], samples) if samples else {}
    result = {"axis": axis, "a": law.a, "b": law.b, "c": law.c, "bootstrap_5_50_95": spread,
              "points": [{"name": r["name"], key: x[i], "loss": y[i], "fitted": law(x[i]), "held_out": i in held}
                         for i, r in enumerate(records)]}
    for i in held:
        result.setdefault("held_out", []).append(
            {"name": records[i]["name"], key: x[i], "measured": y[i], "predicted": law(x[i]),
             "error_percent": 100 * (law(x[i]) - y[i]) / y[i]})
    if plot:
        s.plot(plot, x, y, law, xlabel="compute C = 6 N D (FLOPs)" if axis == "compute"
               else "non-embedding parameters N", held_out=held)
    if as_json:
        click.echo(json.dumps(result, indent=1))
        return
    sym = "C" if axis == "compute" else "N"
    click.echo(f"L({sym}) = {law.a:.4g} * {sym}^{law.b:.4f} + {law.c:.4f}   ({len(used)} runs)")
    for name in "abc" if spread else "":
        lo, mid, hi = spread[name]
        click.echo(f"  {name}: bootstrap median {mid:.4g}, 90% interval [{lo:.4g}, {hi:.4g}]")
    for p in result["points"]:
        click.echo(f"  {p['name']:12s} {sym}={p[key]:.3e} loss {p['loss']:.4f} fit {p['fitted']:.4f}"
                   + ("  (held out)" if p["held_out"] else ""))
    for h in result.get("held_out", []):
        click.echo(f"held out {h['name']}: predicted {h['predicted']:.4f}, measured {h['measured']:.4f} "
                   f"({h['error_percent']:+.2f}% of its loss)")
    if plot:
        click.echo(f"plot: {plot}", err=True)
    sys.stdout.flush()
