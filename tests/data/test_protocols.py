"""The papers' protocols: Omniglot's named splits on generated trees with the
official names, CSV split files (Ravi & Larochelle's mini-ImageNet layout),
and Lake et al.'s one-shot runs."""

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fastmeta
from fastmeta.__main__ import main
from fastmeta.data import CSVImages, Omniglot, data_dir, official_characters, one_shot_runs
from fastmeta.data.omniglot import BACKGROUND_ALPHABETS, EVALUATION_ALPHABETS, VALIDATION_ALPHABETS
from fastmeta.training.run import load_data, resolved_split

OMNIGLOT = data_dir() / "omniglot"


def png(array: np.ndarray, mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


def write_official_omniglot(root: Path, subsets=("images_background", "images_evaluation"), drawings=1, extra=()):
    """Zips with the official alphabets and characters (``extra`` adds
    other ones to the background), each drawing a random 8x8 greyscale image."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for subset in subsets:
        alphabets = BACKGROUND_ALPHABETS if subset == "images_background" else EVALUATION_ALPHABETS
        names = [f"{a}/character{c:02d}" for a, n in alphabets.items() for c in range(1, n + 1)]
        if subset == "images_background":
            names += list(extra)
        with zipfile.ZipFile(root / f"{subset}.zip", "w") as archive:
            for name in names:
                for d in range(drawings):
                    archive.writestr(
                        f"{subset}/{name}/{d:04d}_{d:02d}.png", png(rng.integers(0, 256, (8, 8), np.uint8))
                    )
    return root


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    return write_official_omniglot(tmp_path_factory.mktemp("omniglot"))


@pytest.fixture(scope="module")
def background_only(tmp_path_factory):
    return write_official_omniglot(tmp_path_factory.mktemp("background"), subsets=("images_background",))


def characters(data) -> set:
    return {"/".join(name.split("/")[:2]) for name in data.class_names}


def test_the_official_tables_have_every_character():
    names = official_characters()
    assert len(names) == 1623 and len(set(names)) == 1623 and names == sorted(names)
    assert len(BACKGROUND_ALPHABETS) == 30 and sum(BACKGROUND_ALPHABETS.values()) == 964
    assert len(EVALUATION_ALPHABETS) == 20 and sum(EVALUATION_ALPHABETS.values()) == 659


def test_the_vinyals_split_has_the_published_classes(official):
    parts = {s: Omniglot(official, s, protocol="vinyals", image_size=8) for s in ("train", "val", "test", "trainval")}
    # the published lists: 4112, 688, 1692 and 4800 lines, each character rotated 4 ways
    assert {s: p.num_classes for s, p in parts.items()} == {"train": 4112, "val": 688, "test": 1692, "trainval": 4800}
    assert parts["train"].class_names[:4] == [f"Alphabet_of_the_Magi/character01/rot{r}" for r in (0, 90, 180, 270)]
    train, val, test = (characters(parts[s]) for s in ("train", "val", "test"))
    assert not (train & val or train & test or val & test)
    assert train | val | test == set(official_characters()) and characters(parts["trainval"]) == train | val
    assert {c.split("/")[0] for c in val} == set(VALIDATION_ALPHABETS)
    assert "Gurmukhi/character41" in train and "Gurmukhi/character42" in test
    assert {c.split("/")[0] for c in test} == {"Gurmukhi", "Kannada", "Keble", "Malayalam", "Manipuri", "Mongolian",
                                               "Old_Church_Slavonic_(Cyrillic)", "Oriya", "Sylheti", "Syriac_(Serto)",
                                               "Tengwar", "Tibetan", "ULOG"}  # fmt: skip
    # a rotated class is its character's images rotated
    plain = Omniglot(official, "test", protocol="vinyals", rotations=False, image_size=8)
    assert plain.num_classes == 423
    first = parts["test"].images[parts["test"].labels == 1]
    assert torch.equal(first, torch.rot90(plain.images[plain.labels == 0], 1, dims=(2, 3)))


def test_the_lake_split_trains_on_background_and_tests_on_evaluation_alphabets(official):
    parts = {s: Omniglot(official, s, protocol="lake", image_size=8) for s in ("train", "val", "test")}
    assert {s: p.num_classes for s, p in parts.items()} == {"train": 792, "val": 172, "test": 659}
    alphabets = {s: {c.split("/")[0] for c in characters(p)} for s, p in parts.items()}
    assert alphabets["train"] | alphabets["val"] == set(BACKGROUND_ALPHABETS)
    assert alphabets["val"] == set(VALIDATION_ALPHABETS) and alphabets["test"] == set(EVALUATION_ALPHABETS)
    assert all("/rot" not in name for p in parts.values() for name in p.class_names)


def test_a_split_whose_subsets_are_missing_names_them(background_only):
    with pytest.raises(
        FileNotFoundError, match="'vinyals' split's test classes: 0 of its 423 .* needs images_evaluation"
    ):
        Omniglot(background_only, "test", protocol="vinyals", image_size=8)
    with pytest.raises(FileNotFoundError, match="'lake' split's test classes: 0 of its 659 .* needs images_evaluation"):
        Omniglot(background_only, "test", protocol="lake", image_size=8)
    with pytest.warns(UserWarning, match="'vinyals' split's train classes: 792 of its 1028 .* in images_evaluation"):
        partial = Omniglot(background_only, "train", protocol="vinyals", rotations=False, image_size=8)
    assert partial.num_classes == 792
    assert Omniglot(background_only, "train", protocol="lake", image_size=8).num_classes == 792  # complete


@pytest.mark.skipif(not (OMNIGLOT / "images_background_small1.zip").exists(), reason="no Omniglot subsets")
def test_the_small_official_subsets_give_a_stated_part_of_the_lake_split():
    with pytest.warns(UserWarning, match="'lake' split's val classes: 22 of its 172 characters"):
        val = Omniglot(OMNIGLOT, "val", protocol="lake")
    assert {name.split("/")[0] for name in val.class_names} == {"Early_Aramaic"}


def test_named_splits_refuse_unofficial_characters_and_bad_names(tmp_path):
    root = write_official_omniglot(tmp_path, ("images_background",), extra=["Klingon/character01"])
    with pytest.raises(ValueError, match=r"not official \(\['Klingon/character01'\]\).*use protocol='random'"):
        Omniglot(root, "train", protocol="lake", image_size=8)
    with pytest.raises(ValueError, match="protocol must be one of .*'lake'.*got 'snell'"):
        Omniglot(root, "train", protocol="snell")
    with pytest.raises(ValueError, match="split must be one of .*'trainval'.*got 'validation'"):
        Omniglot(root, "validation", protocol="lake")


def test_the_random_split_has_a_trainval_part(background_only):
    parts = {s: Omniglot(background_only, s, image_size=8) for s in ("train", "val", "trainval")}
    assert parts["trainval"].class_names == sorted(parts["train"].class_names + parts["val"].class_names)


# CSV split files -----------------------------------------------------------


def write_ravi_layout(root: Path, header=True):
    """mini-ImageNet as Ravi & Larochelle's files lay it out: images/ and a CSV per split."""
    rng = np.random.default_rng(1)
    (root / "images").mkdir(parents=True)
    arrays = {}
    for split, classes in (("train", ["n02", "n01", "n03"]), ("val", ["n04", "n05"]), ("test", ["n06", "n07"])):
        rows = ["filename,label"] if header else []
        for name in classes:
            for i in range(3):
                arrays[f"{name}{i:08d}.jpg"] = array = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
                Image.fromarray(array).save(root / "images" / f"{name}{i:08d}.jpg", quality=100)
                rows.append(f"{name}{i:08d}.jpg,{name}")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return arrays


@pytest.mark.parametrize("header", [True, False])
def test_csv_split_files_are_read(tmp_path, header):
    write_ravi_layout(tmp_path, header)
    train = CSVImages(tmp_path / "train.csv", image_size=6)
    assert train.class_names == ["n01", "n02", "n03"] and train.images.shape == (9, 3, 6, 6)
    assert train.get_labels() == [1, 1, 1, 0, 0, 0, 2, 2, 2]  # rows in file order, classes by sorted name
    by_hand = Image.open(tmp_path / "images" / "n0100000002.jpg").convert("RGB").resize((6, 6), Image.BILINEAR)
    assert torch.equal(train.images[5], torch.from_numpy(np.array(by_hand)).permute(2, 0, 1))
    test = CSVImages(tmp_path / "test.csv", image_size=(4, 5), channels=1)
    assert test.class_names == ["n06", "n07"] and test.images.shape == (6, 1, 4, 5)
    assert torch.equal(CSVImages(tmp_path / "train.csv", image_size=6).images, train.images)  # from the cache


def test_csv_split_files_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="no split file .*train.csv; expected rows 'file name,class'"):
        CSVImages(tmp_path / "train.csv")
    write_ravi_layout(tmp_path)
    with pytest.raises(FileNotFoundError, match="no image folder .*pictures"):
        CSVImages(tmp_path / "train.csv", tmp_path / "pictures")
    (tmp_path / "bad.csv").write_text("filename,label\nn0100000000.jpg,n01\nn0100000001.jpg\n")
    with pytest.raises(ValueError, match="bad.csv line 3: expected 'file name,class', got 'n0100000001.jpg'"):
        CSVImages(tmp_path / "bad.csv")
    (tmp_path / "empty.csv").write_text("filename,label\n")
    with pytest.raises(ValueError, match="empty.csv lists no images"):
        CSVImages(tmp_path / "empty.csv")
    (tmp_path / "absent.csv").write_text("n0100000000.jpg,n01\nn09.jpg,n09\n")
    with pytest.raises(
        FileNotFoundError, match=r"1 image\(s\) listed in .*absent.csv are not in .*images, e.g. .*n09.jpg"
    ):
        CSVImages(tmp_path / "absent.csv")


# Lake et al.'s one-shot runs -------------------------------------------------


def write_one_shot_runs(root: Path, runs=3, ways=4, same_image=False, seed=0):
    """Runs in the official format: black strokes on white, one-bit 105x105
    PNGs; the test images' classes in a shuffled order. With
    ``same_image``, each test image is its class's training image."""
    rng = np.random.default_rng(seed)
    answers = []
    for r in range(1, runs + 1):
        run = f"run{r:02d}"
        (root / run / "training").mkdir(parents=True)
        (root / run / "test").mkdir()
        order = rng.permutation(ways)
        lines = []
        for k in range(ways):
            strokes = rng.random((105, 105)) < 0.1
            drawing = np.where(strokes, 0, 255).astype(np.uint8)
            (root / run / "training" / f"class{k + 1:02d}.png").write_bytes(png(drawing, "1"))
        for m, k in enumerate(order):
            if same_image:
                test = (root / run / "training" / f"class{k + 1:02d}.png").read_bytes()
            else:
                test = png(np.where(rng.random((105, 105)) < 0.1, 0, 255).astype(np.uint8), "1")
            (root / run / "test" / f"item{m + 1:02d}.png").write_bytes(test)
            lines.append(f"{run}/test/item{m + 1:02d}.png {run}/training/class{k + 1:02d}.png")
        (root / run / "class_labels.txt").write_text("\n".join(lines) + "\n")
        answers.append(order.tolist())
    return answers


def zip_folder(folder: Path, archive: Path):
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(folder.rglob("*")):
            z.write(path, path.relative_to(folder).as_posix() + ("/" if path.is_dir() else ""))
    return archive


def test_one_shot_runs_are_read_from_a_folder_or_the_zip(tmp_path):
    answers = write_one_shot_runs(tmp_path / "all_runs", runs=3, ways=4)
    names, episode = one_shot_runs(tmp_path / "all_runs", image_size=21)
    assert names == ["run01", "run02", "run03"]
    assert episode.support.shape == (3, 4, 1, 21, 21) and episode.query.shape == (3, 4, 1, 21, 21)
    assert episode.query_labels.tolist() == answers
    assert episode.support_labels.tolist() == [[0, 1, 2, 3]] * 3 and episode.classes.shape == (3, 4)
    # prepared as Omniglot's: resized from the one-bit image, inverted so strokes are 1
    drawing = Image.open(tmp_path / "all_runs" / "run02" / "training" / "class03.png")
    by_hand = 255 - np.array(drawing.convert("L").resize((21, 21), Image.BILINEAR))
    assert torch.equal(episode.support[1, 2, 0], torch.from_numpy(by_hand).float() / 255)
    zipped = zip_folder(tmp_path / "all_runs", tmp_path / "all_runs.zip")
    for path in (zipped, tmp_path):  # the zip, and the folder above the runs
        again_names, again = one_shot_runs(path, image_size=21)
        assert again_names == names and all(torch.equal(a, b) for a, b in zip(again, episode))


def test_one_shot_runs_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file or folder .*nowhere"):
        one_shot_runs(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no runNN/class_labels.txt in"):
        one_shot_runs(tmp_path)
    (tmp_path / "not.zip").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not.zip is not a readable zip file"):
        one_shot_runs(tmp_path / "not.zip")
    write_one_shot_runs(tmp_path / "runs", runs=2, ways=3)
    labels = tmp_path / "runs" / "run02" / "class_labels.txt"
    good = labels.read_text()
    labels.write_text(good + "run02/test/item04.png\n")
    with pytest.raises(ValueError, match="run02/class_labels.txt line 4: expected 'test image  training image'"):
        one_shot_runs(tmp_path / "runs")
    labels.write_text(good.replace("item01", "item09"))
    with pytest.raises(FileNotFoundError, match="names run02/test/item09.png, which is not there"):
        one_shot_runs(tmp_path / "runs")
    labels.write_text("\n".join(good.splitlines()[:2]) + "\n")
    with pytest.raises(ValueError, match=r"the runs differ .*\[\(2, 2\), \(3, 3\)\]"):
        one_shot_runs(tmp_path / "runs")
    labels.write_text(good)
    (tmp_path / "runs" / "run01" / "test" / "item02.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match="cannot decode .*run01/test/item02.png"):
        one_shot_runs(tmp_path / "runs")


# fastmeta train --split, fastmeta evaluate --oneshot-runs -------------------

TINY = "--ways 3 --shots 1 --queries 2 --meta-batch 2 --val-episodes 2 --validate-every 2 --no-progress".split()


def cli_error(argv, capsys):
    capsys.readouterr()
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture(scope="module")
def official_drawings(tmp_path_factory):
    return write_official_omniglot(tmp_path_factory.mktemp("omniglot3"), drawings=3)


def test_train_takes_a_named_split_and_evaluate_reports_it(official_drawings, tmp_path, capsys):
    data = ["--data", f"omniglot:{official_drawings}", "--image-size", "16", "--steps", "1"]
    # the complete official files: the default is Vinyals et al.'s split, recorded in the run
    assert main(["train", "protonet", *data, *TINY, "--out", str(tmp_path / "auto")]) == 0
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["split"] == "vinyals"
    config = tmp_path / "lake.toml"
    config.write_text('split = "lake"\n')
    assert main(["train", "protonet", *data, *TINY, "--config", str(config), "--out", str(tmp_path / "lake")]) == 0
    trained = fastmeta.load_checkpoint(tmp_path / "lake")
    assert trained.config.split == "lake"
    test = load_data(trained.config, "test")
    assert {name.split("/")[0] for name in test.class_names} == set(EVALUATION_ALPHABETS)
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "lake"), "--episodes", "2", "--queries", "2"]) == 0
    assert "(lake split), test classes, 3-way 1-shot" in capsys.readouterr().out
    record = json.loads((tmp_path / "lake" / "evaluation.jsonl").read_text().splitlines()[-1])
    assert (record["protocol"], record["split"], record["episodes"]) == ("lake", "test", 2)


def test_split_files_are_the_default_for_a_folder_that_has_them(tmp_path):
    write_ravi_layout(tmp_path / "mini")
    config = fastmeta.training.make_config("protonet", data=f"folder:{tmp_path / 'mini'}", image_size=8)
    assert resolved_split(config) == "files"
    assert load_data(config, "val").class_names == ["n04", "n05"]
    assert load_data(config, "test").images.shape == (6, 3, 8, 8)
    random = fastmeta.training.make_config("protonet", data=f"folder:{tmp_path / 'mini' / 'images'}", image_size=8)
    assert resolved_split(random) == "random"


def test_bad_splits_get_one_line_and_status_2(tmp_path, capsys):
    out = ["--out", str(tmp_path / "x")]
    assert "split 'vinyals' does not apply to chars data; use auto, random" in cli_error(
        ["train", "protonet", "--split", "vinyals", *out], capsys
    )
    assert "split 'files' does not apply to omniglot data; use auto, random, vinyals, lake" in cli_error(
        ["train", "protonet", "--data", "omniglot", "--split", "files", *out], capsys
    )
    (tmp_path / "classes" / "a").mkdir(parents=True)
    assert "no train.csv (with images/) nor train/ folder of classes in" in cli_error(
        ["train", "protonet", "--data", f"folder:{tmp_path / 'classes'}", "--split", "files", *out], capsys
    )


def test_a_named_split_missing_its_test_subset_trains_on_what_is_there_and_cannot_test(tmp_path, capsys):
    background = write_official_omniglot(tmp_path / "background", ("images_background",), drawings=3)
    flags = ["--data", f"omniglot:{background}", "--split", "vinyals", "--image-size", "16", "--steps", "1"]
    capsys.readouterr()
    assert main(["train", "protonet", *flags, *TINY, "--out", str(tmp_path / "run")]) == 0
    warning = "fastmeta train: warning: Omniglot: the 'vinyals' split's train classes: 792 of its 1028 characters are"
    assert warning in capsys.readouterr().err.splitlines()[0]
    assert "'vinyals' split's test classes: 0 of its 423 characters are in" in cli_error(
        ["evaluate", str(tmp_path / "run")], capsys
    )


@pytest.fixture(scope="module")
def protonet_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "protonet"
    assert main(["train", "protonet", "--out", str(out), "--steps", "1", *TINY]) == 0
    return out


@pytest.mark.parametrize("zipped", [False, True])
def test_evaluate_on_lake_one_shot_runs(protonet_run, tmp_path, capsys, zipped):
    answers = write_one_shot_runs(tmp_path / "all_runs", runs=3, ways=4, same_image=True)
    runs = zip_folder(tmp_path / "all_runs", tmp_path / "all_runs.zip") if zipped else tmp_path / "all_runs"
    capsys.readouterr()
    assert main(["evaluate", str(protonet_run), "--oneshot-runs", str(runs)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    # a test image that is its class's training image is found however the classes are shuffled
    assert lines[:3] == ["run01: 100.00%", "run02: 100.00%", "run03: 100.00%"] and len(answers) == 3
    assert lines[3].startswith("protonet on Lake et al.'s 3 one-shot runs (4-way 1-shot): 100.00% +- 0.00")
    assert lines[3].endswith("humans 95.5%, Koch et al.'s Siamese network 92.0%")
    record = json.loads((protonet_run / "evaluation.jsonl").read_text().splitlines()[-1])
    assert record["protocol"] == "lake-one-shot-runs" and record["runs"] == {f"run0{r}": 100.0 for r in (1, 2, 3)}


def test_one_shot_runs_accuracy_counts_each_test_image(protonet_run, tmp_path):
    write_one_shot_runs(tmp_path / "runs", runs=2, ways=4, same_image=True)
    labels = tmp_path / "runs" / "run02" / "class_labels.txt"
    lines = labels.read_text().splitlines()
    # swap the answers of two test images: those two are now wrong
    first, second = (line.split() for line in lines[:2])
    lines[:2] = [f"{first[0]} {second[1]}", f"{second[0]} {first[1]}"]
    labels.write_text("\n".join(lines) + "\n")
    result = fastmeta.training.evaluate_one_shot_runs(protonet_run, tmp_path / "runs")
    assert result["runs"] == {"run01": 100.0, "run02": 50.0} and result["accuracy"] == 75.0


def test_one_shot_runs_bad_uses_get_one_line_and_status_2(protonet_run, tmp_path, capsys):
    write_one_shot_runs(tmp_path / "runs", runs=2, ways=4)
    run = str(protonet_run)
    assert "--ways, --seed cannot be used with --oneshot-runs" in cli_error(
        ["evaluate", run, "--oneshot-runs", str(tmp_path / "runs"), "--ways", "4", "--seed", "1"], capsys
    )
    assert f"--oneshot-runs: no file or folder {tmp_path / 'nowhere'}" in cli_error(
        ["evaluate", run, "--oneshot-runs", str(tmp_path / "nowhere")], capsys
    )
    maml = tmp_path / "maml"
    assert main(["train", "maml", "--out", str(maml), "--steps", "1", *TINY]) == 0
    assert "maml was trained with a 3-way classifier; it evaluates 3-way episodes only, got ways=4" in cli_error(
        ["evaluate", str(maml), "--oneshot-runs", str(tmp_path / "runs")], capsys
    )


def test_one_shot_runs_refuse_a_model_trained_on_colour_images(tmp_path, capsys):
    rng = np.random.default_rng(2)
    for c in range(30):
        (tmp_path / "colour" / f"c{c:02d}").mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
                tmp_path / "colour" / f"c{c:02d}" / f"{i}.png"
            )
    run = tmp_path / "run"
    flags = ["--data", f"folder:{tmp_path / 'colour'}", "--image-size", "16", "--steps", "1", "--out", str(run)]
    assert main(["train", "protonet", *flags, *TINY]) == 0
    write_one_shot_runs(tmp_path / "runs", runs=1, ways=3)
    assert "protonet was trained on 3-channel images; the one-shot runs are greyscale characters" in cli_error(
        ["evaluate", str(run), "--oneshot-runs", str(tmp_path / "runs")], capsys
    )
