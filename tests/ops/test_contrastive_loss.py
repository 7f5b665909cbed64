import pytest
import torch

from fastmeta import ops, reference
from fastmeta.testing import DEVICES, compare_with_reference, dtypes_for, randn


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 1), (37, 5), (3, 4, 9), (0, 3), (6, 0)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_reference(device, shape, reduction):
    for dtype in dtypes_for(device):
        if reduction == "mean" and shape[0] == 0:
            continue
        x1 = randn(*shape, dtype=dtype, device=device, requires_grad=True)
        x2 = randn(*shape, dtype=dtype, device=device, requires_grad=True)
        same = (torch.rand(shape[:-1], device=device) > 0.5).to(dtype).requires_grad_()
        (out,), _ = compare_with_reference(
            lambda *t: ops.contrastive_loss(*t, 2.0, reduction),
            lambda *t: reference.contrastive_loss(*t, 2.0, reduction),
            (x1, x2, same),
        )
        assert out.dtype == dtype


def test_bool_same_and_zero_distance():
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    same = torch.tensor([True, False, True, False])
    loss = ops.contrastive_loss(x, x.detach(), same, margin=1.5, reduction="none")
    assert torch.allclose(loss, torch.tensor([0.0, 2.25, 0.0, 2.25], dtype=torch.float64))
    (g,) = torch.autograd.grad(loss.sum(), x)
    assert torch.all(g == 0)


def test_bad_arguments_name_the_argument():
    x1, x2, same = torch.randn(4, 3), torch.randn(4, 3), torch.ones(4)
    with pytest.raises(ValueError, match="x1 and x2 must have the same shape"):
        ops.contrastive_loss(x1, x2[:3], same)
    with pytest.raises(ValueError, match=r"same must have shape \[4\]"):
        ops.contrastive_loss(x1, x2, same[:2])
    with pytest.raises(TypeError, match="same must be a bool or floating-point tensor"):
        ops.contrastive_loss(x1, x2, same.long())
    with pytest.raises(TypeError, match="x2 has dtype torch.float64 but x1 has dtype torch.float32"):
        ops.contrastive_loss(x1, x2.double(), same)
    with pytest.raises(ValueError, match="unknown reduction 'avg'"):
        ops.contrastive_loss(x1, x2, same, reduction="avg")
