"""mt.models.cache: the decoding-cache protocol (expand / reorder(new_order) / advance) for every model
family, and the transformer's key/value cache: reordering and branching equal a fresh run."""
import inspect

import pytest
import torch

from conftest import make_model
from mt.config import ModelConfig
from mt.models import DecodingCache, build_model
from mt.models.cache import cached_mask
from mt.tokenizer import BOS, EOS, PAD

SRC = torch.tensor([[5, 6, 7, 8, 9, EOS], [4, 10, EOS, PAD, PAD, PAD], [7, 7, 5, EOS, PAD, PAD]])
TGT_IN = torch.tensor([[BOS, 4, 5, 6, 7, 8, 9], [BOS, 10, 9, 8, 7, 6, 5], [BOS, 4, 4, 4, 4, 4, 4]])
# decoder-only models with a fixed-size state (mt.models.cache.StateCache) are families of their own here
MIXERS = {"sliding_window": dict(mixer="sliding_window", window=3), "linear_attention": dict(mixer="linear", linear_gate=True),
          "ssm": dict(mixer="ssm", positions="none")}
ARCHS = ["transformer", "decoder_only", "prefix_lm", "linear", *MIXERS]


def family(arch):
    torch.manual_seed(0)
    mixer = MIXERS.get(arch, {})
    cfg = ModelConfig(arch="decoder_only" if mixer else arch, enc_layers=2, dec_layers=2, d_model=32, heads=4,
                      ffn=64, max_positions=64, **mixer)
    return build_model(cfg, 11).eval()


def source(arch):
    """A batch each family decodes from: sources, prompts (with PAD) or nothing."""
    return SRC if arch in ("transformer", "prefix_lm") else torch.tensor([[5, 6, 7], [8, PAD, PAD], [9, 4, PAD]])


@pytest.mark.parametrize("arch", ARCHS)
def test_every_family_follows_the_protocol(arch):
    """The three calls search makes, with the protocol's signatures, and nothing else search needs."""
    cache = family(arch).new_cache(source(arch), 8)
    for name in ("expand", "reorder", "advance"):
        want = inspect.signature(getattr(DecodingCache, name))
        got = inspect.signature(getattr(cache, name))
        assert list(got.parameters) == list(want.parameters)[1:], name


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_expand_then_reorder_equals_a_fresh_run_on_the_kept_rows(arch):
    """Beam search's moves on any family's cache: one step per row, expand(k), reorder to rows of some
    sentences (one dropped, rows swapped and repeated); later steps equal a cache built on those rows."""
    model, src, k = family(arch), source(arch), 2
    tgt = TGT_IN.repeat_interleave(k, 0)
    cache = model.new_cache(src, TGT_IN.shape[1])
    model.step(TGT_IN[:, :1], cache)
    cache.expand(k)
    keep = torch.tensor([1, 0, 5, 5])        # sentence 0 (rows swapped), sentence 2 (row 5 twice); 1 dropped
    cache.reorder(keep)
    rows = src.repeat_interleave(k, 0)[keep]
    fresh = model.new_cache(rows, TGT_IN.shape[1])
    model.step(tgt[keep, :1], fresh)
    for t in range(1, 4):
        torch.testing.assert_close(model.step(tgt[keep, t:t + 1], cache), model.step(tgt[keep, t:t + 1], fresh),
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("rows", [[2, 0, 2], [0, 2], [0, 1], [2]])  # all rows copied; one moved; none; one
@torch.no_grad()
def test_kv_cache_reorder_selects_rows(rows):
    """reorder(index) keeps rows `index`: the cache and later steps equal a run on src[index]
    (reorder copies only the rows that move when few do)."""
    model, index = make_model(), torch.tensor(rows)
    cache = model.new_cache(SRC, TGT_IN.shape[1])
    model.step(TGT_IN[:, :2], cache)
    before = [k[:, :, :2].clone() for k in cache.self_k]
    cache.reorder(index)
    assert cache.length == 2 and cache.memory_mask.shape[0] == len(rows)
    for old, new in zip(before, cache.self_k):
        torch.testing.assert_close(new[:, :, :2], old[index])
    torch.testing.assert_close(cache.memory_mask, (SRC[index] != PAD)[:, None, None, :])
    fresh = model.new_cache(SRC[index], TGT_IN.shape[1])
    model.step(TGT_IN[index, :2], fresh)
    for t in range(2, TGT_IN.shape[1]):
        torch.testing.assert_close(model.step(TGT_IN[index, t:t + 1], cache),
                                   model.step(TGT_IN[index, t:t + 1], fresh), atol=1e-6, rtol=0)


@torch.no_grad()
def test_expanded_rows_share_one_source_copy():
    """After expand(k) the k rows of a sentence share its encoder keys/values (no copy per hypothesis);
    a reorder within sentences leaves the source alone, one across sentences moves it."""
    model, k = make_model(), 3
    cache = model.new_cache(SRC, TGT_IN.shape[1])
    first = model.step(TGT_IN[:, :1], cache)
    cache.expand(k)
    assert cache.length == 1 and cache.self_k[0].shape[0] == 3 * k and cache.memory_k[0].shape[0] == 3
    plain = model.new_cache(SRC.repeat_interleave(k, 0), TGT_IN.shape[1])
    torch.testing.assert_close(model.step(TGT_IN.repeat_interleave(k, 0)[:, :1], plain), first.repeat_interleave(k, 0),
                               atol=1e-5, rtol=0)
    memory = cache.memory_k[0]
    cache.reorder(torch.tensor([2, 0, 0, 3, 5, 4, 8, 8, 6]))              # beams moved within their sentence
    assert cache.memory_k[0] is memory
    cache.reorder(torch.tensor([6, 7, 8]))                                 # sentence 2 alone
    assert cache.memory_k[0].shape[0] == 1 and torch.equal(cache.memory_mask[0], (SRC[2] != PAD)[None, None, :])


def test_advance_is_the_cache_s_own():
    model = make_model()
    cache = model.new_cache(SRC, 8)
    with torch.no_grad():
        model.step(TGT_IN[:, :3], cache)
    assert cache.length == 3 and cache.positions(2) == slice(3, 5)
    cache.advance(2)
    assert cache.length == 5


def test_cached_mask_is_causal_and_hides_padded_prompt_keys():
    key_mask = torch.tensor([[True, False, True, True, True]])[:, None, None, :]
    m = cached_mask(key_mask, 1, 3, "cpu")[0, 0]          # 3 new positions after 1 cached
    # query 0 is the padded position 1 itself: it sees only itself and the past
    assert m.tolist() == [[True, True, False, False], [True, False, True, False], [True, False, True, True]]
    padded = cached_mask(torch.zeros(1, 1, 1, 4, dtype=torch.bool), 0, 4, "cpu")[0, 0]
    assert padded.diagonal().all()                          # a padded query still sees itself (no NaN)
    assert cached_mask(None, 2, 1, "cpu") is None           # one new position sees everything before it
