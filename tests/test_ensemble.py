"""Ensembles (mt.ensemble) and lowercased training text (data.lowercase)."""
import itertools
import shutil

import pytest
import torch
import yaml

from conftest import make_model
from test_cli import assert_one_line_error, head, mt_cli
from test_search import EXH_MAX_LEN, EXH_SRC
from mt.ensemble import Ensemble
from mt.scoring import score_ids
from mt.search import beam_search, generate
from mt.tokenizer import BOS, EOS, PAD, Tokenizer


@torch.no_grad()
def test_step_is_the_log_of_the_members_mean_probability():
    a, b = make_model(seed=0), make_model(seed=1)
    ens = Ensemble([a, b])
    src = torch.tensor([[4, 5, 6, EOS], [7, EOS, PAD, PAD]])
    caches = [a.new_cache(src, 5), b.new_cache(src, 5)]
    cache = ens.new_cache(src, 5)
    tokens = torch.full((2, 1), BOS)
    for nxt in ([4, 5], [6, 7]):
        lp = ens.step(tokens, cache)
        pa, pb = a.step(tokens, caches[0]).exp(), b.step(tokens, caches[1]).exp()
        torch.testing.assert_close(lp.exp(), (pa + pb) / 2)
        torch.testing.assert_close(lp.exp().sum(-1), torch.ones(2))
        tokens = torch.tensor(nxt)[:, None]


@torch.no_grad()
def test_wide_beam_on_an_ensemble_finds_the_exhaustive_best():
    """Vocabulary 5, outputs of at most 4 tokens: beam 32 prunes nothing, so it must return the
    enumeration's best, with the log-prob the ensemble's teacher-forced scoring gives."""
    ens = Ensemble([make_model(vocab_size=5, seed=7), make_model(vocab_size=5, seed=8)])
    words = [t for t in range(5) if t not in (PAD, BOS, EOS)]
    results = beam_search(ens, EXH_SRC, torch.full((3,), EXH_MAX_LEN), beam_size=32, length_penalty=0.0)
    for b, hyps in enumerate(results):
        src = EXH_SRC[b][EXH_SRC[b] != PAD][:-1].tolist()  # without EOS: score_ids adds it
        outputs = [list(s) for n in range(EXH_MAX_LEN + 1) for s in itertools.product(words, repeat=n)]
        scores = score_ids(ens, [src] * len(outputs), outputs, batch_tokens=10_000, device="cpu")
        best = max(range(len(outputs)), key=lambda i: scores[i].logprob)
        assert hyps[0].tokens == outputs[best]
        assert hyps[0].logprob == pytest.approx(scores[best].logprob, abs=1e-5)
        total = torch.logsumexp(torch.tensor([s.logprob for s in scores]), 0)
        assert float(total) < 0  # outputs longer than 4 tokens hold the rest of the mass


@torch.no_grad()
def test_greedy_on_an_ensemble_of_one_model_twice_is_the_models_greedy():
    m = make_model(seed=3)
    src = torch.tensor([[4, 5, 6, EOS], [7, EOS, PAD, PAD]])
    single = generate(m, src, torch.tensor([6, 6]))
    double = generate(Ensemble([m, m]), src, torch.tensor([6, 6]))
    for s, d in zip(single, double):
        assert s.tokens == d.tokens
        assert s.logprob == pytest.approx(d.logprob, abs=1e-5)


def test_cli_ensemble_translates_and_refuses_other_tokenizers(trained_run, multi30k_dir, tmp_path):
    lines = "\n".join(head(multi30k_dir / "val.en.gz", 12)) + "\n"
    single = mt_cli("translate", "-m", trained_run, "--beam", 3, input=lines)
    double = mt_cli("translate", "-m", trained_run, "-m", trained_run, "--beam", 3, input=lines)
    assert single.exit_code == 0 and double.exit_code == 0, double.output
    assert double.stdout.splitlines() == single.stdout.splitlines()
    assert len(double.stdout.splitlines()) == 12

    other = tmp_path / "lowercased"
    shutil.copytree(trained_run, other)
    cfg = yaml.safe_load((other / "config.yaml").read_text())
    cfg["data"]["lowercase"] = True
    (other / "config.yaml").write_text(yaml.safe_dump(cfg))
    result = mt_cli("translate", "-m", trained_run, "-m", other, input=lines)
    assert_one_line_error(result, str(other), "share tokenizer")


def test_lowercase_tokenizer_ignores_case(trained_run):
    cased, lower = Tokenizer(trained_run / "spm.model"), Tokenizer(trained_run / "spm.model", lowercase=True)
    assert lower.encode(["A Man IN Blue"]) == lower.encode(["a man in blue"]) == cased.encode(["a man in blue"])
    assert cased.encode(["A Man"]) != cased.encode(["a man"])
    assert not cased.same_as(lower) and cased.same_as(Tokenizer(trained_run / "spm.model"))


def test_tokenizer_gives_the_same_ids_one_by_one_and_as_a_list(trained_run, multi30k_dir):
    """Fewer than 64 texts are encoded one at a time (SentencePiece's list call starts a thread pool),
    more through the list call: the ids must not depend on which path a text took."""
    tok = Tokenizer(trained_run / "spm.model")
    from mt.data import read_lines

    texts = list(read_lines(multi30k_dir / "val.en.gz"))[:100] + ["", "  two  spaces "]
    whole = tok.encode(texts)  # the list call
    assert [ids for i in range(0, len(texts), 10) for ids in tok.encode(texts[i:i + 10])] == whole
    assert whole[100] == [] and all(whole[:100])


def test_lowercase_training_run(tmp_path, multi30k_dir):
    """data.lowercase: the tokenizer learns lowercase pieces only, translations come out lowercase,
    and validation BLEU is against lowercased references."""
    from test_training_options import tiny

    run, records = tiny(tmp_path, multi30k_dir, "data.lowercase=true", "train.max_steps=20", "train.valid_every=20")
    tok = Tokenizer(run / "spm.model")
    pieces = [tok.sp.id_to_piece(i) for i in range(len(tok))]
    assert not any(p.lower() != p for p in pieces[4:])  # specials aside, no piece holds a capital
    out = mt_cli("translate", "-m", run, "--beam", 2, input="A Dog Runs On The Beach.\nTwo MEN talk.\n")
    assert out.exit_code == 0 and len(out.stdout.splitlines()) == 2
    assert out.stdout == out.stdout.lower()
    assert any("valid_bleu" in r for r in records)
