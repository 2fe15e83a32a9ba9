"""mt.fast.linear and mt.fast.enable: packed-weight CPU inference equals F.linear; training is untouched."""
import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import make_model
from mt import fast
from mt.fast.linear import LAYER_MIN_ROWS, PackedLinear, onednn_ops, packable

ONEDNN = onednn_ops() is not None
needs_onednn = pytest.mark.skipif(not ONEDNN, reason="this torch build has no oneDNN packed-linear ops")


def packed(in_features, out_features, bias=True, **kw):
    torch.manual_seed(0)
    return PackedLinear(in_features, out_features, bias, **kw)


def _close(a, b):
    a, b = a.detach(), b.detach()
    scale = float(b.abs().max()) if b.numel() else 1.0
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-5 * scale)


@needs_onednn
def test_only_float32_inference_takes_the_packed_path():
    x, w, ops = torch.randn(3, 8), torch.randn(5, 8), onednn_ops()
    with torch.inference_mode():
        assert packable(x, w, ops)
        assert not packable(x.bfloat16(), w.bfloat16(), ops)  # other dtypes: F.linear
        made_here = torch.randn(5, 8)                          # an inference tensor has no version
        assert not packable(x, made_here, ops)                 # counter to key the cache on
    assert not packable(x, w, ops)                             # grad enabled: training path
    assert not packable(x, w, None)                            # no ops: F.linear


@pytest.mark.parametrize("shape", [(1, 64), (5, 64), (450, 64), (3, 7, 64), (0, 64)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("one_row_transposed", [True, False])
def test_inference_equals_f_linear(shape, bias, one_row_transposed):
    layer = packed(64, 96, bias, one_row_transposed=one_row_transposed)
    x = torch.randn(shape)
    with torch.inference_mode():
        got = layer(x)
    assert got.shape == shape[:-1] + (96,)
    assert _close(got, F.linear(x, layer.weight, layer.bias))
    rows = x.numel() // 64
    if ONEDNN and rows > 1:
        assert layer.packed is not None                        # it really took the packed path


def test_non_contiguous_input():
    layer, x = packed(16, 32), torch.randn(16, 4, 6).permute(1, 2, 0)  # (4, 6, 16), not contiguous
    with torch.inference_mode():
        assert _close(layer(x), F.linear(x, layer.weight, layer.bias))


def test_packed_copy_follows_weight_updates():
    """The packed weight is cached; an in-place change (optimizer step, load_state_dict) must show."""
    layer, x = packed(16, 8), torch.randn(2, 16)
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


def test_validation_after_a_fused_optimizer_step_sees_the_new_weights():
    """Fused AdamW writes the weights without bumping their version: the cache must not go stale
    across validation rounds of a training (model.eval() / model.train() around each)."""
    layer, x = packed(16, 8), torch.randn(4, 16)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1, fused=True)
    for _ in range(2):
        layer.eval()
        with torch.no_grad():
            assert _close(layer(x), F.linear(x, layer.weight, layer.bias))
        layer.train()
        layer(x).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()


def test_training_path_is_f_linear_with_gradients():
    layer, x = packed(16, 8), torch.randn(4, 16, requires_grad=True)
    y = layer(x)
    assert torch.equal(y, F.linear(x, layer.weight, layer.bias))
    y.square().sum().backward()
    assert layer.weight.grad is not None and x.grad is not None and layer.packed is None


@needs_onednn
def test_one_row_reads_the_transposed_copy():
    """Batch-1 decoding of a vocabulary projection: one row from the transposed copy, more from oneDNN."""
    layer = packed(16, 40, one_row_transposed=True)
    with torch.inference_mode():
        one = torch.randn(1, 1, 16)
        assert _close(layer(one), F.linear(one, layer.weight, layer.bias))
        assert layer.transposed is not None and layer.packed is None
        many = torch.randn(3, 16)
        assert _close(layer(many), F.linear(many, layer.weight, layer.bias))
        assert layer.packed is not None


@needs_onednn
def test_min_rows_keeps_short_inputs_on_f_linear():
    """Small layers at few rows stay on F.linear (oneDNN's per-call cost); longer inputs are packed."""
    layer = packed(16, 8, min_rows=4)
    with torch.inference_mode():
        short = torch.randn(1, 3, 16)
        assert torch.equal(layer(short), F.linear(short, layer.weight, layer.bias))
        assert layer.packed is None
        long = torch.randn(2, 3, 16)
        assert _close(layer(long), F.linear(long, layer.weight, layer.bias))
        assert layer.packed is not None


def test_modules_stay_plain_linear_layers():
    """Same checkpoints as nn.Linear, and deep-copyable after inference (the packed copy is not state)."""
    layer = packed(16, 8)
    assert isinstance(layer, nn.Linear) and set(layer.state_dict()) == {"weight", "bias"}
    x = torch.randn(3, 16)
    with torch.inference_mode():
        layer(x)
        twin = copy.deepcopy(layer)
        assert twin.packed is None and _close(twin(x), layer(x))
    assert twin.weight is not layer.weight


def test_enable_keeps_parameters_and_ties():
    """enable() swaps layers in place: the same Parameter objects, tied output still tied, same names."""
    model = make_model(vocab_size=50, tie_embeddings=True)
    names = set(model.state_dict())
    params = {id(p) for p in model.parameters()}
    fast.enable(model)
    assert set(model.state_dict()) == names and {id(p) for p in model.parameters()} == params
    assert model.output.weight is model.embed.weight
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is PackedLinear for m in linears)
    assert model.output.min_rows == 1 and model.output.one_row_transposed
    assert all(m.min_rows == LAYER_MIN_ROWS for m in linears if m is not model.output)
    assert not any(type(m) is nn.Dropout for m in model.modules())
    assert not any(m.training for m in model.modules())                # an eval model stays in eval mode
    twin = copy.deepcopy(model)
    assert twin.output.weight is twin.embed.weight and twin.output.weight is not model.output.weight


def test_model_decoding_matches_the_training_path():
    """Log-probs from incremental decoding (packed) equal the teacher-forced forward with grad on."""
    model = fast.enable(make_model(vocab_size=50, d_model=64, ffn=128).eval())
    src, tgt = torch.tensor([[5, 9, 12, 3, 2]]), torch.tensor([[1, 7, 8, 11]])
    ref = model.normalize(model(src, tgt))[0]                          # grad enabled: F.linear
    with torch.inference_mode():
        cache = model.new_cache(src, 8)
        got = torch.stack([model.step(tgt[:, i:i + 1], cache)[0] for i in range(tgt.shape[1])])
    assert (got.exp() - ref.detach().exp()).abs().max() < 1e-5   # PAD and BOS are -inf in both


def test_mt_onednn_0_turns_the_path_off():
    code = "from mt.fast.linear import onednn_ops; print(onednn_ops() is None)"
    env = {**os.environ, "MT_ONEDNN": "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.strip() == "True", out.stderr


def test_tune_process_caps_onednn_kernel_caches_unless_the_user_set_them():
    """Decoding meets a new row count nearly every step: uncapped caches grew peak RSS by 0.3 GB."""
    code = ("import os, mt.fast.runtime as r; before = os.environ.get('LRU_CACHE_CAPACITY'); r.tune_process(); "
            "print(before, os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'], os.environ['LRU_CACHE_CAPACITY'])")
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.split() == ["None", "16", "16"], out.stderr      # importing set nothing
    env["LRU_CACHE_CAPACITY"] = "64"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.split() == ["64", "16", "64"], out.stderr
