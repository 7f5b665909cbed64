"""A built-in Omniglot-like dataset that needs no files: characters of many
scripts rendered from the DejaVu Sans font that matplotlib ships, each example
drawn with its own random distortion."""

import os
import unicodedata
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .images import LabelledImages, cached

__all__ = ["Characters"]

RENDER_SIZE = 64
GLYPH_BOX = 40  # the glyph's longer side, in pixels of the render canvas
THUMBNAIL = 16  # resolution at which near-identical glyphs are merged
DUPLICATE_DISTANCE = 0.9  # L2 distance of thumbnails (pixels in [0, 1]) below which glyphs merge
MIN_ALPHABET = 10
FORMAT_VERSION = 1  # bump when the rendering changes, to invalidate caches


class Characters(LabelledImages):
    """Handwritten-looking characters rendered from the fonts of an installed
    package, so every example and test runs on a fresh machine.

    The letters of every script that matplotlib's DejaVu Sans covers (Latin,
    Greek, Cyrillic, Armenian, Georgian, Hebrew, Arabic, Canadian syllabics,
    Tifinagh, Lisu, Lao, N'Ko, Ogham, Coptic, ...) are the character classes,
    grouped into "alphabets" by script (``self.alphabets``), with glyphs that
    look alike after centring (``o``/``O``, Latin ``A``/Greek ``Α``) merged
    into one class: over 1000 classes. Each example is drawn with its own
    random affine warp, stroke width and elastic noise, as Omniglot's
    drawers differ. Deterministic from ``seed``; generated once (a few
    seconds) and cached in :func:`~fastmeta.data.cache_dir`. Strokes are 1,
    background 0, like :class:`Omniglot`.

    Args:
        split: ``"train"``, ``"val"``, ``"test"`` (classes split in the
            fractions ``split_fractions`` with ``split_seed``) or None for all.
        image_size: side of the square images (default 28, as Omniglot).
        examples_per_class: drawings per character (default 20, as Omniglot).
        rotations: add 90/180/270-degree rotations as extra classes.
        seed: the distortions' random seed.

    Example:
        >>> train = Characters(split="train")  # doctest: +SKIP
        >>> train.num_classes > 700  # doctest: +SKIP
        True
    """

    def __init__(
        self,
        split: Optional[str] = None,
        *,
        image_size: int = 28,
        examples_per_class: int = 20,
        rotations: bool = False,
        split_fractions: Tuple[float, float, float] = (0.7, 0.1, 0.2),
        split_seed: int = 0,
        seed: int = 0,
        cache: bool = True,
    ):
        if image_size < 1 or examples_per_class < 1:
            raise ValueError(
                f"Characters: image_size and examples_per_class must be >= 1, got {image_size} and {examples_per_class}"
            )
        font = _font_path()

        def build():
            glyphs, names = _unique_glyphs(font)
            images = _draw_examples(glyphs, examples_per_class, image_size, seed)
            labels = torch.arange(len(names)).repeat_interleave(examples_per_class)
            return {"images": images, "labels": labels, "names": names}

        from PIL import __version__ as pillow_version

        key = [
            FORMAT_VERSION,
            os.path.getsize(font),
            pillow_version,
            torch.__version__.split("+")[0],
            image_size,
            examples_per_class,
            seed,
        ]
        content = cached(key, "characters", None, build) if cache else build()
        data = LabelledImages(content["images"], content["labels"], content["names"]).choose_split(
            split, split_fractions, split_seed, rotations
        )
        super().__init__(data.images, data.labels, data.class_names)

    @property
    def alphabets(self) -> List[str]:
        """Each class's script ("LATIN", "GREEK", ...)."""
        return [name.split("/")[0] for name in self.class_names]


def _font_path() -> str:
    import matplotlib

    return os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf", "DejaVuSans.ttf")


def _unique_glyphs(font_path: str):
    """Glyph images ``[C, RENDER_SIZE, RENDER_SIZE]`` (float, strokes 1) of
    the font's letters, centred and scaled to GLYPH_BOX, near-duplicates
    merged, grouped by script; and their names "SCRIPT/U+XXXX"."""
    from matplotlib.ft2font import FT2Font
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(font_path, 2 * GLYPH_BOX)
    candidates = []
    for code in sorted(FT2Font(font_path).get_charmap()):
        char = chr(code)
        if unicodedata.category(char) in ("Lu", "Ll", "Lo", "Lt"):
            candidates.append((unicodedata.name(char, "").split(" ")[0], code))
    glyphs, names = [], []
    for script, code in candidates:
        canvas = Image.new("L", (4 * GLYPH_BOX, 4 * GLYPH_BOX))
        ImageDraw.Draw(canvas).text((2 * GLYPH_BOX, 2 * GLYPH_BOX), chr(code), fill=255, font=font, anchor="mm")
        box = canvas.getbbox()
        if box is None or min(box[2] - box[0], box[3] - box[1]) < 2:
            continue
        glyph = canvas.crop(box)
        ratio = GLYPH_BOX / max(glyph.size)
        glyph = glyph.resize(
            (max(1, round(glyph.size[0] * ratio)), max(1, round(glyph.size[1] * ratio))), Image.Resampling.BILINEAR
        )
        centred = Image.new("L", (RENDER_SIZE, RENDER_SIZE))
        centred.paste(glyph, ((RENDER_SIZE - glyph.size[0]) // 2, (RENDER_SIZE - glyph.size[1]) // 2))
        glyphs.append(np.asarray(centred, dtype=np.float32) / 255)
        names.append(f"{script}/U+{code:04X}")
    glyphs = torch.from_numpy(np.stack(glyphs))
    keep = _distinct(glyphs)
    scripts = [names[i].split("/")[0] for i in keep]
    large = {s for s in scripts if scripts.count(s) >= MIN_ALPHABET}
    keep = [i for i in keep if names[i].split("/")[0] in large]
    keep.sort(key=lambda i: names[i])
    return glyphs[keep], [names[i] for i in keep]


def _distinct(glyphs: torch.Tensor) -> List[int]:
    """Indices of glyphs that differ from every earlier kept glyph."""
    small = F.adaptive_avg_pool2d(glyphs[:, None], THUMBNAIL).flatten(1)
    close = (torch.cdist(small, small) < DUPLICATE_DISTANCE).numpy()
    kept = np.zeros(len(glyphs), dtype=bool)
    for i in range(len(glyphs)):
        kept[i] = not close[i, :i][kept[:i]].any()
    return np.flatnonzero(kept).tolist()


def _draw_examples(glyphs: torch.Tensor, per_class: int, size: int, seed: int, chunk: int = 2048) -> torch.Tensor:
    """``per_class`` distorted drawings of each glyph, ``uint8 [C*per_class, 1, size, size]``."""
    g = torch.Generator().manual_seed(seed)
    count = len(glyphs) * per_class
    out = torch.empty(count, 1, size, size, dtype=torch.uint8)
    for start in range(0, count, chunk):
        n = min(chunk, count - start)
        source = glyphs[torch.arange(start, start + n) // per_class][:, None]
        angle = (torch.rand(n, generator=g) - 0.5) * 0.35
        scale = 0.85 + 0.3 * torch.rand(n, 2, generator=g)
        shear = (torch.rand(n, generator=g) - 0.5) * 0.4
        shift = (torch.rand(n, 2, generator=g) - 0.5) * 0.16
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack(
            [
                torch.stack([cos / scale[:, 0], (shear - sin) / scale[:, 0], shift[:, 0]], 1),
                torch.stack([sin / scale[:, 1], cos / scale[:, 1], shift[:, 1]], 1),
            ],
            1,
        )
        grid = F.affine_grid(theta, (n, 1, RENDER_SIZE, RENDER_SIZE), align_corners=False)
        # elastic noise: a smooth random displacement field
        coarse = (torch.rand(n, 2, 5, 5, generator=g) - 0.5) * 0.12
        grid = grid + F.interpolate(coarse, size=RENDER_SIZE, mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        drawn = F.grid_sample(source, grid, align_corners=False)
        # stroke width: thinner (min-pool), as rendered, or thicker (max-pool)
        width = torch.randint(0, 3, (n, 1, 1, 1), generator=g)
        thinner = -F.max_pool2d(-drawn, 3, 1, 1)
        thicker = F.max_pool2d(drawn, 3, 1, 1)
        drawn = torch.where(width == 0, thinner, torch.where(width == 1, drawn, thicker))
        small = F.interpolate(drawn, size=size, mode="area")
        out[start : start + n] = (small.clamp(0, 1) * 255).round().to(torch.uint8)
    return out
