"""fastmeta's functional ops: compiled kernels with a PyTorch-like interface.

Each is a ``torch.ops.fastmeta`` custom op with CPU and CUDA kernels, autograd
(backward kernels; double backward through the reference), ``torch.compile``
support (fake implementations) and, for the metric ops, ``torch.func.vmap``
support.
"""

from .attention_readout import attention_readout
from .class_prototypes import class_prototypes
from .contrastive_loss import contrastive_loss
from .gnn_adjacency import gnn_adjacency
from .l2o_lstm_step import l2o_lstm_step, l2o_lstm_step_, l2o_num_weights
from .mann_memory import MannMemoryOutput, mann_memory
from .matching_attention_lstm import matching_attention_lstm
from .meta_lstm_step import meta_lstm_num_weights, meta_lstm_step
from .mlp_task_derivatives import mlp_task_derivatives
from .pairwise_distance import pairwise_distance
from .recycled_buffers import release_recycled_buffers
from .relation_pair_pool import relation_pair_pool
from .similarity_cross_entropy import similarity_cross_entropy
from .similarity_log_softmax import similarity_log_softmax

__all__ = [
    "pairwise_distance",
    "class_prototypes",
    "similarity_log_softmax",
    "similarity_cross_entropy",
    "attention_readout",
    "contrastive_loss",
    "matching_attention_lstm",
    "mann_memory",
    "gnn_adjacency",
    "MannMemoryOutput",
    "relation_pair_pool",
    "l2o_lstm_step",
    "l2o_lstm_step_",
    "l2o_num_weights",
    "release_recycled_buffers",
    "meta_lstm_step",
    "meta_lstm_num_weights",
    "mlp_task_derivatives",
]
