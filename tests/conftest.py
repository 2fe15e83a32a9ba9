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


SLOW_FIXTURES = {"trained_run", "multi30k_dir", "diffusion_run"}  # a training or a pass over real data


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


WORDS = ("house dog cat tree river red blue small big runs sees eats under over the a man woman child "
         "water street green old young plays sings walks in on with").split()


def write_corpus(folder: Path, prefix: str, n: int, seed: int = 0) -> Path:
    """PREFIX.en / PREFIX.de of n random sentences (the 'German' side reversed): data for trainings
    that must take seconds, not for translation quality. Returns folder / prefix."""
    import random

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    src = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(n)]
    (folder / f"{prefix}.en").write_text("\n".join(src) + "\n", encoding="utf-8")
    (folder / f"{prefix}.de").write_text("\n".join(" ".join(reversed(s.split())) for s in src) + "\n", encoding="utf-8")
    return folder / prefix


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> dict:
    """--set overrides that train recipes/tiny.yaml on a small random corpus in about a second."""
    folder = tmp_path_factory.mktemp("corpus")
    train, valid = write_corpus(folder, "train", 300), write_corpus(folder, "val", 20, seed=1)
    return {"data.train": str(train), "data.valid": str(valid), "data.vocab_size": 60, "data.max_sentences": 0,
            "train.threads": 1, "train.max_steps": 4, "train.valid_every": 2, "train.save_every": 2,
            "train.log_every": 1}


@pytest.fixture(scope="session")
def random_run(tmp_path_factory, tiny_corpus) -> Path:
    """A run directory with an untrained Transformer (64 positions) and a 60-piece tokenizer, written
    without training: for the CLI's and loaders' behaviour, in milliseconds."""
    from mt import config
    from mt.checkpoint import save_config, save_weights
    from mt.tokenizer import train_tokenizer

    run = tmp_path_factory.mktemp("runs") / "random"
    run.mkdir()
    text = Path(tiny_corpus["data.train"] + ".en").read_text().splitlines()
    tok = train_tokenizer(text + [" ".join(reversed(s.split())) for s in text], run / "spm.model", vocab_size=60)
    cfg = config.from_dict({"model": dict(enc_layers=1, dec_layers=1, d_model=32, heads=2, ffn=64, max_positions=64),
                            "train": {"out_dir": str(run)}, "decode": {"beam_size": 2}})
    torch.manual_seed(0)
    save_weights(Transformer(cfg.model, len(tok)), run / "model.safetensors")
    save_config(cfg, run, vocab_size=len(tok))
    return run


SHARED_SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare/input.txt.gz"
SLOW_FIXTURES |= {"shakespeare_dir"}


@pytest.fixture(scope="session")
def shakespeare_dir(tmp_path_factory) -> Path:
    """Tiny Shakespeare split by `mt data tinyshakespeare --from` the read-only copy in ../shared."""
    if not SHARED_SHAKESPEARE.is_file():
        pytest.skip(f"Tiny Shakespeare not found at {SHARED_SHAKESPEARE}")
    out = tmp_path_factory.mktemp("data") / "tinyshakespeare"
    proc = subprocess.run([sys.executable, "-m", "mt.cli", "data", "tinyshakespeare", "--from", str(SHARED_SHAKESPEARE),
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def char_lm_cmd(data_dir: Path, out: Path, *sets: str, resume: bool = False) -> list[str]:
    """A small character LM of recipes/shakespeare.yaml (one thread, a slice of the text, seconds)."""
    sets = [f"train.out_dir={out}", f"data.train={data_dir / 'train.txt'}", f"data.valid={data_dir / 'valid.txt'}",
            "data.max_sentences=3000", "data.max_valid_sentences=300", "data.context=64", "model.dec_layers=1",
            "model.d_model=32", "model.heads=2", "model.ffn=64", "model.max_positions=512", "model.chunk=16",
            "train.batch_tokens=520", "train.max_minutes=0", "train.max_steps=30", "train.schedule=inverse_sqrt",
            "train.warmup_steps=10", "train.valid_every=15", "train.save_every=15", "train.log_every=1",
            "train.progress=false", "train.threads=1", *sets]
    return ([sys.executable, "-m", "mt.cli", "train", str(REPO / "recipes/shakespeare.yaml")]
            + [a for s in sets for a in ("--set", s)] + (["--resume"] if resume else []))


@pytest.fixture(scope="session")
def char_lm_run(shakespeare_dir, tmp_path_factory) -> Path:
    """A small state-space character LM trained once through the CLI; returns the run dir."""
    out = tmp_path_factory.mktemp("runs") / "char-ssm"
    proc = subprocess.run(char_lm_cmd(shakespeare_dir, out, "model.mixer=ssm", "model.positions=none"),
                          cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out
