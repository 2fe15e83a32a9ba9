"""mt.models.transformer: cached incremental decoding, causal and padding masks, tied embeddings."""
import torch
import torch.nn.functional as F

from conftest import make_model
from mt.checkpoint import load_weights, save_weights
from mt.tokenizer import BOS, EOS, PAD

SRC = torch.tensor([[5, 6, 7, 8, 9, EOS], [4, 10, EOS, PAD, PAD, PAD], [7, 7, 5, EOS, PAD, PAD]])
TGT_IN = torch.tensor([[BOS, 4, 5, 6, 7, 8, 9], [BOS, 10, 9, 8, 7, 6, 5], [BOS, 4, 4, 4, 4, 4, 4]])


def teacher_forced_log_probs(model, src, tgt_in):
    """log_softmax of forward()'s logits with PAD and BOS excluded, as step() computes them."""
    logits = model(src, tgt_in).float()
    logits[..., PAD] = logits[..., BOS] = float("-inf")
    return F.log_softmax(logits, dim=-1)


@torch.no_grad()
def test_incremental_decoding_matches_teacher_forcing(tiny_model):
    """step() token by token on the KV cache gives the teacher-forced log-probs within 1e-5."""
    full = teacher_forced_log_probs(tiny_model, SRC, TGT_IN)
    cache = tiny_model.new_cache(SRC, TGT_IN.shape[1])
    for t in range(TGT_IN.shape[1]):
        lp = tiny_model.step(TGT_IN[:, t:t + 1], cache)
        torch.testing.assert_close(lp, full[:, t], atol=1e-5, rtol=0)
    assert cache.length == TGT_IN.shape[1]


@torch.no_grad()
def test_incremental_decoding_several_tokens_per_step(tiny_model):
    """Feeding a 3-token prefix in one step, then single tokens, matches teacher forcing too."""
    full = teacher_forced_log_probs(tiny_model, SRC, TGT_IN)
    cache = tiny_model.new_cache(SRC, TGT_IN.shape[1])
    torch.testing.assert_close(tiny_model.step(TGT_IN[:, :3], cache), full[:, 2], atol=1e-5, rtol=0)
    for t in range(3, TGT_IN.shape[1]):
        torch.testing.assert_close(tiny_model.step(TGT_IN[:, t:t + 1], cache), full[:, t], atol=1e-5, rtol=0)


@torch.no_grad()
def test_forward_with_tgt_out_keeps_non_pad_rows(tiny_model):
    """forward(src, tgt_in, tgt_out) returns exactly the logits of the non-pad target positions."""
    tgt_out = TGT_IN.roll(-1, dims=1)
    tgt_out[1, 4:] = PAD
    full = tiny_model(SRC, TGT_IN)
    torch.testing.assert_close(tiny_model(SRC, TGT_IN, tgt_out), full[tgt_out != PAD])


@torch.no_grad()
def test_causal_mask(tiny_model):
    """Changing the target token at position j changes no logit before j (and does change j's)."""
    base = tiny_model(SRC, TGT_IN)
    for j in range(1, TGT_IN.shape[1]):
        changed = TGT_IN.clone()
        changed[:, j] = (changed[:, j] - 3) % 7 + 4  # another real token (ids 4..10)
        out = tiny_model(SRC, changed)
        torch.testing.assert_close(out[:, :j], base[:, :j], atol=1e-6, rtol=0)
        assert not torch.allclose(out[:, j], base[:, j])


@torch.no_grad()
def test_source_padding_does_not_leak(tiny_model):
    """Each sentence gets the same log-probs in a padded batch as alone (no padding)."""
    batched = teacher_forced_log_probs(tiny_model, SRC, TGT_IN)
    for b in range(len(SRC)):
        src = SRC[b:b + 1, :int((SRC[b] != PAD).sum())]
        alone = teacher_forced_log_probs(tiny_model, src, TGT_IN[b:b + 1])
        torch.testing.assert_close(batched[b:b + 1], alone, atol=1e-5, rtol=0)


def test_tied_embeddings_share_one_tensor(tmp_path):
    """With tie_embeddings, source/target embeddings and the output projection are one tensor (also after a save/load)."""
    tied, untied = make_model(tie_embeddings=True), make_model(tie_embeddings=False)
    assert tied.tgt_embed.weight is tied.embed.weight and tied.output.weight is tied.embed.weight
    h = torch.randn(3, tied.cfg.d_model)
    torch.testing.assert_close(tied.logits(h), h @ tied.embed.weight.T)
    V, D = tied.vocab_size, tied.cfg.d_model
    assert untied.num_parameters() - tied.num_parameters() == 2 * V * D
    assert untied.tgt_embed.weight is not untied.embed.weight
    save_weights(tied, tmp_path / "w.safetensors")
    loaded = make_model(seed=1, tie_embeddings=True)
    load_weights(loaded, tmp_path / "w.safetensors")
    assert loaded.tgt_embed.weight is loaded.embed.weight
    assert torch.equal(loaded.embed.weight, tied.embed.weight)
    with torch.no_grad():
        torch.testing.assert_close(loaded(SRC, TGT_IN), tied(SRC, TGT_IN))


@torch.no_grad()
def test_output_projection_follows_the_tied_embedding():
    """The tied output projection reads the embedding's tensor itself: an in-place change (an
    optimizer step, loading a checkpoint) shows in the logits."""
    model = make_model()
    hidden = torch.randn(3, 32)
    torch.testing.assert_close(model.logits(hidden), F.linear(hidden, model.embed.weight))
    model.embed.weight.mul_(2.0)
    torch.testing.assert_close(model.logits(hidden), F.linear(hidden, model.embed.weight))


def test_attention_under_cpu_autocast_runs_in_float32():
    """Under CPU bfloat16 autocast, `attention` attends in float32 (torch's bfloat16 flash-attention
    backward is ~10x slower there) and hands back the caller's dtype; gradients reach q, k and v."""
    from mt.models.layers import attention
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 5, 8, generator=g).bfloat16().requires_grad_() for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = attention(q, k, v, is_causal=True)
    assert y.dtype == torch.bfloat16
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    torch.testing.assert_close(y, expected.bfloat16(), rtol=0, atol=0)
    y.float().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))
