"""easyfsl's inference-time methods (SimpleShot, Finetune,
TransductiveFinetuning, TIM, PT-MAP, BD-CSPN, LaplacianShot) and FEAT against
their papers' equations written episode by episode in fastmeta.reference."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastmeta import reference
from fastmeta.bench import baselines as bl
from fastmeta.nn import (
    BDCSPN,
    FEAT,
    PTMAP,
    TIM,
    Finetune,
    LaplacianShot,
    MultiHeadAttention,
    SimpleShot,
    TransductiveFinetuning,
)

DOUBLE = dict(dtype=torch.float64)

# (module class, reference, the hyperparameters of both: module's, reference's)
FEW_STEPS = dict(fine_tuning_steps=4, fine_tuning_lr=0.05)
METHODS = {
    "SimpleShot": (SimpleShot, reference.simple_shot_scores, {}, {}),
    "Finetune": (
        Finetune,
        reference.finetune_scores,
        dict(FEW_STEPS, temperature=3.0),
        dict(steps=4, lr=0.05, temperature=3.0),
    ),
    "TransductiveFinetuning": (
        TransductiveFinetuning,
        reference.transductive_finetuning_scores,
        dict(FEW_STEPS, temperature=2.0),
        dict(steps=4, lr=0.05, temperature=2.0),
    ),
    "TIM": (
        TIM,
        reference.tim_scores,
        dict(FEW_STEPS, marginal_entropy_weight=0.7, conditional_entropy_weight=0.3),
        dict(steps=4, lr=0.05, marginal_entropy_weight=0.7, conditional_entropy_weight=0.3),
    ),
    "PTMAP": (
        PTMAP,
        reference.pt_map_scores,
        dict(fine_tuning_steps=3, lambda_regularization=2.0),
        dict(steps=3, lam=2.0),
    ),
    "BDCSPN": (BDCSPN, reference.bd_cspn_scores, {}, {}),
    "LaplacianShot": (LaplacianShot, reference.laplacian_shot_scores, dict(knn=4), dict(knn=4)),
}
# Sinkhorn stops once an iteration changes the rows' sums by less than 1e-6:
# the same plan computed in a different order may stop one iteration apart,
# so PT-MAP's results agree to that threshold (a lambda that converges in
# tens of iterations, not hundreds, keeps what one iteration changes near
# it); every other method to float64 rounding.
TOLERANCE = {"PTMAP": 1e-5}


def features(batch, shots_per_class, queries, dim, seed=0):
    """Support features of ``shots_per_class[c]`` examples of class c
    (shuffled), and query features, of ``batch`` episodes."""
    g = torch.Generator().manual_seed(seed)
    ways = len(shots_per_class)
    labels = torch.arange(ways).repeat_interleave(torch.tensor(shots_per_class))
    labels = torch.stack([labels[torch.randperm(len(labels), generator=g)] for _ in range(batch)])
    support = torch.randn(batch, len(labels[0]), dim, generator=g, **DOUBLE) + labels[..., None] * 0.5
    query = (
        torch.randn(batch, queries, dim, generator=g, **DOUBLE)
        + torch.randint(ways, (batch, queries, 1), generator=g) * 0.5
    )
    return support, labels, query


def reference_of(name, support, labels, query):
    _, ref, _, ref_options = METHODS[name]
    results = [ref(support[b], labels[b], query[b], **ref_options) for b in range(len(support))]
    return torch.stack([p for p, _ in results]), torch.stack([s for _, s in results])


def build(name, backbone=None, **options):
    cls, _, module_options, _ = METHODS[name]
    return cls(backbone, **{**module_options, **options})


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize(
    "batch, shots_per_class, queries, dim",
    [(3, [2, 2, 2, 2, 2], 15, 11), (2, [1, 3, 2], 7, 5), (1, [4], 5, 1), (4, [1] * 7, 9, 33)],
)
def test_batched_scores_equal_the_papers_equations_episode_by_episode(name, batch, shots_per_class, queries, dim):
    support, labels, query = features(batch, shots_per_class, queries, dim)
    _, want = reference_of(name, support, labels, query)
    got = build(name).score_episodes(support, labels, query)
    torch.testing.assert_close(got, want, atol=TOLERANCE.get(name, 1e-12), rtol=0)


@pytest.mark.parametrize("name", METHODS)
def test_easyfsl_forward_keeps_the_refined_prototypes_and_refines_them_again(name):
    support, labels, query = features(1, [3, 2, 3], 8, 6, seed=1)
    model = build(name)
    model.process_support_set(support[0], labels[0])
    support_features = model.compute_features(support[0])  # PT-MAP's are power-transformed
    torch.testing.assert_close(model.prototypes, reference.simple_shot_scores(support_features, labels[0], query[0])[0])
    assert torch.equal(model.support_labels, labels[0]) and torch.equal(model.support_features, support_features)
    want_prototypes, want_scores = reference_of(name, support, labels, query)
    tolerance = dict(atol=TOLERANCE.get(name, 1e-12), rtol=0)
    torch.testing.assert_close(model(query[0]), want_scores[0], **tolerance)
    torch.testing.assert_close(model.prototypes, want_prototypes[0], **tolerance)
    again = model(query[0])  # easyfsl's forward starts from the prototypes it left
    if name in ("Finetune", "TransductiveFinetuning", "TIM", "PTMAP"):
        assert not torch.allclose(again, want_scores[0])


@pytest.mark.parametrize("name", METHODS)
def test_runs_under_no_grad_and_gives_the_same_scores(name):
    support, labels, query = features(2, [2, 2, 2], 6, 4)
    model = build(name)
    with torch.no_grad():
        scores = model.score_episodes(support, labels, query)
    torch.testing.assert_close(scores, model.score_episodes(support, labels, query))


def test_fine_tuning_methods_freeze_the_backbone_and_return_scores_without_gradient():
    support, labels, query = features(2, [2, 2, 2], 6, 4)
    for cls in (Finetune, TransductiveFinetuning, TIM):
        backbone = nn.Linear(4, 3).double()
        model = cls(backbone, fine_tuning_steps=2)
        assert not any(p.requires_grad for p in backbone.parameters())
        assert not model.score_episodes(support, labels, query).requires_grad
        assert cls.is_transductive() == (cls is not Finetune)


@pytest.mark.parametrize("name", ["SimpleShot", "BDCSPN", "PTMAP", "LaplacianShot"])
def test_gradients_of_the_differentiable_methods_equal_the_reference(name):
    support, labels, query = features(2, [2, 3, 2], 7, 5, seed=3)
    support.requires_grad_(), query.requires_grad_()
    weights = torch.randn(2, 7, 3, generator=torch.Generator().manual_seed(4), **DOUBLE)
    got = torch.autograd.grad((build(name).score_episodes(support, labels, query) * weights).sum(), (support, query))
    want = torch.autograd.grad((reference_of(name, support, labels, query)[1] * weights).sum(), (support, query))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4 if name == "PTMAP" else 1e-10, rtol=0)


def test_simple_shot_gradcheck():
    support, labels, query = features(2, [2, 1, 2], 4, 3)
    model = SimpleShot()
    torch.autograd.gradcheck(
        lambda s, q: model.score_episodes(s, labels, q), (support.requires_grad_(), query.requires_grad_())
    )


def test_simple_shot_with_centering_and_l2_normalisation_is_cl2n():
    support, labels, query = features(2, [2, 2, 2], 6, 5)
    mean = torch.randn(5, **DOUBLE)
    model = SimpleShot(feature_centering=mean, feature_normalization=2)
    centred = [F.normalize(t - mean, dim=-1) for t in (support, query)]
    want = torch.stack([reference.simple_shot_scores(centred[0][b], labels[b], centred[1][b])[1] for b in range(2)])
    torch.testing.assert_close(model.score_episodes(support, labels, query), want)


def test_assignment_methods_return_probabilities_and_use_softmax_applies_the_temperature():
    support, labels, query = features(2, [2, 2, 2], 6, 4)
    for cls in (PTMAP, LaplacianShot):
        scores = cls(use_softmax=True).score_episodes(support, labels, query)
        torch.testing.assert_close(scores, cls().score_episodes(support, labels, query))
        torch.testing.assert_close(scores.sum(-1), torch.ones(2, 6, **DOUBLE), atol=1e-3, rtol=0)
    tim = TIM(fine_tuning_steps=1, temperature=10.0)
    torch.testing.assert_close(
        TIM(fine_tuning_steps=1, temperature=10.0, use_softmax=True).score_episodes(support, labels, query),
        (10.0 * tim.score_episodes(support, labels, query)).softmax(-1),
    )


def test_sinkhorn_plan_equals_the_reference_at_a_tight_threshold():
    support, labels, query = features(3, [2] * 5, 15, 11)
    model = PTMAP(lambda_regularization=2.0)
    prototypes = reference.simple_shot_scores(support[0], labels[0], query[0])[0].abs()[None]
    query = model.compute_features(query[0])[None]
    got = model.assignments(query, prototypes, epsilon=1e-13)
    want = bl._sinkhorn(torch.cdist(query[0], prototypes[0]) ** 2, 2.0, epsilon=1e-13)
    torch.testing.assert_close(got[0], want, atol=1e-11, rtol=0)


def test_pt_map_assignments_do_not_underflow_on_distant_features():
    support, labels, query = features(1, [2, 2], 4, 3)
    support, query = support.float() * 30, query.float() * 30
    model = PTMAP(fine_tuning_steps=1)
    cost = torch.cdist(model.compute_features(query[0]), model.compute_features(support[0])) ** 2
    assert (torch.exp(-10 * cost) == 0).all(1).any()  # exp(-lambda * cost) alone: a row of zeros, NaN plans
    assert torch.isfinite(model.score_episodes(support, labels, query)).all()


@pytest.mark.parametrize("name", METHODS)
def test_no_episodes_and_no_queries(name):
    support, labels, query = features(2, [2, 2], 0, 3)
    assert build(name).score_episodes(support, labels, query).shape == (2, 0, 2)
    assert build(name).score_episodes(support[:0], labels[:0], query[:0], ways=2).shape == (0, 0, 2)


def test_bad_input_messages():
    support, labels, query = features(1, [2, 2], 3, 3)
    with pytest.raises(ValueError, match="knn = 4 needs episodes of at least 4 queries, got 3"):
        LaplacianShot(knn=4).score_episodes(support, labels, query)
    with pytest.raises(RuntimeError, match="call process_support_set"):
        TIM()(query[0])
    with pytest.raises(ValueError, match="support_labels must lie in 0..1"):
        PTMAP().score_episodes(support, labels + 1, query, ways=2)
    with pytest.raises(ValueError, match="one flat feature vector per image"):
        Finetune(nn.Identity()).process_support_set(torch.randn(4, 3, 2), labels[0])


# FEAT


@pytest.mark.parametrize("heads, dim, metric", [(1, 6, "euclidean"), (3, 5, "sqeuclidean")])
def test_feat_batched_scores_equal_the_reference_episode_by_episode(heads, dim, metric):
    support, labels, query = features(3, [2, 1, 3, 2], 7, dim)
    attention = MultiHeadAttention(heads, dim, 4, 3).double().eval()
    model = FEAT(attention_module=attention, metric=metric)
    want = torch.stack(
        [reference.feat_scores(nn.Identity(), attention, support[b], labels[b], query[b], metric) for b in range(3)]
    )
    torch.testing.assert_close(model.score_episodes(support, labels, query), want)
    model.process_support_set(support[0], labels[0])
    torch.testing.assert_close(model(query[0]), want[0])
    assert model.prototypes.shape == (4, dim)


def test_feat_gradcheck_and_default_attention():
    support, labels, query = features(2, [1, 2], 3, 4)
    model = FEAT(feature_dimension=4).double().eval()
    assert model.attention_module.w_qs.weight.shape == (4, 4)
    torch.autograd.gradcheck(
        lambda s, q: model.score_episodes(s, labels, q), (support.requires_grad_(), query.requires_grad_())
    )
    with pytest.raises(ValueError, match="FEAT: give an attention_module, or the feature_dimension"):
        FEAT()


def test_feat_attention_dropout_only_in_training():
    attention = MultiHeadAttention(2, 8, 4, 4, dropout=0.5).double()
    x = torch.randn(3, 5, 8, **DOUBLE)
    attention.eval()
    torch.testing.assert_close(attention(x, x, x)[0], attention(x, x, x)[0])
    attention.train()
    assert not torch.allclose(attention(x, x, x)[0], attention(x, x, x)[0])
