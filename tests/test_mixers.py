"""Token mixers of decoder-only models: full, sliding-window and linear attention, the state-space
layer, rotary positions. Each runs as a parallel (training) form and a step-by-step (decoding) form;
they must compute the same function, causally, on a state whose size the mixer promises."""
from __future__ import annotations

import pytest
import torch

from mt.config import ModelConfig
from mt.models import build_model
from mt.models.cache import StateCache
from mt.models.rotary import rotate
from mt.models.scan import chunked_scan, recurrent_step
from mt.models.sliding_window import band_mask, blocked_attention
from mt.search import beam_search, generate
from mt.tokenizer import BOS, EOS, PAD

V = 40
MIXERS = {  # name: model.* overrides; windows and chunks far shorter than the sequences below
    "softmax": dict(mixer="softmax", positions="sinusoidal"),
    "softmax_rotary": dict(mixer="softmax", positions="rotary"),
    "sliding_window": dict(mixer="sliding_window", window=5, positions="rotary"),
    "sliding_window_sinusoidal": dict(mixer="sliding_window", window=7, positions="sinusoidal"),
    "linear": dict(mixer="linear", chunk=4, positions="sinusoidal"),
    "gated_linear": dict(mixer="linear", linear_gate=True, chunk=4, positions="none"),
    "ssm": dict(mixer="ssm", chunk=4, positions="none"),
}


def lm(seed=0, **overrides):
    cfg = dict(arch="decoder_only", d_model=32, heads=4, ffn=64, dec_layers=2, dropout=0.0, max_positions=256)
    torch.manual_seed(seed)
    return build_model(ModelConfig(**{**cfg, **overrides}), V).eval()


def parallel_logprobs(model, ids):
    return model.normalize(model(None, ids))  # (B, T, V)


@pytest.mark.parametrize("name", MIXERS)
def test_step_by_step_equals_parallel_form(name):
    """Prompts of different lengths (right-padded, so the prefill skips pads), then 20 steps: every
    step's log-probs equal the parallel forward's at that position, past window and chunk boundaries."""
    model = lm(**MIXERS[name])
    torch.manual_seed(1)
    seqs = torch.randint(4, V, (3, 33))
    lens = [9, 2, 13]
    prompts = torch.full((3, 13), PAD)
    for b, n in enumerate(lens):
        prompts[b, :n] = seqs[b, :n]
    ids = torch.cat([torch.full((3, 1), BOS), seqs], 1)
    with torch.no_grad():
        full = parallel_logprobs(model, ids)
        cache = model.new_cache(prompts, 20)
        worst = 0.0
        for t in range(20):
            tok = torch.full((3, 1), BOS) if t == 0 else torch.stack([seqs[b, lens[b] + t - 1] for b in range(3)])[:, None]
            lp = model.step(tok, cache)
            for b in range(3):
                worst = max(worst, (lp[b, 4:] - full[b, lens[b] + t, 4:]).abs().max().item())
    assert worst < 1e-5, worst


@pytest.mark.parametrize("name", MIXERS)
def test_a_future_token_never_changes_an_earlier_logit(name):
    model = lm(**MIXERS[name])
    torch.manual_seed(2)
    ids = torch.randint(4, V, (2, 30))
    changed = ids.clone()
    changed[:, 17] = (changed[:, 17] + 1 - 4) % (V - 4) + 4
    with torch.no_grad():
        a, b = model(None, ids), model(None, changed)
    assert torch.equal(a[:, :17], b[:, :17])
    assert not torch.allclose(a[:, 17:], b[:, 17:])


def test_sliding_window_covering_the_context_is_full_attention_exactly():
    full = lm(mixer="softmax", positions="rotary")
    window = lm(mixer="sliding_window", window=30, positions="rotary")
    window.load_state_dict(full.state_dict())  # the same parameter names
    ids = torch.randint(4, V, (2, 30))
    with torch.no_grad():
        assert torch.equal(full(None, ids), window(None, ids))
        window.layers[0].attn.window = 29  # one position less: no longer the same function
        assert not torch.allclose(full(None, ids), window(None, ids))


@pytest.mark.parametrize("T", [5, 16, 17, 23])
def test_blocked_sliding_window_equals_the_banded_mask(T):
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 3, T, 8) for _ in range(3))
    pos = torch.arange(T)
    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=band_mask(pos, pos, 4))
    assert torch.allclose(blocked_attention(q, k, v, 4), reference, atol=1e-6)


def decode_states(model, steps):
    cache = model.new_cache(torch.randint(4, V, (2, 6)), steps)
    sizes, shapes = [], None
    with torch.no_grad():
        tok = torch.full((2, 1), BOS)
        for t in range(steps):
            tok = model.step(tok, cache).argmax(-1, keepdim=True)
            sizes.append(cache.nbytes())
    shapes = [{k: tuple(t.shape) for k, t in state.items()} for state in cache.layers]
    return sizes, shapes


def test_rolling_cache_holds_window_slots_whatever_the_length():
    model = lm(mixer="sliding_window", window=5, positions="rotary")
    sizes, shapes = decode_states(model, 12)  # past two turns of the ring
    assert len(set(sizes)) == 1
    assert all(s == {"k": (2, 4, 5, 8), "v": (2, 4, 5, 8)} for s in shapes)


@pytest.mark.parametrize("name", ["linear", "gated_linear", "ssm"])
def test_recurrent_state_has_a_fixed_size(name):
    sizes, _ = decode_states(lm(**MIXERS[name]), 12)
    assert len(set(sizes)) == 1 and sizes[0] > 0


@pytest.mark.parametrize("T,chunk", [(1, 4), (13, 4), (16, 4), (16, 64), (37, 8)])
def test_chunked_scan_equals_the_recurrence(T, chunk):
    torch.manual_seed(4)
    q, k = torch.randn(2, 3, T, 5), torch.randn(2, 3, T, 5)
    v, g = torch.randn(2, 3, T, 6), -torch.rand(2, 3, T)
    state0 = torch.randn(2, 3, 5, 6)
    out, final = chunked_scan(q, k, v, g, chunk=chunk, state=state0)
    S, steps = state0, []
    for t in range(T):
        o, S = recurrent_step(q[:, :, t], k[:, :, t], v[:, :, t], g[:, :, t], S)
        steps.append(o)
    assert torch.allclose(out, torch.stack(steps, 2), atol=1e-5)
    assert torch.allclose(final, S, atol=1e-5)


def test_rotary_scores_depend_on_the_offset_only():
    torch.manual_seed(5)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    score = lambda i, j: (rotate(q, torch.tensor([i])) * rotate(k, torch.tensor([j]))).sum().item()
    assert score(3, 1) == pytest.approx(score(103, 101), abs=1e-4)
    assert score(3, 1) != pytest.approx(score(3, 2), abs=1e-3)
    assert torch.allclose(rotate(q, torch.tensor([0])), q)


@pytest.mark.parametrize("name", ["sliding_window", "gated_linear", "ssm"])
def test_search_on_a_state_cache_scores_what_it_found(name):
    """Beam search (expand, reorder) and sampling on a StateCache: each hypothesis' log-prob equals
    the parallel forward's score of the same sequence."""
    model = lm(**MIXERS[name])
    prompts = torch.tensor([[5, 6, 7], [8, 9, PAD]])
    max_lens = torch.tensor([8, 8])
    beams = beam_search(model, prompts, max_lens, beam_size=3, nbest=3)
    draws = [[h] for h in generate(model, prompts, max_lens, sample=True, seed=3)]
    assert isinstance(model.new_cache(prompts, 4), StateCache)
    for row in range(2):
        prompt = [t for t in prompts[row].tolist() if t != PAD]
        for h in beams[row] + draws[row]:
            ids = torch.tensor([[BOS] + prompt + h.tokens])
            with torch.no_grad():
                lp = parallel_logprobs(model, ids)[0]
            scored = sum(lp[len(prompt) + i, t].item() for i, t in enumerate(h.tokens + [EOS]))
            assert scored == pytest.approx(h.logprob, abs=1e-4), (name, row, h)


def test_parameter_counts_match_full_attention_within_five_percent():
    """At recipes/shakespeare.yaml's shape: the mixers are compared at equal size."""
    shape = dict(d_model=128, heads=4, ffn=512, dec_layers=4)
    base = lm(mixer="softmax", **shape).num_parameters()
    for name in ("sliding_window", "linear", "gated_linear", "ssm"):
        assert abs(lm(**MIXERS[name], **shape).num_parameters() / base - 1) < 0.05, name


def test_a_packed_lm_reads_bos_as_the_line_break_it_was_trained_after():
    """Packed windows never hold BOS (every line starts after an EOS): prompts and scored lines of such
    a model start from EOS, so sampling and scoring condition on what training showed."""
    torch.manual_seed(0)
    cfg = ModelConfig(arch="decoder_only", d_model=32, heads=4, ffn=64, dec_layers=2, dropout=0.0, mixer="ssm",
                      positions="none")
    packed, plain = build_model(cfg, V, packed=True).eval(), build_model(cfg, V).eval()
    plain.load_state_dict(packed.state_dict())
    ids = torch.randint(4, V, (2, 9))
    with torch.no_grad():
        bos, eos = torch.cat([torch.full((2, 1), BOS), ids], 1), torch.cat([torch.full((2, 1), EOS), ids], 1)
        assert torch.equal(packed(None, bos), plain(None, eos))
        assert not torch.allclose(plain(None, bos), plain(None, eos))
