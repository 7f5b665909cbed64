"""fastmeta.data: the episode sampler, Omniglot, image folders, built-in characters."""

import io
import os
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastmeta import reference
from fastmeta.data import Characters, EpisodeSampler, ImageFolder, LabelledImages, Omniglot, data_dir
from fastmeta.data.characters import _draw_examples
from fastmeta.testing import DEVICES

OMNIGLOT = data_dir() / "omniglot"
needs_omniglot = pytest.mark.skipif(
    not (OMNIGLOT / "images_background_small1.zip").exists(),
    reason=f"the Omniglot subsets are not at {OMNIGLOT} (set FASTMETA_DATA)",
)


def uneven_dataset(seed=0):
    """12 classes with 4..15 examples each, labels shuffled and not 0..C-1."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(4, 16, (12,), generator=g)
    labels = torch.repeat_interleave(torch.arange(12) * 7 + 3, counts)
    labels = labels[torch.randperm(len(labels), generator=g)]
    images = torch.arange(len(labels), dtype=torch.float32)[:, None, None, None].expand(-1, 1, 2, 2)
    return images.contiguous(), labels


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ways, shots, queries, batch", [(5, 1, 3, 8), (12, 2, 2, 3), (1, 4, 0, 5), (3, 1, 1, 1)])
def test_sampler_episodes_have_right_classes_and_counts(device, ways, shots, queries, batch):
    images, labels = uneven_dataset()
    sampler = EpisodeSampler(
        (images.to(device), labels.to(device)), ways, shots, queries, episodes_per_batch=batch, seed=1
    )
    for episode in (sampler.sample() for _ in range(20)):
        assert episode.support.shape == (batch, ways * shots, 1, 2, 2)
        assert episode.query.shape == (batch, ways * queries, 1, 2, 2)
        assert episode.support.device.type == device
        expected = torch.arange(ways).repeat_interleave(shots).expand(batch, -1)
        assert torch.equal(episode.support_labels.cpu(), expected)
        assert torch.equal(episode.query_labels.cpu(), torch.arange(ways).repeat_interleave(queries).expand(batch, -1))
        for b in range(batch):
            assert len(set(episode.classes[b].tolist())) == ways
            drawn = torch.cat([episode.support_indices[b], episode.query_indices[b]]).tolist()
            assert len(set(drawn)) == len(drawn), "an example repeats within an episode"
            # images are their own index here: each row comes from its class
            support_ids = episode.support[b, :, 0, 0, 0].long().cpu()
            assert torch.equal(labels[support_ids], episode.classes[b].cpu().repeat_interleave(shots))
            query_ids = episode.query[b, :, 0, 0, 0].long().cpu()
            assert torch.equal(labels[query_ids], episode.classes[b].cpu().repeat_interleave(queries))


def test_sampler_is_deterministic_and_covers_every_class():
    images, labels = uneven_dataset()
    a = EpisodeSampler((images, labels), 5, 1, 2, episodes_per_batch=50, seed=3).sample()
    b = EpisodeSampler(
        (images, labels), 5, 1, 2, episodes_per_batch=50, generator=torch.Generator().manual_seed(3)
    ).sample()
    c = EpisodeSampler((images, labels), 5, 1, 2, episodes_per_batch=50, seed=4).sample()
    assert torch.equal(a.support_indices, b.support_indices)
    assert not torch.equal(a.support_indices, c.support_indices)
    assert set(a.classes.flatten().tolist()) == set(labels.tolist())


def test_sampler_over_labels_alone_and_easyfsl_datasets():
    images, labels = uneven_dataset()
    data = LabelledImages(images, labels - 3)
    by_tensor = EpisodeSampler(data, 4, 2, 2, episodes_per_batch=2, seed=5).sample()

    class EasyFslStyle(torch.utils.data.Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return data[i]

        def get_labels(self):
            return data.get_labels()

    by_items = EpisodeSampler(EasyFslStyle(), 4, 2, 2, episodes_per_batch=2, seed=5).sample()
    indices = EpisodeSampler(data.labels, 4, 2, 2, episodes_per_batch=2, seed=5).sample()
    assert torch.equal(by_tensor.support, by_items.support)
    assert torch.equal(by_tensor.query, by_items.query)
    assert torch.equal(indices.support, by_tensor.support_indices)


def test_sampler_iterates_num_batches_and_converts_uint8():
    data = LabelledImages(torch.full((20, 1, 3, 3), 255, dtype=torch.uint8), torch.arange(4).repeat(5))
    sampler = EpisodeSampler(data, 2, 2, 1, num_batches=3, seed=0)
    episodes = list(sampler)
    assert len(episodes) == len(sampler) == 3
    assert episodes[0].support.dtype == torch.float32 and float(episodes[0].support.max()) == 1.0


@pytest.mark.parametrize(
    "kwargs, labels, error, message",
    [
        ({"ways": 13}, None, ValueError, "ways=13 but the dataset has only 12 classes"),
        ({"shots": 10, "queries": 6}, None, ValueError, "fewer than shots + queries = 16"),
        ({}, torch.arange(40.0) % 5, TypeError, "labels must be integers, got torch.float32"),
        ({}, torch.zeros(40, 2, dtype=torch.long), ValueError, "labels must be one-dimensional"),
        ({"ways": 0}, None, ValueError, "ways must be an integer >= 1, got 0"),
        ({"shots": 1.5}, None, ValueError, "shots must be an integer >= 1, got 1.5"),
        ({"queries": -1}, None, ValueError, "queries must be an integer >= 0"),
        ({"episodes_per_batch": 0}, None, ValueError, "episodes_per_batch must be an integer >= 1"),
        ({"num_batches": -2}, None, ValueError, "num_batches must be an integer >= 0 or None"),
        ({"seed": 1, "generator": torch.Generator()}, None, ValueError, "a seed or a generator"),
    ],
)
def test_sampler_bad_input(kwargs, labels, error, message):
    if labels is None:
        _, labels = uneven_dataset()
    arguments = {"ways": 5, "shots": 1, "queries": 3, **kwargs}
    ways, shots, queries = arguments.pop("ways"), arguments.pop("shots"), arguments.pop("queries")
    with pytest.raises(error, match=message.replace("+", r"\+").replace("(", r"\(")):
        EpisodeSampler(labels, ways, shots, queries, **arguments)


def test_sampler_bad_datasets():
    with pytest.raises(ValueError, match="3 examples but 4 labels"):
        EpisodeSampler((torch.zeros(3, 2), torch.arange(4)), 1, 1, 0)
    with pytest.raises(TypeError, match="dataset must be a LabelledImages"):
        EpisodeSampler([1, 2, 3], 1, 1, 0)
    with pytest.raises(TypeError, match="endless sampler"):
        len(EpisodeSampler(torch.arange(4), 1, 1, 0))


def test_sampler_is_much_faster_than_a_per_example_loop():
    """The benchmark's claim in small: the vectorised sampler draws 32
    episodes in less time than the easyfsl-style loop draws as many (the
    margin is about ten times on a quiet machine, so a busy one keeps it)."""
    data = LabelledImages(torch.rand(2000, 1, 28, 28), torch.arange(100).repeat_interleave(20))
    sampler = EpisodeSampler(data, 5, 1, 15, episodes_per_batch=32, seed=0)
    sampler.sample()

    def fastest(draw, repeats=5):  # the least of several timings: robust to a busy machine
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            draw()
            times.append(time.perf_counter() - start)
        return min(times)

    vectorised = fastest(sampler.sample)
    loop = fastest(lambda: [reference.sample_episode_loop(data, 5, 1, 15) for _ in range(32)])
    assert vectorised < loop


def test_reference_episode_loop_draws_valid_episodes():
    images, labels = uneven_dataset()
    data = LabelledImages(images, labels)
    support, support_labels, query, query_labels = reference.sample_episode_loop(data, 5, 2, 1)
    assert support.shape == (10, 1, 2, 2) and query.shape == (5, 1, 2, 2)
    assert torch.equal(support_labels, torch.arange(5).repeat_interleave(2))
    ids = torch.cat([support[:, 0, 0, 0], query[:, 0, 0, 0]]).long()
    assert len(set(ids.tolist())) == 15


def test_labelled_images_split_rotations_and_selection():
    images = torch.randint(0, 256, (30, 1, 4, 4), dtype=torch.uint8)
    data = LabelledImages(images, torch.arange(10).repeat_interleave(3), [f"c{i}" for i in range(10)])
    train, val, test = data.split((0.6, 0.2, 0.2), seed=1)
    names = [set(part.class_names) for part in (train, val, test)]
    assert [len(n) for n in names] == [6, 2, 2]
    assert set.union(*names) == set(data.class_names) and not (names[0] & names[1] | names[0] & names[2])
    assert [p.class_names for p in data.split((0.6, 0.2, 0.2), seed=1)] == [p.class_names for p in (train, val, test)]
    for part in (train, val, test):  # each image keeps its class
        for label, name in enumerate(part.class_names):
            original = int(name[1:])
            assert torch.equal(part.images[part.labels == label], images[original * 3 : original * 3 + 3])
    rotated = data.with_rotations()
    assert rotated.num_classes == 40 and len(rotated) == 120
    assert torch.equal(rotated.images[rotated.labels == 4 * 2 + 1], torch.rot90(images[6:9], 1, (2, 3)))
    assert rotated.class_names[9] == "c2/rot90"
    image, label = data[4]
    assert label == 1 and image.dtype == torch.float32 and torch.equal(image, images[4].float() / 255)
    assert data.choose_split("val", (0.6, 0.2, 0.2), 1).class_names == val.class_names


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: LabelledImages(torch.zeros(3, 4, 4), torch.zeros(3)), ValueError, "tensor \\[N, C, H, W\\]"),
        (lambda: LabelledImages(torch.zeros(3, 1, 4, 4), torch.zeros(2)), ValueError, "labels must have shape \\[3\\]"),
        (lambda: LabelledImages(torch.zeros(3, 1, 4, 4), torch.zeros(3)), TypeError, "labels must be integers"),
        (lambda: LabelledImages(torch.zeros(2, 1, 4, 4), torch.tensor([0, -1])), ValueError, "labels must be >= 0"),
        (
            lambda: LabelledImages(torch.zeros(2, 1, 4, 4), torch.tensor([0, 1]), ["a"]),
            ValueError,
            "1 class names for 2",
        ),
        (
            lambda: LabelledImages(torch.zeros(2, 1, 4, 4), torch.tensor([0, 1])).split((0.9, 0.9)),
            ValueError,
            "sum to at most 1",
        ),
        (
            lambda: LabelledImages(torch.zeros(2, 1, 4, 4), torch.tensor([0, 1])).split((2, 1)),
            ValueError,
            "there are 2",
        ),
        (
            lambda: LabelledImages(torch.zeros(2, 1, 4, 4), torch.tensor([0, 1])).choose_split("dev", (1, 0, 0), 0),
            ValueError,
            "split must be one of",
        ),
    ],
)
def test_labelled_images_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()


# Omniglot ------------------------------------------------------------------


@needs_omniglot
def test_omniglot_reads_zips_and_folders_identically(tmp_path):
    from_zips = Omniglot(OMNIGLOT, cache=False)
    unpacked = tmp_path / "unpacked"
    for archive in OMNIGLOT.glob("*.zip"):
        with zipfile.ZipFile(archive) as z:
            z.extractall(unpacked)
    from_folders = Omniglot(unpacked, cache=False)
    torchvision_layout = tmp_path / "tv"
    shutil.copytree(unpacked, torchvision_layout / "omniglot-py")
    from_torchvision = Omniglot(torchvision_layout, cache=False)
    for other in (from_folders, from_torchvision):
        assert torch.equal(from_zips.images, other.images)
        assert torch.equal(from_zips.labels, other.labels)
        assert from_zips.class_names == other.class_names
    # the two small subsets overlap in Greek and Latin: 136 + 156 - 50 characters
    assert from_zips.num_classes == 242 and len(from_zips) == 242 * 20
    assert from_zips.class_names == sorted(from_zips.class_names)
    assert from_zips.images.shape[1:] == (1, 28, 28) and from_zips.images.dtype == torch.uint8
    # inverted: strokes are bright on a dark background
    corners = from_zips.images[:, 0, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert corners.float().mean() < 2 and int(from_zips.images.max()) == 255
    # one drawing decoded by hand
    with zipfile.ZipFile(OMNIGLOT / "images_background_small1.zip") as z:
        png = z.read("images_background_small1/Balinese/character01/0108_01.png")
    by_hand = 255 - np.array(Image.open(io.BytesIO(png)).convert("L").resize((28, 28), Image.BILINEAR))
    assert torch.equal(from_zips.images[0, 0], torch.from_numpy(by_hand))
    assert from_zips.class_names[0] == "Balinese/character01"


@needs_omniglot
def test_omniglot_splits_rotations_and_sizes():
    parts = [Omniglot(OMNIGLOT, split=s, cache=False) for s in ("train", "val", "test")]
    names = [set(p.class_names) for p in parts]
    assert sum(map(len, names)) == 242 and len(set.union(*names)) == 242
    rotated = Omniglot(OMNIGLOT, split="train", rotations=True, cache=False, image_size=20)
    assert rotated.num_classes == 4 * parts[0].num_classes and rotated.images.shape[2:] == (20, 20)
    one = Omniglot(OMNIGLOT, subsets=["images_background_small1"], cache=False)
    assert one.num_classes == 136


@needs_omniglot
def test_omniglot_cache_is_reused_and_rebuilt_when_corrupted(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTMETA_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "data"
    root.mkdir()
    shutil.copy(OMNIGLOT / "images_background_small1.zip", root)
    first = Omniglot(root)
    cache_files = list((root / ".fastmeta-cache").glob("omniglot-*.pt"))
    assert len(cache_files) == 1
    assert torch.equal(Omniglot(root).images, first.images)
    cache_files[0].write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="unreadable cache"):
        again = Omniglot(root)
    assert torch.equal(again.images, first.images)
    # a folder marked read-only is left untouched: the cache goes to FASTMETA_CACHE
    shutil.rmtree(root / ".fastmeta-cache")
    os.chmod(root, 0o555)
    try:
        Omniglot(root)
        assert not (root / ".fastmeta-cache").exists()
        assert list((tmp_path / "cache").glob("omniglot-*.pt"))
    finally:
        os.chmod(root, 0o755)


def test_omniglot_missing_or_corrupted_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no folder .*images_background.zip"):
        Omniglot(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no Omniglot subset in .*images_background.zip"):
        Omniglot(tmp_path)
    with pytest.raises(ValueError, match="unknown subsets \\['images_test'\\]"):
        Omniglot(tmp_path, subsets=["images_test"])
    with pytest.raises(FileNotFoundError, match="subset images_evaluation not found"):
        Omniglot(tmp_path, subsets=["images_evaluation"])
    (tmp_path / "images_background.zip").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="images_background.zip is not a readable zip file"):
        Omniglot(tmp_path, cache=False)


# Image folders -------------------------------------------------------------


def write_image_folder(root: Path):
    rng = np.random.default_rng(0)
    arrays = {}
    for c, name in enumerate(["n02", "n01", "n10"]):
        (root / name).mkdir(parents=True)
        for i in range(3 + c):
            array = rng.integers(0, 256, (30 + i, 25, 3), dtype=np.uint8)
            suffix = ".png" if i % 2 else ".jpg"
            Image.fromarray(array).save(root / name / f"{i}{suffix}")
            arrays[(name, i)] = root / name / f"{i}{suffix}"
    (root / "n01" / "notes.txt").write_text("not an image")
    return arrays


def test_image_folder_reads_class_per_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTMETA_CACHE", str(tmp_path / "cache"))
    files = write_image_folder(tmp_path / "train")
    data = ImageFolder(tmp_path / "train", image_size=16)
    assert data.class_names == ["n01", "n02", "n10"]
    assert data.images.shape == (3 + 4 + 5, 3, 16, 16)
    assert data.get_labels() == [0] * 4 + [1] * 3 + [2] * 5
    expected = np.array(Image.open(files[("n01", 2)]).convert("RGB").resize((16, 16), Image.BILINEAR))
    assert torch.equal(data.images[2], torch.from_numpy(expected).permute(2, 0, 1))
    grey = ImageFolder(tmp_path / "train", image_size=(8, 12), channels=1, cache=False)
    assert grey.images.shape == (12, 1, 8, 12)
    assert torch.equal(ImageFolder(tmp_path / "train", image_size=16).images, data.images)  # cached
    episode = EpisodeSampler(data, 3, 1, 2, seed=0).sample()
    assert episode.support.shape == (1, 3, 3, 16, 16)


def test_image_folder_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        ImageFolder(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no class folders"):
        ImageFolder(tmp_path)
    (tmp_path / "a").mkdir()
    with pytest.raises(FileNotFoundError, match=r"class folder\(s\) \['a'\] .* hold no images"):
        ImageFolder(tmp_path)
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        ImageFolder(tmp_path, channels=2)


def test_image_folder_scales_16_bit_greyscale_to_8_bits(tmp_path):
    levels = np.array([[0, 257 * 128], [65535, 257 * 64]], dtype=np.uint16)
    (tmp_path / "a").mkdir()
    image = Image.fromarray(levels)
    assert image.mode == "I;16"
    image.save(tmp_path / "a" / "deep.png")
    data = ImageFolder(tmp_path, image_size=2, channels=1, cache=False)
    assert data.images[0, 0].tolist() == [[0, 128], [255, 64]]  # Pillow alone clips 128 to 255


def test_image_folder_names_an_image_it_cannot_decode(tmp_path):
    write_image_folder(tmp_path)
    bad = tmp_path / "n02" / "1.png"
    bad.write_bytes(bad.read_bytes()[:60])
    with pytest.raises(ValueError, match=f"cannot decode {bad}: "):
        ImageFolder(tmp_path, image_size=8, cache=False)


def test_an_unwritable_or_foreign_cache_is_skipped(tmp_path, monkeypatch):
    write_image_folder(tmp_path / "data")
    monkeypatch.setenv("FASTMETA_CACHE", str(tmp_path / "cache"))
    want = ImageFolder(tmp_path / "data", image_size=8, cache=False).images

    def disk_full(content, path):
        Path(path).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64")

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", disk_full)
        with pytest.warns(UserWarning, match="could not write the cache in .*continuing without it"):
            assert torch.equal(ImageFolder(tmp_path / "data", image_size=8).images, want)
    assert not [f for f in (tmp_path / "data" / ".fastmeta-cache").iterdir()]  # no partial file
    ImageFolder(tmp_path / "data", image_size=8)
    (cache,) = (tmp_path / "data" / ".fastmeta-cache").glob("images-*.pt")
    torch.save({"something": torch.zeros(1)}, cache)
    with pytest.warns(UserWarning, match="holds something else; rebuilding it"):
        assert torch.equal(ImageFolder(tmp_path / "data", image_size=8).images, want)


@needs_omniglot
def test_omniglot_zip_with_a_bad_crc_or_no_drawings(tmp_path):
    data = bytearray((OMNIGLOT / "images_background_small1.zip").read_bytes())
    with zipfile.ZipFile(OMNIGLOT / "images_background_small1.zip") as archive:
        member = next(i for i in archive.infolist() if i.filename.endswith(".png"))
    start = member.header_offset + 30 + len(member.filename.encode()) + len(member.extra)
    data[start + member.compress_size // 2] ^= 0xFF
    (tmp_path / "images_background_small1.zip").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"images_background_small1.zip is damaged at .*\.png"):
        Omniglot(tmp_path, cache=False)
    (tmp_path / "images_background_small1.zip").unlink()
    (tmp_path / "images_background").mkdir()
    with pytest.raises(FileNotFoundError, match="Omniglot: no drawings in .*images_background"):
        Omniglot(tmp_path, cache=False)


def test_sampler_takes_numpy_integers():
    images, labels = uneven_dataset()
    sampler = EpisodeSampler(
        LabelledImages(images, labels), np.int64(5), np.int32(1), np.int64(3), episodes_per_batch=np.int64(2), seed=0
    )
    assert sampler.sample().support.shape[:2] == (2, 5)


def test_labels_are_checked_before_anything_is_sized_by_them():
    started = time.perf_counter()
    with pytest.raises(ValueError, match="labels go up to 1000000000 for 2 images"):
        LabelledImages(torch.zeros(2, 1, 2, 2), torch.tensor([0, 10**9]))
    assert time.perf_counter() - started < 1


# Built-in characters -------------------------------------------------------


def test_characters_dataset():
    data = Characters()
    assert data.num_classes >= 1000
    assert len(set(data.alphabets)) >= 10
    assert data.images.shape == (data.num_classes * 20, 1, 28, 28)
    assert torch.equal(torch.bincount(data.labels), torch.full((data.num_classes,), 20))
    # strokes bright on a dark background, and every drawing of a class differs
    assert int(data.images[:, 0, 0, 0].max()) == 0 and int(data.images.max()) == 255
    first = data.images[data.labels == 0].flatten(1).float()
    assert torch.cdist(first, first).fill_diagonal_(float("inf")).min() > 0
    # loaded again from the cache: identical
    start = time.perf_counter()
    again = Characters()
    assert time.perf_counter() - start < 5 and torch.equal(again.images, data.images)
    parts = [Characters(split=s) for s in ("train", "val", "test")]
    assert sum(p.num_classes for p in parts) == data.num_classes
    assert not set(parts[0].class_names) & set(parts[2].class_names)


def test_character_drawings_are_deterministic_from_the_seed():
    glyphs = torch.zeros(3, 64, 64)
    glyphs[:, 20:44, 30:34] = 1
    a = _draw_examples(glyphs, 4, 28, seed=7)
    assert torch.equal(a, _draw_examples(glyphs, 4, 28, seed=7))
    assert not torch.equal(a, _draw_examples(glyphs, 4, 28, seed=8))
    with pytest.raises(ValueError, match="image_size and examples_per_class must be >= 1"):
        Characters(examples_per_class=0)
