"""mt.fast.aot_batched (`--aot` on batches): greedy search, sampling and beam search through the
model's own step, exported with dynamic rows and lengths and compiled ahead of time, give the eager
output on padded batches whose rows finish at different steps. Where a C++ compiler is present these
tests run and fail if compiling fails."""
import pytest
import torch

from conftest import make_model
from mt.errors import MTError
from mt.fast.aot_batched import BatchedAotDecoder
from mt.search import beam_search, generate
from mt.tokenizer import EOS, PAD
from test_aot import needs_cxx


@pytest.fixture(scope="module")
def model_and_compiled():
    model = make_model(vocab_size=40, d_model=32, heads=4, ffn=64, tie_embeddings=False)
    return model, BatchedAotDecoder(model)


def batch(*sources):
    """Sources padded into one batch, each ending in EOS."""
    S = max(len(s) for s in sources) + 1
    out = torch.full((len(sources), S), PAD)
    for i, s in enumerate(sources):
        out[i, :len(s) + 1] = torch.tensor(s + [EOS])
    return out


SOURCES = [[5, 9, 12, 3, 7, 8, 30, 31], [6, 4], [11, 13, 17], [20, 21, 22, 23, 24], [33]]


@needs_cxx
@pytest.mark.slow
@pytest.mark.parametrize("sources, max_lens", [(SOURCES, [12, 3, 9, 0, 7]), ([[]], [6]), ([[], []], [4, 2]),
                                               ([[8, 9]], [10])])
def test_batched_greedy_and_beam_equal_eager(model_and_compiled, sources, max_lens):
    """Rows finish at different steps (down to one row), a source of EOS alone, length caps of 0."""
    model, compiled = model_and_compiled
    src, lens = batch(*sources), torch.tensor(max_lens)
    with torch.no_grad():
        eager = generate(model, src, lens, length_penalty=1.0)
        eager_beam = beam_search(model, src, lens, beam_size=4, nbest=3)
    for got, want in zip(generate(compiled, src, lens, length_penalty=1.0), eager):
        assert got.tokens == want.tokens
        assert got.step_logprobs == pytest.approx(want.step_logprobs, abs=1e-4)
    for got, want in zip(beam_search(compiled, src, lens, beam_size=4, nbest=3), eager_beam):
        assert [h.tokens for h in got] == [h.tokens for h in want]
        assert [h.score for h in got] == pytest.approx([h.score for h in want], abs=1e-4)


@needs_cxx
@pytest.mark.slow
def test_batched_sampling_draws_what_eager_sampling_draws(model_and_compiled):
    model, compiled = model_and_compiled
    src, lens = batch(*SOURCES), torch.tensor([9] * len(SOURCES))
    kw = dict(sample=True, ids=[3, 1, 4, 1, 5], seed=2, temperature=0.8, top_k=10, top_p=0.9)
    with torch.no_grad():
        eager = generate(model, src, lens, **kw)
    got = generate(compiled, src, lens, **kw)
    assert [h.tokens for h in got] == [h.tokens for h in eager]


@needs_cxx
@pytest.mark.slow
def test_the_compiled_step_follows_the_eager_cache_through_expand_and_reorder(model_and_compiled):
    model, compiled = model_and_compiled
    src = batch(*SOURCES[:3])
    with torch.no_grad():
        eager_cache, cache = model.new_cache(src, 6), compiled.new_cache(src, 6)
        tokens = torch.tensor([[1], [1], [1]])
        torch.testing.assert_close(compiled.step(tokens, cache), model.step(tokens, eager_cache), atol=1e-4, rtol=1e-4)
        for c in (cache, eager_cache):
            c.expand(2)
        order = torch.tensor([1, 1, 0, 3, 5, 4])  # beams swap within sentences
        for new_order in (order, torch.tensor([4, 5, 0, 1])):  # then sentence 1 finishes
            tokens = torch.tensor([[7], [8], [9], [10], [11], [12]])
            torch.testing.assert_close(compiled.step(tokens, cache), model.step(tokens, eager_cache),
                                       atol=1e-4, rtol=1e-4)
            for c in (cache, eager_cache):
                c.reorder(new_order)
        tokens = torch.tensor([[13], [14], [15], [16]])
        torch.testing.assert_close(compiled.step(tokens, cache), model.step(tokens, eager_cache), atol=1e-4, rtol=1e-4)


@needs_cxx
@pytest.mark.slow
def test_one_package_per_group_size_serves_every_batch(model_and_compiled, monkeypatch):
    model, compiled = model_and_compiled
    beam_search(compiled, batch([5, 6]), torch.tensor([3]), beam_size=3)  # groups 1 and 3 compiled (or loaded)

    def no_compiler(program, package_path, **options):
        raise AssertionError("compiled again for another shape")
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", no_compiler)
    torch.manual_seed(1)
    for n in (1, 2, 7):
        src = torch.cat([torch.randint(3, 40, (n, 2 + 3 * n)), torch.full((n, 1), EOS)], 1)
        with torch.no_grad():
            want = [h[0].tokens for h in beam_search(model, src, torch.tensor([2 * n + 3] * n), beam_size=3)]
        assert [h[0].tokens for h in beam_search(compiled, src, torch.tensor([2 * n + 3] * n), beam_size=3)] == want


@needs_cxx
@pytest.mark.slow
def test_an_ensemble_decodes_through_its_members_compiled_steps(model_and_compiled):
    from mt.ensemble import Ensemble

    model, compiled = model_and_compiled
    other = make_model(vocab_size=40, d_model=32, heads=4, ffn=64, tie_embeddings=False, seed=3)
    eager, fast = Ensemble([model, other]), Ensemble([model, other], steppers=[compiled, BatchedAotDecoder(other)])
    src, lens = batch(*SOURCES), torch.tensor([9, 4, 7, 6, 5])
    with torch.no_grad():
        want = beam_search(eager, src, lens, beam_size=3, nbest=2)
    got = beam_search(fast, src, lens, beam_size=3, nbest=2)
    assert [[h.tokens for h in hs] for hs in got] == [[h.tokens for h in hs] for hs in want]
    assert [h.score for hs in got for h in hs] == pytest.approx([h.score for hs in want for h in hs], abs=1e-4)


def test_batched_aot_refuses_what_it_cannot_decode(trained_run):
    from mt.ensemble import Ensemble
    from mt.fast.int8 import quantize_int8
    from mt.translate import Translator

    with pytest.raises(MTError, match="--aot"):
        BatchedAotDecoder(Ensemble([make_model(), make_model(seed=1)]))  # an ensemble: member by member
    with pytest.raises(MTError, match="--aot"):
        BatchedAotDecoder(quantize_int8(make_model()))
    with pytest.raises(MTError, match="--quantize"):
        Translator.load(trained_run, quantize="int8", aot=True)
