"""`--compile`: batch-1 greedy search and sampling through a compiled decoder step give the eager output."""
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch

from conftest import REPO, make_model
from mt.compiled import CompiledDecoder
from mt.errors import MTError
from mt.search import generate
from mt.tokenizer import EOS


# inductor compiles C++ (and a Python extension); without a compiler only the error test below can run
HAVE_CXX = (any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "clang++"))
            and os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))
needs_cxx = pytest.mark.skipif(not HAVE_CXX, reason="torch.compile's CPU backend needs a C++ compiler")


@pytest.fixture(scope="module")
def model_and_compiled():
    # a model whose greedy outputs vary in length, untied output layer to cover that weight's path
    model = make_model(vocab_size=40, d_model=32, heads=4, ffn=64, tie_embeddings=False)
    return model, CompiledDecoder(model)


@needs_cxx
@pytest.mark.parametrize("src, max_len", [([5, 9, 12, 3, 7, 8], 9), ([6, 4], 3), ([], 5), ([11, 13, 17], 0)])
def test_compiled_greedy_equals_eager_greedy(model_and_compiled, src, max_len):
    model, compiled = model_and_compiled
    ids = torch.tensor([src + [EOS]])
    with torch.no_grad():
        eager = generate(model, ids, torch.tensor([max_len]), length_penalty=1.0)[0]
    got = compiled.search(ids, max_len, length_penalty=1.0)
    assert got.tokens == eager.tokens
    assert len(got.tokens) <= max_len and EOS not in got.tokens
    assert got.step_logprobs == pytest.approx(eager.step_logprobs, abs=1e-4)  # EOS's log-prob last
    assert got.score == pytest.approx(got.logprob / (len(got.tokens) + 1), abs=1e-6)


@needs_cxx
def test_compiled_encoder_gives_the_eager_keys_and_values(model_and_compiled):
    model, compiled = model_and_compiled
    ids = torch.tensor([[5, 9, 12, 3, 7, 8, EOS]])
    with torch.no_grad():
        memory, _ = model.encode(ids)
        kv = [layer.cross_attn.project_memory(memory) for layer in model.decoder]
    k, v = compiled.encode(ids)
    assert k.is_contiguous() and v.is_contiguous()  # the compiled step reads them so, unchecked
    torch.testing.assert_close(k, torch.stack([k_[0] for k_, _ in kv]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v, torch.stack([v_[0] for _, v_ in kv]), atol=1e-5, rtol=1e-5)


@needs_cxx
def test_compiled_greedy_follows_many_sources_without_recompiling(model_and_compiled):
    model, compiled = model_and_compiled
    torch.manual_seed(1)
    for n in range(2, 12):
        ids = torch.cat([torch.randint(3, 40, (1, n)), torch.tensor([[EOS]])], 1)
        with torch.no_grad():
            eager = generate(model, ids, torch.tensor([n + 4]))[0]
        assert compiled.search(ids, n + 4).tokens == eager.tokens


@needs_cxx
@pytest.mark.parametrize("seed, sid, opts",
                         [(0, 0, {}), (3, 7, dict(top_k=5)), (1, 2, dict(top_p=0.8, temperature=0.7))])
def test_compiled_sampling_draws_what_eager_sampling_draws(model_and_compiled, seed, sid, opts):
    """Draws are keyed by (seed, sentence id, step), so the compiled path must reproduce them exactly."""
    model, compiled = model_and_compiled
    ids = torch.tensor([[5, 9, 12, 3, 7, 8, EOS]])
    kw = dict(temperature=1.0, top_k=0, top_p=1.0) | opts
    with torch.no_grad():
        eager = generate(model, ids, torch.tensor([9]), sample=True, ids=[sid], seed=seed, **kw)[0]
    got = compiled.search(ids, 9, sampling=dict(ids=torch.tensor([sid]), seed=seed, **kw))
    assert got.tokens == eager.tokens
    assert got.step_logprobs == pytest.approx(eager.step_logprobs, abs=1e-4)
    assert got.tokens != compiled.search(ids, 9).tokens  # a draw, not the greedy path


@needs_cxx
def test_compiled_step_is_kept_on_disk_and_rebuilt_when_damaged(model_and_compiled, compiled_step_cache,
                                                                 monkeypatch):
    """A second decoder for the same model loads the compiled step and encoder instead of compiling them;
    a damaged file is compiled again (here: a stand-in compiler that copies the good file, to keep the test fast)."""
    model, compiled = model_and_compiled
    ids = torch.tensor([[5, 9, 12, 3, 7, 8, EOS]])
    want = compiled.search(ids, 9).tokens
    kept = {kind: compiled_step_cache / f"{kind}-{compiled._key(kind)}.pt2" for kind in ("step", "encoder")}
    assert all(p.exists() for p in kept.values())
    path = kept["step"]
    good = path.read_bytes()

    def no_compiler(program, package_path, **options):
        raise AssertionError("compiled again although the disk cache has it")
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", no_compiler)
    assert CompiledDecoder(model).search(ids, 9).tokens == want

    path.write_bytes(b"not a package")
    stale = compiled_step_cache / "step-0123456789-0123456789abcdef.pt2"  # another version's
    stale.write_bytes(b"old")
    rebuilt = []

    def stand_in(program, package_path, **options):
        rebuilt.append(package_path)
        open(package_path, "wb").write(good)
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", stand_in)
    assert CompiledDecoder(model).search(ids, 9).tokens == want
    assert len(rebuilt) == 1 and path.read_bytes() == good
    assert not stale.exists() and kept["encoder"].exists()
    assert [p.name for p in compiled_step_cache.iterdir() if p.name.startswith("tmp")] == []  # none left behind


def test_compile_refuses_what_it_cannot_decode():
    from mt.ensemble import Ensemble
    from mt.translate import quantize_int8

    with pytest.raises(MTError, match="--compile"):
        CompiledDecoder(Ensemble([make_model(), make_model(seed=1)]))
    with pytest.raises(MTError, match="--compile"):
        CompiledDecoder(quantize_int8(make_model()))


@needs_cxx
def test_cli_translate_compile_matches_uncompiled(trained_run, multi30k_dir):
    """The user's view: greedy search and sampling give the same lines as uncompiled, one per input line."""
    import gzip

    with gzip.open(multi30k_dir / "test_2016_flickr.en.gz", "rt") as f:
        lines = [next(f).rstrip("\n") for _ in range(12)]
    lines.insert(3, "")
    src = "\n".join(lines) + "\n"
    for search in (["--greedy"], ["--sample", "--top-k", "10", "--seed", "3"]):
        outs = []
        for extra in ([], ["--compile"]):
            proc = subprocess.run([sys.executable, "-m", "mt.cli", "translate", "-m", str(trained_run), *search,
                                   *extra], input=src, capture_output=True, text=True, cwd=REPO, timeout=900)
            assert proc.returncode == 0, proc.stderr
            outs.append(proc.stdout.splitlines())
        assert len(outs[1]) == len(lines) and outs[1][3] == ""
        assert outs[1] == outs[0], search


def test_cli_compile_without_a_compiler_is_one_line(trained_run, tmp_path):
    import os

    env = dict(os.environ, CXX=str(tmp_path / "no-such-g++"), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"),
               MT_CACHE_DIR=str(tmp_path / "mt-cache"))
    proc = subprocess.run([sys.executable, "-m", "mt.cli", "translate", "-m", str(trained_run), "--greedy",
                           "--compile"], input="A man.\n", capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=600)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # one line, no traceback
    assert "--compile" in proc.stderr and "C++ compiler" in proc.stderr


@needs_cxx
def test_cli_compile_answers_each_line_as_it_arrives(trained_run):
    """A pipe from a server: with --compile --greedy, line 1's translation comes out before line 2 is sent."""
    import select

    proc = subprocess.Popen([sys.executable, "-m", "mt.cli", "translate", "-m", str(trained_run), "--greedy",
                             "--compile"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
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
