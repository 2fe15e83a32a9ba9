"""mt.fast.aot (`--aot`): batch-1 greedy search and sampling through the model's own step, exported and
compiled ahead of time, give the eager output. Where a C++ compiler is present these tests run and fail
if compiling fails; they skip only where inductor has no compiler at all."""
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch

from conftest import REPO, make_model
from mt.fast.aot import AotCache, AotDecoder
from mt.fast.int8 import quantize_int8
from mt.errors import MTError
from mt.search import generate
from mt.tokenizer import EOS


# inductor compiles C++ (and a Python extension); without a compiler only the error test below can run
HAVE_CXX = (any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "clang++"))
            and os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))
needs_cxx = pytest.mark.skipif(not HAVE_CXX, reason="AOTInductor needs a C++ compiler and Python headers")


@pytest.fixture(scope="module")
def model_and_compiled():
    # a model whose greedy outputs vary in length, untied output layer to cover that weight's path
    model = make_model(vocab_size=40, d_model=32, heads=4, ffn=64, tie_embeddings=False)
    return model, AotDecoder(model)


@needs_cxx
@pytest.mark.slow
@pytest.mark.parametrize("src, max_len", [([5, 9, 12, 3, 7, 8], 9), ([6, 4], 3), ([], 5), ([11, 13, 17], 0)])
def test_compiled_greedy_equals_eager_greedy(model_and_compiled, src, max_len):
    model, compiled = model_and_compiled
    ids = torch.tensor([src + [EOS]])
    with torch.no_grad():
        eager = generate(model, ids, torch.tensor([max_len]), length_penalty=1.0)[0]
    got = generate(compiled, ids, torch.tensor([max_len]), length_penalty=1.0)[0]
    assert got.tokens == eager.tokens
    assert len(got.tokens) <= max_len and EOS not in got.tokens
    assert got.step_logprobs == pytest.approx(eager.step_logprobs, abs=1e-4)  # EOS's log-prob last
    assert got.score == pytest.approx(got.logprob / (len(got.tokens) + 1), abs=1e-6)


@needs_cxx
@pytest.mark.slow
def test_compiled_encoder_and_step_give_the_eager_cache_and_log_probs(model_and_compiled):
    model, compiled = model_and_compiled
    ids = torch.tensor([[5, 9, 12, 3, 7, 8, EOS]])
    with torch.no_grad():
        kv = model.memory_kv(model.encode(ids)[0])
        eager_cache, cache = model.new_cache(ids, 6), compiled.new_cache(ids, 6)
        assert cache.memory_k.is_contiguous() and cache.memory_v.is_contiguous()  # read so, unchecked
        torch.testing.assert_close(cache.memory_k, torch.stack([k for k, _ in kv]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache.memory_v, torch.stack([v for _, v in kv]), atol=1e-5, rtol=1e-5)
        for token in (1, 7, 8, 11):
            tokens = torch.tensor([[token]])
            torch.testing.assert_close(compiled.step(tokens, cache), model.step(tokens, eager_cache),
                                       atol=1e-4, rtol=1e-4)


@needs_cxx
@pytest.mark.slow
def test_compiled_greedy_follows_many_sources_without_recompiling(model_and_compiled, monkeypatch):
    model, compiled = model_and_compiled
    generate(compiled, torch.tensor([[5, 6, EOS]]), torch.tensor([3]))  # both parts compiled (or loaded) once

    def no_compiler(program, package_path, **options):
        raise AssertionError("compiled again for another length")
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", no_compiler)
    torch.manual_seed(1)
    for n in range(2, 12):
        ids = torch.cat([torch.randint(3, 40, (1, n)), torch.tensor([[EOS]])], 1)
        with torch.no_grad():
            eager = generate(model, ids, torch.tensor([n + 4]))[0]
        assert generate(compiled, ids, torch.tensor([n + 4]))[0].tokens == eager.tokens


@needs_cxx
@pytest.mark.slow
@pytest.mark.parametrize("seed, sid, opts",
                         [(0, 0, {}), (3, 7, dict(top_k=5)), (1, 2, dict(top_p=0.8, temperature=0.7))])
def test_compiled_sampling_draws_what_eager_sampling_draws(model_and_compiled, seed, sid, opts):
    """Draws are keyed by (seed, sentence id, step), so the compiled path must reproduce them exactly."""
    model, compiled = model_and_compiled
    ids = torch.tensor([[5, 9, 12, 3, 7, 8, EOS]])
    kw = dict(temperature=1.0, top_k=0, top_p=1.0) | opts
    with torch.no_grad():
        eager = generate(model, ids, torch.tensor([9]), sample=True, ids=[sid], seed=seed, **kw)[0]
        got = generate(compiled, ids, torch.tensor([9]), sample=True, ids=[sid], seed=seed, **kw)[0]
        greedy = generate(compiled, ids, torch.tensor([9]))[0]
    assert got.tokens == eager.tokens
    assert got.step_logprobs == pytest.approx(eager.step_logprobs, abs=1e-4)
    assert got.tokens != greedy.tokens  # a draw, not the greedy path


@needs_cxx
@pytest.mark.slow
def test_compiled_step_is_kept_on_disk_and_rebuilt_when_damaged(model_and_compiled, compiled_step_cache,
                                                                 monkeypatch):
    """A second decoder for the same model loads the compiled step and encoder instead of compiling them;
    a damaged file is compiled again (here: a stand-in compiler that copies the good file, to keep the test fast)."""
    model, compiled = model_and_compiled
    ids = torch.tensor([[5, 9, 12, 3, 7, 8, EOS]])
    def search(decoder):
        return generate(decoder, ids, torch.tensor([9]))[0].tokens

    want = search(compiled)
    kept = {kind: compiled_step_cache / f"{kind}-{compiled.key(kind)}.pt2" for kind in ("step", "encoder")}
    assert all(p.exists() for p in kept.values())
    path = kept["step"]
    good = path.read_bytes()

    def no_compiler(program, package_path, **options):
        raise AssertionError("compiled again although the disk cache has it")
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", no_compiler)
    assert search(AotDecoder(model)) == want

    path.write_bytes(b"not a package")
    stale = compiled_step_cache / "step-0123456789-0123456789abcdef.pt2"  # another version's
    stale.write_bytes(b"old")
    rebuilt = []

    def stand_in(program, package_path, **options):
        rebuilt.append(package_path)
        open(package_path, "wb").write(good)
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", stand_in)
    assert search(AotDecoder(model)) == want
    assert len(rebuilt) == 1 and path.read_bytes() == good
    assert not stale.exists() and kept["encoder"].exists()
    assert [p.name for p in compiled_step_cache.iterdir() if p.name.startswith("tmp")] == []  # none left behind


def test_aot_refuses_what_it_cannot_decode():
    from mt.ensemble import Ensemble

    with pytest.raises(MTError, match="--aot"):
        AotDecoder(Ensemble([make_model(), make_model(seed=1)]))
    with pytest.raises(MTError, match="--aot"):
        AotDecoder(quantize_int8(make_model()))
    with pytest.raises(MTError, match="no beam search"):
        AotCache(*[torch.zeros(1)] * 4).expand(2)


@needs_cxx
@pytest.mark.slow
def test_cli_translate_aot_matches_eager(trained_run, multi30k_dir):
    """The user's view: greedy search, sampling and beam search give the same lines as uncompiled, one
    per input line, in batches and (--batch-sentences 1) one sentence at a time."""
    import gzip

    with gzip.open(multi30k_dir / "test_2016_flickr.en.gz", "rt") as f:
        lines = [next(f).rstrip("\n") for _ in range(12)]
    lines.insert(3, "")
    src = "\n".join(lines) + "\n"
    for search in (["--greedy"], ["--sample", "--top-k", "10", "--seed", "3"], ["--beam", "4"]):
        outs = []
        for extra in ([], ["--aot"], ["--aot", "--batch-sentences", "1"]):
            proc = subprocess.run([sys.executable, "-m", "mt.cli", "translate", "-m", str(trained_run), *search,
                                   *extra], input=src, capture_output=True, text=True, cwd=REPO, timeout=900)
            assert proc.returncode == 0, proc.stderr
            outs.append(proc.stdout.splitlines())
        assert len(outs[1]) == len(lines) and outs[1][3] == ""
        assert outs[1] == outs[0] and outs[2] == outs[0], search


def test_cli_aot_without_a_compiler_is_one_line(trained_run, tmp_path):
    import os

    env = dict(os.environ, CXX=str(tmp_path / "no-such-g++"), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"),
               MT_CACHE_DIR=str(tmp_path / "mt-cache"))
    proc = subprocess.run([sys.executable, "-m", "mt.cli", "translate", "-m", str(trained_run), "--greedy",
                           "--aot"], input="A man.\n", capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=600)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # one line, no traceback
    assert "--aot" in proc.stderr and "C++ compiler" in proc.stderr


@needs_cxx
@pytest.mark.slow
def test_cli_aot_answers_each_line_as_it_arrives(trained_run):
    """A pipe from a server: with --aot --greedy --batch-sentences 1, line 1's translation comes out
    before line 2 is sent (the batch-1 step decodes each line as it arrives)."""
    import select

    proc = subprocess.Popen([sys.executable, "-m", "mt.cli", "translate", "-m", str(trained_run), "--greedy",
                             "--aot", "--batch-sentences", "1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO)
    try:
        proc.stdin.write("A man rides a bike.\n")
        proc.stdin.flush()
        ready, _, _ = select.select([proc.stdout], [], [], 600)
        assert ready, "no output for the first line while stdin stays open"
        first = proc.stdout.readline()
        assert first.endswith("\n") and first.strip()
        out, err = proc.communicate("Two dogs play in the snow.\n", timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert len(out.splitlines()) == 1


def test_a_cache_folder_others_can_write_is_refused(tmp_path, monkeypatch):
    """Packages are native code this process runs: a folder another user could plant one in is refused."""
    from mt.fast.aot import private_cache_dir

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("MT_CACHE_DIR", str(shared))
    with pytest.raises(MTError, match="writable by other users"):
        private_cache_dir()
    shared.chmod(0o755)
    assert private_cache_dir() == shared
    monkeypatch.setenv("MT_CACHE_DIR", str(tmp_path / "new"))
    assert private_cache_dir().stat().st_mode & 0o777 == 0o700  # created private


def test_a_planted_package_is_never_loaded(tmp_path, monkeypatch):
    """A file at the computable name, without the content hash recorded when mt compiled it, is
    deleted and compiled again, never loaded (here the loader and compiler are stand-ins)."""
    monkeypatch.setenv("MT_CACHE_DIR", str(tmp_path / "cache"))
    decoder = AotDecoder(make_model())
    from mt.fast.aot import private_cache_dir

    planted = private_cache_dir() / f"step-{decoder.key('step')}.pt2"
    planted.write_bytes(b"attacker's native code")
    loaded, compiled = [], []

    class Package:
        loader = "runner"

    def load(path):
        loaded.append(open(path, "rb").read())
        return Package()

    def compile_(program, package_path, **options):
        compiled.append(package_path)
        open(package_path, "wb").write(b"mt's own package")

    monkeypatch.setattr(torch._inductor, "aoti_load_package", load)
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", compile_)
    monkeypatch.setattr(torch.export, "export", lambda *a, **k: type("P", (), {"run_decompositions": lambda s, d: s})())
    assert decoder._load_or_compile("step") == "runner"
    assert loaded == [b"mt's own package"] and len(compiled) == 1
    assert AotDecoder(make_model())._load_or_compile("step") == "runner"  # now trusted: loaded, not compiled
    assert loaded[-1] == b"mt's own package" and len(compiled) == 1
