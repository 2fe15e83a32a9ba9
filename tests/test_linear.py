"""mt.linear: float32 CPU inference on oneDNN-packed weights must equal F.linear; training is untouched."""
import copy
import os
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import make_model
from mt.linear import Linear, PackedWeight, packable


def linear(x, w, b=None, one_row_transposed=False):
    return PackedWeight(one_row_transposed).linear(x, w, b)


def _close(a, b):
    scale = float(b.abs().max()) if b.numel() else 1.0
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="oneDNN ops are checked on x86 builds")
def test_x86_builds_take_the_onednn_path():
    x, w = torch.randn(3, 8), torch.randn(5, 8)
    with torch.inference_mode():
        assert packable(x, w)
    assert not packable(x, w)                               # grad enabled: training path
    with torch.inference_mode():
        assert not packable(x.bfloat16(), w.bfloat16())     # other dtypes: F.linear
        made_here = torch.randn(5, 8)                          # an inference tensor has no version
        assert not packable(x, made_here)                   # counter to key the cache on
        assert torch.equal(linear(x, made_here), F.linear(x, made_here))


@pytest.mark.parametrize("shape", [(1, 64), (5, 64), (450, 64), (3, 7, 64), (0, 64)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("one_row_transposed", [True, False])
def test_inference_equals_f_linear(shape, bias, one_row_transposed):
    torch.manual_seed(0)
    w, b = torch.randn(96, 64), (torch.randn(96) if bias else None)
    x = torch.randn(shape)
    with torch.inference_mode():
        got = linear(x, w, b, one_row_transposed)
    assert got.shape == shape[:-1] + (96,)
    assert _close(got, F.linear(x, w, b))


def test_non_contiguous_input():
    torch.manual_seed(0)
    w, x = torch.randn(32, 16), torch.randn(16, 4, 6).permute(1, 2, 0)  # (4, 6, 16), not contiguous
    with torch.inference_mode():
        assert _close(linear(x, w), F.linear(x, w))


def test_packed_copy_follows_weight_updates():
    """The packed weight is cached; an in-place change (optimizer step, load_state_dict) must show."""
    torch.manual_seed(0)
    layer, x = Linear(16, 8), torch.randn(2, 16)
    assert layer.min_rows == 1
    with torch.no_grad():
        before = layer(x)
        layer.weight.mul_(2.0)
        after = layer(x)
        expected = F.linear(x, layer.weight, layer.bias)
        layer.load_state_dict({"weight": torch.ones(8, 16), "bias": torch.zeros(8)})
        loaded = layer(x)
    assert _close(after, expected) and not torch.allclose(before, after)
    assert _close(loaded, x.sum(1, keepdim=True).expand(2, 8))


def test_training_path_is_f_linear_with_gradients():
    torch.manual_seed(0)
    layer, x = Linear(16, 8), torch.randn(4, 16, requires_grad=True)
    y = layer(x)
    assert torch.equal(y, F.linear(x, layer.weight, layer.bias))
    y.square().sum().backward()
    assert layer.weight.grad is not None and x.grad is not None


def test_one_row_reads_the_transposed_copy():
    """Batch-1 decoding of a vocabulary projection: one row from the transposed copy, more from oneDNN."""
    torch.manual_seed(0)
    w, cache = torch.randn(40, 16), PackedWeight(one_row_transposed=True)
    with torch.inference_mode():
        one = torch.randn(1, 1, 16)
        assert _close(cache.linear(one, w), F.linear(one, w))
        assert cache.transposed is not None and cache.packed is None
        many = torch.randn(3, 16)
        assert _close(cache.linear(many, w), F.linear(many, w))
    assert cache.packed is not None or not packable(many, w)


def test_min_rows_keeps_short_inputs_on_f_linear():
    """Small layers at few rows stay on F.linear (oneDNN's per-call cost); longer inputs are packed."""
    torch.manual_seed(0)
    layer = Linear(16, 8, min_rows=4)
    with torch.inference_mode():
        short = torch.randn(1, 3, 16)
        assert torch.equal(layer(short), F.linear(short, layer.weight, layer.bias))
        assert layer.packed.packed is None
        long = torch.randn(2, 3, 16)
        assert _close(layer(long), F.linear(long, layer.weight, layer.bias))
    assert layer.packed.packed is not None or not packable(long, layer.weight)


def test_modules_stay_plain_linear_layers():
    """Same checkpoints as nn.Linear, and deep-copyable after inference (the packed copy is not state)."""
    layer = Linear(16, 8)
    assert isinstance(layer, nn.Linear) and set(layer.state_dict()) == {"weight", "bias"}
    x = torch.randn(3, 16)
    with torch.inference_mode():
        layer(x)
        twin = copy.deepcopy(layer)
        assert twin.packed.packed is None and _close(twin(x), layer(x))


def test_model_decoding_matches_the_training_path():
    """Log-probs from incremental decoding (oneDNN) equal the teacher-forced forward with grad on (MKL)."""
    torch.manual_seed(0)
    model = make_model(vocab_size=50, d_model=64, ffn=128).eval()
    src, tgt = torch.tensor([[5, 9, 12, 3, 2]]), torch.tensor([[1, 7, 8, 11]])
    ref = model.normalize(model(src, tgt))[0]                          # grad enabled: F.linear
    with torch.inference_mode():
        cache = model.new_cache(src, 8)
        got = torch.stack([model.step(tgt[:, i:i + 1], cache)[0] for i in range(tgt.shape[1])])
    assert (got.exp() - ref.detach().exp()).abs().max() < 1e-5   # PAD and BOS are -inf in both


def test_mt_onednn_0_turns_the_path_off():
    code = "import mt.linear as L; print(L._ONEDNN is None)"
    env = {**os.environ, "MT_ONEDNN": "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.strip() == "True", out.stderr


def test_onednn_kernel_caches_are_capped_unless_the_user_set_them():
    """Decoding meets a new row count nearly every step: uncapped caches grew peak RSS by 0.3 GB."""
    code = "import os, mt.linear; print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'], os.environ['LRU_CACHE_CAPACITY'])"
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.split() == ["16", "16"], out.stderr
    env["LRU_CACHE_CAPACITY"] = "64"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.split() == ["16", "64"], out.stderr
