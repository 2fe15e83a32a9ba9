"""Reliability of `mt`: kill/resume, signals, atomic and safe checkpoints, one-line errors, numerical faults."""
from __future__ import annotations

import gzip
import json
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from conftest import REPO
from mt.cli import main

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
KILL_RESUME = ["train.log_every=1", "train.save_every=10", "train.valid_every=1000", "train.max_steps=30",
               "model.dropout=0.1"]


def train_cmd(multi30k_dir, out, *sets, resume=False):
    """`python -m mt.cli train recipes/tiny.yaml` on one thread into `out`, with extra --set overrides."""
    sets = [f"train.out_dir={out}", f"data.train={multi30k_dir / 'train'}", f"data.valid={multi30k_dir / 'val'}",
            "train.threads=1", *sets]
    return ([sys.executable, "-m", "mt.cli", "train", str(REPO / "recipes/tiny.yaml")]
            + [a for s in sets for a in ("--set", s)] + (["--resume"] if resume else []))


def run(cmd, **kw):
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=3600, **kw)


def run_ok(cmd):
    proc = run(cmd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def records(run_dir):
    """metrics.jsonl parsed strictly: every line must be one JSON object."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir):
    """Training loss per logged step; the last record wins where a resumed run logged a step twice."""
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


def last_logged_step(path):
    try:
        return max((json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")),
                   default=0)
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def signal_at_step(proc, metrics, step, sig, deadline_s=3000):
    """Send `sig` once `metrics` shows `step`; returns the step seen then, or None if proc ended first."""
    end = time.time() + deadline_s
    while proc.poll() is None:
        seen = last_logged_step(metrics)
        if seen >= step:
            proc.send_signal(sig)
            return seen
        assert time.time() < end, "training never reached the step"
        time.sleep(0.02)
    return None


def saved_step(run_dir):
    state = run_dir / "state" if (run_dir / "state").is_dir() else run_dir / "state.old"
    return json.loads((state / "progress.json").read_text())["step"]


def copy_run(run_dir, dest, with_state=False):
    return shutil.copytree(run_dir, dest, ignore=None if with_state else shutil.ignore_patterns("state"))


def mt_cli(*args, input=None):
    """In process (train only where it fails before installing its signal handlers)."""
    return CliRunner().invoke(main, [str(a) for a in args], input=input)


def assert_one_line_error(result, *fragments, log_lines_ok=False):
    """Exit 2, no traceback, one 'mt: error:' line (the last); with log_lines_ok other 'mt: ' log lines may precede it."""
    if hasattr(result, "exit_code"):  # CliRunner: an uncaught exception would not be a SystemExit
        code, stderr = result.exit_code, result.stderr
        assert isinstance(result.exception, SystemExit), repr(result.exception)
    else:
        code, stderr = result.returncode, result.stderr
    assert code == 2, stderr[-2000:]
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("mt: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr[-2000:]
    assert len(lines) == 1 or (log_lines_ok and all(line.startswith("mt: ") for line in lines)), stderr[-2000:]
    for f in fragments:
        assert f in errors[0], errors[0]


# --- 1. kill and resume ---------------------------------------------------------------------------
def test_sigkill_then_resume_matches_uninterrupted_run(multi30k_dir, tmp_path):
    """A run SIGKILLed after step 15 and resumed logs the same losses and ends with the same weights as an uninterrupted one."""
    a, b = tmp_path / "a", tmp_path / "b"
    run_ok(train_cmd(multi30k_dir, a, *KILL_RESUME))
    b.mkdir()
    shutil.copy(a / "spm.model", b / "spm.model")  # the same tokenizer
    proc = subprocess.Popen(train_cmd(multi30k_dir, b, *KILL_RESUME), cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_at = signal_at_step(proc, b / "metrics.jsonl", 15, signal.SIGKILL)
    proc.wait()
    if killed_at is None:  # finished before the kill: a deterministic clean stop at step 20 instead
        shutil.rmtree(b / "state")
        (b / "metrics.jsonl").unlink()
        run_ok(train_cmd(multi30k_dir, b, *KILL_RESUME, "train.max_steps=20"))
    else:
        assert proc.returncode == -signal.SIGKILL
    resumed_from = saved_step(b)
    assert 0 < resumed_from < 30
    run_ok(train_cmd(multi30k_dir, b, *KILL_RESUME, resume=True))
    la, lb = losses(a), losses(b)
    assert sorted(la) == sorted(lb) == list(range(1, 31))
    after = [s for s in la if s > resumed_from]
    max_loss_diff = max(abs(la[s] - lb[s]) for s in after)
    wa, wb = load_file(a / "last.safetensors"), load_file(b / "last.safetensors")
    assert wa.keys() == wb.keys()
    max_weight_diff = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    print(f"\nkill/resume: killed at step {killed_at}, resumed from {resumed_from}, {len(after)} steps compared, "
          f"max loss diff {max_loss_diff:.3g}, max weight diff {max_weight_diff:.3g}")
    assert max_loss_diff <= 1e-6 and max_weight_diff <= 1e-6


def test_sigterm_saves_state_and_resume_continues(multi30k_dir, tmp_path):
    """SIGTERM during training saves state, exits 0 and says --resume; --resume continues after the saved step."""
    out = tmp_path / "run"
    sets = ["train.log_every=1", "train.max_steps=100000", "train.max_minutes=30", "train.valid_every=100000",
            "train.save_every=100000"]  # so the only saved state is the signal's
    proc = subprocess.Popen(train_cmd(multi30k_dir, out, *sets), cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert signal_at_step(proc, out / "metrics.jsonl", 2, signal.SIGTERM) is not None
    _, stderr = proc.communicate(timeout=3600)
    assert proc.returncode == 0, stderr[-2000:]
    assert "--resume" in stderr and "Traceback" not in stderr
    step = saved_step(out)
    assert step >= 2 and not (out / "state.tmp").exists()
    n_before = len(records(out))
    run_ok(train_cmd(multi30k_dir, out, *sets[:1], f"train.max_steps={step + 3}", *sets[2:], resume=True))
    new = [r["step"] for r in records(out)[n_before:] if "loss" in r]
    assert new == [step + 1, step + 2, step + 3]


# --- 2. atomic checkpoints ------------------------------------------------------------------------
def test_no_temporary_files_after_training(trained_run):
    """A finished run leaves no *.tmp file, state.tmp or state.old behind."""
    leftovers = [p for p in trained_run.rglob("*") if p.name.endswith(".tmp") or p.name in ("state.tmp", "state.old")]
    assert leftovers == [] and (trained_run / "state").is_dir()


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_weights_one_line_error(trained_run, tmp_path, damage):
    """A half-length or random-bytes model.safetensors: `mt translate` exits 2 with one line naming the file."""
    run_dir = copy_run(trained_run, tmp_path / "run")
    weights = run_dir / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[:size // 2] if damage == "truncated" else random.Random(0).randbytes(size))
    assert_one_line_error(mt_cli("translate", "-m", run_dir, input="A dog runs.\n"), str(weights))


# --- 3. safe loading ------------------------------------------------------------------------------
class Payload:
    """Unpickling this creates the file `marker` (what an attacker's code could do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_pickle_payload_really_runs_when_unpickled(tmp_path):
    """Control: the payloads used below do create their marker when unpickled unsafely."""
    pickle.loads(pickle.dumps(Payload(tmp_path / "m1")))
    torch.save({"state": Payload(tmp_path / "m2")}, tmp_path / "p.bin")
    torch.load(tmp_path / "p.bin", weights_only=False)
    assert (tmp_path / "m1").exists() and (tmp_path / "m2").exists()


def test_pickled_model_weights_refused(trained_run, tmp_path):
    """A pickle in RUN/model.safetensors: `mt translate` exits 2 with one line and never unpickles it."""
    run_dir, marker = copy_run(trained_run, tmp_path / "run"), tmp_path / "pwned"
    (run_dir / "model.safetensors").write_bytes(pickle.dumps(Payload(marker)))
    assert_one_line_error(mt_cli("translate", "-m", run_dir, input="A dog runs.\n"), "model.safetensors")
    assert not marker.exists()


@pytest.mark.parametrize("name", [
    "optimizer.bin",
    "random_states_0.pkl",
])
def test_pickled_training_state_refused(trained_run, multi30k_dir, tmp_path, name):
    """A pickle payload in RUN/state/NAME: `mt train --resume` exits 2 with one error line; the payload never runs."""
    run_dir, marker = copy_run(trained_run, tmp_path / "run", with_state=True), tmp_path / "pwned"
    torch.save({"state": Payload(marker), "param_groups": []}, run_dir / "state" / name)
    proc = run(train_cmd(multi30k_dir, run_dir, resume=True))
    assert not marker.exists()
    assert_one_line_error(proc, "cannot resume", log_lines_ok=True)


def test_every_torch_load_in_mt_is_weights_only():
    """Each torch.load( call in mt/ passes weights_only=True (nothing else may unpickle)."""
    for path in (REPO / "mt").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for m in re.finditer(r"torch\.load\(", text):
            depth, end = 1, m.end()
            while depth:  # the call's full argument list, across lines
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                end += 1
            assert re.search(r"weights_only\s*=\s*True", text[m.start():end]), f"{path}: {text[m.start():end]}"


# --- 4. bad usage: one line, exit 2, no traceback -------------------------------------------------
def test_eval_missing_src_file(trained_run, multi30k_dir, tmp_path):
    """`mt eval -m RUN --src MISSING --ref REF` names the missing file."""
    missing = tmp_path / "missing.en"
    assert_one_line_error(mt_cli("eval", "-m", trained_run, "--src", missing, "--ref", multi30k_dir / "val.de.gz"),
                          str(missing))


def test_eval_hyp_ref_line_count_mismatch(tmp_path):
    """`mt eval --hyp --ref` with 3 vs 2 lines names both counts."""
    (tmp_path / "hyp").write_text("a\nb\nc\n")
    (tmp_path / "ref").write_text("a\nb\n")
    assert_one_line_error(mt_cli("eval", "--hyp", tmp_path / "hyp", "--ref", tmp_path / "ref"), "3 lines", "2")


def test_incompatible_run_format(trained_run, tmp_path):
    """A run whose meta.json says format 999 is refused by `mt translate`, naming the format."""
    run_dir = copy_run(trained_run, tmp_path / "run")
    meta = json.loads((run_dir / "meta.json").read_text())
    (run_dir / "meta.json").write_text(json.dumps({**meta, "format": 999}))
    assert_one_line_error(mt_cli("translate", "-m", run_dir, input="A dog.\n"), "999")


def test_unknown_recipe_key():
    """`mt train --set train.bogus=1` names the key."""
    assert_one_line_error(mt_cli("train", REPO / "recipes/tiny.yaml", "--set", "train.bogus=1"), "train.bogus")


def test_target_language_not_in_corpus(multi30k_dir, tmp_path):
    """`--set data.tgt_lang=xx`: the missing corpus file is named."""
    assert_one_line_error(mt_cli(*train_cmd(multi30k_dir, tmp_path / "run", "data.tgt_lang=xx")[3:]), "train.xx")


@pytest.mark.parametrize("kind", ["empty gzip stream", "0-byte .gz", "0-byte plain"])
def test_empty_training_corpus(multi30k_dir, tmp_path, kind):
    """Empty training files (gzip or plain): one line saying the corpus is empty."""
    for lang in ("en", "de"):
        path = tmp_path / f"empty.{lang}{'' if kind == '0-byte plain' else '.gz'}"
        with (gzip.open(path, "wb") if kind == "empty gzip stream" else open(path, "wb")):
            pass
    result = mt_cli(*train_cmd(multi30k_dir, tmp_path / "run", f"data.train={tmp_path / 'empty'}")[3:])
    assert_one_line_error(result, "empty")


def test_vocabulary_larger_than_corpus_supports(multi30k_dir, tmp_path):
    """vocab_size=100000 on 50 sentences: one line naming the vocabulary size."""
    proc = run(train_cmd(multi30k_dir, tmp_path / "run", "data.vocab_size=100000", "data.max_sentences=50"))
    assert_one_line_error(proc, "vocab", log_lines_ok=True)


# --- 5. numerical faults --------------------------------------------------------------------------
def test_non_finite_losses_stop_training_with_state_saved(multi30k_dir, tmp_path, monkeypatch):
    """Losses that turn non-finite after 2 updates: skipped updates are logged, then exit 2 after 3 in a
    row, state saved."""
    import mt.train
    from mt.loss import training_loss

    calls = []

    def diverging(*args):
        calls.append(1)
        loss, nll = training_loss(*args)
        return (loss * float("nan"), nll) if len(calls) > 2 else (loss, nll)

    monkeypatch.setattr(mt.train, "training_loss", diverging)
    out = tmp_path / "run"
    args = train_cmd(multi30k_dir, out, "train.max_bad_steps=3", "train.max_steps=50", "train.log_every=1",
                     "train.valid_every=1000", "train.save_every=1000")[3:]
    assert_one_line_error(mt_cli(*args), "non-finite", log_lines_ok=True)
    skipped = [r["skipped_nonfinite"] for r in records(out) if "skipped_nonfinite" in r]
    assert skipped == [1, 2, 3]
    assert (out / "state" / "progress.json").is_file() and (out / "last.safetensors").is_file()


# --- 6. weights that load but are wrong -----------------------------------------------------------
def damage_weights(run, how):
    from safetensors.torch import save_file

    path = run / "model.safetensors"
    tensors = load_file(path)
    name = sorted(k for k in tensors if tensors[k].dim() == 2)[0]
    if how == "nan":
        tensors[name][0, 0] = float("nan")
    elif how == "inf":
        tensors[name][-1, -1] = float("-inf")
    else:
        tensors[name] = tensors[name].to(getattr(torch, how))
    save_file(tensors, path, metadata={"format": "pt"})
    return name


@pytest.mark.parametrize("how", ["nan", "inf", "float16", "int32"])
def test_weights_with_nan_inf_or_the_wrong_dtype_are_refused(random_run, tmp_path, how):
    run = copy_run(random_run, tmp_path / "run")
    name = damage_weights(run, how)
    result = mt_cli("translate", "-m", run, input="a dog\n")
    assert_one_line_error(result, name, "NaN or infinite" if how in ("nan", "inf") else "F32")
    assert result.stdout == ""


def test_export_refuses_nan_weights(random_run, tmp_path):
    pytest.importorskip("ctranslate2")
    run = copy_run(random_run, tmp_path / "run")
    damage_weights(run, "nan")
    assert_one_line_error(mt_cli("export", run, "--out", tmp_path / "ct2"), "NaN or infinite")
    assert not (tmp_path / "ct2").exists()
