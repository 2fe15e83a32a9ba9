"""int8 decoding (`--quantize int8`): every linear layer quantized per output channel, same distribution."""
import subprocess
import sys

import torch
import torch.nn as nn

from conftest import REPO, make_model
from mt.fast.int8 import quantize_int8


def _step_logprobs(model, src, prefix):
    cache = model.new_cache(src, 8)
    return model.step(prefix, cache)


def test_int8_model_keeps_the_distribution():
    model = make_model(vocab_size=50, d_model=64, ffn=128)
    src, prefix = torch.tensor([[5, 9, 12, 3, 2]]), torch.tensor([[1, 7, 8]])
    with torch.inference_mode():
        ref = _step_logprobs(model, src, prefix)
        q = quantize_int8(make_model(vocab_size=50, d_model=64, ffn=128))
        got = _step_logprobs(q, src, prefix)
    linears = [m for m in q.modules() if type(m).__name__ == "Linear" and "quantized" in type(m).__module__]
    assert len(linears) == 2 * 4 + 2 * 7 + 1  # encoder 4 per layer, decoder 7, the tied output projection
    assert all(m.weight().qscheme() == torch.per_channel_affine for m in linears)
    assert torch.allclose(got.logsumexp(-1), torch.zeros(1), atol=1e-5)      # still a distribution
    assert (got.exp() - ref.exp()).abs().max() < 0.01                         # and the same one, to 1%


def test_per_channel_scales_follow_rows_of_different_size():
    """A per-tensor scale wastes int8 levels on small rows; per-channel keeps each row's precision."""
    torch.manual_seed(0)
    layer = nn.Linear(64, 32)
    with torch.no_grad():
        layer.weight.mul_(torch.logspace(-2, 0, 32)[:, None])                # rows 100x apart in size
    x = torch.randn(16, 64)
    exact = layer(x)
    per_channel = quantize_int8(nn.Sequential(layer))(x)
    with torch.no_grad():
        per_tensor = torch.ao.quantization.quantize_dynamic(nn.Sequential(layer), {nn.Linear}, dtype=torch.qint8)(x)
    small = slice(0, 8)  # the smallest rows
    assert (per_channel - exact)[:, small].abs().max() < 0.2 * (per_tensor - exact)[:, small].abs().max()


def test_cli_translates_with_int8(trained_run, multi30k_dir):
    src = "\n".join(["A man rides a bike.", "", "Two dogs play in the snow."]) + "\n"
    out = subprocess.run([sys.executable, "-m", "mt.cli", "translate", "-m", str(trained_run), "--quantize", "int8"],
                         input=src, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == 3 and out.stdout.splitlines()[1] == ""
