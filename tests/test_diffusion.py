"""mt.models.diffusion (masked diffusion) and mt.search.mask_predict: the loss is the NELBO's formula,
its Monte-Carlo estimate converges to the exact bound, the bound bounds the T-step generative
process (enumerated exactly on a tiny model), and decoding does what Mask-Predict says."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from mt.config import ModelConfig
from mt.models import build_model
from mt.models.diffusion import (DiffusionTerms, DiffusionTranslator, mask_of_size, normalize_denoiser,
                                 stratified_counts)
from mt.search import mask_predict
from mt.tokenizer import EOS, PAD


def tiny(vocab_size=8, max_positions=8, seed=0) -> DiffusionTranslator:
    torch.manual_seed(seed)
    cfg = ModelConfig(arch="diffusion", enc_layers=1, dec_layers=1, d_model=16, heads=2, ffn=32,
                      max_positions=max_positions, dropout=0.0)
    model = build_model(cfg, vocab_size).eval()
    with torch.no_grad():  # a less uniform length distribution and denoiser than the initial ones
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return model


# --- the objective ----------------------------------------------------------------------------
def test_stratified_counts_are_uniform_in_1_to_L_and_masks_have_that_size():
    assert sorted(stratified_counts(torch.tensor([5] * 10), 0.05).tolist()) == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    lengths = torch.tensor([5] * 10 + [0, 1])
    k = stratified_counts(lengths, 0.05)
    assert k[10:].tolist() == [0, 1] and bool((k[:10] >= 1).all()) and bool((k[:10] <= 5).all())
    real = torch.arange(7)[None, :] < lengths[:, None]
    masked = mask_of_size(real, k, torch.rand(12, 7))
    assert masked.sum(1).tolist() == k.tolist() and not bool((masked & ~real).any())


def test_masking_rate_is_t():
    model = tiny(max_positions=2048)
    y = torch.randint(4, 8, (4, 2000))
    t = torch.tensor([0.1, 0.4, 0.7, 0.95])
    _, masked = model.corrupt(y, t, torch.rand(4, 2000, generator=torch.Generator().manual_seed(0)))
    rate = masked.float().mean(1)
    assert torch.allclose(rate, t, atol=0.03), rate


def test_loss_is_the_nelbo_formula():
    torch.manual_seed(0)
    logits, targets = torch.randn(5, 8), torch.tensor([4, 5, 6, 7, 4])
    weights = torch.tensor([2.0, 2.0, 1.25, 1.25, 10.0])
    length_lp = torch.log_softmax(torch.randn(3, 8), -1)
    lengths = torch.tensor([2, 2, 1])
    terms = DiffusionTerms(logits, targets, weights, length_lp, lengths)
    logp = normalize_denoiser(logits)
    want = sum(float(weights[i] * -logp[i, targets[i]]) for i in range(5)) - float(length_lp[[0, 1, 2], lengths].sum())
    loss, nelbo = terms.loss(0.0)
    assert math.isclose(float(nelbo), want, rel_tol=1e-6) and math.isclose(float(loss), want, rel_tol=1e-6)
    smoothed, nelbo_s = terms.loss(0.1)
    assert math.isclose(float(nelbo_s), want, rel_tol=1e-6)  # label smoothing stays out of the bound
    assert not math.isclose(float(smoothed), want, rel_tol=1e-3)


def test_forward_masks_k_tokens_and_weights_them_by_l_over_k():
    model = tiny(max_positions=64).train()
    src = torch.tensor([[5, 6, EOS]] * 4)
    tgt_out = torch.cat([torch.randint(4, 8, (4, 40)), torch.full((4, 1), EOS)], 1)
    torch.manual_seed(3)
    terms = model(src, None, tgt_out)
    torch.manual_seed(3)
    k = stratified_counts(torch.tensor([40] * 4), torch.rand(()))
    assert len(terms.targets) == int(k.sum())  # k_b masked tokens in row b
    assert sorted(terms.weights.tolist()) == pytest.approx(sorted(w for kb in k.tolist() for w in [40 / kb] * kb))
    assert terms.lengths.tolist() == [40] * 4


# --- the bound on a model small enough to enumerate ------------------------------------------
SRC = torch.tensor([[5, 7, EOS]])
Y = [4, 6, 5]


def masked_nll(model, y, mask):
    """sum over masked l of -log p(y_l | z), z = y with `mask` (a set of positions) masked."""
    z = torch.tensor([[model.mask_id if i in mask else tok for i, tok in enumerate(y)]])
    memory, mm = model.encode(SRC)
    logp = normalize_denoiser(model.denoise(z, model.memory_kv(memory), mm))[0]
    return sum(-float(logp[i, y[i]]) for i in mask), logp


def length_nll(model, L):
    memory, mm = model.encode(SRC)
    return -float(model.length_log_probs(memory, mm)[0, L])


def subsets(L):
    return [frozenset(c) for k in range(L + 1) for c in itertools.combinations(range(L), k)]


def exact_bounds(model, y, T):
    """(continuous NELBO, T-step NELBO, -log P of the T-step generative process), by enumeration."""
    L = len(y)
    cost = {m: masked_nll(model, y, m)[0] for m in subsets(L)}

    def expected(t):  # E over masks z_t of (1/t) sum of masked NLLs
        return sum(t ** (len(m) - 1) * (1 - t) ** (L - len(m)) * c for m, c in cost.items() if m)
    # the continuous bound two ways: the integral over t, and its closed form by mask size k
    grid = torch.linspace(0.0, 1.0, 400_001, dtype=torch.float64)[1:]
    integral = float(torch.trapezoid(expected(grid), grid))
    continuous = sum(sum(c for m, c in cost.items() if len(m) == k) / math.comb(L, k) / k for k in range(1, L + 1))
    assert abs(integral - continuous) < 1e-3 * continuous  # the t-integral equals the sum over k
    t_step = sum(float(expected(torch.tensor(i / T, dtype=torch.float64))) for i in range(1, T + 1)) / T
    # the generative process: from all masked, at t_i = i/T (i = T .. 1) each masked position is
    # revealed with probability 1/i, its token drawn from p(. | z); P(y) sums over reveal orders
    prob = {frozenset(range(L)): 1.0}
    for i in range(T, 0, -1):
        nxt = {}
        for masked, p in prob.items():
            logp = masked_nll(model, y, masked)[1] if masked else None
            for reveal in subsets(L):
                if not reveal <= masked:
                    continue
                q = (1 / i) ** len(reveal) * (1 - 1 / i) ** (len(masked) - len(reveal))
                q *= math.prod(math.exp(float(logp[l, y[l]])) for l in reveal) if reveal else 1.0
                if q:
                    nxt[masked - reveal] = nxt.get(masked - reveal, 0.0) + p * q
        prob = nxt
    return (length_nll(model, L) + continuous, length_nll(model, L) + t_step,
            length_nll(model, L) - math.log(prob[frozenset()]))


@pytest.mark.parametrize("T", [1, 2, 3, 8])
def test_the_t_step_bound_bounds_the_t_step_generative_process(T):
    model = tiny()
    with torch.no_grad():
        continuous, t_step, exact = exact_bounds(model, Y, T)
    assert t_step >= exact - 1e-9 and math.isfinite(exact)


def test_monte_carlo_bound_converges_to_the_exact_nelbo():
    model = tiny()
    y = torch.tensor([Y])
    with torch.no_grad():
        continuous, t_step, _ = exact_bounds(model, Y, 4)
    errors = []
    for K in (16, 256, 4096):
        terms = model.nelbo(SRC, y, samples=K, seed=1, ids=[0]).double()[0]
        mean, se = float(terms.mean()), float(terms.std() / math.sqrt(K))
        assert abs(mean - continuous) < 4 * se + 1e-3, (K, mean, continuous, se)
        errors.append(se)
    assert errors[2] < errors[0] / 8  # the error shrinks like 1/sqrt(K)
    terms = model.nelbo(SRC, y, samples=4096, seed=1, ids=[0], steps=4).double()[0]
    assert abs(float(terms.mean()) - t_step) < 4 * float(terms.std() / 64) + 1e-3


# --- decoding ---------------------------------------------------------------------------------
class Scripted(DiffusionTranslator):
    """A perfect denoiser for one target: the right token everywhere, more confident at lower
    positions; length log-probs given. Records how many positions each pass sees masked."""

    def __init__(self, target, length_logprobs, confidence=None):
        super().__init__(ModelConfig(arch="diffusion", enc_layers=1, dec_layers=1, d_model=8, heads=2, ffn=8,
                                     max_positions=16), 12)
        self.target, self.length_lp, self.confidence = target, length_logprobs, confidence or {}
        self.masked_seen, self.encodes = [], 0

    def encode(self, src):
        self.encodes += src.shape[0]
        return super().encode(src)

    def length_log_probs(self, memory, memory_mask):
        return self.length_lp.expand(memory.shape[0], -1)

    def denoise(self, z, memory_kv, memory_mask):
        B, L = z.shape
        self.masked_seen.append(int((z == self.mask_id).sum()))
        logits = torch.zeros(B, L, self.vocab_size)
        for b in range(B):
            n = int((z[b] != PAD).sum())
            for i in range(n):
                tok = self.target[i] if i < len(self.target) else 4
                logits[b, i, tok] = self.confidence.get(n, 5.0) - 0.1 * i
        return logits


def lengths(probs: dict) -> torch.Tensor:
    lp = torch.full((1, 16), -30.0)
    for L, p in probs.items():
        lp[0, L] = math.log(p)
    return lp


def test_t_equal_to_the_length_commits_one_token_a_pass_and_returns_the_target():
    target = [5, 9, 6, 11, 7]
    model = Scripted(target, lengths({5: 0.9, 4: 0.1}))
    hyp = mask_predict(model, torch.tensor([[4, 5, EOS]]), torch.tensor([10]), steps=5, length_beam=1)[0][0]
    assert hyp.tokens == target
    assert model.masked_seen == [5, 4, 3, 2, 1]  # L (T - s) / T masked before pass s
    assert model.encodes == 1


def test_the_length_beam_picks_the_candidate_with_the_higher_mean_log_prob():
    target = [5, 9, 6, 11, 7]
    # length 3 is likelier, but the denoiser is far more confident about 5 tokens
    model = Scripted(target, lengths({3: 0.6, 5: 0.4}), confidence={3: 0.5, 5: 9.0})
    src, longest = torch.tensor([[4, 5, EOS]]), torch.tensor([10])
    assert mask_predict(model, src, longest, steps=2, length_beam=1)[0][0].tokens == target[:3]
    assert mask_predict(model, src, longest, steps=2, length_beam=2)[0][0].tokens == target


def test_batches_of_1_and_64_decode_the_same(tmp_path):
    model = tiny(vocab_size=30, max_positions=32)
    torch.manual_seed(1)
    srcs = [torch.randint(4, 30, (int(n),)).tolist() for n in torch.randint(1, 12, (64,))]
    from mt.decoding import pad_sources

    def decode(batch, **kw):
        src = pad_sources(batch, eos=True)
        return [h[0].tokens for h in mask_predict(model, src, torch.tensor([20] * len(batch)), steps=4, length_beam=3,
                                                   ids=list(range(len(batch))) if len(batch) > 1 else None, **kw)]
    together = decode(srcs)
    alone = [decode([s])[0] for s in srcs]
    assert together == alone
    sampled = [h[0].tokens for h in mask_predict(model, pad_sources(srcs, eos=True), torch.tensor([20] * 64), steps=4,
                                                 length_beam=3, sample=True, ids=list(range(64)), seed=5)]
    one = [mask_predict(model, pad_sources([s], eos=True), torch.tensor([20]), steps=4, length_beam=3, sample=True,
                        ids=[i], seed=5)[0][0].tokens for i, s in enumerate(srcs)]
    assert sampled == one


def test_the_encoder_runs_once_per_sentence_across_the_steps():
    model = Scripted([5, 6, 7], lengths({3: 1.0}))
    src = torch.tensor([[4, 5, EOS], [6, EOS, PAD]])
    mask_predict(model, src, torch.tensor([8, 8]), steps=16, length_beam=3)
    assert model.encodes == 2 and 3 <= len(model.masked_seen) <= 16  # each pass decodes; encoding once
    model = Scripted([5, 6, 7], lengths({3: 1.0}))
    mask_predict(model, src, torch.tensor([8, 8]), steps=16, length_beam=1)
    # 3 (15 - s) // 16 tokens stay masked after pass s: none after pass 10, so 11 passes, one encoding
    assert model.encodes == 2 and model.masked_seen == [6] + [4] * 5 + [2] * 5


# --- through the CLI: training, resume, translation, scoring ------------------------------------
def train_diffusion(out, corpus, *sets, flags=()):
    from click.testing import CliRunner

    from conftest import REPO
    from mt.cli import main

    overrides = {**corpus, "model.arch": "diffusion", "train.out_dir": str(out)}
    overrides.update(s.split("=", 1) for s in sets)
    args = ["train", str(REPO / "recipes/tiny.yaml"), *[a for k, v in overrides.items() for a in ("--set", f"{k}={v}")], *flags]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def diffusion_run(tiny_corpus, tmp_path_factory):
    return train_diffusion(tmp_path_factory.mktemp("diffusion") / "run", tiny_corpus)


@pytest.mark.slow
def test_resumed_diffusion_training_equals_the_uninterrupted_one(tiny_corpus, tmp_path):
    from safetensors.torch import load_file

    whole = train_diffusion(tmp_path / "whole", tiny_corpus, "train.max_steps=4")
    part = train_diffusion(tmp_path / "part", tiny_corpus, "train.max_steps=2")
    train_diffusion(part, tiny_corpus, "train.max_steps=4", flags=["--resume"])
    a, b = load_file(whole / "last.safetensors"), load_file(part / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_translates_one_line_per_line_in_order(diffusion_run):
    from click.testing import CliRunner

    from mt.cli import main

    lines = ["a dog runs", "", "the man sees the river " * 300, "   ", "a small cat"]
    result = CliRunner().invoke(main, ["translate", "-m", str(diffusion_run), "--steps", "4", "--length-beam", "2",
                                       "--window", "2"], input="\n".join(lines) + "\n")
    assert result.exit_code == 0, result.output
    out = result.stdout.split("\n")[:-1]
    assert len(out) == 5 and out[1] == out[3] == "" and out[0] and out[4]
    alone = [CliRunner().invoke(main, ["translate", "-m", str(diffusion_run), "--steps", "4", "--length-beam", "2"],
                                input=line + "\n").stdout.rstrip("\n") for line in lines]
    assert out == alone  # batched with others or alone, the same output


def test_score_prints_a_bound_with_its_standard_error(diffusion_run):
    from click.testing import CliRunner

    from mt.cli import main

    result = CliRunner().invoke(main, ["score", "-m", str(diffusion_run), "--samples", "16"],
                                input="a dog runs\tdog a runs\nthe man\tman the\n")
    assert result.exit_code == 0, result.output
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    assert len(rows) == 2 and all(len(r) == 4 and float(r[0]) < 0 and float(r[3]) > 0 for r in rows)
    assert "per-token perplexity <= " in result.stderr and "a bound" in result.stderr
    tighter = CliRunner().invoke(main, ["score", "-m", str(diffusion_run), "--samples", "16", "--bound-steps", "2"],
                                 input="a dog runs\tdog a runs\n")
    assert tighter.exit_code == 0 and tighter.stdout.split("\t")[0] != rows[0][0]


def test_diffusion_refuses_what_it_cannot_do(diffusion_run):
    from mt.errors import MTError
    from mt.translate import Translator

    with pytest.raises(MTError, match="diffusion model decodes alone"):
        Translator.load([diffusion_run, diffusion_run])
    with pytest.raises(MTError, match="--aot"):
        Translator.load(diffusion_run, aot=True).translate(["a dog"], beam_size=1)
