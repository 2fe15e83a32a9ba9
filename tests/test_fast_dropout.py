"""mt.fast.dropout: the CPU dropout's mask statistics, scaling, gradient, seeding and edge cases."""
import pytest
import torch

from mt.fast.dropout import CheapDropout, dropout


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_drop_rate_and_scaling(p):
    torch.manual_seed(0)
    x = torch.rand(1_000_003) + 1.0  # odd size: the last int64 word is only partly used
    y = dropout(x, p)
    dropped = y == 0
    # 1M Bernoulli(p) draws: standard error below 5e-4
    assert abs(dropped.float().mean().item() - p) < 0.002
    kept = ~dropped
    torch.testing.assert_close(y[kept], x[kept] / (1 - p))


def test_neighbouring_elements_are_independent():
    # four elements share one 64-bit word: their masks must not be correlated
    torch.manual_seed(1)
    d = dropout(torch.ones(400_000), 0.5).view(-1, 4) == 0
    for a in range(4):
        for b in range(a + 1, 4):
            assert abs((d[:, a] & d[:, b]).float().mean().item() - 0.25) < 0.005


def test_gradient_is_the_scaled_mask():
    torch.manual_seed(2)
    x = torch.randn(64, 33, requires_grad=True)
    y = dropout(x, 0.2)
    y.sum().backward()
    expected = (y != 0).float() / 0.8
    torch.testing.assert_close(x.grad, expected)


def test_seeded_and_resumable():
    x = torch.ones(10_000)
    torch.manual_seed(3)
    a = dropout(x, 0.1)
    state = torch.get_rng_state()
    b = dropout(x, 0.1)
    torch.manual_seed(3)
    assert torch.equal(dropout(x, 0.1), a)
    torch.set_rng_state(state)
    assert torch.equal(dropout(x, 0.1), b)
    assert not torch.equal(a, b)


def test_identity_cases_and_module():
    x = torch.randn(5, 7)
    assert dropout(x, 0.0) is x
    assert dropout(x, 0.5, training=False) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    m = CheapDropout(0.3)
    m.eval()
    assert m(x) is x
    m.train()
    assert (m(torch.ones(1000)) == 0).any()
    assert "p=0.3" in repr(m)
    with pytest.raises(ValueError, match="dropout probability"):
        CheapDropout(1.5)


def test_non_contiguous_and_bfloat16_inputs():
    torch.manual_seed(4)
    x = torch.ones(50, 40).t()
    y = dropout(x, 0.25)
    assert y.shape == (40, 50) and torch.isin(y, torch.tensor([0.0, 1 / 0.75])).all()
    z = dropout(torch.ones(1000, dtype=torch.bfloat16), 0.25)
    assert z.dtype == torch.bfloat16
