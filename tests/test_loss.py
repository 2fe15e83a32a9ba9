"""mt.loss: the fused label-smoothed cross-entropy equals torch's, value and gradient."""
import pytest
import torch
import torch.nn.functional as F

from mt.loss import smoothed_cross_entropy


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_matches_torch_cross_entropy(eps):
    torch.manual_seed(0)
    logits = (torch.randn(37, 50) * 4).requires_grad_()
    target = torch.randint(0, 50, (37,))
    loss, nll = smoothed_cross_entropy(logits, target, eps)
    loss.backward()
    ours = logits.grad.clone()
    logits.grad = None
    ref = F.cross_entropy(logits, target, label_smoothing=eps, reduction="sum")
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(nll, F.cross_entropy(logits.detach(), target, reduction="sum"))
    torch.testing.assert_close(ours, logits.grad)
    assert not nll.requires_grad


def test_gradient_scales_with_the_upstream_gradient():
    torch.manual_seed(1)
    logits = torch.randn(5, 9, requires_grad=True)
    target = torch.tensor([0, 3, 8, 2, 2])
    loss, _ = smoothed_cross_entropy(logits, target, 0.1)
    (loss * 2.5).backward()
    expected = torch.autograd.grad(2.5 * F.cross_entropy(logits, target, label_smoothing=0.1, reduction="sum"), logits)[0]
    torch.testing.assert_close(logits.grad, expected)
