"""Search: greedy vs beam, beam search on a scripted model and against exhaustive enumeration."""
import itertools
import math

import pytest
import torch

from conftest import make_model
from mt.search import beam_search, generate
from mt.tokenizer import BOS, EOS, PAD, UNK

A, B = 4, 5
# P(next | prefix) per sentence (keyed by the source's first token); unlisted prefixes: DEFAULT.
# Sentence 4: greedy takes A (.5) then A (.4) then EOS: P = .5*.4*.97 = .194,
# but [B] EOS has P = .45*.9 = .405, which a beam of 2 finds.
DEFAULT = {UNK: .01, EOS: .97, A: .01, B: .01}
TABLES = {
    4: {(): {UNK: .02, EOS: .03, A: .5, B: .45},
        (A,): {UNK: .02, EOS: .28, A: .4, B: .3},
        (B,): {UNK: .02, EOS: .9, A: .04, B: .04}},
    5: {(): {UNK: .02, EOS: .03, A: .9, B: .05}},  # greedy and beam agree: [A] EOS, P = .9*.97
}


class ScriptedCache:
    def __init__(self, keys):
        self.rows = [(k, ()) for k in keys]
        self.length = 0

    def expand(self, k):
        self.rows = [row for row in self.rows for _ in range(k)]

    def reorder(self, new_order):
        self.rows = [self.rows[i] for i in new_order.tolist()]

    def advance(self, n):
        self.length += n


class ScriptedModel:
    """new_cache/step like mt.models.Transformer, with log-probs read from TABLES."""

    def new_cache(self, src, max_len):
        return ScriptedCache(src[:, 0].tolist())

    def step(self, tokens, cache):
        lp = torch.full((len(cache.rows), 6), float("-inf"))
        for r, (key, prefix) in enumerate(cache.rows):
            prefix += tuple(t for t in tokens[r].tolist() if t != BOS)
            cache.rows[r] = (key, prefix)
            for tok, p in TABLES[key].get(prefix, DEFAULT).items():
                lp[r, tok] = math.log(p)
        cache.advance(tokens.shape[1])
        return lp


SCRIPT_SRC = torch.tensor([[4, EOS], [5, EOS]])
MAX_LENS = torch.tensor([5, 5])


def test_scripted_greedy_takes_the_locally_best_path():
    """Greedy follows the argmax: [A, A] with log P = log(.5 * .4 * .97)."""
    g = generate(ScriptedModel(), SCRIPT_SRC, MAX_LENS)
    assert g[0].tokens == [A, A] and g[0].logprob == pytest.approx(math.log(.5 * .4 * .97))
    assert g[1].tokens == [A] and g[1].logprob == pytest.approx(math.log(.9 * .97))


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_scripted_beam_finds_hand_computed_best(length_penalty):
    """A beam of 2 finds [B] with log P = log(.45 * .9), which greedy misses; score = log P / 2 ** lp."""
    best = [h[0] for h in beam_search(ScriptedModel(), SCRIPT_SRC, MAX_LENS, beam_size=2,
                                      length_penalty=length_penalty)]
    assert best[0].tokens == [B]
    assert best[0].step_logprobs == pytest.approx([math.log(.45), math.log(.9)])
    assert best[0].logprob == pytest.approx(math.log(.405))
    assert best[0].score == pytest.approx(math.log(.405) / 2 ** length_penalty)
    assert best[1].tokens == [A] and best[1].logprob == pytest.approx(math.log(.9 * .97))


def test_scripted_nbest_is_distinct_and_sorted():
    """nbest=3 gives the three best distinct hypotheses, best first: [B], [A, A], [A, B]."""
    hyps = beam_search(ScriptedModel(), SCRIPT_SRC[:1], MAX_LENS[:1], beam_size=2, length_penalty=0.0, nbest=3)[0]
    assert [h.tokens for h in hyps] == [[B], [A, A], [A, B]]
    assert [h.logprob for h in hyps] == pytest.approx([math.log(p) for p in (.405, .5 * .4 * .97, .5 * .3 * .97)])


@torch.no_grad()
def test_beam_size_one_equals_greedy():
    """beam_search(beam_size=1) returns greedy's tokens and log-probs on a random Transformer."""
    model = make_model(vocab_size=11, seed=3)
    src = torch.tensor([[5, 6, 7, 8, EOS], [9, EOS, PAD, PAD, PAD], [4, 10, 4, EOS, PAD]])
    max_lens = torch.tensor([6, 3, 8])
    greedy = generate(model, src, max_lens)
    beam = [h[0] for h in beam_search(model, src, max_lens, beam_size=1, length_penalty=0.0)]
    for g, b in zip(greedy, beam):
        assert b.tokens == g.tokens
        assert b.logprob == pytest.approx(g.logprob, abs=1e-5)
        assert b.step_logprobs == pytest.approx(g.step_logprobs, abs=1e-5)


def exhaustive(model, src, max_len):
    """(tokens, log P) of every output of at most max_len tokens from the non-special ids, by teacher forcing."""
    words = [t for t in range(model.vocab_size) if t not in (PAD, BOS, EOS)]
    out = []
    for n in range(max_len + 1):
        for seq in itertools.product(words, repeat=n):
            tgt_in = torch.tensor([[BOS, *seq]])
            lp = model.log_probs(model.decode(tgt_in, *_memory(model, src)))[0]
            out.append((list(seq), float(lp[torch.arange(n + 1), torch.tensor([*seq, EOS])].sum())))
    return out


def _memory(model, src):
    memory, mask = model.encode(src)
    return [layer.cross_attn.project_memory(memory) for layer in model.decoder], mask


EXH_SRC = torch.tensor([[4, 4, 1, 4, EOS], [1, EOS, PAD, PAD, PAD], [4, 1, EOS, PAD, PAD]])
EXH_MAX_LEN = 4


def exhaustive_truth(model, b, length_penalty):
    """{tokens: log P} by enumeration for sentence b of EXH_SRC alone, and the best tokens by score."""
    alone = EXH_SRC[b:b + 1, :int((EXH_SRC[b] != PAD).sum())]
    truth = {tuple(s): lp for s, lp in exhaustive(model, alone, EXH_MAX_LEN)}
    assert len(truth) == 31  # 1 + 2 + 4 + 8 + 16 outputs over the non-special ids {1, 4}
    return truth, max(truth, key=lambda s: truth[s] / (len(s) + 1) ** length_penalty)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
@torch.no_grad()
def test_wide_beam_finds_the_exhaustive_best(length_penalty):
    """On vocabulary 5 and max length 4, a wide beam returns enumeration's best output, log-prob and score.

    beam 32 >= the 24 finite candidates any step can have, so nothing is pruned and the search is exact
    (a beam of 16 is not provably exact here: a length-3 winner can be ranked 16th at step 3).
    """
    model = make_model(vocab_size=5, seed=7)
    results = beam_search(model, EXH_SRC, torch.full((3,), EXH_MAX_LEN), beam_size=32, length_penalty=length_penalty)
    for b, hyps in enumerate(results):
        truth, best = exhaustive_truth(model, b, length_penalty)
        assert tuple(hyps[0].tokens) == best
        assert hyps[0].logprob == pytest.approx(truth[best], abs=1e-5)
        assert hyps[0].score == pytest.approx(truth[best] / (len(best) + 1) ** length_penalty, abs=1e-5)


@torch.no_grad()
def test_wide_beam_nbest_is_the_enumeration():
    """With nothing pruned, the n-best list is exactly the 31 enumerated outputs sorted by score."""
    model = make_model(vocab_size=5, seed=7)
    results = beam_search(model, EXH_SRC, torch.full((3,), EXH_MAX_LEN), beam_size=32, length_penalty=0.0, nbest=100)
    for b, hyps in enumerate(results):
        truth, _ = exhaustive_truth(model, b, 0.0)
        assert sorted(tuple(h.tokens) for h in hyps) == sorted(truth)
        assert [h.logprob for h in hyps] == pytest.approx(sorted(truth.values(), reverse=True), abs=1e-5)


@torch.no_grad()
def test_hypothesis_logprob_is_sum_of_step_logprobs():
    """For greedy and beam hypotheses, logprob == sum(step_logprobs) and score == logprob / len ** lp."""
    model = make_model(vocab_size=11, seed=5)
    src = torch.tensor([[5, 6, 7, EOS], [8, 9, EOS, PAD]])
    max_lens = torch.tensor([5, 7])
    hyps = [h for hs in beam_search(model, src, max_lens, beam_size=4, length_penalty=0.7, nbest=4) for h in hs]
    hyps += generate(model, src, max_lens, length_penalty=0.7)
    for h in hyps:
        assert h.logprob == pytest.approx(sum(h.step_logprobs), abs=1e-6)
        assert len(h.step_logprobs) == len(h.tokens) + 1
        assert h.score == pytest.approx(h.logprob / len(h.step_logprobs) ** 0.7)


@torch.no_grad()
def test_beam_hypotheses_never_contain_eos():
    """A sentence that reaches its max length before the batch's longest still ends at its first EOS
    (regression: EOS rows used to stay alive and leak EOS into hypotheses)."""
    model = make_model(vocab_size=11, seed=5)
    src = torch.tensor([[5, 6, 7, EOS], [8, 9, EOS, PAD]])
    for hyps in beam_search(model, src, torch.tensor([5, 7]), beam_size=4, length_penalty=0.7, nbest=4):
        for h in hyps:
            assert EOS not in h.tokens and BOS not in h.tokens and len(h.tokens) <= 7


@torch.no_grad()
def test_nbest_distinct_and_sorted_on_model():
    """nbest hypotheses of a random Transformer are distinct token sequences, sorted by score."""
    model = make_model(vocab_size=11, seed=2)
    src = torch.tensor([[5, 6, 7, 8, EOS]])
    hyps = beam_search(model, src, torch.tensor([6]), beam_size=5, length_penalty=1.0, nbest=5)[0]
    assert 1 < len(hyps) <= 5
    assert len({tuple(h.tokens) for h in hyps}) == len(hyps)
    assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
