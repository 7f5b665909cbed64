import pytest
import torch

from fastmeta import ops, reference
from fastmeta.testing import (
    DEVICES,
    assert_close_to_reference,
    compare_with_reference,
    dtypes_for,
    randn,
    run_until_device_assertion,
)


def labels_covering_all_classes(B, S, N, device):
    """Random labels in which every class appears at least once per task."""
    assert S >= N
    labels = (
        torch.stack([torch.cat([torch.arange(N), torch.randint(0, N, (S - N,))])[torch.randperm(S)] for _ in range(B)])
        if B
        else torch.zeros(0, S, dtype=torch.long)
    )
    return labels.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,S,N,D", [(1, 1, 1, 1), (2, 25, 5, 1600), (3, 17, 7, 3), (0, 5, 5, 2), (4, 9, 9, 5)])
def test_matches_reference(device, B, S, N, D):
    for dtype in dtypes_for(device):
        support = randn(B, S, D, dtype=dtype, device=device, requires_grad=True)
        labels = labels_covering_all_classes(B, S, N, device)
        (out,), _ = compare_with_reference(
            lambda s: ops.class_prototypes(s, labels, N), lambda s: reference.class_prototypes(s, labels, N), [support]
        )
        assert out.dtype == dtype


@pytest.mark.parametrize("device", DEVICES)
def test_unbatched(device):
    support = randn(10, 4, dtype=torch.float64, device=device)
    labels = (torch.arange(10) % 5).to(device)
    assert_close_to_reference(ops.class_prototypes(support, labels, 5), reference.class_prototypes(support, labels, 5))


def test_class_without_support_names_task_and_class():
    support = randn(3, 4, 2)
    labels = torch.tensor([[0, 1, 2, 0], [0, 1, 1, 0], [2, 1, 0, 0]])
    with pytest.raises(RuntimeError, match="class 2 has no support examples in task 1"):
        ops.class_prototypes(support, labels, 3)


def test_label_out_of_range():
    support = randn(1, 3, 2)
    for bad in (3, -1):
        labels = torch.tensor([[0, bad, 2]])
        with pytest.raises(RuntimeError, match=rf"labels\[0, 1\] = {bad} is out of range for num_classes = 3"):
            ops.class_prototypes(support, labels, 3)


# On CUDA, label values are device-side assertions (no host synchronisation
# per call), which end the process's CUDA context: each runs in a subprocess.
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize(
    "labels,message",
    [
        ("[[0, 1, 2, 0], [0, 1, 1, 0]]", "a class has no support examples"),
        ("[[0, 3, 2, 1]]", "a label is out of range"),
    ],
)
def test_bad_labels_on_cuda_are_device_side_assertions(labels, message):
    output = run_until_device_assertion(
        f"import torch, fastmeta; labels = torch.tensor({labels}, device='cuda'); "
        "support = torch.randn(*labels.shape, 2, device='cuda'); "
        "fastmeta.ops.class_prototypes(support, labels, 3); torch.cuda.synchronize()"
    )
    assert message in output


def test_bad_arguments_name_the_argument():
    support = torch.randn(2, 4, 3)
    labels = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(TypeError, match="labels must have dtype torch.int64"):
        ops.class_prototypes(support, labels.int(), 1)
    with pytest.raises(TypeError, match="support must be a floating-point tensor"):
        ops.class_prototypes(support.long(), labels, 1)
    with pytest.raises(ValueError, match="labels of shape"):
        ops.class_prototypes(support, labels[:, :3], 1)
    with pytest.raises(ValueError, match="num_classes must be a non-negative int"):
        ops.class_prototypes(support, labels, -2)
