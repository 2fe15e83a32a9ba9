"""`mt export --to ctranslate2`: the exported model computes the same distribution as mt's own."""
import json

import pytest
import torch

from mt.checkpoint import load_run
from mt.tools.export import SPECIALS
from mt.translate import Translator
from test_cli import assert_one_line_error, mt_cli

ctranslate2 = pytest.importorskip("ctranslate2")


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "ct2"
    result = mt_cli("export", trained_run, "--out", out)
    assert result.exit_code == 0, result.output
    return out


def val_sentences(multi30k_dir, n=40):
    import gzip
    with gzip.open(multi30k_dir / "val.en.gz", "rt", encoding="utf-8") as f:
        return [next(f).strip() for _ in range(n)]


def test_export_writes_a_ctranslate2_model_with_its_tokenizer(exported, trained_run):
    for name in ("model.bin", "config.json", "spm.model", "mt_export.json"):
        assert (exported / name).is_file(), name
    meta = json.loads((exported / "mt_export.json").read_text())
    assert meta["weights"] == "model" and meta["src_lang"] == "en"
    assert (exported / "spm.model").read_bytes() == (trained_run / "spm.model").read_bytes()


def test_ctranslate2_scores_equal_mt_log_probs(exported, trained_run, multi30k_dir):
    """log P(y_i | y_<i, x) from the exported model equal the teacher-forced log-softmax of mt's
    logits (over the whole vocabulary: CT2 does not exclude <pad> and <s> as mt's search does)."""
    from mt.tokenizer import BOS, EOS

    src = val_sentences(multi30k_dir)
    t = Translator.load(trained_run, device="cpu")
    hyps = [h[0] for h in t.translate_batch(src, beam_size=1)]
    sp = t.tokenizer.sp
    ct2 = ctranslate2.Translator(str(exported), device="cpu", intra_threads=1)
    results = ct2.score_batch([sp.encode(s, out_type=str) + ["</s>"] for s in src],
                              [[sp.id_to_piece(i) for i in h.tokens] for h in hyps])
    with torch.inference_mode():
        for s, h, r in zip(src, hyps, results):
            x = torch.tensor([sp.encode(s) + [EOS]])
            y = torch.tensor([h.tokens + [EOS]])
            logits = t.model(x, torch.cat([torch.tensor([[BOS]]), y[:, :-1]], 1))[0]
            ours = logits.log_softmax(-1).gather(1, y[0, :, None])[:, 0]
            assert len(r.log_probs) == len(ours)
            assert torch.allclose(torch.tensor(r.log_probs), ours, atol=1e-4), (r.log_probs, ours)


def test_ctranslate2_greedy_output_equals_mt(exported, trained_run, multi30k_dir):
    src = val_sentences(multi30k_dir)
    t = Translator.load(trained_run, device="cpu")
    ours = [h[0].tokens for h in t.translate_batch(src, beam_size=1)]
    sp = t.tokenizer.sp
    ct2 = ctranslate2.Translator(str(exported), device="cpu", intra_threads=1)
    res = ct2.translate_batch([sp.encode(s, out_type=str) + ["</s>"] for s in src], beam_size=1,
                              max_decoding_length=max(len(o) for o in ours) + 5,
                              suppress_sequences=[["<pad>"], ["<s>"]])  # as mt's search never emits them
    theirs = [[sp.piece_to_id(p) for p in r.hypotheses[0]] for r in res]
    # the length limits differ (mt's is per sentence), so compare up to the shorter output
    same = sum(a[:len(b)] == b[:len(a)] and min(len(a), len(b)) > 0 for a, b in zip(ours, theirs))
    assert same >= len(src) - 2, f"{same} of {len(src)} identical"  # float order may flip a near-tie


def lm_run(trained_run, tmp_path, arch):
    """A run directory holding a random DecoderLM (`arch`) over the trained run's tokenizer."""
    import shutil

    from mt import config
    from mt.checkpoint import read_meta, save_config, save_weights
    from mt.models import build_model

    run = tmp_path / arch
    run.mkdir()
    shutil.copy(trained_run / "spm.model", run / "spm.model")
    cfg = config.load(trained_run / "config.yaml", [f"model.arch={arch}", "model.dec_layers=2"])
    meta = read_meta(trained_run)
    save_config(cfg, run, **{k: v for k, v in meta.items() if k != "format"})
    torch.manual_seed(0)
    save_weights(build_model(cfg.model, meta["vocab_size"]), run / "model.safetensors")
    return run


@pytest.mark.parametrize("arch", ["decoder_only", "prefix_lm"])
def test_language_models_export_to_a_generator_with_the_same_log_probs(trained_run, tmp_path, arch):
    """A decoder-only LM reads BOS x; a prefix LM reads x EOS BOS y: CT2's Generator, given the same
    tokens, scores each next token as mt's model does."""
    from mt.tokenizer import BOS, EOS

    run = lm_run(trained_run, tmp_path, arch)
    out = tmp_path / f"{arch}-ct2"
    result = mt_cli("export", run, "--out", out)
    assert result.exit_code == 0, result.output
    cfg, model, tok = load_run(run)
    sp = tok.sp
    x, y = sp.encode("A dog runs in the park."), sp.encode("Ein Hund rennt.")
    if arch == "decoder_only":
        src, tgt = torch.zeros(1, 0, dtype=torch.long), [BOS] + x + [EOS]
    else:
        src, tgt = torch.tensor([x + [EOS]]), [BOS] + y + [EOS]
    with torch.inference_mode():
        logits = model(src, torch.tensor([tgt[:-1]]))[0]
    ours = logits.log_softmax(-1).gather(1, torch.tensor(tgt[1:])[:, None])[:, 0]
    pieces = [SPECIALS[i] if i < len(SPECIALS) else sp.id_to_piece(i) for i in src[0].tolist() + tgt]
    gen = ctranslate2.Generator(str(out), device="cpu", intra_threads=1)
    theirs = gen.score_batch([pieces])[0].log_probs[-len(ours):]
    assert torch.allclose(torch.tensor(theirs), ours, atol=1e-4), (theirs, ours)


def test_export_refuses_a_non_empty_folder_and_the_linear_lm(trained_run, tmp_path, monkeypatch):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    assert_one_line_error(mt_cli("export", trained_run, "--out", tmp_path / "busy"), "not empty")
    from mt.models import build_model

    cfg, _, tok = load_run(trained_run)
    cfg.model.arch = "linear"
    linear_lm = build_model(cfg.model, len(tok))
    monkeypatch.setattr("mt.tools.export.load_run", lambda run, weights: (cfg, linear_lm, tok))
    assert_one_line_error(mt_cli("export", trained_run, "--out", tmp_path / "lm"), "no CTranslate2 counterpart")


def test_export_leaves_an_unrelated_tmp_folder_and_replaces_only_an_export(random_run, tmp_path):
    """OUT.tmp/ beside OUT is someone's folder, not ours to delete; --overwrite replaces an earlier
    export and refuses anything else."""
    (tmp_path / "ct2.tmp").mkdir()
    (tmp_path / "ct2.tmp" / "precious").write_text("mine")
    assert mt_cli("export", random_run, "--out", tmp_path / "ct2").exit_code == 0
    assert (tmp_path / "ct2.tmp" / "precious").read_text() == "mine"
    first = (tmp_path / "ct2" / "model.bin").stat().st_mtime_ns
    assert_one_line_error(mt_cli("export", random_run, "--out", tmp_path / "ct2"), "not empty", "--overwrite")
    assert mt_cli("export", random_run, "--out", tmp_path / "ct2", "--overwrite").exit_code == 0
    assert (tmp_path / "ct2" / "model.bin").stat().st_mtime_ns != first
    assert ctranslate2.Translator(str(tmp_path / "ct2"))  # whole and loadable
    assert_one_line_error(mt_cli("export", random_run, "--out", tmp_path / "ct2.tmp", "--overwrite"),
                          "not an mt export")
    assert (tmp_path / "ct2.tmp" / "precious").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct2", "ct2.tmp"]  # no temporary folder left
