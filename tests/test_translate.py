"""mt.translate.Translator: the library API (keyword-only translate_batch, translate_iterable,
score_batch, generate_batch, the translate alias), on a tiny model and tokenizer built here."""
import math

import pytest
import torch

from mt.config import Config, ModelConfig
from mt.decoding import pad_sources
from mt.models import build_model
from mt.search import beam_search, generate
from mt.tokenizer import BOS, EOS, train_tokenizer
from mt.translate import Translator

SENTENCES = ["a man rides a red bike", "two dogs play in the snow", "a girl reads a book in the park",
             "the children run on the beach", "a woman sings a song", "an old man walks his dog"] * 20


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(SENTENCES, tmp_path_factory.mktemp("spm") / "spm.model", vocab_size=60)


def translator(tokenizer, arch="transformer", **decode):
    torch.manual_seed(0)
    cfg = Config()
    cfg.model = ModelConfig(arch=arch, enc_layers=1, dec_layers=2, d_model=32, heads=4, ffn=64, max_positions=40)
    for key, value in decode.items():
        setattr(cfg.decode, key, value)
    return Translator(build_model(cfg.model, len(tokenizer)), tokenizer, cfg)


def test_decode_options_are_keywords_only(tokenizer):
    t = translator(tokenizer)
    with pytest.raises(TypeError):
        t.translate_batch(["a dog"], 3)


def test_translate_batch_returns_the_search_s_hypotheses(tokenizer):
    """beam_size 1 is mt.search.generate, beam k with num_hypotheses n is beam_search's n-best, each with
    its text, tokens, log-prob and score; an empty line gets no hypotheses."""
    t = translator(tokenizer, max_len_a=0.0, max_len_b=6)
    sources = ["a man rides a red bike", "", "two dogs play"]
    ids = [tokenizer.encode([s])[0] for s in sources]
    src = pad_sources([ids[0], ids[2]], eos=True)                   # what decoding feeds the model
    greedy = t.translate_batch(sources, beam_size=1)
    want = generate(t.model, src, torch.tensor([6, 6]), length_penalty=t.cfg.decode.length_penalty)
    assert [g[0].tokens for g in (greedy[0], greedy[2])] == [h.tokens for h in want] and greedy[1] == []
    assert greedy[0][0].text == tokenizer.decode([want[0].tokens])[0]
    nbest = t.translate_batch(sources, beam_size=4, num_hypotheses=3)
    want = beam_search(t.model, src, torch.tensor([6, 6]), beam_size=4, nbest=3, length_penalty=1.0)
    assert [[h.tokens for h in hs] for hs in (nbest[0], nbest[2])] == [[h.tokens for h in hs] for hs in want]
    assert all(a.score >= b.score for a, b in zip(nbest[0], nbest[0][1:]))
    assert t.translate(sources, beam_size=1) == [greedy[0][0].text, "", greedy[2][0].text]


def test_translate_iterable_reads_lazily_and_equals_the_batch(tokenizer):
    t = translator(tokenizer, beam_size=2)
    lines, read = SENTENCES[:7], []

    def source():
        for line in lines:
            read.append(line)
            yield line
    stream = t.translate_iterable(source(), window=3)
    first = next(stream)
    assert len(read) == 3                                   # one window read, not the whole input
    rest = list(stream)
    assert [r[0].text for r in [first] + rest] == [r[0].text for r in t.translate_batch(lines)]


def test_sampling_defaults_come_from_decode_config_and_keyword_overrides_win(tokenizer):
    t = translator(tokenizer, sample=True, top_k=1, seed=3)      # top-k 1: a sample is the greedy path
    assert t.translate(["a man rides a red bike"]) == translator(tokenizer).translate(["a man rides a red bike"],
                                                                                      beam_size=1)
    draws = {tuple(h.tokens) for h in t.translate_batch(["a dog"], num_hypotheses=6, top_k=0, temperature=3.0)[0]}
    assert len(draws) > 1                                        # top_k=0 overrides: several draws


def test_score_batch_is_the_teacher_forced_log_prob(tokenizer):
    """log P(y | x) summed over y's tokens and EOS, from the model's own forward pass."""
    t = translator(tokenizer)
    sources, targets = ["a man rides a red bike", "two dogs play"], ["a woman sings a song", "the dog"]
    scores = t.score_batch(sources, targets)
    for x, y, s in zip(sources, targets, scores):
        src = pad_sources(tokenizer.encode([x]), eos=True)
        y_ids = tokenizer.encode([y])[0]
        tgt_in, tgt_out = torch.tensor([[BOS] + y_ids]), torch.tensor([y_ids + [EOS]])
        with torch.no_grad():
            lp = t.model.normalize(t.model(src, tgt_in))[0].gather(1, tgt_out.T).sum()
        assert s.tokens == len(y_ids) + 1 and math.isclose(s.logprob, float(lp), abs_tol=1e-4)
    with pytest.raises(Exception, match="2 sources but 1 targets"):
        t.score_batch(sources, ["x"])


def test_generate_batch_continues_a_language_model_s_prompt(tokenizer):
    t = translator(tokenizer, arch="decoder_only", max_len_a=0.0, max_len_b=5)
    out = t.generate_batch(["a man", ""], num_samples=3, seed=1)
    assert [len(o) for o in out] == [3, 3]
    assert all(s.startswith("a man") for s in out[0])
    assert out == t.generate_batch(["a man", ""], num_samples=3, seed=1)        # keyed by seed: reproducible
    assert out != t.generate_batch(["a man", ""], num_samples=3, seed=2)


def test_the_model_bounds_the_source_length(tokenizer, capsys):
    """Sources longer than the model's max_source_tokens() are cut there, with a warning naming the line."""
    t = translator(tokenizer, beam_size=1)
    long = " ".join(SENTENCES[:10])
    assert len(tokenizer.encode([long])[0]) > t.model.max_source_tokens()
    t.translate_batch(["a dog", long])
    assert "input 2 has" in capsys.readouterr().err


def test_score_batch_scores_up_to_the_position_table_and_refuses_beyond(random_run, capsys):
    """random_run has 64 positions: a target of 63 tokens (BOS + 63 fill the table) is scored exactly,
    64 is not scored (nan, 0 tokens) and its pair is named, never silently truncated."""
    from mt.scoring import score_ids

    t = Translator.load(random_run)
    assert t.tokenizer.encode(["dog dog"]) == [[33, 33]]  # "dog" is one piece
    fits, too_long = " ".join(["dog"] * 63), " ".join(["dog"] * 64)
    results = t.score_batch(["a dog", "a dog", "a dog"], [fits, too_long, "dog"])
    exact = score_ids(t.model, t.tokenizer.encode(["a dog"]) * 2, [[33] * 63, [33]], batch_tokens=1000, device="cpu")
    assert results[0] == exact[0] and results[2] == exact[1] and results[0].tokens == 64
    assert math.isnan(results[1].logprob) and results[1].tokens == 0 and not results[1].scored
    assert "pair 2 is not scored: 3 source and 64 target tokens" in capsys.readouterr().err
    from mt.scoring import perplexities

    summary = perplexities(results)
    assert summary["not_scored"] == 1 and summary["tokens"] == 64 + 2
