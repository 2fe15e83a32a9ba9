"""End to end through the `mt` CLI on Multi30K, reusing one tiny trained run (conftest.trained_run)."""
import gzip
import json
import re
import subprocess
import sys

import pytest
from click.testing import CliRunner

import mt
from conftest import REPO
from mt.cli import main

BLEU_SIGNATURE = re.compile(r"nrefs:1\|case:mixed\|eff:no\|tok:13a\|smooth:exp\|version:\d")
CHRF_SIGNATURE = re.compile(r"nrefs:1\|case:mixed\|eff:yes\|nc:6\|nw:0\|space:no\|version:\d")


def mt_cli(*args, input=None):
    return CliRunner().invoke(main, [str(a) for a in args], input=input)


def assert_one_line_error(result, *fragments):
    """Exit code 2, nothing on stdout, exactly one 'mt: error:' line on stderr, no traceback."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mt: error: ") and "Traceback" not in result.stderr
    for f in fragments:
        assert f in lines[0]


def head(path, n):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [next(f).rstrip("\n") for _ in range(n)]


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_translate_keeps_line_count_and_order(trained_run, multi30k_dir):
    """`mt translate` prints exactly one line per input line, in order, empty for blank input, only translations on stdout."""
    sentences = head(multi30k_dir / "test_2016_flickr.en.gz", 4)
    long_line = " ".join(["dog"] * 5000)
    lines = [sentences[0], "", "   ", sentences[1], "\t", long_line, sentences[2], "", sentences[3]]
    result = mt_cli("translate", "-m", trained_run, input="".join(line + "\n" for line in lines))
    assert result.exit_code == 0, result.output
    out = result.stdout.split("\n")
    assert out[-1] == "" and len(out[:-1]) == len(lines)
    out = out[:-1]
    assert [out[i] for i in (1, 2, 4, 7)] == ["", "", "", ""]
    assert "truncated" in result.stderr and not any(o.startswith("mt:") for o in out)
    direct = mt.load(trained_run, device="cpu").translate(sentences)  # other batching, same outputs
    assert [out[i] for i in (0, 3, 6, 8)] == direct


def test_eval_hyp_ref_bleu_chrf(multi30k_dir, tmp_path):
    """`mt eval --bleu --chrf --hyp --ref` prints both scores with sacreBLEU signatures; --json parses."""
    ref = multi30k_dir / "val.de.gz"
    refs = head(ref, 1014)
    hyp = write_lines(tmp_path / "hyp.txt", [" ".join(r.split()[:-1]) for r in refs])  # last word dropped
    result = mt_cli("eval", "--bleu", "--chrf", "--hyp", hyp, "--ref", ref)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("BLEU = ") and "chrF2 = " in result.stdout
    assert BLEU_SIGNATURE.search(result.stdout) and CHRF_SIGNATURE.search(result.stdout)
    as_json = json.loads(mt_cli("eval", "--bleu", "--chrf", "--hyp", hyp, "--ref", ref, "--json").stdout)
    assert 0 < as_json["bleu"]["score"] < 100 and 0 < as_json["chrf"]["score"] < 100
    assert BLEU_SIGNATURE.search(as_json["bleu"]["signature"])
    same = json.loads(mt_cli("eval", "--hyp", ref, "--ref", ref, "--json").stdout)
    assert list(same) == ["bleu"] and same["bleu"]["score"] == 100.0


def test_eval_model_src_ref(trained_run, multi30k_dir, tmp_path):
    """`mt eval -m RUN --src --ref` translates the source and scores it (BLEU in [0, 100], with signature)."""
    src = write_lines(tmp_path / "src.en", head(multi30k_dir / "test_2016_flickr.en.gz", 8))
    ref = write_lines(tmp_path / "ref.de", head(multi30k_dir / "test_2016_flickr.de.gz", 8))
    result = mt_cli("eval", "-m", trained_run, "--src", src, "--ref", ref, "--json")
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)
    assert 0 <= scores["bleu"]["score"] <= 100 and BLEU_SIGNATURE.search(scores["bleu"]["signature"])


def test_eval_line_count_mismatch(tmp_path):
    """hyp/ref line-count mismatch: exit code 2 and one error line naming both counts."""
    hyp = write_lines(tmp_path / "hyp.txt", ["a", "b", "c"])
    ref = write_lines(tmp_path / "ref.txt", ["a", "b"])
    assert_one_line_error(mt_cli("eval", "--hyp", hyp, "--ref", ref), "3 lines", "2")


def test_eval_line_count_mismatch_real_process(tmp_path):
    """The same error from a real `python -m mt.cli` process: exit 2, one stderr line, empty stdout."""
    hyp = write_lines(tmp_path / "hyp.txt", ["a", "b", "c"])
    ref = write_lines(tmp_path / "ref.txt", ["a", "b"])
    proc = subprocess.run([sys.executable, "-m", "mt.cli", "eval", "--hyp", str(hyp), "--ref", str(ref)],
                          capture_output=True, text=True, timeout=900)  # generous: CI machines may be loaded
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("mt: error: ")


def test_train_unknown_recipe_key(tmp_path):
    """An unknown key (by --set or in the recipe file) stops `mt train` with exit 2 and one line naming it."""
    assert_one_line_error(mt_cli("train", REPO / "recipes/tiny.yaml", "--set", "model.layerz=2"), "model.layerz")
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("train:\n  max_step: 3   # typo\n", encoding="utf-8")
    assert_one_line_error(mt_cli("train", recipe), "train.max_step")
    assert_one_line_error(mt_cli("train", tmp_path / "missing.yaml"), "missing.yaml")


def test_data_multi30k_copies_files(multi30k_dir, tmp_path):
    """`mt data multi30k --from DIR --out OUT` copies every split/language file byte for byte and lists them."""
    out = tmp_path / "m30k"
    result = mt_cli("data", "multi30k", "--from", multi30k_dir, "--out", out)
    if result.exit_code == 2 and "not found" in result.stderr:
        pytest.skip(f"shared copy lacks a language: {result.stderr.strip()}")
    assert result.exit_code == 0, result.output
    listed = result.stdout.split()
    for name in ("train.en.gz", "val.de.gz", "test_2016_flickr.en.gz"):
        assert str(out / name) in listed
        assert (out / name).read_bytes() == (multi30k_dir / name).read_bytes()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.split("/")[-1] for p in listed)  # no .part left
    with gzip.open(multi30k_dir / "val.de.gz", "rb") as f:  # and unpacked beside, for `mt translate < FILE`
        assert (out / "val.de").read_bytes() == f.read()


def test_library_load_and_translate(trained_run):
    """mt.load(RUN).translate(...) returns one string per input, '' for blank input."""
    t = mt.load(trained_run, device="cpu")
    out = t.translate(["A dog runs.", "", "Two children play in the park."], beam_size=2)
    assert len(out) == 3 and all(isinstance(s, str) for s in out) and out[1] == ""
    assert t.translate([]) == []
    assert t.translate(["A dog runs."], beam_size=1) == t.translate(["A dog runs."], beam_size=1)


def test_batch_options_bound_the_batches_and_keep_the_output(trained_run, multi30k_dir, monkeypatch):
    """--batch-tokens / --batch-sentences change how sentences are grouped, never what is written."""
    lines = gzip.open(multi30k_dir / "val.en.gz", "rt", encoding="utf-8").read().splitlines()[:12]
    text = "\n".join(lines) + "\n"
    default = mt_cli("translate", "-m", trained_run, "--greedy", input=text)
    assert default.exit_code == 0, default.output
    sizes = []
    import mt.decoding
    batches = mt.decoding.token_batches

    def spy(*args):
        for batch in batches(*args):
            sizes.append(len(batch))
            yield batch
    monkeypatch.setattr(mt.decoding, "token_batches", spy)
    small = mt_cli("translate", "-m", trained_run, "--greedy", "--batch-sentences", 5, input=text)
    assert small.exit_code == 0, small.output
    assert small.stdout == default.stdout
    assert max(sizes) == 5 and sum(sizes) == 12
    sizes.clear()
    one = mt_cli("translate", "-m", trained_run, "--greedy", "--batch-tokens", 1, input=text)
    assert one.stdout == default.stdout and sizes == [1] * 12  # a sentence over budget still gets a batch
    bench = mt_cli("bench", "translate", "-m", trained_run, "--src", multi30k_dir / "val.en.gz",
                   "--beam", 1, "--batch-sentences", 7, "--repeats", 1, "--json")
    assert bench.exit_code == 0, bench.output


def test_translate_cuts_an_overlong_line_and_still_answers_it(random_run):
    result = mt_cli("translate", "-m", random_run, "--greedy", "--max-line-chars", "100",
                    input="a dog\n" + "dog " * 100_000 + "\nthe river\n")
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == 3
    assert "stdin line 2 has 400,000 characters; only its first 100 are read" in result.stderr


def test_score_prints_nan_for_a_pair_too_long_and_names_it(random_run):
    result = mt_cli("score", "-m", random_run, input="a dog\tdog\na dog\t" + "dog " * 64 + "\n")
    assert result.exit_code == 0, result.output
    first, second = result.stdout.splitlines()
    assert second == "nan\t0\tnan" and re.fullmatch(r"-\d+\.\d{4}\t2\t\d+\.\d{4}", first)
    assert "pair 2 is not scored" in result.stderr and "(1 not scored: too long for the model)" in result.stderr


@pytest.mark.parametrize("redirect,message,code", [(">/dev/full", "cannot write the output to stdout (No space left", 1),
                                                   (">&-", "stdout is closed", 1), ("<&-", "stdin is closed", 2)])
def test_closed_or_full_standard_streams_are_one_line(random_run, redirect, message, code):
    import shlex

    feed = "" if redirect == "<&-" else "echo 'a dog' | "
    proc = subprocess.run(f"{feed}{shlex.quote(sys.executable)} -m mt.cli translate -m {shlex.quote(str(random_run))} "
                          f"--greedy {redirect}", shell=True, cwd=REPO, capture_output=redirect != ">&-",
                          stderr=subprocess.PIPE if redirect == ">&-" else None, text=True)
    assert proc.returncode == code
    assert proc.stderr.strip().splitlines() == [f"mt: error: {proc.stderr.strip()[11:]}"] and message in proc.stderr
    assert "Traceback" not in proc.stderr
