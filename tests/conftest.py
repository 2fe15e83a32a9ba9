"""Shared fixtures: the Multi30K data in ../shared, a tiny random Transformer, one tiny trained run."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mt.config import ModelConfig
from mt.models import Transformer

REPO = Path(__file__).resolve().parents[1]
SHARED_MULTI30K = Path(__file__).resolve().parents[2] / "shared/data/multi30k"


SLOW_FIXTURES = {"trained_run", "multi30k_dir"}  # a training or a pass over real data


def pytest_collection_modifyitems(items):
    """Tests that train a model or read Multi30K are `slow`: `pytest -m "not slow"` is the fast lane."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", autouse=True)
def compiled_step_cache(tmp_path_factory):
    """`--aot` keeps compiled decoder steps in $MT_CACHE_DIR: the tests' own, not the user's."""
    import os

    path = tmp_path_factory.mktemp("mt-cache")
    old, os.environ["MT_CACHE_DIR"] = os.environ.get("MT_CACHE_DIR"), str(path)
    yield path
    if old is None:
        del os.environ["MT_CACHE_DIR"]
    else:
        os.environ["MT_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def multi30k_dir() -> Path:
    """The read-only Multi30K copy in ../shared/data/multi30k (skips when absent)."""
    needed = [f"{split}.{lang}.gz" for split in ("train", "val", "test_2016_flickr") for lang in ("en", "de")]
    missing = [n for n in needed if not (SHARED_MULTI30K / n).is_file()]
    if missing:
        pytest.skip(f"Multi30K data not found in {SHARED_MULTI30K} (missing {', '.join(missing[:3])})")
    return SHARED_MULTI30K


def make_model(vocab_size: int = 11, seed: int = 0, **overrides) -> Transformer:
    """A small random Transformer in eval mode (dropout off), built from a fixed seed."""
    cfg = dict(enc_layers=2, dec_layers=2, d_model=32, heads=4, ffn=64, dropout=0.1, max_positions=64)
    cfg.update(overrides)
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**cfg), vocab_size).eval()


@pytest.fixture
def tiny_model() -> Transformer:
    """A small random Transformer (vocabulary 11) in eval mode."""
    return make_model()


@pytest.fixture(scope="session")
def trained_run(multi30k_dir, tmp_path_factory) -> Path:
    """recipes/tiny.yaml trained once through the CLI (about 10 s on one thread); returns the run dir."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    cmd = [sys.executable, "-m", "mt.cli", "train", str(REPO / "recipes/tiny.yaml"),
           "--set", f"train.out_dir={out}",
           "--set", f"data.train={multi30k_dir / 'train'}",
           "--set", f"data.valid={multi30k_dir / 'val'}",
           "--set", "train.threads=1"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)  # a hang guard only
    assert proc.returncode == 0, f"tiny training failed:\n{proc.stderr[-3000:]}"
    for name in ("model.safetensors", "spm.model", "config.yaml", "meta.json"):
        assert (out / name).is_file(), name
    return out
