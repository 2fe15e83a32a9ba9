"""Scaling laws: train a sweep of small models, fit L(C) = a * C^b + c, predict the large one.

A sweep recipe (YAML) names a base recipe, overrides for every run and one entry per run:

    base: multi30k.yaml            # relative to the sweep recipe
    out_dir: runs/scaling
    set: {train.max_tokens: 2000000, train.max_minutes: 0}
    runs:
      - {name: d64, set: {model.d_model: 64, model.ffn: 256}}

`run_sweep` trains each entry (finished runs are skipped, unfinished ones resumed) and writes
RUN/scaling.json: non-embedding parameters N, training target tokens D, compute C = 6 N D, wall time
and the validation loss (NLL per target token). `fit_law` fits the law by least squares on log L.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from mt import config as config_mod
from mt.errors import MTError


def read_sweep(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise MTError(f"sweep recipe not found: {path}")
    try:
        sweep = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise MTError(f"{path}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(sweep, dict) or not isinstance(sweep.get("runs"), list) or not sweep["runs"]:
        raise MTError(f"{path}: expected keys base, out_dir, set and a non-empty list 'runs'")
    unknown = set(sweep) - {"base", "out_dir", "set", "runs"}
    if unknown:
        raise MTError(f"{path}: unknown key {sorted(unknown)[0]} (known: base, out_dir, set, runs)")
    names = [r.get("name") if isinstance(r, dict) else None for r in sweep["runs"]]
    if not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise MTError(f"{path}: every entry of 'runs' needs a distinct name")
    sweep["base"] = str(path.parent / sweep.get("base", ""))
    sweep.setdefault("out_dir", "runs/scaling")
    return sweep


def overrides(mapping: dict | None) -> list[str]:
    """{'train.lr': 0.001} -> ['train.lr=0.001'] (values as YAML, so lists and strings survive)."""
    return [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
            for k, v in (mapping or {}).items()]


def run_config(sweep: dict, entry: dict, out_dir: Path | None = None):
    out = Path(out_dir or sweep["out_dir"]) / entry["name"]
    sets = overrides(sweep.get("set")) + overrides(entry.get("set")) + [f"train.out_dir={out}"]
    return config_mod.load(sweep["base"], sets), out


def non_embedding_parameters(cfg, vocab_size: int) -> int:
    from mt.models import build_model
    return build_model(cfg.model, vocab_size).num_parameters(non_embedding=True)


def run_sweep(sweep: dict, *, out_dir: str | Path | None = None, log=print) -> list[dict]:
    """Train every run of the sweep that has no scaling.json yet; returns all records."""
    from mt.checkpoint import read_meta
    from mt.train import train

    records, first_spm = [], None
    for entry in sweep["runs"]:
        cfg, run = run_config(sweep, entry, out_dir)
        record_path = run / "scaling.json"
        if record_path.is_file():
            log(f"mt scaling: {entry['name']} finished, skipped")
            records.append(json.loads(record_path.read_text()))
            continue
        resume = (run / "state").is_dir() or (run / "state.old").is_dir()
        log(f"mt scaling: {'resuming' if resume else 'training'} {entry['name']}")
        start = time.time()
        # one tokenizer for the whole sweep; a run that stopped before its first save starts again
        train(cfg, resume=resume, overwrite=not resume, tokenizer=None if resume else first_spm)
        progress = json.loads((run / "state" / "progress.json").read_text())
        losses = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        valid = [r for r in losses if "valid_loss" in r and "averaged" not in r]
        if not valid:
            raise MTError(f"{run}: no validation loss recorded (the sweep's base recipe needs data.valid)")
        n = non_embedding_parameters(cfg, read_meta(run)["vocab_size"])
        record = {"name": entry["name"], "non_embedding_params": n, "tokens": progress["tokens"],
                  "compute": 6 * n * progress["tokens"], "steps": progress["step"],
                  "wall_s": progress["elapsed"], "session_s": time.time() - start,
                  "valid_loss": valid[-1]["valid_loss"]}
        (run / "scaling.json").write_text(json.dumps(record, indent=1))
        records.append(record)
        first_spm = first_spm or run / "spm.model"
    return records


def read_records(folder: str | Path) -> list[dict]:
    folder = Path(folder)
    records = [json.loads(p.read_text()) for p in sorted(folder.glob("*/scaling.json"))]
    if not records:
        raise MTError(f"{folder}: no finished runs (RUN/scaling.json); run `mt scaling run` first")
    return sorted(records, key=lambda r: r["compute"])


@dataclass
class Law:
    a: float
    b: float
    c: float

    def __call__(self, x):
        return self.a * x ** self.b + self.c


def fit_law(x, y) -> Law:
    """Least squares on log y of y = a x^b + c with a > 0, b < 0, 0 <= c < min(y).

    A grid over c (for each c, log(y - c) is linear in log x) finds the basin; L-BFGS then polishes
    all three parameters on the log-space residuals.
    """
    x = torch.as_tensor(x, dtype=torch.float64)
    y = torch.as_tensor(y, dtype=torch.float64)
    if len(x) < 3:
        raise MTError(f"a power law with an offset needs at least 3 points, got {len(x)}")
    lx, ly, ymin = x.log(), y.log(), float(y.min())
    scale = float(lx.mean())  # centre log x: a is then well conditioned

    def residual(log_a, b, c):
        return ((log_a + b * (lx - scale)).exp() + c).log() - ly

    best = None
    for c in torch.linspace(0, ymin * 0.999, 400, dtype=torch.float64):
        t = (y - c).log()
        X = torch.stack([torch.ones_like(lx), lx - scale], 1)
        coef = torch.linalg.lstsq(X, t[:, None]).solution[:, 0]
        if coef[1] >= 0:
            continue
        err = float((residual(coef[0], coef[1], c) ** 2).sum())
        if best is None or err < best[0]:
            best = (err, float(coef[0]), float(coef[1]), float(c))
    if best is None:
        raise MTError("no decreasing power law fits these points (loss does not fall with compute)")
    _, log_a0, b0, c0 = best
    # unconstrained parameters: b = -exp(beta), c = ymin * sigmoid(gamma)
    p = torch.tensor([log_a0, math.log(-b0), math.log((c0 + 1e-12 * ymin) / (ymin - c0 + 1e-12 * ymin))],
                     dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([p], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (residual(p[0], -p[1].exp(), ymin * torch.sigmoid(p[2])) ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    p = p.detach()
    log_a, b, c = float(p[0]), -math.exp(float(p[1])), ymin * float(torch.sigmoid(p[2]))
    return Law(a=math.exp(log_a - b * scale), b=b, c=c)


def bootstrap(x, y, samples: int = 200, seed: int = 0) -> dict:
    """5th, 50th and 95th percentiles of a, b, c over fits to points resampled with replacement."""
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    fits = []
    for _ in range(samples):
        idx = torch.randint(len(x), (len(x),), generator=gen)
        if len(set(idx.tolist())) < 3:
            continue
        try:
            law = fit_law(x[idx], y[idx])
        except MTError:
            continue
        fits.append((law.a, law.b, law.c))
    if not fits:
        return {}
    t = torch.tensor(fits, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64), dim=0)
    return {name: [float(v) for v in q[:, i]] for i, name in enumerate("abc")}


def plot(path: str | Path, x, y, law: Law, *, xlabel: str, held_out: list[int] = ()) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MTError("--plot needs matplotlib: pip install 'mt[plot]'") from None
    fig, ax = plt.subplots(figsize=(5.5, 4))
    fit_idx = [i for i in range(len(x)) if i not in held_out]
    ax.scatter([x[i] for i in fit_idx], [y[i] for i in fit_idx], label="runs used for the fit", zorder=3)
    if held_out:
        ax.scatter([x[i] for i in held_out], [y[i] for i in held_out], marker="*", s=140, c="red",
                   label="held out (measured)", zorder=3)
        ax.scatter([x[i] for i in held_out], [law(x[i]) for i in held_out], marker="x", s=80, c="black",
                   label="held out (predicted)", zorder=3)
    lo, hi = min(x) / 1.5, max(x) * 1.5
    grid = [lo * (hi / lo) ** (i / 99) for i in range(100)]
    ax.plot(grid, [law(g) for g in grid], "--", c="gray", label=f"L = {law.a:.3g} x^{law.b:.3f} + {law.c:.3f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation loss (NLL / target token)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
