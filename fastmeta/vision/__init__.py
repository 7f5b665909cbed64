"""learn2learn's vision models under its names (``l2l.vision.models``)."""

from . import models

__all__ = ["models"]
