"""Training options a recipe switches on: schedules, token budgets, early stopping, checkpoint
averaging, subword regularisation; and the lowercased tokenised BLEU of `mt eval --lc-tok`."""
import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from mt import config
from mt.errors import MTError
from mt.metrics import corpus_scores, lc_tok_bleu
from mt.schedule import budget_used, lr_at
from test_cli import mt_cli


def train_cfg(**kw):
    return config.from_dict({"train": kw}).train


def test_schedules_shape():
    inv = train_cfg(lr=1e-3, warmup_steps=10)
    assert lr_at(5, inv) == pytest.approx(5e-4)
    assert lr_at(40, inv) == pytest.approx(1e-3 * math.sqrt(10 / 40))
    lin = train_cfg(lr=1e-3, warmup_steps=10, schedule="linear", lr_end=1e-4, max_steps=100)
    assert lr_at(5, lin, 0.0) == pytest.approx(5e-4)          # warm-up
    assert lr_at(50, lin, 0.5) == pytest.approx(5.5e-4)        # half way down to lr_end
    assert lr_at(100, lin, 1.0) == pytest.approx(1e-4)
    assert lr_at(100, lin, 1.7) == pytest.approx(1e-4)         # never below lr_end
    cos = train_cfg(lr=1e-3, warmup_steps=10, schedule="cosine", max_minutes=5)
    assert lr_at(50, cos, 0.5) == pytest.approx(5e-4)
    assert lr_at(50, cos, 0.25) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi / 4)))


def test_budget_is_whichever_ends_first():
    cfg = train_cfg(schedule="linear", max_steps=100, max_minutes=10, max_tokens=1000)
    assert budget_used(cfg, 10, 0.0, 300, 100) == pytest.approx(0.5)   # time: 300 s of 600
    assert budget_used(cfg, 80, 0.0, 60, 100) == pytest.approx(0.8)    # steps
    assert budget_used(cfg, 10, 0.0, 60, 900) == pytest.approx(0.9)    # tokens


def test_decaying_schedule_needs_a_budget():
    with pytest.raises(MTError, match="train.schedule=linear decays over the budget"):
        train_cfg(schedule="linear")
    with pytest.raises(MTError, match="train.schedule must be one of"):
        train_cfg(schedule="step")


def tiny(tmp_path, multi30k_dir, *sets):
    out = tmp_path / "run"
    result = mt_cli("train", REPO / "recipes/tiny.yaml", "--set", f"train.out_dir={out}",
                    "--set", f"data.train={multi30k_dir / 'train'}", "--set", f"data.valid={multi30k_dir / 'val'}",
                    "--set", "train.threads=1", *[a for s in sets for a in ("--set", s)])
    assert result.exit_code == 0, result.output
    return out, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_token_budget_linear_decay_and_averaging(tmp_path, multi30k_dir):
    run, records = tiny(tmp_path, multi30k_dir, "train.max_steps=0", "train.max_tokens=12000",
                        "train.schedule=linear", "train.average_last=3", "train.save_every=4",
                        "train.log_every=1", "train.valid_every=1000")
    progress = json.loads((run / "state/progress.json").read_text())
    assert 12000 <= progress["tokens"] < 12000 + 1500  # stops at the first update past the budget
    steps = [r for r in records if "lr" in r]
    assert all(a["lr"] >= b["lr"] for a, b in zip(steps[20:], steps[21:]))  # decays after warm-up (20)
    assert steps[-1]["lr"] < 0.1 * max(r["lr"] for r in steps)
    snaps = sorted((run / "snapshots").glob("step_*.safetensors"))
    assert len(snaps) == 3
    tensors = [load_file(str(p)) for p in snaps]
    averaged = load_file(str(run / "averaged.safetensors"))
    assert averaged.keys() == tensors[0].keys()
    for k, v in averaged.items():
        torch.testing.assert_close(v, sum(t[k] for t in tensors) / 3, rtol=1e-6, atol=1e-7)
    chosen = [r for r in records if "averaged" in r]
    assert len(chosen) == 1 and chosen[0]["averaged"] == 3
    meta = json.loads((run / "meta.json").read_text())
    assert (meta.get("averaged") == 3) == chosen[0]["chosen"]


def test_patience_stops_when_validation_stops_improving(tmp_path, multi30k_dir):
    # lr 0: the weights never change, so no validation after the first can be a new best
    run, records = tiny(tmp_path, multi30k_dir, "train.lr=0", "train.valid_every=5", "train.patience=2",
                        "train.best_metric=loss", "train.max_steps=60")
    assert [r["step"] for r in records if "valid_loss" in r] == [5, 10, 15]


def test_average_command(tmp_path, multi30k_dir):
    run, _ = tiny(tmp_path, multi30k_dir, "train.save_every=10", "train.average_last=4", "train.max_steps=40")
    result = mt_cli("average", run, "--last", 2)
    assert result.exit_code == 0, result.output
    snaps = sorted((run / "snapshots").glob("step_*.safetensors"))[-2:]
    a, b = (load_file(str(p)) for p in snaps)
    averaged = load_file(str(run / "averaged.safetensors"))
    for k in averaged:
        torch.testing.assert_close(averaged[k], (a[k] + b[k]) / 2)
    result = mt_cli("translate", "-m", run, "--checkpoint", "averaged", "--greedy", input="A dog runs.\n")
    assert result.exit_code == 0 and len(result.stdout.splitlines()) == 1


def test_subword_regularisation_resamples_per_epoch(tmp_path, multi30k_dir):
    from accelerate import Accelerator

    from mt.train_data import load_data

    cfg = config.load(REPO / "recipes/tiny.yaml", [f"data.train={multi30k_dir / 'train'}", "data.valid=",
                                                   "data.spm_alpha=0.3", "data.max_sentences=300"])
    tok, first, _, resample = load_data(cfg, tmp_path, Accelerator(cpu=True))
    again, other = resample(0), resample(1)
    assert (first.tgt.flat == again.tgt.flat).all()           # an epoch's segmentation is reproducible
    assert len(other.tgt.flat) != len(first.tgt.flat) or (other.tgt.flat != first.tgt.flat).any()
    plain = tok.encode(["A man in an orange hat starring at something."])[0]
    sampled = tok.encode(["A man in an orange hat starring at something."], alpha=0.3, seed=5)[0]
    assert tok.decode([sampled]) == tok.decode([plain])          # same text, other pieces


def test_lc_tok_bleu_lowercases_and_tokenises():
    hyps, refs = ["A dog, running fast!"], ["a dog , running fast !"]
    assert lc_tok_bleu(hyps, refs, "en")["score"] == 100.0
    assert corpus_scores(hyps, refs)["bleu"]["score"] < 100.0   # cased, 13a-tokenised: not equal
    assert "case:lc" in lc_tok_bleu(hyps, refs, "en")["signature"]
    assert "moses-tok.en" in lc_tok_bleu(hyps, refs, "en")["signature"]


def test_eval_lc_tok_cli(tmp_path):
    hyp, ref = tmp_path / "hyp.de", tmp_path / "ref.de"
    hyp.write_text("Ein Hund, der läuft.\nZwei Männer.\n", encoding="utf-8")
    ref.write_text("ein hund , der läuft .\nzwei männer .\n", encoding="utf-8")
    result = mt_cli("eval", "--lc-tok", "--hyp", hyp, "--ref", ref, "--json")
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)
    assert scores["bleu_lc_tok"]["score"] == 100.0 and scores["bleu"]["score"] < 100.0
    assert "moses-tok.de" in scores["bleu_lc_tok"]["signature"]


def test_symmetric_kl_matches_its_definition():
    from mt.loss import symmetric_kl

    torch.manual_seed(0)
    z = torch.randn(6, 9)
    lp1, lp2 = z[:3].log_softmax(-1), z[3:].log_softmax(-1)
    kl12 = torch.nn.functional.kl_div(lp2, lp1, log_target=True, reduction="sum")  # KL(p1 || p2)
    kl21 = torch.nn.functional.kl_div(lp1, lp2, log_target=True, reduction="sum")
    torch.testing.assert_close(symmetric_kl(z), (kl12 + kl21) / 2)
    assert float(symmetric_kl(torch.cat([z[:3], z[:3]]))) == pytest.approx(0.0, abs=1e-6)


def test_rdrop_without_dropout_is_plain_training(tmp_path, multi30k_dir):
    """With every dropout at 0 both passes agree, the KL term is 0 and the mean of the two
    cross-entropies is the plain one: R-Drop must then train exactly as plain training does."""
    no_dropout = ("model.dropout=0", "model.attn_dropout=0", "model.activation_dropout=0", "train.max_steps=8",
                  "train.valid_every=1000", "train.log_every=1")
    plain, plain_log = tiny(tmp_path / "plain", multi30k_dir, *no_dropout)
    rdrop, rdrop_log = tiny(tmp_path / "rdrop", multi30k_dir, *no_dropout, "train.rdrop_alpha=5")
    losses = lambda log: [r["loss"] for r in log if "loss" in r]
    assert len(losses(plain_log)) == 8
    assert losses(rdrop_log) == pytest.approx(losses(plain_log), rel=1e-4)
    a, b = load_file(str(plain / "last.safetensors")), load_file(str(rdrop / "last.safetensors"))
    for k in a:  # Adam amplifies float rounding in near-zero gradients: compare at 1/30 of the distance moved
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=5e-4)
    # with dropout on the two passes differ: the KL term adds to the loss
    _, dropped_log = tiny(tmp_path / "dropped", multi30k_dir, *no_dropout[3:], "train.rdrop_alpha=5")
    _, plain_dropped_log = tiny(tmp_path / "plain_dropped", multi30k_dir, *no_dropout[3:])
    assert losses(dropped_log)[0] > losses(plain_dropped_log)[0] + 1e-3


def test_bf16_autocast_trains_on_cpu(tmp_path, multi30k_dir):
    """train.precision=bf16 on a CPU (Accelerate's autocast), as a user runs it (its own process:
    Accelerate keeps one precision per process): the loss falls as in float32."""
    sets = ["train.max_steps=30", "train.valid_every=1000", "train.log_every=1", "train.threads=1",
            f"data.train={multi30k_dir / 'train'}", f"data.valid={multi30k_dir / 'val'}"]
    losses = {}
    for precision in ("bf16", "no"):
        out = tmp_path / precision
        cmd = [sys.executable, "-m", "mt.cli", "train", str(REPO / "recipes/tiny.yaml"), "--set", f"train.out_dir={out}",
               "--set", f'train.precision="{precision}"', *[a for s in sets for a in ("--set", s)]]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)  # a hang guard only
        assert proc.returncode == 0, proc.stderr[-2000:]
        log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[precision] = [r["loss"] for r in log if "loss" in r]
    bf16, fp32 = losses["bf16"], losses["no"]
    assert len(bf16) == 30 and all(math.isfinite(x) for x in bf16)
    assert bf16[-1] < bf16[0] - 1.0
    assert bf16[-1] == pytest.approx(fp32[-1], abs=0.1)  # the same training, up to bfloat16 rounding
