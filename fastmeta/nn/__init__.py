"""Drop-in modules built on fastmeta's ops: backbones, the metric-based
few-shot classifiers (easyfsl's interface, plus a batched one) and learned
optimizers."""

from .backbones import ChannelsLastConv2d, Conv4, ResNet12
from .feat import FEAT, MultiHeadAttention
from .few_shot import FewShotClassifier
from .gnn import FewShotGNN
from .kronecker import KroneckerLinear, KroneckerLSTM, KroneckerRNN
from .layers import Lambda, Scale
from .learned_optimizers import CoordinatewiseLSTM, MetaLearnerLSTM
from .mann import MANN
from .matching import MatchingNetworks
from .meta_layers import MetaModule, ParameterTransform
from .metanet import MetaNetwork
from .prototypical import PrototypicalClassifier, PrototypicalNetworks
from .refined_prototypes import BDCSPN, PTMAP, TIM, Finetune, LaplacianShot, SimpleShot, TransductiveFinetuning
from .relation import RelationModule, RelationNetworks, easyfsl_relation_module
from .siamese import SiameseNetworks

__all__ = [
    "BDCSPN",
    "ChannelsLastConv2d",
    "Conv4",
    "CoordinatewiseLSTM",
    "FEAT",
    "FewShotClassifier",
    "FewShotGNN",
    "Finetune",
    "KroneckerLinear",
    "KroneckerLSTM",
    "KroneckerRNN",
    "Lambda",
    "LaplacianShot",
    "MANN",
    "MatchingNetworks",
    "MetaLearnerLSTM",
    "MetaModule",
    "MetaNetwork",
    "MultiHeadAttention",
    "ParameterTransform",
    "PrototypicalClassifier",
    "PrototypicalNetworks",
    "PTMAP",
    "RelationModule",
    "RelationNetworks",
    "ResNet12",
    "Scale",
    "SiameseNetworks",
    "SimpleShot",
    "TIM",
    "TransductiveFinetuning",
    "easyfsl_relation_module",
]
