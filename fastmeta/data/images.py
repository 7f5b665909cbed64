"""Labelled images held as one tensor, read from class-per-folder trees with
Pillow, and cached decoded."""

import hashlib
import io
import os
import warnings
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .._checks import check_integer_labels

__all__ = ["LabelledImages", "ImageFolder", "CSVImages", "cache_dir", "data_dir"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
SPLITS = ("train", "val", "test", "trainval")


def cache_dir() -> Path:
    """Where decoded datasets are cached when the data's own folder is
    read-only: ``$FASTMETA_CACHE``, else ``~/.cache/fastmeta``."""
    return Path(os.environ.get("FASTMETA_CACHE", Path.home() / ".cache" / "fastmeta"))


def data_dir() -> Path:
    """Where named datasets (``--data omniglot``) are read from:
    ``$FASTMETA_DATA``, else ``~/.cache/fastmeta/data``."""
    return Path(os.environ.get("FASTMETA_DATA", Path.home() / ".cache" / "fastmeta" / "data"))


class LabelledImages(torch.utils.data.Dataset):
    """Images ``[N, C, H, W]`` held as one tensor (``uint8``, or floating),
    with integer class labels ``[N]`` in ``0..num_classes-1``.

    Indexing returns ``(image, label)`` with the image as floats in [0, 1]
    (``uint8`` images are divided by 255); ``get_labels()`` is easyfsl's
    interface. :class:`~fastmeta.data.EpisodeSampler` gathers episodes from
    the tensor directly, on whatever device it lives.

    Example:
        >>> images = torch.randint(0, 256, (6, 1, 4, 4), dtype=torch.uint8)
        >>> data = LabelledImages(images, torch.tensor([0, 0, 1, 1, 2, 2]))
        >>> train, test = data.split((2, 1), seed=0)
        >>> train.num_classes, len(test)
        (2, 2)
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, class_names: Optional[Sequence[str]] = None):
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise ValueError(
                "LabelledImages: images must be a tensor [N, C, H, W], got "
                f"{getattr(images, 'shape', type(images).__name__)}"
            )
        labels = torch.as_tensor(labels)
        if labels.dim() != 1 or labels.numel() != images.shape[0]:
            raise ValueError(
                f"LabelledImages: labels must have shape [{images.shape[0]}] (one per image), got {list(labels.shape)}"
            )
        check_integer_labels("LabelledImages", "labels", labels)
        if labels.numel() and int(labels.min()) < 0:
            raise ValueError("LabelledImages: labels must be >= 0")
        num_classes = int(labels.max()) + 1 if labels.numel() else 0
        if class_names is None and num_classes > labels.numel():
            raise ValueError(
                f"LabelledImages: labels go up to {num_classes - 1} for "
                f"{labels.numel()} images; number the classes 0..num_classes-1"
            )
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"LabelledImages: {len(class_names)} class names for {num_classes} classes")
        self.images = images
        self.labels = labels.to(device=images.device, dtype=torch.long)
        self.class_names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        return as_float_images(self.images[index]), int(self.labels[index])

    def get_labels(self) -> List[int]:
        return self.labels.tolist()

    def to(self, device) -> "LabelledImages":
        return LabelledImages(self.images.to(device), self.labels.to(device), self.class_names)

    def select_classes(self, classes: Sequence[int]) -> "LabelledImages":
        """The images of ``classes``, relabelled ``0..len(classes)-1`` in that order."""
        classes = torch.as_tensor(list(classes), dtype=torch.long)
        relabel = torch.full((max(self.num_classes, 1),), -1, dtype=torch.long)
        relabel[classes] = torch.arange(len(classes))
        new_labels = relabel[self.labels.cpu()]
        keep = (new_labels >= 0).nonzero().squeeze(1)
        return LabelledImages(
            self.images[keep.to(self.images.device)], new_labels[keep], [self.class_names[c] for c in classes.tolist()]
        )

    def split(self, sizes: Sequence[Union[int, float]], seed: int = 0) -> Tuple["LabelledImages", ...]:
        """Splits the classes (not the images) into disjoint parts, in a random
        order fixed by ``seed``: ``sizes`` are class counts, or fractions
        summing to at most 1 (the last part then takes the rounding)."""
        return tuple(self.select_classes(classes) for classes in self._split_classes(sizes, seed))

    def _split_classes(self, sizes: Sequence[Union[int, float]], seed: int) -> List[List[int]]:
        order = torch.randperm(self.num_classes, generator=torch.Generator().manual_seed(seed))
        counts = _split_counts(sizes, self.num_classes)
        bounds = np.cumsum([0] + counts)
        return [sorted(order[a:b].tolist()) for a, b in zip(bounds[:-1], bounds[1:])]

    def with_rotations(self) -> "LabelledImages":
        """Four classes per class: the images rotated by 0, 90, 180 and 270
        degrees (as Omniglot is augmented in the literature); class
        ``4 c + k`` is class ``c`` rotated by ``90 k`` degrees."""
        rotated = torch.stack([torch.rot90(self.images, k, dims=(2, 3)) for k in range(4)], 1)
        labels = (4 * self.labels[:, None] + torch.arange(4, device=self.labels.device)).flatten()
        names = [f"{name}/rot{90 * k}" for name in self.class_names for k in range(4)]
        return LabelledImages(rotated.flatten(0, 1), labels, names)

    def choose_split(
        self, split: Optional[str], fractions: Sequence[float], seed: int, rotations: bool = False
    ) -> "LabelledImages":
        """The ``"train"``, ``"val"`` or ``"test"`` part of :meth:`split` (or
        ``"trainval"``, the first two together; all for None), with
        :meth:`with_rotations` applied after the split when ``rotations``."""
        part = self
        if split is not None:
            if split not in SPLITS:
                raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
            if len(fractions) != 3:
                raise ValueError(f"split_fractions must be three fractions (train, val, test), got {tuple(fractions)}")
            train, val, test = self._split_classes(fractions, seed)
            part = self.select_classes(
                {"train": train, "val": val, "test": test, "trainval": sorted(train + val)}[split]
            )
        return part.with_rotations() if rotations else part

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({len(self)} images of {tuple(self.images.shape[1:])}, "
            f"{self.num_classes} classes, {self.images.dtype}, {self.images.device})"
        )


def _split_counts(sizes, total: int) -> List[int]:
    sizes = list(sizes)
    if not sizes or any(s < 0 for s in sizes):
        raise ValueError(f"split sizes must be non-negative, got {sizes}")
    if all(isinstance(s, int) for s in sizes):
        counts = sizes
    else:
        if sum(sizes) > 1 + 1e-9:
            raise ValueError(f"split fractions must sum to at most 1, got {sizes}")
        counts = [int(round(s * total)) for s in sizes]
        counts[-1] = min(counts[-1], total - sum(counts[:-1]))
        if abs(sum(sizes) - 1) < 1e-9:
            counts[-1] = total - sum(counts[:-1])
    if sum(counts) > total:
        raise ValueError(f"split sizes {sizes} ask for {sum(counts)} classes; there are {total}")
    return counts


def as_float_images(images: torch.Tensor) -> torch.Tensor:
    return images.float().div_(255) if images.dtype == torch.uint8 else images


def decode_image(data: bytes, size: Tuple[int, int], mode: str, name: str = "an image") -> np.ndarray:
    """One image file's bytes, decoded by Pillow, converted to ``mode`` ("L"
    or "RGB") and resized to ``size`` (width, height): ``uint8 [C, H, W]``.
    16-bit greyscale images are scaled to 8 bits (Pillow's own conversion
    would clip them); a file that cannot be decoded raises a
    ValueError naming ``name``."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return _decoded(image, size, mode)
    except (OSError, ValueError, SyntaxError) as error:  # what Pillow raises on a bad file
        raise ValueError(f"cannot decode {name}: {error}") from None


def _decoded(image, size: Tuple[int, int], mode: str) -> np.ndarray:
    from PIL import Image

    if image.mode.startswith("I"):  # 16-bit greyscale ("I;16...", or "I" from older decoders)
        levels = np.asarray(image).astype(np.float64) * (255 / 65535)
        image = Image.fromarray(levels.round().clip(0, 255).astype(np.uint8), "L")
    image = image.convert(mode)
    if image.size != size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def cached(key_parts: Sequence, name: str, preferred_dir: Optional[Path], build: Callable[[], dict]) -> dict:
    """``build()``'s tensors, cached in ``preferred_dir`` (or :func:`cache_dir`
    when that is not writable) under a name hashed from ``key_parts``. The
    cache is optional: a corrupted or foreign cache file is rebuilt, and one
    that cannot be written is skipped, each with a warning. Written
    atomically."""
    digest = hashlib.sha256(repr(list(key_parts)).encode()).hexdigest()[:16]
    file_name = f"{name}-{digest}.pt"
    candidates = [d for d in (preferred_dir, cache_dir()) if d is not None and _writable(d)]
    for directory in candidates:
        path = directory / file_name
        if path.exists():
            try:
                content = torch.load(path, weights_only=True)
            except Exception as error:  # noqa: BLE001: torch.load raises many kinds on a bad file
                warnings.warn(f"ignoring the unreadable cache {path} ({error}); rebuilding it")
                continue
            if isinstance(content, dict) and {"images", "labels"} <= content.keys():
                return content
            warnings.warn(f"ignoring the cache {path}: it holds something else; rebuilding it")
    content = build()
    for directory in candidates:
        temporary = directory / f".{file_name}.{os.getpid()}.tmp"
        try:
            directory.mkdir(parents=True, exist_ok=True)
            torch.save(content, temporary)
            os.replace(temporary, directory / file_name)
            break
        except Exception as error:  # noqa: BLE001: a full disk surfaces as OSError or RuntimeError
            temporary.unlink(missing_ok=True)
            warnings.warn(
                f"could not write the cache in {directory} ({str(error).splitlines()[0]}); continuing without it"
            )
    return content


def _writable(directory: Path) -> bool:
    """Whether ``directory`` (or its nearest existing parent) may be written:
    permission bits are honoured even for root, so data marked read-only
    stays untouched."""
    while not directory.exists():
        directory = directory.parent
    return os.access(directory, os.W_OK) and bool(directory.stat().st_mode & 0o222)


class ImageFolder(LabelledImages):
    """A class-per-folder image dataset, ``root/<class>/<image>`` (the
    mini-ImageNet layout: point ``root`` at its ``train``, ``val`` or ``test``
    folder), decoded with Pillow, resized to ``image_size``, held as one
    ``uint8`` tensor, and cached decoded.

    Classes are numbered in the sorted order of their folder names.

    Args:
        root: the folder holding one sub-folder per class.
        image_size: side of the square images (or ``(height, width)``).
        channels: 3 (RGB) or 1 (greyscale).
        cache: keep the decoded tensor in ``root/.fastmeta-cache`` (or
            :func:`cache_dir` when ``root`` is read-only) for fast reloads.

    Example:
        >>> train = ImageFolder("mini-imagenet/train", image_size=84)  # doctest: +SKIP
    """

    def __init__(
        self,
        root: Union[str, Path],
        image_size: Union[int, Tuple[int, int]] = 84,
        channels: int = 3,
        cache: bool = True,
    ):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(
                f"ImageFolder: {root} is not a folder; expected {root}/<class>/<image>.jpg, one folder per class"
            )
        mode = image_mode("ImageFolder", channels)
        classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        files = [sorted(f for f in (root / c).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) for c in classes]
        if not classes:
            raise FileNotFoundError(
                f"ImageFolder: no class folders in {root}; expected {root}/<class>/<image>.jpg, one folder per class"
            )
        empty = [c for c, class_files in zip(classes, files) if not class_files]
        if empty:
            raise FileNotFoundError(
                f"ImageFolder: class folder(s) {empty[:5]} in {root} hold no images ({', '.join(IMAGE_SUFFIXES)})"
            )
        labels = [c for c, class_files in enumerate(files) for _ in class_files]
        images = decoded_files([f for fs in files for f in fs], image_size, mode, root / ".fastmeta-cache", cache)
        super().__init__(images, torch.tensor(labels), classes)


class CSVImages(LabelledImages):
    """The images listed in a CSV split file whose rows are ``file name,
    class`` (Ravi & Larochelle's mini-ImageNet ``train.csv``, ``val.csv``
    and ``test.csv``, or any such list), read from ``image_dir``, decoded
    with Pillow, resized to ``image_size``, held as one ``uint8`` tensor and
    cached decoded.

    A first row whose file name has no image suffix (``filename,label``) is
    a header. Classes are numbered in the sorted order of their names.

    Args:
        csv_file: the split file.
        image_dir: the folder the file names are relative to (default: the
            ``images/`` folder beside ``csv_file``, Ravi & Larochelle's
            layout).
        image_size, channels, cache: as for :class:`ImageFolder`.

    Example:
        >>> test = CSVImages("mini-imagenet/test.csv", image_size=84)  # doctest: +SKIP
    """

    def __init__(
        self,
        csv_file: Union[str, Path],
        image_dir: Optional[Union[str, Path]] = None,
        image_size: Union[int, Tuple[int, int]] = 84,
        channels: int = 3,
        cache: bool = True,
    ):
        mode = image_mode("CSVImages", channels)
        csv_file = Path(csv_file)
        image_dir = csv_file.parent / "images" if image_dir is None else Path(image_dir)
        rows = _read_split_file(csv_file)
        if not image_dir.is_dir():
            raise FileNotFoundError(f"CSVImages: no image folder {image_dir} for the file names in {csv_file}")
        classes = sorted({name for _, name in rows})
        number = {name: c for c, name in enumerate(classes)}
        files = [image_dir / file for file, _ in rows]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(
                f"CSVImages: {len(absent)} image(s) listed in {csv_file} are not in {image_dir}, e.g. {absent[0]}"
            )
        images = decoded_files(files, image_size, mode, image_dir / ".fastmeta-cache", cache)
        super().__init__(images, torch.tensor([number[name] for _, name in rows]), classes)


def _read_split_file(path: Path) -> List[Tuple[str, str]]:
    import csv

    if not path.is_file():
        raise FileNotFoundError(f"CSVImages: no split file {path}; expected rows 'file name,class'")
    with open(path, newline="", encoding="utf-8-sig") as f:
        lines = [(n, [field.strip() for field in row]) for n, row in enumerate(csv.reader(f), 1) if any(row)]
    if lines and not lines[0][1][0].lower().endswith(IMAGE_SUFFIXES):
        lines = lines[1:]  # a header
    for n, row in lines:
        if len(row) != 2 or not all(row):
            raise ValueError(f"CSVImages: {path} line {n}: expected 'file name,class', got {','.join(row)!r}")
    if not lines:
        raise ValueError(f"CSVImages: {path} lists no images; expected rows 'file name,class'")
    return [(row[0], row[1]) for _, row in lines]


def image_mode(who: str, channels: int) -> str:
    """Pillow's mode for images of ``channels`` channels (1 or 3)."""
    if channels not in (1, 3):
        raise ValueError(f"{who}: channels must be 1 or 3, got {channels}")
    return "RGB" if channels == 3 else "L"


def decoded_files(
    files: Sequence[Path], image_size: Union[int, Tuple[int, int]], mode: str, cache_in: Path, cache: bool
) -> torch.Tensor:
    """The image files decoded with Pillow in ``mode`` ("L" or "RGB") into one
    ``uint8`` tensor ``[N, C, height, width]``, cached in ``cache_in`` when
    ``cache``."""
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size

    def build():
        images = [decode_image(f.read_bytes(), (width, height), mode, str(f)) for f in files]
        return {"images": torch.from_numpy(np.stack(images)), "labels": torch.zeros(len(files), dtype=torch.long)}

    key = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return (cached([key, height, width, mode], "images", cache_in, build) if cache else build())["images"]
