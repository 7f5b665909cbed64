"""FewShotClassifier's easyfsl interface: feature centering and
normalisation, the attributes process_support_set keeps, and loading the
state dicts easyfsl saves."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastmeta.nn import (
    FewShotClassifier,
    MatchingNetworks,
    PrototypicalNetworks,
    RelationNetworks,
    easyfsl_relation_module,
)


def test_base_forward_raises_not_implemented_error():
    with pytest.raises(NotImplementedError, match="FewShotClassifier scores no queries"):
        FewShotClassifier(nn.Linear(3, 3))(None)


def test_feature_centering_and_normalization():
    features_ = torch.rand(10, 4)
    assert torch.equal(FewShotClassifier().compute_features(features_), features_)
    centre = torch.rand(4)
    torch.testing.assert_close(
        FewShotClassifier(feature_centering=centre).compute_features(features_), features_ - centre
    )
    ones = torch.ones(10, 2)
    torch.testing.assert_close(FewShotClassifier(feature_normalization=2).compute_features(ones), ones / 2**0.5)
    torch.testing.assert_close(FewShotClassifier(feature_normalization=1).compute_features(ones), ones / 2)
    both = FewShotClassifier(feature_centering=centre, feature_normalization=2).compute_features(features_)
    torch.testing.assert_close(both, F.normalize(features_ - centre, dim=1))


def test_feature_centering_moves_with_the_module_and_stays_out_of_its_state_dict():
    model = PrototypicalNetworks(nn.Linear(3, 4), feature_centering=torch.rand(4))
    assert "feature_centering" not in model.state_dict()
    assert model.double().feature_centering.dtype == torch.float64
    PrototypicalNetworks(nn.Linear(3, 4)).load_state_dict(model.state_dict())


def test_process_support_set_keeps_easyfsl_attributes_for_every_method():
    support = torch.randn(5, 3, dtype=torch.float64)
    labels = torch.tensor([1, 0, 1, 2, 0])
    model = PrototypicalNetworks(metric="euclidean")
    model.process_support_set(support, labels)
    assert torch.equal(model.support_features, support) and torch.equal(model.support_labels, labels)
    torch.testing.assert_close(model.prototypes, torch.stack([support[labels == c].mean(0) for c in range(3)]))
    assert not PrototypicalNetworks.is_transductive()


def test_matching_networks_load_easyfsl_state_dicts():
    torch.manual_seed(0)
    model = MatchingNetworks(nn.Linear(4, 6), feature_dimension=6).eval()
    renamed = {
        k.replace("support_encoder.", "support_features_encoder.").replace(
            "query_encoder.", "query_features_encoding_cell."
        ): v
        for k, v in model.state_dict().items()
    }
    assert (
        "query_features_encoding_cell.weight_ih" in renamed
        and "support_features_encoder.weight_hh_l0_reverse" in renamed
    )
    loaded = MatchingNetworks(nn.Linear(4, 6), feature_dimension=6).eval()
    loaded.load_state_dict(renamed)
    support, labels, query = torch.randn(6, 4), torch.arange(3).repeat(2), torch.randn(5, 4)
    want = model.score_episodes(support, labels, query)
    torch.testing.assert_close(loaded.score_episodes(support, labels, query), want, rtol=0, atol=0)
    wrapped = nn.Sequential(loaded)  # under a prefix too
    wrapped.load_state_dict({"0." + k: v for k, v in renamed.items()})


# easyfsl's default relation module's state dict keys (easyfsl 1.5.0)
EASYFSL_RELATION_KEYS = [
    f"{layer}.{name}"
    for layer, names in [
        ("0.0", ["weight", "bias"]),
        ("0.1", ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]),
        ("1.0", ["weight", "bias"]),
        ("1.1", ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]),
        ("3", ["weight", "bias"]),
        ("5", ["weight", "bias"]),
    ]
    for name in names
]


def test_easyfsl_relation_module_has_easyfsl_names_and_scores_pairs():
    module = easyfsl_relation_module(4)
    assert sorted(module.state_dict()) == sorted(EASYFSL_RELATION_KEYS)
    assert module(torch.randn(6, 8, 7, 7)).shape == (6, 1)
    model = RelationNetworks(nn.Identity(), feature_dimension=4, relation_module=module)
    scores = model.score_episodes(torch.randn(2, 3, 4, 7, 7), torch.arange(3).expand(2, 3), torch.randn(2, 5, 4, 7, 7))
    assert scores.shape == (2, 5, 3) and ((scores > 0) & (scores < 1)).all()


def test_an_easyfsl_relation_state_dict_in_the_default_module_says_how_to_load_it():
    easyfsl_like = RelationNetworks(nn.Identity(), feature_dimension=4, relation_module=easyfsl_relation_module(4))
    with pytest.raises(RuntimeError, match=r"relation_module=easyfsl_relation_module\(feature_dimension\)"):
        RelationNetworks(nn.Identity(), feature_dimension=4).load_state_dict(easyfsl_like.state_dict())


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8])
def test_every_method_takes_labels_of_any_integer_dtype(dtype):
    from fastmeta.nn import (
        BDCSPN,
        FEAT,
        PTMAP,
        TIM,
        FewShotGNN,
        Finetune,
        LaplacianShot,
        MetaNetwork,
        SiameseNetworks,
        SimpleShot,
        TransductiveFinetuning,
    )

    torch.manual_seed(0)
    models = [
        PrototypicalNetworks(),
        MatchingNetworks(feature_dimension=4),
        SiameseNetworks(feature_dimension=4),
        FewShotGNN(feature_dimension=4, ways=2),
        MetaNetwork(feature_dimension=4, ways=2),
        SimpleShot(),
        Finetune(fine_tuning_steps=1),
        TransductiveFinetuning(fine_tuning_steps=1),
        TIM(fine_tuning_steps=1),
        PTMAP(fine_tuning_steps=1),
        BDCSPN(),
        LaplacianShot(knn=2),
        FEAT(feature_dimension=4),
    ]
    support, query = torch.randn(2, 4, 4), torch.randn(2, 3, 4)
    labels, query_labels = torch.tensor([0, 1, 0, 1]), torch.tensor([1, 0, 1])
    for model in models:
        model.eval()  # FEAT's attention dropout would differ between the two calls
        want = model.score_episodes(support, labels.expand(2, 4), query)
        got = model.score_episodes(support, labels.to(dtype).expand(2, 4), query)
        torch.testing.assert_close(got, want, msg=type(model).__name__)
        model.process_support_set(support[0], labels.to(dtype))
        assert model(query[0]).shape == (3, 2)
        if not isinstance(model, (Finetune, TIM, PTMAP, BDCSPN, SimpleShot)):
            model.loss(support, labels.to(dtype).expand(2, 4), query, query_labels.to(dtype).expand(2, 3))
