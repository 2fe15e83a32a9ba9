"""The run directory: what `mt.load`, `mt translate -m` and `mt train --resume` read and write.

    RUN/config.yaml         the full config the model was built from (validated like a recipe on load)
    RUN/meta.json           format version, vocabulary size, step and validation scores of the weights
    RUN/spm.model           the SentencePiece model
    RUN/model.safetensors   best weights (by train.best_metric); RUN/last.safetensors: latest weights
    RUN/snapshots/          the last train.average_last saved weights (step_NNNNNNNN.safetensors), when on
    RUN/averaged.safetensors  their average (`mt average`, or at the end of training)
    RUN/metrics.jsonl       training and validation metrics, one JSON object per line
    RUN/state/              Accelerate's resumable training state (optimizer, schedule, RNG, data position)

Weights are safetensors only, nothing is unpickled; every file is written to a temporary name and
renamed, so a crash never leaves a half-written file where a reader would look.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from mt import config as config_mod
from mt.config import Config
from mt.errors import MTError

FORMAT_VERSION = 1


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_weights(model: torch.nn.Module, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_model(model, str(tmp))  # handles tied (shared) tensors
    os.replace(tmp, path)


def snapshot(model: torch.nn.Module, run: Path, step: int, keep: int) -> None:
    """Write the weights as RUN/snapshots/step_NNNNNNNN.safetensors and keep only the newest `keep`."""
    folder = run / "snapshots"
    folder.mkdir(exist_ok=True)
    save_weights(model, folder / f"step_{step:08d}.safetensors")
    for old in sorted(folder.glob("step_*.safetensors"))[:-keep]:
        old.unlink()


def average_snapshots(run: Path, last: int, out: Path) -> list[Path]:
    """Average the newest `last` snapshots of a run into `out`; returns the snapshots used."""
    paths = sorted((run / "snapshots").glob("step_*.safetensors"))[-last:]
    if not paths:
        raise MTError(f"{run}: no snapshots to average (train with train.average_last > 0)")
    total = None
    for path in paths:
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise MTError(f"{path}: cannot read weights ({str(e).splitlines()[0][:200]})") from None
        if total is None:
            total = {k: v.double() for k, v in tensors.items()}
        elif tensors.keys() != total.keys():
            raise MTError(f"{path}: its tensors differ from {paths[0].name}'s: not the same model")
        else:
            for k, v in tensors.items():
                total[k] += v.double()
    tmp = out.with_name(out.name + ".tmp")
    save_file({k: (v / len(paths)).float().contiguous() for k, v in total.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out)
    return paths


def load_weights(model: torch.nn.Module, path: Path) -> None:
    if not path.is_file():
        raise MTError(f"weights not found: {path}")
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise MTError(f"{path}: cannot read weights ({str(e).splitlines()[0][:200]})") from None
    if missing or unexpected:
        raise MTError(f"{path}: weights do not match the config (missing {sorted(missing)[:3]}, "
                      f"unexpected {sorted(unexpected)[:3]})")


def save_config(cfg: Config, run: Path, **meta) -> None:
    atomic_write_text(run / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    atomic_write_text(run / "meta.json", json.dumps({"format": FORMAT_VERSION, **meta}, indent=1))


def read_meta(run: Path) -> dict:
    path = run / "meta.json"
    if not path.is_file():
        raise MTError(f"{run}: not an mt run directory (no meta.json)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise MTError(f"{path}: not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        raise MTError(f"{path}: run format {meta.get('format') if isinstance(meta, dict) else '?'} "
                      f"is not supported by this mt (expects {FORMAT_VERSION})")
    return meta


def load_run(run: str | Path, *, weights: str = "model"):
    """Build the model of a run directory: returns (config, model in eval mode, tokenizer)."""
    from mt.models import build_model
    from mt.tokenizer import Tokenizer

    run = Path(run)
    if not run.is_dir():
        raise MTError(f"run directory not found: {run}")
    meta = read_meta(run)
    cfg = config_mod.load(run / "config.yaml")
    tok = Tokenizer(run / "spm.model", lowercase=cfg.data.lowercase)
    if len(tok) != meta.get("vocab_size"):
        raise MTError(f"{run}: tokenizer has {len(tok)} pieces but the weights expect {meta.get('vocab_size')}")
    model = build_model(cfg.model, len(tok))
    load_weights(model, run / f"{weights}.safetensors")
    model.eval()
    return cfg, model, tok
