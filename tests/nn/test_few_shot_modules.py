"""The backbones and the metric-based few-shot modules against their
plain-PyTorch (easyfsl-style) formulations in fastmeta.reference."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastmeta import reference
from fastmeta.nn import (
    ChannelsLastConv2d,
    Conv4,
    MatchingNetworks,
    PrototypicalNetworks,
    RelationModule,
    RelationNetworks,
    ResNet12,
    SiameseNetworks,
)
from fastmeta.nn.relation import _is_relu_pool
from fastmeta.testing import DEVICES, compare_with_reference, randn

DOUBLE = dict(dtype=torch.float64)


def episode(ways, shots, queries, image_shape, batch=None, device="cpu", seed=0):
    """Random images and labels of one episode (or ``batch`` episodes), with
    the support labels shuffled."""
    g = torch.Generator().manual_seed(seed)
    lead = () if batch is None else (batch,)
    support = torch.randn(*lead, ways * shots, *image_shape, generator=g, **DOUBLE)
    query = torch.randn(*lead, ways * queries, *image_shape, generator=g, **DOUBLE)
    order = torch.randperm(ways * shots, generator=g)
    support_labels = torch.arange(ways).repeat_interleave(shots)[order].expand(*lead, -1)
    query_labels = torch.randint(0, ways, (*lead, ways * queries), generator=g)
    return [t.contiguous().to(device) for t in (support, support_labels, query, query_labels)]


def mlp_backbone(features=6, image=(1, 3, 3)):
    """A backbone without batch norm, so per-episode and batched calls agree."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(int(torch.tensor(image).prod()), 10), nn.Tanh(), nn.Linear(10, features)
    ).double()


def map_backbone(channels=4):
    return nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.Tanh()).double()


def grads(loss, module):
    params = [p for p in module.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True)


def assert_same_grads(a, b):
    for x, y in zip(a, b):
        if x is None or y is None:
            assert x is None and y is None
        else:
            torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-10)


def models(device="cpu"):
    """(model, reference scores of one episode, image shape) per method."""
    torch.manual_seed(0)
    proto = PrototypicalNetworks(mlp_backbone())
    proto_sq = PrototypicalNetworks(mlp_backbone(), metric="sqeuclidean")
    matching = MatchingNetworks(mlp_backbone(), feature_dimension=6).double()
    relation = RelationNetworks(map_backbone(), feature_dimension=4).double()
    koch = SiameseNetworks(mlp_backbone(), feature_dimension=6).double()
    contrastive = SiameseNetworks(mlp_backbone(), "contrastive")
    return [
        (proto, lambda s, l, q: reference.prototypical_scores(proto.backbone, s, l, q, "euclidean"), (1, 3, 3)),
        (proto_sq, lambda s, l, q: reference.prototypical_scores(proto_sq.backbone, s, l, q, "sqeuclidean"), (1, 3, 3)),
        (
            matching,
            lambda s, l, q: reference.matching_scores(
                matching.backbone, matching.support_encoder, matching.query_encoder, s, l, q
            ),
            (1, 3, 3),
        ),
        (
            relation,
            lambda s, l, q: reference.relation_scores(relation.backbone, relation.relation_module, s, l, q),
            (1, 5, 5),
        ),
        (koch, lambda s, l, q: reference.siamese_scores(koch.backbone, koch.verifier, s, l, q), (1, 3, 3)),
        (contrastive, lambda s, l, q: reference.siamese_scores(contrastive.backbone, None, s, l, q), (1, 3, 3)),
    ]


METHODS = ["proto-euclidean", "proto-sqeuclidean", "matching", "relation", "siamese-koch", "siamese-contrastive"]


@pytest.mark.parametrize("method", range(len(METHODS)), ids=METHODS)
@pytest.mark.parametrize("ways, shots, queries", [(5, 1, 3), (3, 4, 2), (1, 2, 1), (7, 3, 5)])
def test_easyfsl_interface_equals_reference(method, ways, shots, queries):
    model, reference_scores, image = models()[method]
    model.train()
    support, support_labels, query, _ = episode(ways, shots, queries, image, seed=ways + shots)
    model.process_support_set(support, support_labels)
    scores = model(query)
    expected = reference_scores(support, support_labels, query)
    assert scores.shape == (ways * queries, ways)
    torch.testing.assert_close(scores, expected, rtol=1e-9, atol=1e-10)
    weights = torch.randn_like(scores)
    assert_same_grads(grads((scores * weights).sum(), model), grads((expected * weights).sum(), model))


@pytest.mark.parametrize("method", range(len(METHODS)), ids=METHODS)
@pytest.mark.parametrize("batch, ways, shots, queries", [(3, 5, 2, 3), (1, 4, 1, 1), (4, 2, 3, 0)])
def test_batched_episodes_equal_per_episode_reference(method, batch, ways, shots, queries):
    model, reference_scores, image = models()[method]
    model.eval()  # batch norm with running statistics: episodes independent
    support, support_labels, query, query_labels = episode(ways, shots, queries, image, batch)
    scores = model.score_episodes(support, support_labels, query)
    expected = torch.stack([reference_scores(support[b], support_labels[b], query[b]) for b in range(batch)])
    assert scores.shape == (batch, ways * queries, ways)
    torch.testing.assert_close(scores, expected, rtol=1e-9, atol=1e-10)
    if queries:
        weights = torch.randn_like(scores)
        assert_same_grads(grads((scores * weights).sum(), model), grads((expected * weights).sum(), model))
    # one unbatched episode in, one out
    torch.testing.assert_close(model.score_episodes(support[0], support_labels[0], query[0]), expected[0])


@pytest.mark.parametrize("method", range(len(METHODS)), ids=METHODS)
def test_batched_episodes_in_train_mode_equal_each_episode_alone(method):
    """Batch norm in train mode: each episode's statistics are its own, as
    easyfsl's; with all episodes in one backbone call they span the batch."""
    model, reference_scores, image = models()[method]
    model.backbone = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        *([] if image[1] == 5 else [nn.Flatten(), nn.Linear(27, 6)]),
    ).double()
    if hasattr(model, "relation_module"):
        model.backbone[0] = nn.Conv2d(1, 4, 3, padding=1).double()
        model.backbone[1] = nn.BatchNorm2d(4).double()
    model.train()
    support, support_labels, query, _ = episode(3, 2, 4, image, batch=3)
    expected = torch.stack([reference_scores(support[b], support_labels[b], query[b]) for b in range(3)])
    torch.testing.assert_close(model.score_episodes(support, support_labels, query), expected)
    model.episodes_per_call = None
    assert not torch.allclose(model.score_episodes(support, support_labels, query), expected)


def test_prototypical_loss_is_fused_cross_entropy_of_scores():
    for metric in ("sqeuclidean", "euclidean", "cosine"):
        model = PrototypicalNetworks(mlp_backbone(), metric=metric)
        support, support_labels, query, query_labels = episode(5, 2, 3, (1, 3, 3), batch=2)
        loss = model.loss(support, support_labels, query, query_labels)
        scores = model.score_episodes(support, support_labels, query)
        expected = F.cross_entropy(scores.flatten(0, 1), query_labels.flatten())
        torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-12)
        assert_same_grads(grads(loss, model), grads(expected, model))


def test_losses_of_the_other_methods():
    support, support_labels, query, query_labels = episode(4, 2, 3, (1, 5, 5), batch=2)
    relation = RelationNetworks(map_backbone(), feature_dimension=4).double()
    scores = relation.score_episodes(support, support_labels, query)
    torch.testing.assert_close(
        relation.loss(support, support_labels, query, query_labels),
        F.mse_loss(scores, F.one_hot(query_labels, 4).double()),
    )
    support, support_labels, query, query_labels = episode(4, 2, 3, (1, 3, 3), batch=2)
    matching = MatchingNetworks(mlp_backbone(), feature_dimension=6).double()
    scores = matching.score_episodes(support, support_labels, query)
    torch.testing.assert_close(
        matching.loss(support, support_labels, query, query_labels),
        F.nll_loss(scores.flatten(0, 1), query_labels.flatten()),
    )
    same = (query_labels[:, :, None] == support_labels[:, None]).double()
    koch = SiameseNetworks(mlp_backbone(), feature_dimension=6).double()
    features = [koch.backbone(x.flatten(0, 1)).unflatten(0, x.shape[:2]) for x in (query, support)]
    logits = koch.verifier((features[0][:, :, None] - features[1][:, None]).abs()).squeeze(-1)
    torch.testing.assert_close(
        koch.loss(support, support_labels, query, query_labels), F.binary_cross_entropy_with_logits(logits, same)
    )
    contrastive = SiameseNetworks(mlp_backbone(), "contrastive", margin=2.0)
    features = [contrastive.backbone(x.flatten(0, 1)).unflatten(0, x.shape[:2]) for x in (query, support)]
    distance = torch.cdist(features[0], features[1])
    expected = (same * distance**2 + (1 - same) * (2.0 - distance).clamp(min=0) ** 2).mean()
    torch.testing.assert_close(contrastive.loss(support, support_labels, query, query_labels), expected)
    pairs = contrastive.verification_loss(support[0, :3], query[0, :3], same[0, :3, 0])
    assert pairs.shape == () and pairs.requires_grad


@pytest.mark.parametrize(
    "size, channels, momentum, pool",
    [
        (1, 3, 0.1, None),
        (5, 4, None, None),
        (7, 2, 0.5, None),
        (6, 1, 0.1, None),
        (6, 3, 0.1, nn.MaxPool2d(2)),
        (7, 2, 0.1, nn.MaxPool2d(3, 1, padding=1)),
    ],
)
def test_separable_relation_layer_equals_concatenation(size, channels, momentum, pool):
    """The separable first convolution and batch norm (and, with the default
    pooling, the fused ReLU and pooling of the pairs) equal the concatenation
    form: scores, gradients, running statistics, and in eval mode."""
    torch.manual_seed(size)
    module = RelationModule(channels, hidden_units=3).double()
    module.rest[0].momentum = momentum
    if pool is not None:
        module.rest[2] = pool
    assert _is_relu_pool(module.rest[1:3]) == (pool is None)
    with torch.no_grad():
        module.rest[0].weight.uniform_(0.5, 1.5)
        module.rest[0].bias.uniform_(-0.5, 0.5)
    twin = copy.deepcopy(module)
    prototypes = torch.randn(2, 3, channels, size, size, **DOUBLE, requires_grad=True)
    queries = torch.randn(2, 4, channels, size, size, **DOUBLE, requires_grad=True)

    def concatenation(m):
        pairs = torch.cat(
            [
                prototypes[:, None].expand(2, 4, 3, channels, size, size),
                queries[:, :, None].expand(2, 4, 3, channels, size, size),
            ],
            3,
        )
        return m(pairs.flatten(0, 2)).view(2, 4, 3)

    for _ in range(2):
        separable, concatenated = module.pair_scores(prototypes, queries), concatenation(twin)
        torch.testing.assert_close(separable, concatenated, rtol=1e-10, atol=1e-12)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(module.rest[0], name), getattr(twin.rest[0], name))
    weights = torch.randn_like(separable)
    a = torch.autograd.grad((separable * weights).sum(), [prototypes, queries, *module.parameters()])
    b = torch.autograd.grad((concatenated * weights).sum(), [prototypes, queries, *twin.parameters()])
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-11)
    module.eval()
    twin.eval()
    torch.testing.assert_close(module.pair_scores(prototypes, queries), concatenation(twin))


def test_separable_batch_norm_rejects_a_single_value_per_channel():
    module = RelationModule(2).double()
    with pytest.raises(ValueError, match="more than 1 value per channel when training, got 1"):
        module.pair_scores(torch.randn(1, 1, 2, 1, 1, **DOUBLE), torch.randn(1, 1, 2, 1, 1, **DOUBLE))


def test_custom_query_encoder_uses_the_step_by_step_attention_lstm():
    class MyCell(nn.LSTMCell):
        pass

    torch.manual_seed(1)
    model = MatchingNetworks(mlp_backbone(), feature_dimension=6, query_encoder=MyCell(12, 6)).double()
    support, support_labels, query, _ = episode(4, 2, 3, (1, 3, 3))
    model.process_support_set(support, support_labels)
    expected = reference.matching_scores(
        model.backbone, model.support_encoder, model.query_encoder, support, support_labels, query
    )
    torch.testing.assert_close(model(query), expected, rtol=1e-9, atol=1e-10)


def test_custom_relation_module_uses_the_concatenation():
    custom = nn.Sequential(nn.Flatten(), nn.Linear(2 * 4 * 25, 1), nn.Sigmoid(), nn.Flatten(0)).double()
    model = RelationNetworks(map_backbone(), feature_dimension=4, relation_module=custom)
    support, support_labels, query, _ = episode(3, 2, 2, (1, 5, 5))
    model.process_support_set(support, support_labels)
    torch.testing.assert_close(
        model(query), reference.relation_scores(model.backbone, custom, support, support_labels, query)
    )


@pytest.mark.parametrize("method", range(len(METHODS)), ids=METHODS)
def test_gradcheck_through_the_modules(method):
    model, _, image = models()[method]
    model.eval()
    support, support_labels, query, _ = episode(3, 2, 2, image, batch=2)
    support.requires_grad_()
    query.requires_grad_()
    torch.autograd.gradcheck(lambda s, q: model.score_episodes(s, support_labels, q), (support, query))


@pytest.mark.parametrize("device", DEVICES)
def test_modules_on_every_device_with_real_backbones(device):
    support, support_labels, query, query_labels = episode(5, 1, 2, (1, 28, 28), batch=2, device=device)
    support, query = support.float(), query.float()
    for model in (
        PrototypicalNetworks(Conv4(1)),
        MatchingNetworks(Conv4(1), feature_dimension=64),
        RelationNetworks(Conv4(1, pooled_blocks=2, flatten=False), feature_dimension=64),
        SiameseNetworks(Conv4(1), feature_dimension=64),
    ):
        model.to(device)
        loss = model.loss(support, support_labels, query, query_labels)
        loss.backward()
        assert torch.isfinite(loss) and all(p.grad is not None for p in model.backbone.parameters())
        assert model.score_episodes(support, support_labels, query).shape == (2, 10, 5)
        model.process_support_set(support[0], support_labels[0])
        assert model(query[0]).device.type == device


def test_use_softmax_gives_probabilities():
    model = PrototypicalNetworks(mlp_backbone(), use_softmax=True)
    support, support_labels, query, _ = episode(4, 2, 3, (1, 3, 3))
    model.process_support_set(support, support_labels)
    torch.testing.assert_close(model(query).sum(1), torch.ones(12, **DOUBLE))


def test_backbones():
    assert Conv4(1)(torch.zeros(2, 1, 28, 28)).shape == (2, 64)
    assert Conv4(3)(torch.zeros(2, 3, 84, 84)).shape == (2, 1600)
    assert Conv4(1, pooled_blocks=2, flatten=False)(torch.zeros(2, 1, 28, 28)).shape == (2, 64, 7, 7)
    assert Conv4(3, hidden_channels=32, flatten=False)(torch.zeros(1, 3, 84, 84)).shape == (1, 32, 5, 5)
    assert ResNet12(3)(torch.zeros(2, 3, 84, 84)).shape == (2, 640)
    assert ResNet12(1, channels=(8, 8, 16, 16), flatten=False)(torch.zeros(1, 1, 28, 28)).shape == (1, 16, 2, 2)
    with pytest.raises(ValueError, match="pooled_blocks must be in 0..4, got 5"):
        Conv4(1, pooled_blocks=5)


@pytest.mark.parametrize(
    "shape, out_channels, kernel, padding",
    [
        ((5, 1, 28, 28), 8, 3, 1),
        ((3, 3, 9, 11), 5, 3, 1),
        ((2, 6, 7, 5), 7, 1, 0),
        ((1, 2, 1, 1), 3, 3, 1),
        ((0, 3, 8, 8), 4, 3, 1),
    ],
)
def test_channels_last_conv_equals_conv2d(shape, out_channels, kernel, padding):
    """The same values and gradients as nn.Conv2d's, against the float64
    reference, with eager PyTorch's error in float32 as the tolerance; the
    output is channels-last, the weight's gradient in the default layout."""
    torch.manual_seed(0)
    conv = ChannelsLastConv2d(shape[1], out_channels, kernel, padding=padding)
    x = randn(*shape, requires_grad=True)
    weight, bias = (p.detach().clone().requires_grad_() for p in (conv.weight, conv.bias))
    out, _ = compare_with_reference(
        lambda x, w, b: torch.func.functional_call(conv, {"weight": w, "bias": b}, (x,)),
        lambda x, w, b: F.conv2d(x, w, b, padding=padding),
        [x, weight, bias],
    )
    assert shape[0] == 0 or out[0].is_contiguous(memory_format=torch.channels_last)
    conv(x).sum().backward()
    assert conv.weight.grad.is_contiguous() and conv.weight.is_contiguous()


def test_channels_last_conv_second_derivatives():
    """MAML differentiates through the layout change twice."""
    conv = ChannelsLastConv2d(2, 3, 3, padding=1).double()
    x = torch.randn(2, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    w = conv.weight.detach().clone().requires_grad_()

    def f(x, w):
        return torch.func.functional_call(conv, {"weight": w, "bias": conv.bias}, (x,)).tanh()

    assert torch.autograd.gradgradcheck(f, (x, w))


def test_backbones_keep_the_default_layout_and_state_dict():
    """Channels-last inside, NCHW outside: the features come back contiguous
    and an nn.Conv2d model's state dict loads with the same numbers."""
    torch.manual_seed(0)
    x = torch.randn(3, 3, 20, 20, dtype=torch.float64)
    for model in (Conv4(3, hidden_channels=8, flatten=False), ResNet12(3, channels=(4, 4, 8, 8), flatten=False)):
        model = model.double()
        plain = reference.default_layout(model)
        assert not any(isinstance(m, ChannelsLastConv2d) for m in plain.modules())
        plain.load_state_dict(model.state_dict())
        out = model(x)
        assert out.is_contiguous()
        torch.testing.assert_close(out, plain(x))
    assert isinstance(Conv4(1)[:2], nn.Sequential) and len(Conv4(1)[:-1]) == 4


def test_bad_input_messages():
    support, support_labels, query, query_labels = episode(3, 2, 2, (1, 28, 28))
    support, query = support.float(), query.float()
    flat_maps = PrototypicalNetworks(Conv4(1, flatten=False))
    with pytest.raises(
        ValueError,
        match=r"must return one flat feature vector per image, \[n, D\]; "
        r"got shape \[6, 64, 1, 1\]",
    ):
        flat_maps.process_support_set(support, support_labels)
    with pytest.raises(ValueError, match=r"RelationNetworks: the backbone must return one feature map"):
        RelationNetworks(Conv4(1), feature_dimension=64).process_support_set(support, support_labels)
    model = PrototypicalNetworks(Conv4(1))
    with pytest.raises(RuntimeError, match="call process_support_set"):
        model(query)
    with pytest.raises(ValueError, match=r"support_labels must lie in 0..2 .* got values in 0..3"):
        model.score_episodes(support, torch.tensor([0, 1, 1, 2, 2, 3]), query, ways=3)
    with pytest.raises(ValueError, match="every class 0..3 needs at least one support example"):
        model.score_episodes(support, support_labels, query, ways=4)
    with pytest.raises(ValueError, match=r"support_labels must lie in 0..2 .* got values in -1..2"):
        model.process_support_set(support, torch.tensor([-1, 0, 1, 1, 2, 2]))
    with pytest.raises(TypeError, match="support_labels must be integers, got torch.float32"):
        model.process_support_set(support, support_labels.float())
    with pytest.raises(ValueError, match=r"support_labels must have shape \[6\], got \[5\]"):
        model.process_support_set(support, support_labels[:5])
    with pytest.raises(ValueError, match="disagree on the episode shape"):
        model.score_episodes(support, support_labels[:5], query)
    with pytest.raises(ValueError, match="query has 2 episodes, support 1"):
        model.score_episodes(support[None], support_labels[None], torch.cat([query[None]] * 2))
    with pytest.raises(ValueError, match="query images .* and support images .* differ in shape"):
        model.score_episodes(support, support_labels, query[:, :, :20])
    with pytest.raises(ValueError, match=r"query_labels must have shape \[6\], got \[5\]"):
        model.loss(support, support_labels, query, query_labels[:5])
    with pytest.raises(TypeError, match="query_labels must be integers"):
        model.loss(support, support_labels, query, query_labels.float())
    with pytest.raises(ValueError, match="the support set is empty"):
        model.score_episodes(support[:0], support_labels[:0], query)
    with pytest.raises(ValueError, match="metric must be one of"):
        PrototypicalNetworks(metric="manhattan")
    with pytest.raises(ValueError, match="head must be one of"):
        SiameseNetworks(head="triplet")
    with pytest.raises(ValueError, match="the koch head needs feature_dimension"):
        SiameseNetworks(Conv4(1))
    with pytest.raises(ValueError, match="the backbone returns 64 features, feature_dimension is 32"):
        MatchingNetworks(Conv4(1), feature_dimension=32).process_support_set(support, support_labels)
    with pytest.raises(ValueError, match="the backbone returns 64 channels, feature_dimension is 8"):
        RelationNetworks(Conv4(1, flatten=False), feature_dimension=8).process_support_set(support, support_labels)
    with pytest.raises(ValueError, match="images1 .* must pair up"):
        SiameseNetworks(Conv4(1), "contrastive").verification_loss(support, query[:5], torch.ones(6))


@pytest.mark.parametrize("method", range(len(METHODS)), ids=METHODS)
def test_a_batch_of_no_episodes_gives_empty_scores(method):
    model, _, image_shape = models()[method]
    support, support_labels, query, _ = episode(3, 2, 2, image_shape, batch=2)
    scores = model.score_episodes(support[:0], support_labels[:0], query[:0], ways=3)
    assert scores.shape == (0, 6, 3)


def test_siamese_loss_checks_the_query_labels():
    support, support_labels, query, query_labels = episode(3, 2, 2, (1, 3, 3))
    model = SiameseNetworks(mlp_backbone(), feature_dimension=6).double()
    with pytest.raises(ValueError, match=r"SiameseNetworks: query_labels must lie in 0..2, got values in 0..3"):
        model.loss(support, support_labels, query, torch.tensor([0, 1, 2, 3, 0, 1]))
    with pytest.raises(ValueError, match=r"query_labels must lie in 0..2, got values in -1..2"):
        model.loss(support, support_labels, query, torch.tensor([0, 1, 2, -1, 0, 1]))
    assert model.loss(support, support_labels, query, query_labels).isfinite()


def test_numpy_integers_are_accepted_where_python_integers_are():
    from fastmeta.nn import MANN, FewShotGNN, MetaNetwork

    gnn = FewShotGNN(mlp_backbone(), feature_dimension=np.int64(6), ways=np.int64(3))
    assert gnn.ways == 3 and type(gnn.ways) is int
    assert MetaNetwork(mlp_backbone(), feature_dimension=np.int32(6), ways=np.int64(3)).ways == 3
    assert MANN(np.int64(4), np.int64(3)).num_classes == 3
