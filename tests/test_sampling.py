"""Sampling and point estimation: scores agree with decoding, probabilities sum right, samplers obey their filters."""
from __future__ import annotations

import itertools
import math

import torch

from conftest import make_model
from mt.scoring import score_ids
from mt.search import beam_search, filter_logits, generate
from mt.tokenizer import BOS, EOS, PAD, UNK

OUTPUTS = [UNK, EOS, 4, 5]  # vocabulary 6 = PAD, UNK, BOS, EOS + 2 words: 4 possible output tokens


def test_score_equals_sum_of_greedy_step_logprobs():
    """log P(y|x) from scoring equals the per-step log-probs greedy decoding saw for y."""
    model = make_model(vocab_size=20, seed=3)
    src = torch.tensor([[5, 6, 7, EOS], [8, 9, EOS, PAD]])
    hyps = generate(model, src, torch.tensor([8, 8]))
    scores = score_ids(model, [[5, 6, 7], [8, 9]], [h.tokens for h in hyps], batch_tokens=1000, device="cpu")
    for h, s in zip(hyps, scores):
        assert abs(h.logprob - sum(h.step_logprobs)) < 1e-6
        assert abs(s.logprob - h.logprob) < 1e-4
        assert s.tokens == len(h.tokens) + 1


def _all_sequences(max_len):
    """Every finished output (<= max_len words then EOS) and every unfinished prefix of max_len + 1 words."""
    words = [t for t in OUTPUTS if t != EOS]
    finished = [list(p) for n in range(max_len + 1) for p in itertools.product(words, repeat=n)]
    unfinished = [list(p) for p in itertools.product(words, repeat=max_len + 1)]
    return finished, unfinished


@torch.no_grad()
def _prefix_logprob(model, src, prefix):
    """log P(prefix) without EOS: sum of next-token log-probs by teacher forcing."""
    tgt_in = torch.tensor([[BOS] + prefix[:-1]])
    lp = model.normalize(model(src, tgt_in))[0]
    return float(lp[torch.arange(len(prefix)), torch.tensor(prefix)].sum())


def test_probabilities_of_all_sequences_sum_to_one_and_sampling_matches():
    """Finished sequences' probabilities plus the unfinished mass sum to 1; 20,000 samples match them (chi-squared)."""
    model = make_model(vocab_size=6, seed=1, d_model=16, heads=2, ffn=32)
    L = 3
    src_ids = [4, 5, 4]
    src = torch.tensor([src_ids + [EOS]])
    finished, unfinished = _all_sequences(L)
    scores = score_ids(model, [src_ids] * len(finished), finished, batch_tokens=10_000, device="cpu")
    p_finished = [math.exp(s.logprob) for s in scores]
    p_unfinished = sum(math.exp(_prefix_logprob(model, src, u)) for u in unfinished)
    assert abs(sum(p_finished) + p_unfinished - 1.0) < 1e-5
    # the sampler stops at L words by forcing EOS: a length-L output has the probability of its prefix
    expected = {tuple(y): p for y, p in zip(finished, p_finished) if len(y) < L}
    expected.update({tuple(y): math.exp(_prefix_logprob(model, src, y)) for y in finished if len(y) == L})
    assert abs(sum(expected.values()) - 1.0) < 1e-5
    n = 20_000
    hyps = generate(model, src.repeat(n, 1), torch.full((n,), L), sample=True, seed=7)
    counts = {}
    for h in hyps:
        counts[tuple(h.tokens)] = counts.get(tuple(h.tokens), 0) + 1
    assert set(counts) <= set(expected)
    chi2 = sum((counts.get(y, 0) - n * p) ** 2 / (n * p) for y, p in expected.items())
    df = len(expected) - 1  # 39 cells of freedom; 99.9% quantile of chi2(39) is 72.05
    assert df == 39 and chi2 < 72.05, chi2


def test_sampled_sequence_logprob_matches_score():
    """The log-prob each sample reports equals its teacher-forced score."""
    model = make_model(vocab_size=20, seed=4)
    n, limit = 50, 40
    hyps = generate(model, torch.tensor([[5, 6, EOS]]).repeat(n, 1), torch.full((n,), limit), sample=True, seed=2)
    natural = [h for h in hyps if len(h.tokens) < limit]  # ended by sampling EOS, not by the length limit
    assert natural
    scores = score_ids(model, [[5, 6]] * len(natural), [h.tokens for h in natural], batch_tokens=10_000, device="cpu")
    for h, s in zip(natural, scores):
        assert abs(s.logprob - h.logprob) < 1e-4


def test_top_k_1_equals_greedy_and_low_temperature_approaches_greedy():
    """--top-k 1 gives the greedy output; temperature -> 0 gives it too."""
    model = make_model(vocab_size=30, seed=5)
    src = torch.randint(4, 30, (6, 7))
    max_lens = torch.full((6,), 10)
    greedy = [h.tokens for h in generate(model, src, max_lens)]
    top1 = [h.tokens for h in generate(model, src, max_lens, sample=True, top_k=1, seed=3)]
    cold = [h.tokens for h in generate(model, src, max_lens, sample=True, temperature=1e-4, seed=3)]
    assert top1 == greedy and cold == greedy


def test_top_p_keeps_smallest_set_reaching_p():
    """Nucleus filtering keeps the most probable tokens until their mass first reaches p."""
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    for p, kept in ((0.5, 1), (0.51, 2), (0.8, 2), (0.81, 3), (0.95, 3), (0.96, 4), (1.0, 4)):
        out = filter_logits(logits, top_p=p)
        assert int(torch.isfinite(out).sum()) == kept, (p, out)
        assert torch.isfinite(out[0, :kept]).all()


def test_top_k_keeps_k_tokens():
    """Top-k filtering leaves exactly k finite logits, the k largest."""
    logits = torch.tensor([[0.1, 2.0, -1.0, 3.0, 0.5]])
    out = filter_logits(logits, top_k=2)
    assert torch.isfinite(out).nonzero()[:, 1].tolist() == [1, 3]


def test_sampling_is_batch_size_invariant():
    """The same seed and sentence ids give the same samples alone or in a batch."""
    model = make_model(vocab_size=30, seed=6)
    src = torch.randint(4, 30, (5, 6))
    max_lens = torch.full((5,), 8)
    batched = generate(model, src, max_lens, sample=True, seed=11, top_p=0.9)
    for i in range(5):
        alone = generate(model, src[i:i + 1], max_lens[i:i + 1], sample=True, seed=11, top_p=0.9, ids=[i])[0]
        assert alone.tokens == batched[i].tokens
        assert abs(alone.logprob - batched[i].logprob) < 1e-5


def test_nbest_distinct_and_sorted():
    """Beam search n-best lists hold distinct hypotheses, best score first."""
    model = make_model(vocab_size=30, seed=8)
    src = torch.randint(4, 30, (3, 5))
    for hyps in beam_search(model, src, torch.full((3,), 8), beam_size=6, nbest=4):
        assert len(hyps) == 4
        assert len({tuple(h.tokens) for h in hyps}) == 4
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)


def test_translator_batch_invariance(trained_run):
    """Translating, scoring and sampling in batches of 1 and of 64 sentences give the same results."""
    import mt

    t = mt.load(str(trained_run), device="cpu")
    src = [f"A man in a {c} shirt is riding a bike." for c in ("red", "blue", "green")] + \
          ["Two dogs play in the snow.", "", "A woman sings.", "Children are running on the beach."] * 3
    ref = ["Ein Mann fährt Fahrrad."] * len(src)
    outs, scores, samples = [], [], []
    for sentences, tokens in ((1, 1), (64, 100_000)):
        t.cfg.decode.max_batch_sentences, t.cfg.decode.batch_tokens = sentences, tokens
        outs.append(t.translate(src, beam_size=3))
        scores.append([s.logprob for s in t.score_batch(src, ref)])
        samples.append(t.generate_batch(src[:4], num_samples=2, seed=5, top_k=20))
    assert outs[0] == outs[1]
    assert max(abs(a - b) for a, b in zip(*scores)) < 1e-5
    assert samples[0] == samples[1]


def test_beam_hypotheses_stop_at_their_length_limit():
    """A sentence forced to end at its length limit yields finished hypotheses only: no EOS inside, none too long."""
    model = make_model(vocab_size=30, seed=9)
    src = torch.randint(4, 30, (3, 5))
    max_lens = torch.tensor([1, 6, 2])
    for lp in (0.0, 1.0):
        for limit, hyps in zip(max_lens.tolist(), beam_search(model, src, max_lens, beam_size=4, nbest=4,
                                                                length_penalty=lp)):
            assert hyps and all(EOS not in h.tokens and len(h.tokens) <= limit for h in hyps)
