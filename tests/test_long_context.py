"""Long-context language modelling as a user runs it: the character tokenizer, Tiny Shakespeare's
split, loss per character, the mixer options, and the CLI end to end with each mixer."""
from __future__ import annotations

import json
import subprocess

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file

from conftest import REPO
from mt import config
from mt.cli import main
from mt.errors import MTError
from mt.scoring import PairScore, perplexities
from mt.tokenizer import train_tokenizer
from mt.tools.download import tinyshakespeare
from mt.validation import text_characters

SHAKESPEARE_LINES = ["First Citizen:", "Before we proceed any further, hear me speak.", "",
                     "All:", "Speak,  speak.", "  You are all resolved rather to die than to famish?"] * 20


@pytest.mark.parametrize("overrides, fragment", [
    (["model.mixer=mamba"], "model.mixer must be one of softmax, sliding_window, linear, ssm"),
    (["model.mixer=ssm"], "applies to model.arch decoder_only"),                      # a translation model
    (["model.arch=decoder_only", "model.positions=rotary", "model.mixer=linear"], "rotary applies to softmax"),
    (["model.arch=decoder_only", "model.positions=rotary", "model.d_model=12", "model.heads=4"], "even head width"),
    (["model.arch=decoder_only", "model.mixer=sliding_window", "model.window=0"], "model.window"),
    (["model.arch=decoder_only", "model.positions=learned"], "model.positions must be one of"),
    (["data.spm_model_type=word"], "'bpe', 'unigram' or 'char'"),
])
def test_bad_mixer_options_are_one_line_errors(overrides, fragment):
    with pytest.raises(MTError, match=fragment.replace("(", r"\(")):
        config.load(None, overrides)


def test_character_tokenizer_is_lossless(tmp_path):
    """One token per character, spaces kept exactly (no normalisation, no dummy prefix)."""
    tok = train_tokenizer(iter(SHAKESPEARE_LINES), tmp_path / "c.model", vocab_size=256, model_type="char")
    assert len(tok) == len(set("".join(SHAKESPEARE_LINES))) + 4  # the characters and pad/unk/bos/eos
    ids = tok.encode(SHAKESPEARE_LINES)
    assert [len(i) for i in ids] == [len(line) for line in SHAKESPEARE_LINES]
    assert tok.decode(ids) == SHAKESPEARE_LINES


def test_tinyshakespeare_split_is_ninety_ten_by_characters(tmp_path):
    src = tmp_path / "input.txt"
    text = "".join(f"Line {i}: {'x' * (i % 7)}\n" for i in range(1000))
    src.write_text(text, encoding="utf-8")
    tinyshakespeare(tmp_path / "out", source=src)
    train = (tmp_path / "out/train.txt").read_text(encoding="utf-8")
    valid = (tmp_path / "out/valid.txt").read_text(encoding="utf-8")
    assert train + valid == text and len(train) == int(len(text) * 0.9)
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe broken")
    with pytest.raises(MTError, match="not UTF-8"):
        tinyshakespeare(tmp_path / "out2", source=tmp_path / "bad.txt")


def test_loss_per_character_counts_each_line_and_its_newline():
    lines = ["abc", "", "de"]
    assert text_characters(lines, packed=True) == 4 + 1 + 3       # a packed stream: the blank line's EOS too
    assert text_characters(lines, packed=False) == 4 + 3          # sentences: blank lines are not scored
    scores = [PairScore(-8.0, 4), PairScore(float("nan"), 0), PairScore(-6.0, 3)]
    result = perplexities(scores, lines)
    assert result["characters"] == 7 and result["nll_per_char"] == pytest.approx(14 / 7)


# --- the CLI end to end, one small character LM per mixer ------------------------------------------
CLI_MIXERS = {
    "softmax": ["model.mixer=softmax", "model.positions=rotary"],
    "sliding_window": ["model.mixer=sliding_window", "model.window=16", "model.positions=rotary"],
    "gated_linear": ["model.mixer=linear", "model.linear_gate=true", "model.positions=sinusoidal"],
    "ssm": ["model.mixer=ssm", "model.positions=none"],
}


def run_ok(cmd):
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)  # a hang guard only
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", CLI_MIXERS)
def test_each_mixer_trains_scores_and_samples_through_the_cli(name, shakespeare_dir, tmp_path):
    from conftest import char_lm_cmd

    run = tmp_path / name
    proc = run_ok(char_lm_cmd(shakespeare_dir, run, *CLI_MIXERS[name]))
    assert "per char" in proc.stderr
    valid = [r for r in records(run) if "valid_loss_per_char" in r]
    assert len(valid) == 2 and valid[-1]["valid_loss_per_char"] < valid[0]["valid_loss_per_char"] < 4.2  # < log(vocab)
    text = tmp_path / "lines.txt"
    text.write_text("\n".join(SHAKESPEARE_LINES[:6]) + "\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["eval", "--ppl", "-m", str(run), "--text", str(text), "--json"])
    assert result.exit_code == 0, result.output
    ppl = json.loads(result.stdout)["ppl"]
    assert ppl["characters"] == sum(len(line) + 1 for line in SHAKESPEARE_LINES[:6])  # a blank line: its EOS
    assert ppl["nll_per_char"] == pytest.approx(-ppl["logprob"] / ppl["characters"])
    result = CliRunner().invoke(main, ["sample", "-m", str(run), "--prompt", "ROMEO:", "-n", "2", "--document",
                                       "--max-len", "120", "--seed", "1"])
    assert result.exit_code == 0, result.output
    blocks = result.stdout.split("==> prompt 1 sample ")
    assert blocks[0] == "" and [b[:9] for b in blocks[1:]] == ["1 <==\nROM", "2 <==\nROM"]
    assert all(len(b) >= 6 + 126 for b in blocks[1:])  # written through line breaks to --max-len characters
    if name != "softmax":
        result = CliRunner().invoke(main, ["export", str(run), "--out", str(tmp_path / "ct2")])
        assert result.exit_code != 0 and "does not export to CTranslate2" in result.output


@pytest.mark.parametrize("name", ["sliding_window", "ssm"])
def test_a_resumed_run_matches_an_uninterrupted_one(name, shakespeare_dir, tmp_path):
    from conftest import char_lm_cmd

    a, b = tmp_path / "a", tmp_path / "b"
    sets = [*CLI_MIXERS[name], "model.dropout=0.1"]
    run_ok(char_lm_cmd(shakespeare_dir, a, *sets))
    run_ok(char_lm_cmd(shakespeare_dir, b, *sets, "train.max_steps=15"))
    run_ok(char_lm_cmd(shakespeare_dir, b, *sets, resume=True))
    wa, wb = load_file(a / "last.safetensors"), load_file(b / "last.safetensors")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6
    la = {r["step"]: r["loss"] for r in records(a) if "loss" in r}
    lb = {r["step"]: r["loss"] for r in records(b) if "loss" in r}
    assert la.keys() == lb.keys() and max(abs(la[s] - lb[s]) for s in la) <= 1e-6


def test_bench_context_reports_the_state_each_mixer_holds():
    """`mt bench context`: a KV cache grows by one column of keys and values per token and layer; a
    window holds W slots; linear attention's (S, z) and the state-space layer's state stay put."""
    from mt.tools.bench_context import bench_context, crossover

    sets = ["model.dec_layers=2", "model.d_model=16", "model.heads=2", "model.ffn=32", "model.max_positions=64"]
    variants = {"full": ["model.mixer=softmax"], "window 4": ["model.mixer=sliding_window", "model.window=4"],
                "linear": ["model.mixer=linear", "model.positions=sinusoidal"], "ssm": ["model.mixer=ssm", "model.positions=none"]}
    rows = bench_context(REPO / "recipes/shakespeare.yaml", sets, variants=variants, lengths=[8, 32], batches=[1, 3],
                         window=4)
    state = {(r["mixer"], r["batch"], r["length"]): r["cache_bytes"] for r in rows if r["asked"]}
    assert len(state) == 4 * 2 * 2 and all(r["ms_per_token"] > 0 for r in rows)
    for b in (1, 3):
        assert state[("full", b, 32)] == 32 * 2 * 2 * b * 16 * 4          # length x (k, v) x layers x batch x d x fp32
        assert state[("window 4", b, 8)] == state[("window 4", b, 32)] == 4 * 2 * 2 * b * 16 * 4
        assert state[("linear", b, 8)] == state[("linear", b, 32)] == 2 * b * 2 * 8 * 9 * 4  # H x Dh x (Dh + 1)
        assert state[("ssm", b, 8)] == state[("ssm", b, 32)]
    fake = [{"mixer": m, "batch": 1, "length": L, "ms_per_step": ms} for m, L, ms in
            [("full", 8, 1.0), ("full", 16, 2.0), ("full", 32, 4.0), ("x", 8, 1.5), ("x", 16, 1.9), ("x", 32, 2.0)]]
    assert crossover(fake, "x", 1) == 16 and crossover(fake, "full", 1, base="x") is None  # cheaper at 8 only
