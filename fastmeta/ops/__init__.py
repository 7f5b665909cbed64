"""fastmeta's functional ops: compiled kernels with a PyTorch-like interface.

Each is a ``torch.ops.fastmeta`` custom op with CPU and CUDA kernels, autograd
(backward kernels; double backward through the reference), ``torch.compile``
support (fake implementations) and ``torch.func.vmap`` support.
"""

from .attention_readout import attention_readout
from .class_prototypes import class_prototypes
from .contrastive_loss import contrastive_loss
from .pairwise_distance import pairwise_distance
from .similarity_cross_entropy import similarity_cross_entropy
from .similarity_log_softmax import similarity_log_softmax

__all__ = [
    "pairwise_distance",
    "class_prototypes",
    "similarity_log_softmax",
    "similarity_cross_entropy",
    "attention_readout",
    "contrastive_loss",
]
