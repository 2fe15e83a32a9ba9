"""The run directory is the user's work: one training at a time, a trained run never replaced by
accident, nothing of a failed run reused, no stranger's files touched, and a full disk one line."""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import REPO
from mt.cli import main
from mt.tokenizer import Tokenizer
from test_reliability import assert_one_line_error, saved_step

RECIPE = str(REPO / "recipes/tiny.yaml")
pytestmark = pytest.mark.slow  # each test trains (seconds, on a small random corpus)


def train_args(out, corpus, *sets, flags=()):
    overrides = {**corpus, "train.out_dir": str(out)}
    for s in sets:
        key, value = s.split("=", 1)
        overrides[key] = value
    return ["train", RECIPE, *[a for k, v in overrides.items() for a in ("--set", f"{k}={v}")], *flags]


def mt_train(out, corpus, *sets, flags=()):
    return CliRunner().invoke(main, train_args(out, corpus, *sets, flags=flags))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_second_training_of_the_same_directory_is_refused(tiny_corpus, tmp_path):
    """Two processes on one run directory: the second gets one line; the first is not disturbed."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "mt.cli", *train_args(out, tiny_corpus, "train.max_steps=100000",
                                                                        "train.save_every=1000000")],
                             cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (out / "metrics.jsonl").is_file():  # the first training is past its set-up
            assert first.poll() is None and time.time() < deadline, first.stderr.read()
            time.sleep(0.05)
        second = subprocess.run([sys.executable, "-m", "mt.cli", *train_args(out, tiny_corpus)], cwd=REPO, env=env,
                                capture_output=True, text=True)
        assert_one_line_error(second, "being trained by another process", f"pid {first.pid}")
        assert first.poll() is None  # still training
    finally:
        first.terminate()
        first.wait(timeout=300)
    assert first.returncode == 0, first.stderr.read()  # SIGTERM: state saved, a clean exit
    assert saved_step(out) > 0


def test_a_trained_run_is_kept_unless_overwrite_is_asked(tiny_corpus, tmp_path):
    out = tmp_path / "run"
    assert mt_train(out, tiny_corpus).exit_code == 0
    shutil.rmtree(out / "state")  # a finished run whose state was deleted to save space
    before = {name: digest(out / name) for name in ("model.safetensors", "config.yaml", "meta.json", "spm.model")}
    assert_one_line_error(mt_train(out, tiny_corpus, "data.vocab_size=50"), "holds a trained run", "--overwrite")
    assert {name: digest(out / name) for name in before} == before
    result = mt_train(out, tiny_corpus, "data.vocab_size=50", flags=["--overwrite"])
    assert result.exit_code == 0, result.output
    assert len(Tokenizer(out / "spm.model")) == 50  # a new tokenizer, not the replaced run's
    assert digest(out / "model.safetensors") != before["model.safetensors"]


def test_resume_and_overwrite_together_are_refused(tiny_corpus, tmp_path):
    out = tmp_path / "run"
    assert mt_train(out, tiny_corpus).exit_code == 0
    assert_one_line_error(mt_train(out, tiny_corpus, flags=["--resume", "--overwrite"]), "--resume", "--overwrite")


def test_a_failed_training_leaves_no_tokenizer_for_a_rerun(tiny_corpus, tmp_path):
    """A training that stops after its tokenizer is written (here: every pair filtered out) must not
    hand that tokenizer to the next training of the directory, which asks for another size."""
    out = tmp_path / "run"
    assert_one_line_error(mt_train(out, tiny_corpus, "data.max_len=1"), "no training examples", log_lines_ok=True)
    assert len(Tokenizer(out / "spm.model")) == 60
    assert mt_train(out, tiny_corpus, "data.vocab_size=50").exit_code == 0
    assert len(Tokenizer(out / "spm.model")) == 50


def test_a_directory_with_other_files_is_not_trained_into(tiny_corpus, tmp_path):
    out = tmp_path / "project"
    out.mkdir()
    (out / "config.yaml").write_text("mine")
    (out / "notes.txt").write_text("mine too")
    assert_one_line_error(mt_train(out, tiny_corpus, flags=["--overwrite"]), "notes.txt", "does not write")
    assert (out / "config.yaml").read_text() == "mine" and (out / "notes.txt").read_text() == "mine too"


@pytest.mark.parametrize("value", ["", "' '"])
def test_an_empty_out_dir_is_refused_and_the_current_directory_untouched(tiny_corpus, tmp_path, value, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yaml").write_text("mine")
    args = train_args("x", tiny_corpus) + ["--set", f"train.out_dir={value}"]
    assert_one_line_error(CliRunner().invoke(main, args), "train.out_dir is empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]
    assert (tmp_path / "config.yaml").read_text() == "mine"


def test_an_empty_validation_set_fails_at_start_up(tiny_corpus, tmp_path):
    (tmp_path / "empty.en").write_text("")
    (tmp_path / "empty.de").write_text("")
    out = tmp_path / "run"
    result = mt_train(out, tiny_corpus, f"data.valid={tmp_path / 'empty'}")
    assert_one_line_error(result, "validation set", "is empty")
    assert not (out / "spm.model").exists()  # before the tokenizer trains, let alone the model


def test_disk_full_during_a_save_is_one_line_and_the_last_state_resumes(tiny_corpus, tmp_path, monkeypatch):
    """The second save runs out of space: one line naming the last good state, no half-written state
    left; once there is space, --resume finishes the run."""
    import accelerate

    real_save = accelerate.Accelerator.save_state
    saves = []

    def filling_disk(self, output_dir, **kw):
        saves.append(output_dir)
        if len(saves) == 2:
            real_save(self, output_dir, **kw)  # part of it written, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, output_dir, **kw)

    monkeypatch.setattr(accelerate.Accelerator, "save_state", filling_disk)
    out = tmp_path / "run"
    result = mt_train(out, tiny_corpus, "train.max_steps=6")
    assert_one_line_error(result, "no space left on device", f"{out / 'state'} (step 2)", "--resume", log_lines_ok=True)
    assert saved_step(out) == 2 and not (out / "state.tmp").exists()
    assert [p.name for p in out.rglob("*.tmp")] == []
    monkeypatch.setattr(accelerate.Accelerator, "save_state", real_save)
    assert mt_train(out, tiny_corpus, "train.max_steps=6", flags=["--resume"]).exit_code == 0
    assert saved_step(out) == 6


def test_disk_full_on_a_real_small_filesystem(tiny_corpus, tmp_path):
    """The same on a 1.5 MB tmpfs (needs root to mount; skipped elsewhere)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1500k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        proc = subprocess.run([sys.executable, "-m", "mt.cli", *train_args(mount / "run", tiny_corpus,
                                                                         "train.max_steps=40")],
                              cwd=REPO, capture_output=True, text=True)
        assert_one_line_error(proc, "no space left on device", log_lines_ok=True)
        assert not (mount / "run" / "state.tmp").exists()
    finally:
        subprocess.run(["umount", str(mount)])
