"""Drop-in modules built on fastmeta's ops."""

from .learned_optimizers import CoordinatewiseLSTM, MetaLearnerLSTM

__all__ = ["CoordinatewiseLSTM", "MetaLearnerLSTM"]
