"""Scaling laws: the fitter, the compute accounting, and `mt scaling run / fit` end to end."""
import json
import random

import pytest

from conftest import REPO
from mt.tools import scaling
from mt.config import ModelConfig
from mt.errors import MTError
from test_cli import mt_cli


def test_fit_recovers_a_known_law():
    rng = random.Random(0)
    a, b, c = 40.0, -0.12, 1.5
    x = [10 ** (10 + 0.2 * i) for i in range(25)]
    y = [(a * xi ** b + c) * (1 + rng.gauss(0, 0.002)) for xi in x]  # 0.2% noise
    law = scaling.fit_law(x, y)
    assert law.a == pytest.approx(a, rel=0.05)
    assert law.b == pytest.approx(b, rel=0.05)
    assert law.c == pytest.approx(c, rel=0.05)
    spread = scaling.bootstrap(x, y, samples=30)
    assert spread["b"][0] <= spread["b"][1] <= spread["b"][2]
    assert spread["b"][1] == pytest.approx(b, rel=0.1)


def test_fit_refuses_what_is_not_a_decreasing_law():
    with pytest.raises(MTError, match="at least 3"):
        scaling.fit_law([1e9, 1e10], [3.0, 2.0])
    with pytest.raises(MTError, match="no decreasing power law"):
        scaling.fit_law([1e9, 1e10, 1e11], [2.0, 3.0, 4.0])


def test_compute_accounting_matches_a_hand_count():
    from mt.config import Config
    cfg = Config(model=ModelConfig(enc_layers=1, dec_layers=1, d_model=8, heads=2, ffn=16))
    # encoder layer: 2 layer norms 2*16, fused QKV 8*24+24, output 8*8+8, FFN 8*16+16 + 16*8+8
    enc = 2 * 16 + (8 * 24 + 24) + (8 * 8 + 8) + (8 * 16 + 16) + (16 * 8 + 8)
    # decoder layer: 3 layer norms, self-attention as above, cross-attention q 8*8+8, kv 8*16+16, out 8*8+8, FFN
    dec = 3 * 16 + (8 * 24 + 24) + (8 * 8 + 8) + (8 * 8 + 8) + (8 * 16 + 16) + (8 * 8 + 8) + (8 * 16 + 16) + (16 * 8 + 8)
    final_norms = 2 * 16
    assert scaling.non_embedding_parameters(cfg, vocab_size=20) == enc + dec + final_norms == 1536
    # the 20 x 8 (tied) embedding is not counted: C = 6 N D with N = 1536


def write_sweep(tmp_path, multi30k_dir, arch="transformer"):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"""
base: {REPO / 'recipes/tiny.yaml'}
out_dir: {tmp_path / 'runs'}
set: {{train.max_steps: 0, train.max_tokens: 6000, train.valid_every: 100000, train.threads: 1,
      data.train: {multi30k_dir / 'train'}, data.valid: {multi30k_dir / 'val'}, model.arch: {arch}}}
runs:
  - {{name: small, set: {{model.d_model: 16, model.ffn: 32}}}}
  - {{name: large, set: {{model.d_model: 32, model.ffn: 64}}}}
""")
    return sweep


@pytest.mark.parametrize("arch", ["transformer", "decoder_only"])
def test_run_records_and_skips_finished_runs(tmp_path, multi30k_dir, arch):
    """Translation models (conditional loss) and language models alike."""
    sweep = write_sweep(tmp_path, multi30k_dir, arch)
    result = mt_cli("scaling", "run", sweep)
    assert result.exit_code == 0, result.output
    records = {r["name"]: r for r in scaling.read_records(tmp_path / "runs")}
    assert set(records) == {"small", "large"}
    for r in records.values():
        assert r["tokens"] >= 6000 and r["compute"] == 6 * r["non_embedding_params"] * r["tokens"]
        assert r["valid_loss"] > 0 and r["wall_s"] > 0
    assert records["large"]["non_embedding_params"] > records["small"]["non_embedding_params"]
    stamp = (tmp_path / "runs/small/scaling.json").stat().st_mtime_ns
    result = mt_cli("scaling", "run", sweep)
    assert result.exit_code == 0
    assert "small finished, skipped" in result.stderr and "large finished, skipped" in result.stderr
    assert (tmp_path / "runs/small/scaling.json").stat().st_mtime_ns == stamp


def test_fit_cli_holds_out_the_largest_and_plots(tmp_path):
    a, b, c = 30.0, -0.1, 1.2
    for i, n in enumerate([1e5, 3e5, 1e6, 3e6, 1e7]):
        d = tmp_path / f"r{i}"
        d.mkdir()
        comp = 6 * n * 1e6
        d.joinpath("scaling.json").write_text(json.dumps(
            {"name": f"r{i}", "non_embedding_params": n, "tokens": 1e6, "compute": comp, "wall_s": 1.0,
             "valid_loss": a * comp ** b + c}))
    png = tmp_path / "law.png"
    result = mt_cli("scaling", "fit", tmp_path, "--holdout", "largest", "--plot", png, "--json", "--bootstrap", 10)
    assert result.exit_code == 0, result.output
    fit = json.loads(result.stdout)
    assert fit["held_out"][0]["name"] == "r4"
    assert abs(fit["held_out"][0]["error_percent"]) < 1.0  # exact points: the law extrapolates
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: x.yaml\nruns: [{name: a}, {name: a}]\n")
    result = mt_cli("scaling", "run", bad)
    assert result.exit_code == 2 and "distinct name" in result.stderr
    result = mt_cli("scaling", "fit", tmp_path / "nothing")
    assert result.exit_code == 2 and "no finished runs" in result.stderr
