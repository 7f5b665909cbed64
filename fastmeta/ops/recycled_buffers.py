from .. import _C

__all__ = ["release_recycled_buffers"]


def release_recycled_buffers() -> int:
    """Frees the CPU buffers kept for the next outputs of ``l2o_lstm_step``,
    ``meta_lstm_step``, ``gnn_adjacency``, ``class_prototypes`` and the
    similarity ops' backwards; returns how many bytes that was.

    On the CPU those ops' outputs, gradients and scratch of 64 KiB and more
    are not returned to the system when freed: up to ``FASTMETA_RECYCLED_MIB``
    MiB of them (default 1024; 0 turns this off) are kept for the next buffer
    of the same size, which then needs no page faults. Like
    ``torch.cuda.empty_cache``, this hands them back.
    """
    return _C.release_recycled_buffers()
