"""Loads the compiled extension, and explains clearly when it cannot."""

import torch

REBUILD_COMMAND = "pip install --no-build-isolation --no-deps --force-reinstall -e ."


def load():
    """Imports ``fastmeta._C`` (which registers the ``torch.ops.fastmeta`` ops)."""
    try:
        from . import _build_config
    except ImportError:
        raise ImportError(
            f"fastmeta's C++ extension has not been built. From the source tree run: {REBUILD_COMMAND}"
        ) from None
    if _build_config.TORCH_VERSION != torch.__version__:
        raise ImportError(
            f"fastmeta was built against PyTorch {_build_config.TORCH_VERSION} but PyTorch "
            f"{torch.__version__} is installed; rebuild it against the installed PyTorch with: "
            f"{REBUILD_COMMAND}"
        )
    try:
        from . import _C
    except ImportError as error:
        raise ImportError(
            f"fastmeta's extension (built against PyTorch {_build_config.TORCH_VERSION}) failed "
            f"to load with PyTorch {torch.__version__}: {error}. Rebuild it with: "
            f"{REBUILD_COMMAND}"
        ) from error
    return _C, _build_config
