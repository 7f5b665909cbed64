"""fastmeta.nn.MetaNetwork against its episode-by-episode eager formulation."""

import pytest
import torch

from fastmeta import nn as fnn
from fastmeta import reference


def metanet(**kwargs):
    torch.manual_seed(0)
    return fnn.MetaNetwork(feature_dimension=12, ways=4, hidden=7, key_dimension=5, **kwargs).double()


def episode(B=3, ways=4, shots=2, queries=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    support = torch.randn(B, ways * shots, 12, generator=g, dtype=torch.float64)
    labels = torch.arange(ways).repeat_interleave(shots).expand(B, -1)
    query = torch.randn(B, queries, 12, generator=g, dtype=torch.float64)
    return support, labels, query, torch.randint(0, ways, (B, queries), generator=g)


@pytest.mark.parametrize("shots", [1, 3])
def test_equals_its_eager_formulation(shots):
    model = metanet()
    support, labels, query, query_labels = episode(shots=shots)
    support.requires_grad_()
    scores = model.score_episodes(support, labels, query)
    expected = reference.metanet_scores(model, support, labels, query)
    assert scores.shape == (3, 3, 4)
    torch.testing.assert_close(scores, expected)
    leaves = [support, *model.parameters()]
    loss = torch.nn.functional.cross_entropy(expected.flatten(0, 1), query_labels.flatten())
    for a, b in zip(
        torch.autograd.grad(model.loss(support, labels, query, query_labels), leaves), torch.autograd.grad(loss, leaves)
    ):
        torch.testing.assert_close(a, b)


def test_every_parameter_learns_and_fast_weights_come_from_the_support_set():
    model = metanet()
    support, labels, query, query_labels = episode()
    model.loss(support, labels, query, query_labels).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    other = support.clone()
    other[0, 0] += 1.0
    a, b = model.score_episodes(support, labels, query), model.score_episodes(other, labels, query)
    assert not torch.allclose(a[0], b[0])
    torch.testing.assert_close(a[1:], b[1:])  # episodes do not share fast weights


def test_nan_stays_in_its_episode():
    model = metanet()
    support, labels, query, _ = episode()
    support[1, 2, 0] = float("nan")
    scores = model.score_episodes(support, labels, query)
    assert scores[1].isnan().any() and scores[[0, 2]].isfinite().all()


def test_bad_input_messages():
    model = metanet()
    support, labels, query, _ = episode(ways=3)
    with pytest.raises(ValueError, match="built for ways = 4, got episodes of 3 classes"):
        model.score_episodes(support, labels, query)
    support, labels, query, _ = episode()
    with pytest.raises(ValueError, match="the backbone gives 11 features, but feature_dimension is 12"):
        model.score_episodes(support[..., :11], labels, query[..., :11])
    with pytest.raises(ValueError, match="every class 0..3 needs at least one support example"):
        model.score_episodes(support, torch.zeros_like(labels), query, ways=4)
    with pytest.raises(ValueError, match="key_dimension must be a positive integer, got 0"):
        fnn.MetaNetwork(key_dimension=0)
