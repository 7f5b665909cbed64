"""Omniglot (Lake et al. 2015) read from the official files: no downloads."""

import re
import warnings
import zipfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .episodes import Episode
from .images import SPLITS, LabelledImages, as_float_images, cached, decode_image

__all__ = ["Omniglot", "PROTOCOLS", "official_characters", "one_shot_runs"]

OFFICIAL_SUBSETS = ("images_background", "images_evaluation", "images_background_small1", "images_background_small2")
FETCH_HINT = (
    "put the official files (github.com/brendenlake/omniglot, python/: "
    "images_background.zip, images_evaluation.zip, or the small subsets) in {root}, "
    "zipped or unpacked as {root}/images_background/<Alphabet>/<character>/<drawing>.png "
    "(torchvision's {root}/omniglot-py/ layout works too)"
)

PROTOCOLS = ("random", "vinyals", "lake")

# The official alphabets and their numbers of characters (character01 ..
# characterNN), by the subset that holds them.
BACKGROUND_ALPHABETS = {
    "Alphabet_of_the_Magi": 20,
    "Anglo-Saxon_Futhorc": 29,
    "Arcadian": 26,
    "Armenian": 41,
    "Asomtavruli_(Georgian)": 40,
    "Balinese": 24,
    "Bengali": 46,
    "Blackfoot_(Canadian_Aboriginal_Syllabics)": 14,
    "Braille": 26,
    "Burmese_(Myanmar)": 34,
    "Cyrillic": 33,
    "Early_Aramaic": 22,
    "Futurama": 26,
    "Grantha": 43,
    "Greek": 24,
    "Gujarati": 48,
    "Hebrew": 22,
    "Inuktitut_(Canadian_Aboriginal_Syllabics)": 16,
    "Japanese_(hiragana)": 52,
    "Japanese_(katakana)": 47,
    "Korean": 40,
    "Latin": 26,
    "Malay_(Jawi_-_Arabic)": 40,
    "Mkhedruli_(Georgian)": 41,
    "N_Ko": 33,
    "Ojibwe_(Canadian_Aboriginal_Syllabics)": 14,
    "Sanskrit": 42,
    "Syriac_(Estrangelo)": 23,
    "Tagalog": 17,
    "Tifinagh": 55,
}
EVALUATION_ALPHABETS = {
    "Angelic": 20,
    "Atemayar_Qelisayer": 26,
    "Atlantean": 26,
    "Aurek-Besh": 26,
    "Avesta": 26,
    "Ge_ez": 26,
    "Glagolitic": 45,
    "Gurmukhi": 45,
    "Kannada": 41,
    "Keble": 26,
    "Malayalam": 47,
    "Manipuri": 40,
    "Mongolian": 30,
    "Old_Church_Slavonic_(Cyrillic)": 45,
    "Oriya": 46,
    "Sylheti": 28,
    "Syriac_(Serto)": 23,
    "Tengwar": 25,
    "Tibetan": 42,
    "ULOG": 26,
}
# Vinyals et al.'s split, as published with Snell et al.'s code: whole
# alphabets, except Gurmukhi, whose characters 42 to 45 are test classes.
# Lake's split validates on the same five (background) alphabets.
VALIDATION_ALPHABETS = ("Armenian", "Bengali", "Early_Aramaic", "Hebrew", "Mkhedruli_(Georgian)")
VINYALS_TEST_ALPHABETS = (
    "Kannada",
    "Keble",
    "Malayalam",
    "Manipuri",
    "Mongolian",
    "Old_Church_Slavonic_(Cyrillic)",
    "Oriya",
    "Sylheti",
    "Syriac_(Serto)",
    "Tengwar",
    "Tibetan",
    "ULOG",
)
VINYALS_FIRST_TEST_GURMUKHI = 42


def official_characters() -> List[str]:
    """The 1623 official characters, ``"<Alphabet>/characterNN"``, sorted."""
    alphabets = {**BACKGROUND_ALPHABETS, **EVALUATION_ALPHABETS}
    return sorted(f"{a}/character{c:02d}" for a, n in alphabets.items() for c in range(1, n + 1))


def protocol_part(character: str, protocol: str) -> str:
    """Which part, ``"train"``, ``"val"`` or ``"test"``, the official
    ``character`` ("<Alphabet>/characterNN") belongs to in ``protocol``."""
    alphabet, _, name = character.partition("/")
    if alphabet in VALIDATION_ALPHABETS:
        return "val"
    if protocol == "lake":
        return "test" if alphabet in EVALUATION_ALPHABETS else "train"
    number = re.fullmatch(r"character(\d+)", name)
    gurmukhi_test = alphabet == "Gurmukhi" and number is not None and int(number[1]) >= VINYALS_FIRST_TEST_GURMUKHI
    return "test" if alphabet in VINYALS_TEST_ALPHABETS or gurmukhi_test else "train"


def in_part(part: str, wanted: str) -> bool:
    return part == wanted or (wanted == "trainval" and part in ("train", "val"))


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
        split: ``"train"``, ``"val"``, ``"test"`` or ``"trainval"`` (the
            classes of ``protocol``), or None for every character.
        protocol: which characters form the splits:

            - ``"random"``: a split of the characters found, in the fractions
              ``split_fractions``, random with ``split_seed``;
            - ``"vinyals"``: Vinyals et al.'s class lists, as published with
              Snell et al.'s code: 1028 characters of 33 alphabets for
              training, 172 of 5 for validation, 423 of 13 for test, each
              with its rotations as classes;
            - ``"lake"``: Lake et al.'s: the 30 background alphabets for
              training (less the 5 validation alphabets of ``"vinyals"``,
              172 characters, which validate) and the 20 evaluation
              alphabets (659 characters) for test.

            A named protocol needs the official characters: a split none of
            whose characters are in ``root`` is an error naming the subsets
            it needs, and one only some of which are there is used as it is,
            with a warning saying how many.
        subsets: which official subsets to read (default: every one found).
        image_size: side of the square images.
        rotations: add each character rotated by 90, 180 and 270 degrees as
            three more classes (Santoro et al., Snell et al.), after the
            split; None: as ``protocol`` does (only ``"vinyals"`` does).

    Example:
        >>> train = Omniglot("data/omniglot", split="train", protocol="vinyals")  # doctest: +SKIP
    """

    def __init__(
        self,
        root: Union[str, Path],
        split: Optional[str] = None,
        *,
        protocol: str = "random",
        subsets: Optional[Sequence[str]] = None,
        image_size: int = 28,
        rotations: Optional[bool] = None,
        split_fractions: Tuple[float, float, float] = (0.7, 0.1, 0.2),
        split_seed: int = 0,
        cache: bool = True,
    ):
        if protocol not in PROTOCOLS:
            raise ValueError(f"Omniglot: protocol must be one of {PROTOCOLS}, got {protocol!r}")
        if split is not None and split not in SPLITS:
            raise ValueError(f"Omniglot: split must be one of {SPLITS} or None, got {split!r}")
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
        data = LabelledImages(content["images"], content["labels"], content["names"])
        if protocol == "random":
            data = data.choose_split(split, split_fractions, split_seed)
        elif split is not None:
            data = _protocol_split(data, split, protocol, root)
        if rotations or (rotations is None and protocol == "vinyals"):
            data = data.with_rotations()
        super().__init__(data.images, data.labels, data.class_names)


def _protocol_split(data: LabelledImages, split: str, protocol: str, root: Path) -> LabelledImages:
    official = official_characters()
    foreign = sorted(set(data.class_names) - set(official))
    if foreign:
        raise ValueError(
            f"Omniglot: {root} holds characters that are not official ({foreign[:3]}); "
            f"the {protocol!r} split applies to the official files only (use protocol='random')"
        )
    wanted = [c for c in official if in_part(protocol_part(c, protocol), split)]
    found = set(data.class_names)
    present = [c for c in wanted if c in found]
    if len(present) < len(wanted):
        missing = [c for c in wanted if c not in found]
        needed = sorted(
            {"images_background" if c.split("/")[0] in BACKGROUND_ALPHABETS else "images_evaluation" for c in missing}
        )
        what = f"the {protocol!r} split's {split} classes: {len(present)} of its {len(wanted)} characters are in {root}"
        if not present:
            raise FileNotFoundError(
                f"Omniglot: {what}; it needs {' and '.join(needed)}; " + FETCH_HINT.format(root=root)
            )
        warnings.warn(f"Omniglot: {what}, and only those are used (the rest are in {' and '.join(needed)})")
    index = {name: c for c, name in enumerate(data.class_names)}
    return data.select_classes([index[c] for c in present])


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


def one_shot_runs(path: Union[str, Path], image_size: int = 28) -> Tuple[List[str], Episode]:
    """Lake et al.'s one-shot classification runs (the official
    ``all_runs.zip`` of ``python/one-shot-classification/``, or it
    unpacked): each ``runNN/`` holds ``class_labels.txt``, whose lines
    ``runNN/test/itemMM.png runNN/training/classKK.png`` pair a test image
    with the training image of its class.

    Returns the runs' names and one :class:`~fastmeta.data.Episode` per run,
    batched: the training images are the support (one shot per class, in
    sorted file order, labelled ``0..ways-1``), the test images the queries.
    Images are prepared as :class:`Omniglot`'s (resized, inverted so that
    strokes are 1), as floats in [0, 1].
    """
    path = Path(path)
    files = _run_files(path)
    listings = {m[1]: name for name in files if (m := re.fullmatch(r"(?:.*/)?(run\d+)/class_labels\.txt", name))}
    runs = sorted(listings)
    if not runs:
        raise FileNotFoundError(
            f"no runNN/class_labels.txt in {path}; expected Lake et al.'s all_runs.zip or its folder"
        )
    supports, queries, labels = [], [], []
    for run in runs:
        listing = listings[run]
        base = listing[: -len(f"{run}/class_labels.txt")]
        pairs = []
        for number, line in enumerate(files[listing]().decode(errors="replace").splitlines(), 1):
            if line.strip():
                pair = line.split()
                if len(pair) != 2:
                    raise ValueError(
                        f"{path}: {listing} line {number}: expected 'test image  training image', got {line!r}"
                    )
                pairs.append(pair)
        training = sorted({train for _, train in pairs})
        images = {}
        for name in training + [test for test, _ in pairs]:
            if base + name not in files:
                raise FileNotFoundError(f"{path}: {listing} names {name}, which is not there")
            images[name] = 255 - decode_image(files[base + name](), (image_size, image_size), "L", f"{path}: {name}")
        supports.append(np.stack([images[name] for name in training]))
        queries.append(np.stack([images[test] for test, _ in pairs]))
        labels.append([training.index(train) for _, train in pairs])
    shapes = {(len(s), len(q)) for s, q in zip(supports, queries)}
    if len(shapes) > 1:
        raise ValueError(f"{path}: the runs differ in their numbers of classes and test images: {sorted(shapes)}")
    support, query = torch.from_numpy(np.stack(supports)), torch.from_numpy(np.stack(queries))
    ways, count = support.shape[1], query.shape[1]
    episode = Episode(
        as_float_images(support),
        torch.arange(ways).expand(len(runs), ways),
        as_float_images(query),
        torch.tensor(labels),
        torch.arange(ways).expand(len(runs), ways),
        torch.arange(ways).expand(len(runs), ways),
        torch.arange(count).expand(len(runs), count),
    )
    return runs, episode


def _run_files(path: Path) -> Dict[str, Callable[[], bytes]]:
    """Every file under ``path`` (a folder or a zip): relative name -> a reader of its bytes."""
    if path.is_dir():
        return {p.relative_to(path).as_posix(): p.read_bytes for p in path.rglob("*") if p.is_file()}
    if not path.is_file():
        raise FileNotFoundError(f"no file or folder {path}; expected Lake et al.'s all_runs.zip or its folder")
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as error:
        raise ValueError(f"{path} is not a readable zip file ({error})") from None

    def reader(member: str):
        def read() -> bytes:
            try:
                return archive.read(member)
            except (zipfile.BadZipFile, OSError, EOFError) as error:  # e.g. a bad CRC
                raise ValueError(f"{path} is damaged at {member} ({error})") from None

        return read

    return {member: reader(member) for member in archive.namelist() if not member.endswith("/")}
