"""Omniglot (Lake et al. 2015) read from the official files: no downloads."""

import zipfile
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .images import LabelledImages, cached, decode_image

__all__ = ["Omniglot"]

OFFICIAL_SUBSETS = ("images_background", "images_evaluation", "images_background_small1", "images_background_small2")
FETCH_HINT = (
    "put the official files (github.com/brendenlake/omniglot, python/: "
    "images_background.zip, images_evaluation.zip, or the small subsets) in {root}, "
    "zipped or unpacked as {root}/images_background/<Alphabet>/<character>/<drawing>.png "
    "(torchvision's {root}/omniglot-py/ layout works too)"
)


class Omniglot(LabelledImages):
    """Omniglot's handwritten characters (Lake et al. 2015): 1623 characters
    of 50 alphabets, each drawn by 20 people.

    Reads the official layout, ``images_background/<Alphabet>/<character>/
    *.png`` and ``images_evaluation/...``, from folders or straight from the
    official zip files, and torchvision's ``omniglot-py/`` layout; nothing is
    downloaded. Classes are the characters, numbered in sorted (alphabet,
    character) order; a character found in several subsets (the small
    background subsets overlap) is one class. Images are resized (default
    28x28, as in the literature) and inverted, so strokes are 1 and
    background 0, and held as one ``uint8`` tensor ``[N, 1, H, W]``; the
    decoded tensor is cached next to the data (or in
    :func:`~fastmeta.data.cache_dir` when that is read-only).

    Args:
        root: the folder holding the subsets.
        split: ``"train"``, ``"val"``, ``"test"`` (a split of the characters
            in the fractions ``split_fractions``, random with ``split_seed``)
            or None for every character.
        subsets: which official subsets to read (default: every one found).
        image_size: side of the square images.
        rotations: add each character rotated by 90, 180 and 270 degrees as
            three more classes (Santoro et al., Snell et al.), after the split.

    Example:
        >>> train = Omniglot("data/omniglot", split="train", rotations=True)  # doctest: +SKIP
    """

    def __init__(
        self,
        root: Union[str, Path],
        split: Optional[str] = None,
        *,
        subsets: Optional[Sequence[str]] = None,
        image_size: int = 28,
        rotations: bool = False,
        split_fractions: Tuple[float, float, float] = (0.7, 0.1, 0.2),
        split_seed: int = 0,
        cache: bool = True,
    ):
        root = Path(root)
        sources = _find_sources(root, subsets)

        def build():
            drawings: Dict[Tuple[str, str], Dict[str, bytes]] = {}
            for source in sources:
                for alphabet, character, name, data in _read_drawings(source):
                    drawings.setdefault((alphabet, character), {})[name] = data
            keys = sorted(drawings)
            if not keys:
                raise FileNotFoundError(
                    f"Omniglot: no drawings in {', '.join(map(str, sources))}; "
                    "expected <subset>/<Alphabet>/<character>/<drawing>.png"
                )
            images, labels = [], []
            for label, key in enumerate(keys):
                for name in sorted(drawings[key]):
                    images.append(
                        255 - decode_image(drawings[key][name], (image_size, image_size), "L", "/".join((*key, name)))
                    )
                    labels.append(label)
            return {
                "images": torch.from_numpy(np.stack(images)),
                "labels": torch.tensor(labels),
                "names": ["/".join(k) for k in keys],
            }

        key = [(str(s), s.stat().st_size, s.stat().st_mtime_ns) for s in sources] + [image_size]
        content = cached(key, "omniglot", root / ".fastmeta-cache", build) if cache else build()
        data = LabelledImages(content["images"], content["labels"], content["names"]).choose_split(
            split, split_fractions, split_seed, rotations
        )
        super().__init__(data.images, data.labels, data.class_names)


def _find_sources(root: Path, subsets: Optional[Sequence[str]]):
    if not root.is_dir():
        raise FileNotFoundError(f"Omniglot: no folder {root}; " + FETCH_HINT.format(root=root))
    names = OFFICIAL_SUBSETS if subsets is None else tuple(subsets)
    unknown = [n for n in names if n not in OFFICIAL_SUBSETS]
    if unknown:
        raise ValueError(f"Omniglot: unknown subsets {unknown}; the official ones are {OFFICIAL_SUBSETS}")
    sources = []
    for name in names:
        for base in (root, root / "omniglot-py"):
            if (base / name).is_dir():
                sources.append(base / name)
                break
            if (base / f"{name}.zip").is_file():
                sources.append(base / f"{name}.zip")
                break
        else:
            if subsets is not None:
                raise FileNotFoundError(f"Omniglot: subset {name} not found in {root}; " + FETCH_HINT.format(root=root))
    if not sources:
        raise FileNotFoundError(f"Omniglot: no Omniglot subset in {root}; " + FETCH_HINT.format(root=root))
    return sources


def _read_drawings(source: Path):
    """Yields (alphabet, character, file name, PNG bytes) of a subset folder or zip."""
    if source.is_dir():
        for path in sorted(source.glob("*/*/*.png")):
            yield path.parent.parent.name, path.parent.name, path.name, path.read_bytes()
        return
    try:
        archive = zipfile.ZipFile(source)
    except zipfile.BadZipFile as error:
        raise ValueError(f"Omniglot: {source} is not a readable zip file ({error})") from None
    with archive:
        for member in sorted(archive.namelist()):
            parts = member.split("/")
            if len(parts) == 4 and parts[3].endswith(".png"):
                try:
                    data = archive.read(member)
                except (zipfile.BadZipFile, OSError, EOFError) as error:  # e.g. a bad CRC
                    raise ValueError(f"Omniglot: {source} is damaged at {member} ({error})") from None
                yield parts[1], parts[2], parts[3], data
