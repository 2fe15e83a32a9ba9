"""Data parallelism: 2 CPU processes (gloo) x 1 batch must train the same model as 1 process x 2 accumulated batches."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

from safetensors.torch import load_file

from conftest import REPO

COMMON = ["model.dropout=0", "train.max_steps=5", "train.log_every=1", "train.valid_every=1000",
          "train.save_every=1000", "train.threads=1"]


def train_args(multi30k_dir, out, *sets):
    sets = [f"train.out_dir={out}", f"data.train={multi30k_dir / 'train'}", f"data.valid={multi30k_dir / 'val'}",
            *COMMON, *sets]
    return ["train", str(REPO / "recipes/tiny.yaml")] + [a for s in sets for a in ("--set", s)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process_with_accumulation(multi30k_dir, tmp_path):
    """`accelerate launch` with 2 CPU processes, accum 1 == 1 process, accum 2: last.safetensors within 1e-5."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    proc = subprocess.run([sys.executable, "-m", "mt.cli", *train_args(multi30k_dir, single, "train.accum_steps=2")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp.mkdir()
    shutil.copy(single / "spm.model", ddp / "spm.model")  # the same tokenizer (mt reuses RUN/spm.model)
    # `--cpu --num_processes 2` would start ONE process (accelerate's simple launcher); --multi_gpu starts
    # torchrun workers and ACCELERATE_USE_CPU=1 makes them a gloo MULTI_CPU group.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--num_cpu_threads_per_process", "1", "--main_process_ip", "127.0.0.1",
              "--main_process_port", str(free_port()), "-m", "mt.cli"]
    proc = subprocess.run(launch + train_args(multi30k_dir, ddp, "train.accum_steps=1"), cwd=REPO,
                          env={**env, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stderr, proc.stderr[-3000:]
    a, b = load_file(single / "last.safetensors"), load_file(ddp / "last.safetensors")
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"\nDDP 2x1 vs 1x2 accumulation: max abs parameter difference {diff:.3g}")
    assert diff < 1e-5


def test_two_processes_match_one_process_for_a_state_space_lm(shakespeare_dir, tmp_path):
    """The same for a character LM whose layers are state-space mixers (the chunked scan's backward)."""
    from conftest import char_lm_cmd

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    sets = ["model.mixer=ssm", "model.positions=none", "train.max_steps=5", "train.valid_every=1000",
            "train.save_every=1000"]
    proc = subprocess.run(char_lm_cmd(shakespeare_dir, single, *sets, "train.accum_steps=2"), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp.mkdir()
    shutil.copy(single / "spm.model", ddp / "spm.model")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--num_cpu_threads_per_process", "1", "--main_process_ip", "127.0.0.1",
              "--main_process_port", str(free_port()), "-m", "mt.cli"]
    cmd = char_lm_cmd(shakespeare_dir, ddp, *sets, "train.accum_steps=1")[3:]  # after `python -m mt.cli`
    proc = subprocess.run(launch + cmd, cwd=REPO, env={**env, "ACCELERATE_USE_CPU": "1"},
                          capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stderr, proc.stderr[-3000:]
    a, b = load_file(single / "last.safetensors"), load_file(ddp / "last.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
