"""mt.decoding: the batching around search (line cleaning, empty lines, truncation, token budgets,
padding) and that batching never changes what is decoded."""
from dataclasses import replace

import pytest
import torch

from conftest import make_model
from mt.config import DecodeConfig, ModelConfig
from mt.decoding import clean_line, decode_ids, pad_sources, token_batches
from mt.models import build_model
from mt.tokenizer import EOS, PAD


def test_clean_line_drops_line_ends_and_control_characters():
    assert clean_line("a dog\r\n") == "a dog"
    assert clean_line("a\x00b\tc\x1bd") == "a b c d"
    assert clean_line("Größe ünd 日本") == "Größe ünd 日本"


def test_pad_sources_appends_eos_for_translation_only():
    assert pad_sources([[5, 6], [7]], eos=True).tolist() == [[5, 6, EOS], [7, EOS, PAD]]
    assert pad_sources([[5, 6], [7]], eos=False).tolist() == [[5, 6], [7, PAD]]


@pytest.mark.parametrize("budget, sentences, width", [(10, 100, 1), (40, 3, 2), (1, 100, 5), (10_000, 100, 4)])
def test_token_batches_cover_every_input_once_within_budget(budget, sentences, width):
    src = {i: list(range(4, 4 + n)) for i, n in enumerate([3, 9, 1, 4, 4, 7, 2, 12, 5, 6])}
    options = DecodeConfig(batch_tokens=budget, max_batch_sentences=sentences)
    batches = list(token_batches(list(src), src, width, options))
    assert sorted(i for b in batches for i in b) == list(src)
    for b in batches:
        padded = len(b) * max(len(src[i]) + 1 for i in b) * width
        assert len(b) == 1 or (padded <= budget and len(b) <= sentences)   # one over budget goes alone


@pytest.mark.parametrize("options", [DecodeConfig(beam_size=3), DecodeConfig(beam_size=1),
                                     DecodeConfig(sample=True, top_k=5, seed=2)])
def test_batching_does_not_change_the_outputs(options):
    model = make_model(vocab_size=30, seed=3)
    torch.manual_seed(1)
    src = {i: torch.randint(4, 30, (n,)).tolist() for i, n in enumerate([5, 2, 8, 3, 6])}
    src_ids = {i: ids for i, ids in src.items() if i != 3}                     # input 3 was an empty line
    one = decode_ids(model, src_ids, 5, options=replace(options, batch_tokens=1), device="cpu", num_hypotheses=2)
    all_ = decode_ids(model, src_ids, 5, options=options, device="cpu", num_hypotheses=2)
    n = 1 if options.beam_size == 1 and not options.sample else 2           # greedy search has one answer
    assert one[3] == [] and all(len(h) == n for i, h in enumerate(one) if i != 3)
    assert [[h.tokens for h in hs] for hs in one] == [[h.tokens for h in hs] for hs in all_]


def test_output_length_is_bounded_by_options_and_by_the_model():
    model = make_model(vocab_size=30, seed=4, max_positions=12)
    src_ids = {0: [5, 6, 7, 8]}
    short = decode_ids(model, src_ids, 1, options=DecodeConfig(beam_size=1, max_len_a=0.0, max_len_b=2), device="cpu")
    assert len(short[0][0].tokens) <= 2
    long = decode_ids(model, src_ids, 1, options=DecodeConfig(beam_size=2, max_len_a=10.0, max_len_b=50), device="cpu")
    assert len(long[0][0].tokens) <= model.max_output_tokens(torch.tensor([4]))[0]


def test_language_models_keep_empty_prompts():
    """An LM continues an empty prompt; a translation model has nothing to translate in one."""
    torch.manual_seed(0)
    lm = build_model(ModelConfig(arch="decoder_only", dec_layers=1, d_model=16, heads=2, ffn=32), 20).eval()
    assert lm.reads_prompts and not make_model().reads_prompts
    out = decode_ids(lm, {0: []}, 1, options=DecodeConfig(beam_size=1, max_len_a=0.0, max_len_b=3), device="cpu")
    assert len(out[0]) == 1
