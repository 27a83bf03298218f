"""VTAB-1K / FGVC loading on tiny fake folders: round trip, preprocessing, aliases, caching and every error case."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from moppa_nb.data import (FGVC_TASKS, TASK_ALIASES, VTAB_CLASSES, VTAB_GROUPS, VTAB_TASKS, Preprocessing, canonical_task,
                           load_fgvc_task, load_vtab_task, task_group, write_vtab_task)


def splits_of(rng, shape=(8, 8), sizes=(6, 3, 4), classes=3):
    return {split: (rng.integers(0, 256, (n, *shape), dtype=np.uint8), np.arange(n) % classes)
            for split, n in zip(("train800", "val200", "test"), sizes)}


@pytest.fixture
def fake_vtab(tmp_path):
    "A VTAB root with a gray 'toy' task (PNG, task.json) and a colour 'dtd' task (JPEG, NOAH name, no task.json)."
    rng = np.random.default_rng(0)
    gray = splits_of(rng)
    write_vtab_task(tmp_path / "vtab", "toy", gray)
    colour = splits_of(rng, shape=(12, 10, 3), classes=47)
    write_vtab_task(tmp_path / "vtab", "dtd", colour, image_format="jpg")
    (tmp_path / "vtab" / "dtd" / "task.json").unlink()
    return tmp_path / "vtab", gray, colour


def test_round_trip_is_exact_for_png_at_stored_size(fake_vtab):
    root, gray, _ = fake_vtab
    task = load_vtab_task(root, "toy", Preprocessing(size=8), cache_dir=False)
    assert (task.name, task.num_classes) == ("toy", 3)
    for split in ("train800", "val200", "test"):
        images, labels = task[split]
        assert images.dtype == torch.uint8 and labels.dtype == torch.int64
        assert images.shape == (len(gray[split][1]), 3, 8, 8)
        for channel in range(3):
            np.testing.assert_array_equal(images[:, channel].numpy(), gray[split][0])
        np.testing.assert_array_equal(labels.numpy(), gray[split][1])
    joined = task["train800val200"]
    assert torch.equal(joined[0], torch.cat([task["train800"][0], task["val200"][0]]))
    assert torch.equal(joined[1], torch.cat([task["train800"][1], task["val200"][1]]))


def test_vtab_name_alias_and_resize(fake_vtab):
    root, _, colour = fake_vtab
    task = load_vtab_task(root, "DTD", Preprocessing(size=16, interpolation="bilinear"), splits=("test",), cache_dir=False)
    assert task.num_classes == VTAB_CLASSES["dtd"] == 47
    images, labels = task["test"]
    assert images.shape == (4, 3, 16, 16) and labels.tolist() == [0, 1, 2, 3]
    assert list(task.splits) == ["test"]
    with pytest.raises(KeyError, match="has no split 'val200'"):
        task["val200"]
    assert task.record()["preprocessing"] == {"size": 16, "interpolation": "bilinear", "normalization": "imagenet", "flip": False}


def test_cache_is_written_then_read(fake_vtab, tmp_path, monkeypatch):
    root, _, _ = fake_vtab
    first = load_vtab_task(root, "toy", Preprocessing(size=8), cache_dir=tmp_path / "cache")
    files = sorted((tmp_path / "cache").glob("toy_*_8_bicubic_*.pt"))
    assert len(files) == 4
    monkeypatch.setattr("moppa_nb.data.decode_images", lambda *a, **k: pytest.fail("decoded again"))
    second = load_vtab_task(root, "toy", Preprocessing(size=8), cache_dir=tmp_path / "cache")
    for split in first.splits:
        assert torch.equal(first[split][0], second[split][0]) and torch.equal(first[split][1], second[split][1])


def test_cache_key_changes_with_size_and_list_file(fake_vtab, tmp_path):
    root, _, _ = fake_vtab
    load_vtab_task(root, "toy", Preprocessing(size=8), splits=("test",), cache_dir=tmp_path / "cache")
    load_vtab_task(root, "toy", Preprocessing(size=4), splits=("test",), cache_dir=tmp_path / "cache")
    lines = (root / "toy" / "test.txt").read_text().splitlines()
    (root / "toy" / "test.txt").write_text("\n".join(lines[:2]) + "\n")
    shorter = load_vtab_task(root, "toy", Preprocessing(size=8), splits=("test",), cache_dir=tmp_path / "cache")
    assert len(shorter["test"][1]) == 2
    assert len(list((tmp_path / "cache").glob("toy_test_*.pt"))) == 3


def test_default_cache_dir_follows_environment(fake_vtab, tmp_path, monkeypatch):
    root, _, _ = fake_vtab
    monkeypatch.setenv("MOPPA_NB_CACHE", str(tmp_path / "env-cache"))
    load_vtab_task(root, "toy", Preprocessing(size=8), splits=("val200",))
    assert len(list((tmp_path / "env-cache" / "decoded").glob("toy_val200_*.pt"))) == 1


def test_preprocessing_normalisations_and_flips():
    images = torch.arange(2 * 3 * 2 * 2, dtype=torch.uint8).view(2, 3, 2, 2) * 10
    x = images.float() / 255
    for name, mean, std in (("imagenet", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), ("half", (0.5,) * 3, (0.5,) * 3),
                            ("none", (0.0,) * 3, (1.0,) * 3)):
        out = Preprocessing(normalization=name).normalize(images)
        assert out.dtype == torch.float32 and out.shape == images.shape and out.device == images.device
        expected = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        torch.testing.assert_close(out, expected)
    flipped = Preprocessing(normalization="none").normalize(images, flips=torch.tensor([True, False]))
    torch.testing.assert_close(flipped[0], x[0].flip(-1))
    torch.testing.assert_close(flipped[1], x[1])
    with pytest.raises(ValueError, match="uint8"):
        Preprocessing().normalize(x)


@pytest.mark.parametrize("field, value, message", [("size", 0, "Preprocessing.size must be at least 1, got 0"), ("interpolation", "nearest", "bicubic"),
                                                   ("normalization", "0.5", "half"), ("flip", 1, "bool")])
def test_preprocessing_validates_fields(field, value, message):
    with pytest.raises(ValueError, match=message):
        Preprocessing(**{field: value})


def test_tasks_groups_and_aliases():
    assert len(VTAB_TASKS) == 19 and list(VTAB_CLASSES.values()) == [102, 100, 47, 102, 37, 10, 397, 2, 10, 45, 5, 8, 6, 6, 4, 16, 16, 18, 9]
    assert [t for group in VTAB_GROUPS.values() for t in group] == list(VTAB_TASKS)
    assert {name: canonical_task(name) for name in ("cifar100", "oxford_pet", "pets", "flowers102", "oxford_flowers",
                                                   "camelyon", "retinopathy", "sun", "Clevr-Count")} == {
        "cifar100": "cifar", "oxford_pet": "oxford_iiit_pet", "pets": "oxford_iiit_pet", "flowers102": "oxford_flowers102",
        "oxford_flowers": "oxford_flowers102", "camelyon": "patch_camelyon", "retinopathy": "diabetic_retinopathy",
        "sun": "sun397", "Clevr-Count": "clevr_count"}
    assert all(target in VTAB_TASKS for target in TASK_ALIASES.values())
    assert (task_group("kitti"), task_group("eurosat"), task_group("svhn")) == ("Structured", "Specialized", "Natural")
    with pytest.raises(ValueError, match="Did you mean 'eurosat'"):
        canonical_task("eurosta")


def test_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"Task 'dtd': data root .*nowhere does not exist"):
        load_vtab_task(tmp_path / "nowhere", "dtd")


def test_missing_task_folder_and_unknown_name(fake_vtab):
    root, _, _ = fake_vtab
    with pytest.raises(FileNotFoundError, match=r"Task 'cifar100': folder .*cifar does not exist.*\['dtd', 'toy'\]"):
        load_vtab_task(root, "cifar100", cache_dir=False)
    with pytest.raises(ValueError, match="Did you mean 'svhn'.*Task folders under"):
        load_vtab_task(root, "svnh", cache_dir=False)


def test_missing_list_file(fake_vtab):
    root, _, _ = fake_vtab
    (root / "toy" / "val200.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"Task 'toy': list file .*val200.txt not found; expected lines"):
        load_vtab_task(root, "toy", cache_dir=False)


@pytest.mark.parametrize("line", ["images/test/000001.png", "images/test/000001.png one", "images/test/000001.png 1.5"])
def test_malformed_line(fake_vtab, line):
    root, _, _ = fake_vtab
    (root / "toy" / "test.txt").write_text(f"images/test/000002.png 1\n{line}\n")
    with pytest.raises(ValueError, match=r"Task 'toy': .*test.txt:2: expected '<relative path> <integer label>'"):
        load_vtab_task(root, "toy", splits=("test",), cache_dir=False)


@pytest.mark.parametrize("damage, error, message", [
    (lambda image: image.unlink(), FileNotFoundError, r"Task 'toy': image .*000003.png is listed but does not exist"),
    (lambda image: image.write_bytes(b"not a png"), ValueError, r"Task 'toy': image .*000003.png cannot be decoded"),
], ids=["missing", "undecodable"])
def test_broken_image(fake_vtab, damage, error, message):
    root, _, _ = fake_vtab
    damage(root / "toy" / "images" / "test" / "000003.png")
    with pytest.raises(error, match=message):
        load_vtab_task(root, "toy", splits=("test",), cache_dir=False)


@pytest.mark.parametrize("label", [3, -1])
def test_label_out_of_range(fake_vtab, label):
    root, _, _ = fake_vtab
    (root / "toy" / "test.txt").write_text(f"images/test/000001.png {label}\n")
    with pytest.raises(ValueError, match=rf"Task 'toy': .*test.txt:1: label {label} outside \[0, 3\)"):
        load_vtab_task(root, "toy", splits=("test",), cache_dir=False)


def test_vtab_label_range_uses_vtab_class_count(fake_vtab):
    root, _, _ = fake_vtab
    (root / "dtd" / "test.txt").write_text("images/test/000001.jpg 47\n")
    with pytest.raises(ValueError, match=r"label 47 outside \[0, 47\)"):
        load_vtab_task(root, "dtd", splits=("test",), cache_dir=False)


def test_write_refuses_bad_input(tmp_path):
    rng = np.random.default_rng(1)
    with pytest.raises(ValueError, match="labels must lie in"):
        write_vtab_task(tmp_path, "bad", {"test": (rng.integers(0, 256, (2, 4, 4), dtype=np.uint8), [0, 5])}, num_classes=3)
    with pytest.raises(ValueError, match="2 images but 3 labels"):
        write_vtab_task(tmp_path, "bad", {"test": (rng.integers(0, 256, (2, 4, 4), dtype=np.uint8), [0, 1, 1])})
    with pytest.raises(ValueError, match="uint8 image"):
        write_vtab_task(tmp_path, "bad", {"test": (np.zeros((1, 4, 4), dtype=np.float32), [0])})
    with pytest.raises(ValueError, match="train800 followed by val200"):
        write_vtab_task(tmp_path, "bad", {"train800val200": (np.zeros((1, 4, 4), dtype=np.uint8), [0])})


def test_fgvc_json_splits(tmp_path):
    rng = np.random.default_rng(2)
    folder = tmp_path / "fgvc" / "Stanford-dogs"
    (folder / "Images" / "n1").mkdir(parents=True)
    for i in range(120):
        Image.fromarray(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)).save(folder / "Images" / "n1" / f"{i}.jpg")
    (folder / "train.json").write_text(json.dumps({f"n1/{i}.jpg": 10 + i for i in range(120)}))
    (folder / "val.json").write_text(json.dumps({"n1/5.jpg": 15}))
    (folder / "test.json").write_text(json.dumps({"n1/1.jpg": 11, "n1/119.jpg": 129}))
    task = load_fgvc_task(tmp_path / "fgvc", "dogs", Preprocessing(size=6), cache_dir=False)
    assert task.num_classes == FGVC_TASKS["stanford_dogs"].num_classes == 120
    assert task["test"][1].tolist() == [1, 119] and task["val"][1].tolist() == [5]
    assert task["train"][0].shape == (120, 3, 6, 6)
    (folder / "test.json").write_text(json.dumps({"n1/1.jpg": 500}))
    with pytest.raises(ValueError, match="class ids absent from train.json"):
        load_fgvc_task(tmp_path / "fgvc", "stanford_dogs", splits=("test",), cache_dir=False)
    (folder / "val.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"Task 'stanford_dogs': split file .*val.json not found"):
        load_fgvc_task(tmp_path / "fgvc", "stanford_dogs", splits=("val",), cache_dir=False)
    with pytest.raises(FileNotFoundError, match="CUB_200_2011"):
        load_fgvc_task(tmp_path / "fgvc", "cub", cache_dir=False)
    with pytest.raises(ValueError, match="Did you mean 'nabirds'"):
        load_fgvc_task(tmp_path / "fgvc", "nabird", cache_dir=False)


def test_prune_command_deletes_cached_splits_older_than_days(tmp_path):
    """`python -m moppa_nb.data prune --older-than DAYS` removes only the splits unused for that long ($MOPPA_NB_CACHE)."""
    import os, subprocess, sys, time
    from pathlib import Path
    cache = tmp_path / "moppa_nb" / "decoded"; cache.mkdir(parents=True)
    old, recent = cache / "a_test_16_bilinear_0.pt", cache / "b_test_16_bilinear_0.pt"
    for path in (old, recent): path.write_bytes(b"x")
    os.utime(old, (time.time() - 10 * 86400,) * 2)
    run = lambda *args: subprocess.run([sys.executable, "-m", "moppa_nb.data", "prune", *args], capture_output=True, text=True,
                                       env={**os.environ, "MOPPA_NB_CACHE": str(tmp_path / "moppa_nb")}, cwd=Path(__file__).parent.parent)
    done = run("--older-than", "7")
    assert done.returncode == 0 and "deleted 1 cached file(s)" in done.stdout, done.stderr
    assert not old.exists() and recent.exists()
    assert run().returncode == 0 and not recent.exists()
