"""`mt bench`: what it counts (no timing assertions: a benchmark is not a test)."""
import json
import statistics

import pytest

import mt

from conftest import make_model
from test_cli import mt_cli
from mt.tools.bench import decode_step_bytes
from mt.ensemble import Ensemble


def test_decode_step_bytes_hand_count():
    """2 decoder layers of width 32, FFN 64, vocabulary 11 (tied output): per layer 3 norms (192),
    self-attention qkv + out (3,168 + 1,056), cross-attention q + out (1,056 + 1,056; its key/value
    projection runs once per sentence), FFN (2,112 + 2,080) = 10,720 parameters; + the 11 x 32 output."""
    model = make_model()
    assert decode_step_bytes(model) == (2 * 10_720 + 11 * 32) * 4
    assert decode_step_bytes(Ensemble([model, make_model(seed=1)])) == 2 * decode_step_bytes(model)


def test_bench_translate_cli(trained_run, multi30k_dir, tmp_path):
    src = tmp_path / "src.en"
    src.write_text("A man rides a bike.\nTwo dogs play in the snow.\nA girl reads.\n")
    out = mt_cli("bench", "translate", "-m", trained_run, "--src", src, "--beam", 2, "--repeats", 1, "--json")
    assert out.exit_code == 0, out.output
    r = json.loads(out.stdout)
    assert r["sentences"] == 3 and r["sentences_per_s"] > 0 and r["generated_tokens_per_s"] > 0
    out = mt_cli("bench", "translate", "-m", trained_run, "--src", src, "--beam", 1, "--latency", 2, "--json")
    assert out.exit_code == 0, out.output
    r = json.loads(out.stdout)
    assert r["sentences"] == 2 and r["ms_per_token"] > 0 and r["memory_gb_per_s"] > 0
    # the weights a step reads are the loaded model's, counted independently of the bench
    model = mt.load(trained_run, device="cpu").model
    assert r["weights_mb_per_step"] == pytest.approx(decode_step_bytes(model) / 2**20, rel=1e-3)
    assert 0 < r["bound_ms_per_token"] and 0 < r["weights_read_bound_ms_per_token"]


def test_read_bandwidth_counts_the_bytes_it_reads(monkeypatch):
    """read_bandwidth = bytes of the buffer / the median time of one pass over it."""
    from mt.tools import bench
    clock = iter(range(1000))  # each perf_counter call one second later: every pass takes 1 s
    monkeypatch.setattr(bench.time, "perf_counter", lambda: float(next(clock)))
    assert bench.read_bandwidth(4096, reps=5) == pytest.approx(4096)


def test_bench_translate_profile_counts_the_decoder_steps(trained_run, tmp_path):
    """--profile: one greedy batch runs as many decoder steps as its longest output has tokens (EOS
    included); the time is split into parts, and the model's own step is back in place afterwards."""
    src = tmp_path / "src.en"
    src.write_text("A man rides a bike.\nTwo dogs play in the snow.\nA girl reads.\n")
    t = mt.load(trained_run)
    longest = max(len(h[0].tokens) + 1 for h in t.translate_batch(src.read_text().splitlines(), beam_size=1))
    out = mt_cli("bench", "translate", "-m", trained_run, "--src", src, "--beam", 1, "--profile", "--json")
    assert out.exit_code == 0, out.output
    r = json.loads(out.stdout)
    assert r["steps"] == longest
    assert 0 < r["in_step_ms"] <= r["profiled_wall_ms"]
    # the decoder's products run inside the step, the encoder's outside it (in new_cache); top-k
    # belongs to search; an operator counted twice, or on the wrong side, leaves a side with less
    # time than its operators
    inside, outside = r["in_step_parts_ms"], r["outside_step_parts_ms"]
    assert inside["products"] > 0 and outside["products"] > 0
    assert inside["top-k and bookkeeping"] < outside["top-k and bookkeeping"]
    from mt.tools.profile_decoding import NO_OPERATOR
    assert inside[NO_OPERATOR] >= 0 and outside[NO_OPERATOR] >= 0

    from mt.tools.profile_decoding import profile_translate

    profile_translate(t, ["A man."], beam_size=1)
    assert "step" not in vars(t.model)  # the profiling wrapper is gone


def test_vs_ctranslate2_takes_the_ratio_against_ctranslate2s_best(trained_run, monkeypatch):
    """compare(): every round runs mt, then CTranslate2 at each batch size; throughput takes the
    fastest batch (most sentences/s), latency the lowest ms a token (here CTranslate2 scripted)."""
    import mt.tools.export
    from mt.tools import vs_ctranslate2

    speeds = {4: [100.0, 120.0], 8: [150.0, 90.0], 16: [130.0, 140.0], 1: [50.0, 60.0]}  # medians 110, 120, 135
    calls = []

    def child(model_dir, src, *, batch, **options):
        calls.append(batch)
        value = speeds[batch][sum(c == batch for c in calls) - 1]
        return {"sentences_per_s": value, "ms_per_token": 1000 / value}

    monkeypatch.setattr(vs_ctranslate2, "_ct2_in_child", child)
    monkeypatch.setattr(mt.tools.export, "export_ctranslate2", lambda run, out: None)
    t = mt.load(trained_run)
    lines = ["A man rides a bike.", "Two dogs play in the snow."]
    r = vs_ctranslate2.compare(t, trained_run, "src.en", lines, beam_size=1, batches=[4, 8, 16], rounds=2)
    assert calls == [4, 8, 16, 4, 8, 16] and len(r["mt"]) == 2
    assert r["ctranslate2_best_batch"] == 16
    assert r["mt_over_best"] == pytest.approx(statistics.median(r["mt"]) / 135.0)
    calls.clear()
    r = vs_ctranslate2.compare(t, trained_run, "src.en", lines, beam_size=1, batches=[4, 8, 16], rounds=2, latency=2)
    assert calls == [1, 1]  # latency: CTranslate2 at batch 1 only
    assert r["unit"].startswith("ms") and r["ctranslate2_median"]["1"] == pytest.approx(1000 / 50 / 2 + 1000 / 60 / 2)
    assert r["mt_over_best"] == pytest.approx(r["ctranslate2_median"]["1"] / statistics.median(r["mt"]))  # time ratio: > 1 is faster


@pytest.mark.slow
def test_bench_translate_vs_ctranslate2(trained_run, tmp_path):
    """The side-by-side end to end: the run exported and decoded by CTranslate2 at each batch size
    in its own process; a bad batch list is one line."""
    pytest.importorskip("ctranslate2")
    src = tmp_path / "src.en"
    src.write_text("A man rides a bike.\nTwo dogs play in the snow.\nA girl reads.\n" * 4)
    out = mt_cli("bench", "translate", "-m", trained_run, "--src", src, "--beam", 2, "--repeats", 2,
                 "--vs-ctranslate2", "--ct2-batches", "4,8", "--json")
    assert out.exit_code == 0, out.output
    r = json.loads(out.stdout)
    assert len(r["mt"]) == 2 and set(r["ctranslate2"]) == {"4", "8"}
    assert all(v > 0 for vs in r["ctranslate2"].values() for v in vs)
    out = mt_cli("bench", "translate", "-m", trained_run, "--src", src, "--vs-ctranslate2", "--ct2-batches", "4,x")
    assert out.exit_code != 0 and "--ct2-batches" in out.output
