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

import contextlib
import errno
import fcntl
import json
import os
import shutil
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

from mt import config as config_mod
from mt.config import Config
from mt.errors import MTError

FORMAT_VERSION = 1
LOCK = "train.lock"
# what a training writes into its run directory (and temporary names of these, ending in .tmp)
RUN_FILES = {"config.yaml", "meta.json", "spm.model", "model.safetensors", "last.safetensors", "averaged.safetensors",
             "metrics.jsonl", "snapshots", "state", "state.old", "state.tmp", LOCK}
TRAINED = ("model.safetensors", "last.safetensors", "averaged.safetensors", "snapshots", "state", "state.old")


def lock(run: Path) -> int:
    """Hold RUN/train.lock while this process trains into RUN (released when it exits, even killed);
    returns the descriptor to keep open. A second training of the same directory gets a clear error."""
    fd = os.open(run / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise MTError(f"{run} is being trained by another process (pid {holder}): wait for it to finish, "
                      "or set another train.out_dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def claim_for_new_run(run: Path, *, overwrite: bool) -> None:
    """Make RUN (locked by the caller) ready for a new training: refuse a directory holding files mt does
    not write, and a trained run unless `overwrite`; remove what a replaced or failed run left, so that
    nothing of it (its tokenizer above all) is reused."""
    present = [p for p in run.iterdir() if p.name != LOCK]
    foreign = sorted(p.name for p in present if p.name not in RUN_FILES and not p.name.endswith(".tmp"))
    if foreign:
        raise MTError(f"{run} holds files mt does not write ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}): "
                      "set train.out_dir to a new or empty directory")
    trained = [p.name for p in present if p.name in TRAINED]
    if trained and not overwrite:
        raise MTError(f"{run} holds a trained run ({', '.join(sorted(trained))}): --resume continues it, "
                      "--overwrite replaces it, or set another train.out_dir")
    for p in present:
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_weights(model: torch.nn.Module, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_model(model, str(tmp))  # handles tied (shared) tensors
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def out_of_space_is_one_line(path: Path, last_good: str):
    """A save that runs out of disk space (or quota) ends as one MTError line naming what was being
    written and the last good checkpoint; any other failure propagates."""
    try:
        yield
    except Exception as e:  # OSError, torch's RuntimeError, SafetensorError: whichever wrote the file
        if not _out_of_space(e, path):
            raise
        then = "resume with --resume" if last_good != "none yet" else "train again"
        raise MTError(f"no space left on device while saving {path}; the last good checkpoint is {last_good} "
                      f"(free some space, then {then})") from None


def _out_of_space(e: BaseException, path: Path) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "No space left" in str(e):
        return True
    try:  # torch's zip writer reports a short write as a RuntimeError: ask the filesystem
        folder = next(p for p in [path, *path.parents] if p.exists())
        return shutil.disk_usage(folder).free < 1 << 20
    except (OSError, StopIteration):
        return False


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


def check_dtypes(path: Path, expected: torch.dtype = torch.float32) -> None:
    """Every tensor stored in a safetensors file has the dtype the model is built with (loading would
    silently convert, say, integers or float16 into it)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                dtype = f.get_slice(name).get_dtype()
                if dtype != _SAFETENSORS_DTYPE[expected]:
                    raise MTError(f"{path}: tensor {name} is {dtype}, but the model's weights are "
                                  f"{_SAFETENSORS_DTYPE[expected]}")
    except (SafetensorError, OSError) as e:
        raise MTError(f"{path}: cannot read weights ({str(e).splitlines()[0][:200]})") from None


_SAFETENSORS_DTYPE = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def check_finite(model: torch.nn.Module, path: Path | str) -> None:
    """No NaN or infinity in any weight: such a model translates every line to nothing, scores nan."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise MTError(f"{path}: tensor {name} holds {bad} NaN or infinite value{'s' if bad > 1 else ''}: "
                          "the weights are damaged (a diverged training or a broken file)")


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Weights from a safetensors file into `model`, checked: the right names, shapes and dtype, all finite."""
    if not path.is_file():
        raise MTError(f"weights not found: {path}")
    check_dtypes(path, next(model.parameters()).dtype)
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise MTError(f"{path}: cannot read weights ({str(e).splitlines()[0][:200]})") from None
    if missing or unexpected:
        raise MTError(f"{path}: weights do not match the config (missing {sorted(missing)[:3]}, "
                      f"unexpected {sorted(unexpected)[:3]})")
    check_finite(model, path)


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
    model = build_model(cfg.model, len(tok), packed=cfg.data.pack)
    load_weights(model, run / f"{weights}.safetensors")
    model.eval()
    return cfg, model, tok
