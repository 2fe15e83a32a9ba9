"""Decoder-only models: same cache contract as the encoder-decoder, bag-of-words baseline, packing, CLI."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO
from mt.config import ModelConfig
from mt.data import ParallelData, TokenArray, collate, pack
from mt.models import build_model
from mt.search import beam_search, generate
from mt.tokenizer import BOS, EOS, PAD


def lm(arch: str, seed: int = 0, vocab: int = 20):
    torch.manual_seed(seed)
    cfg = ModelConfig(arch=arch, dec_layers=2, d_model=32, heads=4, ffn=64, max_positions=64)
    return build_model(cfg, vocab).eval()


def masked(x):
    """Drop the PAD and BOS columns (always -inf) before comparing log-probs."""
    return x[..., 3:]


@pytest.mark.parametrize("arch", ["prefix_lm", "decoder_only", "linear"])
def test_cached_steps_equal_full_forward(arch):
    """Step-by-step decoding on the cache gives the teacher-forced log-probs, padded prefixes included."""
    model = lm(arch)
    src = torch.tensor([[5, 6, 7, EOS], [8, 9, EOS, PAD]]) if arch == "prefix_lm" else torch.zeros(2, 0, dtype=torch.long)
    tgt_in = torch.tensor([[BOS, 10, 11, 12], [BOS, 13, 14, 15]])
    with torch.no_grad():
        full = model.normalize(model(src, tgt_in))
        cache = model.new_cache(src, 8)
        steps = torch.stack([model.step(tgt_in[:, t:t + 1], cache) for t in range(4)], 1)
    assert torch.allclose(masked(full), masked(steps), atol=1e-5)


@pytest.mark.parametrize("arch", ["prefix_lm", "decoder_only", "linear"])
def test_expanded_cache_equals_repeated_prompts(arch):
    """Beam search's first step: one row per prompt, then cache.expand(k), equals a cache on every
    prompt repeated k times (padded prompts and the pending prompt token included)."""
    model, k = lm(arch, seed=4), 3
    src = torch.tensor([[5, 6, 7, EOS], [8, 9, EOS, PAD]]) if arch == "prefix_lm" else torch.tensor([[10, 11, 12], [13, PAD, PAD]])
    tgt = torch.tensor([[BOS, 10, 11, 12], [BOS, 13, 14, 15]]).repeat_interleave(k, 0)
    with torch.no_grad():
        grouped, single = model.new_cache(src.repeat_interleave(k, 0), 6), model.new_cache(src, 6)
        first = model.step(tgt[::k, :1], single)
        assert torch.allclose(masked(first.repeat_interleave(k, 0)), masked(model.step(tgt[:, :1], grouped)), atol=1e-5)
        single.expand(k)
        for t in range(1, 4):
            assert torch.allclose(masked(model.step(tgt[:, t:t + 1], single)),
                                  masked(model.step(tgt[:, t:t + 1], grouped)), atol=1e-5)


def test_prefix_lm_ignores_source_padding():
    """A prefix-LM sentence scores the same alone and beside a longer (padding-inducing) one."""
    model = lm("prefix_lm", seed=2)
    with torch.no_grad():
        both = model.normalize(model(torch.tensor([[5, 6, 7, EOS], [8, EOS, PAD, PAD]]),
                                     torch.tensor([[BOS, 10, 11], [BOS, 12, 13]])))
        alone = model.normalize(model(torch.tensor([[8, EOS]]), torch.tensor([[BOS, 12, 13]])))
    assert torch.allclose(masked(both[1]), masked(alone[0]), atol=1e-5)


@pytest.mark.parametrize("arch", ["decoder_only", "linear"])
def test_prompt_prefill_equals_feeding_the_prompt(arch):
    """Continuing a prompt from the prefilled cache gives the log-probs of feeding BOS + prompt."""
    model = lm(arch, seed=3)
    with torch.no_grad():
        cache = model.new_cache(torch.tensor([[10, 11, 12], [13, PAD, PAD]]), 4)
        lp = model.step(torch.full((2, 1), BOS), cache)
        empty = torch.zeros(1, 0, dtype=torch.long)
        ref0 = model.normalize(model(empty, torch.tensor([[BOS, 10, 11, 12]])))[0, -1]
        ref1 = model.normalize(model(empty, torch.tensor([[BOS, 13]])))[0, -1]
    assert torch.allclose(masked(lp[0]), masked(ref0), atol=1e-5)
    assert torch.allclose(masked(lp[1]), masked(ref1), atol=1e-5)


def test_linear_lm_is_a_bag_of_words_and_the_transformer_is_not():
    """Permuting the prefix leaves the linear model's next-token distribution unchanged, not the transformer's."""
    prefix = [BOS, 5, 9, 12, 7]
    perm = [BOS, 12, 7, 5, 9]
    empty = torch.zeros(1, 0, dtype=torch.long)
    with torch.no_grad():
        out = {arch: [model.normalize(model(empty, torch.tensor([p])))[0, -1] for p in (prefix, perm)]
               for arch, model in (("linear", lm("linear")), ("decoder_only", lm("decoder_only")))}
    assert torch.allclose(masked(out["linear"][0]), masked(out["linear"][1]), atol=1e-6)
    assert not torch.allclose(masked(out["decoder_only"][0]), masked(out["decoder_only"][1]), atol=1e-3)


@pytest.mark.parametrize("arch", ["decoder_only", "linear", "prefix_lm"])
def test_beam_one_equals_greedy_for_lms(arch):
    """The shared search code runs decoder-only models: beam 1 gives greedy's output."""
    model = lm(arch, seed=4)
    src = torch.tensor([[5, 6, EOS], [7, EOS, PAD]]) if arch == "prefix_lm" else torch.tensor([[5, 6], [7, PAD]])
    max_lens = torch.tensor([6, 6])
    greedy = generate(model, src, max_lens)
    beam = beam_search(model, src, max_lens, beam_size=1, length_penalty=0.0)
    assert [h.tokens for h in greedy] == [b[0].tokens for b in beam]


def test_pack_makes_contiguous_windows():
    """Packing joins sentences with EOS and cuts windows that overlap by one token."""
    data = ParallelData(TokenArray.from_lists([[], [], []]), TokenArray.from_lists([[5, 6], [7], [8, 9, 10]]))
    packed = pack(data, 3)
    windows = [packed.tgt[i].tolist() for i in range(len(packed.tgt))]
    assert windows == [[5, 6, EOS, 7], [7, EOS, 8, 9], [9, 10, EOS]]
    batch = collate(packed, np.arange(3))
    assert batch["src"].shape == (3, 0)
    assert batch["tgt_in"][0].tolist() == [5, 6, EOS] and batch["tgt_out"][0].tolist() == [6, EOS, 7]
    assert batch["tgt_out"][2].tolist() == [10, EOS, PAD]


def test_lm_cli_end_to_end(multi30k_dir, tmp_path):
    """Train a tiny decoder-only LM, then sample, score and compute perplexity through the CLI."""
    run = tmp_path / "lm"
    mt = [sys.executable, "-m", "mt.cli"]
    train = subprocess.run(mt + ["train", str(REPO / "recipes/tiny.yaml"), "--set", "model.arch=decoder_only",
                                 "--set", f"train.out_dir={run}", "--set", f"data.train={multi30k_dir / 'train'}",
                                 "--set", f"data.valid={multi30k_dir / 'val'}", "--set", "train.max_steps=20",
                                 "--set", "train.threads=1"], capture_output=True, text=True)
    assert train.returncode == 0, train.stderr[-2000:]
    sample = subprocess.run(mt + ["sample", "-m", str(run), "-n", "3", "--prompt", "A dog", "--seed", "1"],
                            capture_output=True, text=True)
    assert sample.returncode == 0, sample.stderr
    lines = sample.stdout.splitlines()
    assert len(lines) == 3 and all(line.startswith("A dog") for line in lines)
    text = tmp_path / "text.en"
    text.write_text("A dog runs.\nTwo men are talking.\n\n")
    score = subprocess.run(mt + ["score", "-m", str(run), "--text", str(text)], capture_output=True, text=True)
    assert score.returncode == 0, score.stderr
    rows = [line.split("\t") for line in score.stdout.splitlines()]
    assert len(rows) == 3 and all(float(r[0]) < 0 for r in rows) and rows[2][1] == "1"  # empty line: EOS only
    ppl = subprocess.run(mt + ["eval", "--ppl", "-m", str(run), "--text", str(text), "--json"],
                         capture_output=True, text=True)
    assert ppl.returncode == 0, ppl.stderr
    import json, math
    result = json.loads(ppl.stdout)["ppl"]
    total = sum(float(r[0]) for r in rows)
    assert abs(result["ppl_per_token"] - math.exp(-total / sum(int(r[1]) for r in rows))) < 1e-2
