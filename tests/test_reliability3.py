"""Reliability, round 3 (issue #27): safe extraction, no data lost on a failed rebuild or write, a cache prune that touches only
the cache, checkpoints that know their data and weights, adapters refused without their checks, one-line messages."""
import errno
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import time
import warnings
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import moppa_nb.adapt as adapt
import moppa_nb.data as data
import moppa_nb.datasets as datasets
from moppa_nb import PeftError, apply_peft, load_adapter, save_adapter
from moppa_nb.adapt import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapted_methods, atomic_write, remove_stale_temporaries, writer_gone,
                            writer_host, writer_tag)
from moppa_nb.checkpoint import CHECKPOINT_NAME, CheckpointError
from moppa_nb.data import (Preprocessing, TaskData, cache_root, load_fgvc_task, load_vtab_task, prune_cache, write_fgvc_task,
                           write_vtab_task)
from moppa_nb.datasets import FGVC_SOURCES, MANIFEST, build_fgvc, build_vtab, extract, fake_fgvc_sources, fake_vtab_archive
from moppa_nb.registry import build_options, check_rank, get_method, vit_layout
from moppa_nb.testing import perturb_for_testing, tiny_vit, toy_task, toy_vit
from moppa_nb.train import TrainConfig, fit

UNCHECKED = {name: tuple(replace(s, sha256=None, md5=None, size=None) for s in files) for name, files in FGVC_SOURCES.items()}
quiet = dict(log=lambda line: None)


def tree(folder: Path) -> dict[str, str]:
    "Every file under `folder` (hidden ones included) -> sha1 of its bytes."
    return {p.relative_to(folder).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line(error) -> str:
    message = str(error.value if hasattr(error, "value") else error)
    assert "\n" not in message.strip(), message
    return message


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# ---------------------------------------------------------------- 1. extraction and folder sources
def tar_with_special_bits(path: Path) -> Path:
    with tarfile.open(path, "w") as bundle:
        def add(name, mode, kind=tarfile.REGTYPE, payload=b"#!/bin/sh\n"):
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.uid, info.gid, info.uname, info.gname = kind, mode, 12345, 12345, "", ""
            info.mtime = 1_600_000_000
            if kind == tarfile.DIRTYPE:
                bundle.addfile(info)
            else:
                info.size = len(payload)
                bundle.addfile(info, io.BytesIO(payload))
        add("top/sticky", 0o1777, tarfile.DIRTYPE)
        add("top/sticky/setuid-tool", 0o4755)
        add("top/sticky/setgid-tool", 0o2775)
        add("top/sticky/plain.txt", 0o644, payload=b"text")
    return path


@pytest.mark.parametrize("how", ["data-filter", "by-hand"])
def test_tar_extraction_drops_special_bits_and_ownership(how, tmp_path, monkeypatch):
    if how == "by-hand":                                    # a Python whose tarfile has no extraction filters
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    out = extract(tar_with_special_bits(tmp_path / "bits.tar"), tmp_path / "out")
    paths = [out / "top" / "sticky", *(out / "top" / "sticky").iterdir()]
    assert len(paths) == 4
    for path in paths:
        status = path.stat()
        assert status.st_mode & 0o7000 == 0, (path.name, oct(status.st_mode))      # no setuid, setgid, sticky
        assert status.st_uid == os.getuid() and status.st_gid == os.getgid(), path.name
        assert path.is_dir() or status.st_mode & 0o022 == 0, (path.name, oct(status.st_mode))   # no group/other write
    assert (out / "top" / "sticky" / "plain.txt").read_bytes() == b"text"


def noah_folder(root: Path, sizes=(8, 4, 5)) -> Path:
    "A NOAH-layout folder source `root/vtab-1k/dtd` (no task.json, as real copies)."
    rng = np.random.default_rng(0)
    splits = {split: (rng.integers(0, 256, (n, 6, 6, 3), dtype=np.uint8), np.arange(n) % 47)
              for split, n in zip(("train800", "val200", "test"), sizes)}
    folder = write_vtab_task(root / "vtab-1k", "dtd", splits, 47, image_format="jpg")
    (folder / "task.json").unlink()
    return root / "vtab-1k"


@pytest.mark.parametrize("case", ["link-to-a-private-file", "link-listed-in-a-split", "link-to-a-folder", "task-folder-is-a-link",
                                  "regular-file"])
def test_a_folder_source_copies_regular_files_and_follows_no_link(case, tmp_path):
    source = noah_folder(tmp_path / "src")
    secret = tmp_path / "private" / "id_rsa"
    secret.parent.mkdir()
    secret.write_text("PRIVATE KEY")
    images = source / "dtd" / "images"
    if case == "task-folder-is-a-link":                       # the task folder itself lies outside the source
        (source / "dtd").rename(tmp_path / "private" / "dtd")
        (source / "dtd").symlink_to(tmp_path / "private" / "dtd", target_is_directory=True)
        with pytest.raises(ValueError, match="is a link") as error:
            build_vtab(tmp_path / "built", ["dtd"], source, expected_sizes=None, **quiet)
        one_line(error)
        assert not (tmp_path / "built" / "dtd").exists()
        return
    if case == "link-to-a-private-file":
        (images / "id_rsa").symlink_to(secret)
    elif case == "link-listed-in-a-split":
        (images / "test" / "leak.jpg").symlink_to(secret)
        with open(source / "dtd" / "test.txt", "a") as listing: listing.write("images/test/leak.jpg 0\n")
    elif case == "link-to-a-folder":
        (images / "private").symlink_to(secret.parent, target_is_directory=True)
    else:
        (images / "notes.txt").write_text("kept")
    if case == "link-listed-in-a-split":
        with pytest.raises(FileNotFoundError, match="leak.jpg.*not followed") as error:
            build_vtab(tmp_path / "built", ["dtd"], source, expected_sizes=None, **quiet)
        one_line(error)
    else:
        build_vtab(tmp_path / "built", ["dtd"], source, expected_sizes=None, **quiet)
    built = tmp_path / "built"
    leaked = [p for p in built.rglob("*") if p.is_file() and p.read_bytes() == b"PRIVATE KEY"]
    assert not leaked and not any(p.is_symlink() for p in built.rglob("*"))
    if case == "regular-file":
        assert (built / "dtd" / "images" / "notes.txt").read_text() == "kept"


# ---------------------------------------------------------------- 2. a failed rebuild keeps the earlier task
def fail_on_test_split(monkeypatch):
    real = data._write_split_images

    def write(image_root, task, split, *args, **kwargs):
        if split == "test": raise OSError(errno.ENOSPC, "No space left on device (injected)")
        return real(image_root, task, split, *args, **kwargs)
    monkeypatch.setattr(data, "_write_split_images", write)


@pytest.mark.parametrize("builder", ["build_vtab", "build_fgvc", "build_mini_vtab", "write_fgvc_task"])
def test_a_failed_rebuild_leaves_the_earlier_task_whole(builder, tmp_path, monkeypatch):
    root = tmp_path / "root"
    if builder == "build_vtab":
        build_vtab(root, ["dtd"], noah_folder(tmp_path / "good"), expected_sizes=None, **quiet)
        bad = noah_folder(tmp_path / "bad", sizes=(6, 3, 4))
        with open(bad / "dtd" / "test.txt", "a") as listing: listing.write("images/test/missing.jpg 1\n")
        rebuild, error = lambda: build_vtab(root, ["dtd"], bad, expected_sizes=None, **quiet), FileNotFoundError
    elif builder == "build_fgvc":
        fake_fgvc_sources("cub", tmp_path / "downloads")
        build_fgvc(root, ["cub"], "official", downloads=tmp_path / "downloads", sources=UNCHECKED, **quiet)
        (tmp_path / "splits" / "OxfordFlower").mkdir(parents=True)          # VPT splits for another dataset only
        for split in ("train", "val", "test"): (tmp_path / "splits" / "OxfordFlower" / f"{split}.json").write_text("{}")
        rebuild = lambda: build_fgvc(root, ["cub"], "vpt", split_archive=tmp_path / "splits", downloads=tmp_path / "downloads",
                                     sources=UNCHECKED, **quiet)
        error = ValueError
    elif builder == "build_mini_vtab":
        from moppa_nb.mini_vtab import build_mini_vtab
        build_mini_vtab(root, ["location"], seed=0, test_size=20)
        fail_on_test_split(monkeypatch)
        rebuild, error = lambda: build_mini_vtab(root, ["location"], seed=1, test_size=20), OSError
    else:
        rng = np.random.default_rng(0)
        splits = lambda: {s: (rng.integers(0, 256, (n, 6, 6), dtype=np.uint8), np.arange(n) % 3) for s, n in
                          (("train", 6), ("val", 3), ("test", 3))}
        write_fgvc_task(root, "toy", splits(), num_classes=3)
        fail_on_test_split(monkeypatch)
        rebuild, error = lambda: write_fgvc_task(root, "toy", splits(), num_classes=3), OSError
    before = tree(root)
    with pytest.raises(error):
        rebuild()
    assert tree(root) == before                      # the task, its manifest entry, and nothing half-built beside them
    assert sorted(p.name for p in root.iterdir()) == sorted({Path(k).parts[0] for k in before})


# ---------------------------------------------------------------- 3. adapters written as a pair
def adapter_model(seed_noise=0):
    torch.manual_seed(seed_noise)
    return perturb_for_testing(apply_peft(tiny_vit(), "lora"))


@pytest.mark.parametrize("failing", ["weights", "config"])
def test_a_failed_adapter_write_leaves_the_old_adapter_loadable(failing, tmp_path, monkeypatch):
    old = adapter_model(0)
    save_adapter(old, tmp_path)
    new = adapter_model(1)
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if failing == "weights":
        import safetensors.torch
        monkeypatch.setattr(safetensors.torch, "save_file", lambda *args, **kwargs: (_ for _ in ()).throw(full))
    else:
        real = Path.write_text
        monkeypatch.setattr(Path, "write_text", lambda self, *a, **k: (_ for _ in ()).throw(full) if "adapter_config" in self.name
                            or self.suffix == ".tmp" else real(self, *a, **k))
    with pytest.raises(OSError, match="disk is full"):
        save_adapter(new, tmp_path)
    monkeypatch.undo()
    loaded = load_adapter(tiny_vit(), tmp_path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), old.eval()(x))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS])


@pytest.mark.parametrize("owner", ["killed", "live", "another host's", "older name without the host"])
def test_a_killed_adapter_write_leaves_nothing_behind_at_the_next_save(owner, tmp_path):
    tag = {"killed": f"{dead_pid()}@{writer_host()}", "live": f"{os.getppid()}@{writer_host()}",
           "another host's": f"{dead_pid()}@another-host.example.org", "older name without the host": str(dead_pid())}[owner]
    stale = tmp_path / f".adapter.{tag}.k1ll3d_x.partial"
    stale.mkdir(parents=True)
    (stale / ADAPTER_WEIGHTS).write_bytes(b"half")
    save_adapter(adapter_model(0), tmp_path)
    assert stale.exists() == (owner != "killed")                    # an older name goes only once an hour old
    load_adapter(tiny_vit(), tmp_path)


# ---------------------------------------------------------------- 4. the decoded-image cache
@pytest.fixture
def vtab_root(tmp_path):
    rng = np.random.default_rng(0)
    splits = {s: (rng.integers(0, 256, (n, 8, 8), dtype=np.uint8), np.arange(n) % 3) for s, n in (("train800", 4), ("val200", 2), ("test", 3))}
    write_vtab_task(tmp_path / "vtab", "toy", splits, num_classes=3)
    return tmp_path / "vtab"


def load(root, cache):
    return load_vtab_task(root, "toy", Preprocessing(size=8), splits=("train800", "test"), cache_dir=cache)


def same_task(a, b):
    return all(torch.equal(a[s][0], b[s][0]) and torch.equal(a[s][1], b[s][1]) for s in ("train800", "test"))


@pytest.mark.parametrize("other", ["checkpoint.pt", "model.pt", "notes.tmp", "nested/a_test_16_bilinear_0.pt"])
def test_prune_deletes_only_the_loaders_cache_files(other, vtab_root, tmp_path):
    cache = tmp_path / "cache"
    load(vtab_root, cache)
    entries = sorted(cache.glob("toy_*.pt"))
    assert len(entries) == 2
    (cache / other).parent.mkdir(parents=True, exist_ok=True)
    (cache / other).write_bytes(b"a run's file")
    deleted = prune_cache(cache)
    assert sorted(deleted) == entries and (cache / other).read_bytes() == b"a run's file"


@pytest.mark.parametrize("days", ["nan", "-1", "inf", "2"])
def test_prune_refuses_an_age_that_is_not_a_finite_number_of_days(days, vtab_root, tmp_path, capsys):
    cache = tmp_path / "cache"
    load(vtab_root, cache)
    if days == "2":
        data.main(["prune", "--cache-dir", str(cache), "--older-than", days])
        assert len(list(cache.glob("*.pt"))) == 2                  # used just now: kept
        return
    with pytest.raises(ValueError, match="finite number of days"):
        prune_cache(cache, float(days))
    with pytest.raises(SystemExit) as stop:
        data.main(["prune", "--cache-dir", str(cache), "--older-than", days])
    assert stop.value.code == 2 and len(list(cache.glob("*.pt"))) == 2
    assert "--older-than" in one_line(capsys.readouterr().err)


def test_a_cache_file_pruned_before_it_is_read_is_decoded_again_without_a_damage_warning(vtab_root, tmp_path, monkeypatch):
    cache, real = tmp_path / "cache", torch.load
    load(vtab_root, cache)

    def load_after_a_prune(path, *args, **kwargs):
        prune_cache(cache)
        return real(path, *args, **kwargs)
    monkeypatch.setattr(torch, "load", load_after_a_prune)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert same_task(load(vtab_root, cache), load(vtab_root, False))
    assert not [w for w in caught if "damaged" in str(w.message)]


@pytest.mark.parametrize("meanwhile", ["prune_cache", "another process deletes the partial file", "nothing"])
def test_a_prune_during_a_cache_write_does_not_crash_the_loader(meanwhile, vtab_root, tmp_path, monkeypatch):
    cache, real = tmp_path / "cache", torch.save
    expected = load(vtab_root, False)

    def save(value, target, *args, **kwargs):
        real(value, target, *args, **kwargs)
        if meanwhile == "prune_cache":
            prune_cache(cache)
        elif meanwhile != "nothing":
            for partial in cache.glob("*.tmp"): partial.unlink()
    monkeypatch.setattr(torch, "save", save)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert same_task(load(vtab_root, cache), expected)
    assert not list(cache.glob("*.tmp"))


@pytest.mark.parametrize("failure", ["cache file cannot be written", "cache folder cannot be created", "used cache cannot be touched",
                                     "writable"])
def test_a_read_only_cache_decodes_without_caching(failure, vtab_root, tmp_path, monkeypatch):
    cache, expected = tmp_path / "cache", load(vtab_root, False)
    read_only = OSError(errno.EROFS, os.strerror(errno.EROFS))
    raise_it = lambda *args, **kwargs: (_ for _ in ()).throw(read_only)
    if failure == "cache file cannot be written":
        monkeypatch.setattr(torch, "save", raise_it)
    elif failure == "cache folder cannot be created":
        real_mkdir = Path.mkdir
        monkeypatch.setattr(Path, "mkdir", lambda self, *a, **k: raise_it() if self == cache else real_mkdir(self, *a, **k))
    elif failure == "used cache cannot be touched":
        load(vtab_root, cache)
        monkeypatch.setattr(os, "utime", raise_it)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert same_task(load(vtab_root, cache), expected)
    if failure in ("cache file cannot be written", "cache folder cannot be created"):
        assert any("without caching" in str(w.message) for w in caught), [str(w.message) for w in caught]


@pytest.mark.parametrize("value", ["", "   ", "{tmp}/cache"])
def test_an_empty_moppa_nb_cache_is_unset(value, tmp_path, monkeypatch):
    monkeypatch.setenv("MOPPA_NB_CACHE", value.format(tmp=tmp_path))
    expected = Path(value.format(tmp=tmp_path)) if value.strip() else Path.home() / ".cache" / "moppa_nb"
    assert cache_root() == expected and data.default_cache_dir() == expected / "decoded"


# ---------------------------------------------------------------- 5. checkpoints that know their data and weights
CONFIG = TrainConfig(epochs=2, batch_size=16, lr=3e-3, warmup_epochs=0, checkpoint_every=1, device="cpu", seed=0)


def lora_vit():
    return apply_peft(toy_vit(), "lora")


def relabelled(task: TaskData) -> TaskData:
    images, labels = task.splits["train800"]
    return TaskData(task.name, task.num_classes, {**task.splits, "train800": (images, (labels + 1) % task.num_classes)}, task.preprocessing)


def other_test_images(task: TaskData) -> TaskData:
    images, labels = task.splits["test"]
    return TaskData(task.name, task.num_classes, {**task.splits, "test": (images.flip(-1).contiguous(), labels)}, task.preprocessing)


@pytest.mark.parametrize("change", ["relabelled training data", "other test images", "preprocessing", "permuted frozen weights", "none"])
def test_resume_refuses_a_checkpoint_of_other_data_or_weights(change, tmp_path):
    task = toy_task(n=16)
    finished = fit(lora_vit(), task, CONFIG, tmp_path, progress=False)
    model = lora_vit()
    if change == "relabelled training data": task = relabelled(task)
    elif change == "other test images": task = other_test_images(task)
    elif change == "preprocessing": task = TaskData(task.name, task.num_classes, task.splits, replace(task.preprocessing, flip=False))
    elif change == "permuted frozen weights":          # same sum of squares, other weights
        with torch.no_grad(): model.blocks[0].mlp.fc1.weight.copy_(model.blocks[0].mlp.fc1.weight.flip(0))
    if change == "none":
        again = fit(model, task, CONFIG, tmp_path, progress=False)
        assert again["resumed_from_epoch"] == 2 and again["val"]["test_acc"] == finished["val"]["test_acc"]
        return
    with pytest.raises(CheckpointError, match="data|frozen weights") as error:
        fit(model, task, CONFIG, tmp_path, progress=False)
    assert "resume=False" in one_line(error)


KEPT = ("live writer's", "another host's writer's")


@pytest.mark.parametrize("left", ["killed writer's checkpoint", "killed writer's history", "legacy name, old", "legacy pid-only name, old",
                                  *KEPT])
def test_temporary_files_of_a_killed_write_are_removed_at_the_next_run(left, tmp_path):
    task = toy_task(n=16)
    fit(lora_vit(), task, replace(CONFIG, epochs=1), tmp_path, progress=False)
    here = writer_host()
    name = {"killed writer's checkpoint": f".{CHECKPOINT_NAME}.{dead_pid()}@{here}.k1ll3d_x.tmp",
            "killed writer's history": f".history.json.{dead_pid()}@{here}.k1ll3d_x.tmp",
            "legacy name, old": f".{CHECKPOINT_NAME}.abcd_123.tmp",
            "legacy pid-only name, old": f".{CHECKPOINT_NAME}.{dead_pid()}.k1ll3d_x.tmp",
            "live writer's": f".{CHECKPOINT_NAME}.{os.getppid()}@{here}.l1ve_xyz.tmp",
            "another host's writer's": f".{CHECKPOINT_NAME}.{dead_pid()}@another-host.example.org.n0t_0urs.tmp"}[left]
    stale = tmp_path / name
    stale.write_bytes(b"half a checkpoint")
    os.utime(stale, (time.time() - 2 * 86400,) * 2)                                    # old: its age does not matter
    fit(lora_vit(), task, replace(CONFIG, epochs=1), tmp_path, progress=False)       # resumes (finished): no write at all
    assert stale.exists() == (left in KEPT)


# ---------------------------------------------------------------- 6. adapter configs without their checks
@pytest.mark.parametrize("damage", ["no backbone", "tensors null", "format 99", "no format", "intact"])
def test_an_adapter_config_without_its_checks_is_refused_unless_forced(damage, tmp_path):
    source = adapter_model(0)
    save_adapter(source, tmp_path)
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    if damage == "no backbone": del config["backbone"]
    elif damage == "tensors null": config["tensors"] = None
    elif damage == "format 99": config["format"] = 99
    elif damage == "no format": del config["format"]
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps(config))
    if damage == "intact":
        load_adapter(tiny_vit(), tmp_path)
        return
    with pytest.raises(PeftError, match="force=True") as error:
        load_adapter(tiny_vit(), tmp_path)
    assert ADAPTER_CONFIG in one_line(error)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_adapter(tiny_vit(), tmp_path, force=True)


@pytest.mark.parametrize("target", ["float16", "bfloat16", "float32", "permuted float32", "other weights"])
def test_a_half_precision_cast_of_the_same_backbone_is_not_another_backbone(target, tmp_path):
    save_adapter(adapter_model(0), tmp_path)
    model = tiny_vit(seed=1 if target == "other weights" else 0)
    if target == "permuted float32":
        with torch.no_grad(): model.blocks[1].attn.qkv.weight.copy_(model.blocks[1].attn.qkv.weight.roll(1, 0))
    if target in ("float16", "bfloat16"):
        model = model.to(getattr(torch, target))
    if target in ("permuted float32", "other weights"):
        with pytest.raises(PeftError, match="another backbone") as error:
            load_adapter(model, tmp_path)
        one_line(error)
    else:
        load_adapter(model, tmp_path)


# ---------------------------------------------------------------- 7. one-line messages
def truncated(path: Path) -> Path:
    raw = path.read_bytes()
    path.write_bytes(raw[:len(raw) * 2 // 3])
    return path


@pytest.mark.parametrize("suffix", [".tgz", ".tar", ".zip", ".tar.gz"])
def test_a_truncated_archive_is_named_in_one_line(suffix, tmp_path, capsys):
    archive = truncated(fake_vtab_archive(tmp_path / f"noah{suffix}", {"dtd": "dtd"}))
    with pytest.raises(ValueError, match=f"noah{suffix}") as error:
        build_vtab(tmp_path / "root", ["dtd"], archive, expected_sizes=None, **quiet)
    one_line(error)
    with pytest.raises(SystemExit):
        datasets.main(["vtab", "--root", str(tmp_path / "root"), "--tasks", "dtd", "--from-archive", str(archive), "--any-size"])
    assert archive.name in one_line(capsys.readouterr().err)


@pytest.mark.parametrize("drop", [("test",), ("test", "train800val200"), ()])
def test_a_task_folder_without_test_txt_is_named_not_contradicted(drop, tmp_path):
    archive = fake_vtab_archive(tmp_path / "noah.zip", {"dtd": "dtd"}, drop=drop)
    if not drop:
        build_vtab(tmp_path / "root", ["dtd"], archive, expected_sizes=None, **quiet)
        return
    with pytest.raises(ValueError, match="test.txt") as error:
        build_vtab(tmp_path / "root", ["dtd"], archive, expected_sizes=None, **quiet)
    assert "it holds ['dtd']" not in one_line(error) and "dtd" in str(error.value)


def fgvc_toy(root: Path) -> Path:
    rng = np.random.default_rng(0)
    splits = {s: (rng.integers(0, 256, (n, 6, 6), dtype=np.uint8), np.arange(n) % 3) for s, n in (("train", 6), ("val", 3), ("test", 3))}
    return write_fgvc_task(root, "toy", splits, num_classes=3)


@pytest.mark.parametrize("file, content", [
    ("task.json", b"{not json"), ("task.json", b"\xff\xfe\x00garbage"), ("task.json", b'{"name": "toy"}'),
    ("task.json", b'{"num_classes": 3, "image_dir": 7}'), ("train.json", b"{broken"), ("val.json", b"\xff\xfe\x00"),
    ("test.json", b'["a list"]')])
def test_damaged_fgvc_files_are_named_in_one_line(file, content, tmp_path):
    folder = fgvc_toy(tmp_path / "fgvc")
    (folder / file).write_bytes(content)
    with pytest.raises(ValueError, match=file) as error:
        load_fgvc_task(tmp_path / "fgvc", "toy", Preprocessing(size=6), cache_dir=False)
    one_line(error)


@pytest.mark.parametrize("path", ["../train.json", "../../../../etc/hostname", "/etc/hostname", "001.x/ok.jpg"])
def test_fgvc_split_paths_leaving_the_folder_are_refused_at_build_time(path, tmp_path):
    fake_fgvc_sources("cub", tmp_path / "downloads")
    build_fgvc(tmp_path / "first", ["cub"], "official", downloads=tmp_path / "downloads", sources=UNCHECKED, **quiet)
    splits = tmp_path / "splits" / "CUB_200_2011"
    splits.mkdir(parents=True)
    for split in ("train", "val", "test"):
        content = json.loads((tmp_path / "first" / "cub" / f"{split}.json").read_text())
        if split == "test": content[path] = 1
        (splits / f"{split}.json").write_text(json.dumps(content))
    build = lambda: build_fgvc(tmp_path / "fgvc", ["cub"], "vpt", split_archive=tmp_path / "splits",
                               downloads=tmp_path / "downloads", sources=UNCHECKED, **quiet)
    if path == "001.x/ok.jpg":                               # an ordinary path that names no image: absent, as before
        with pytest.raises(FileNotFoundError, match="absent"):
            build()
    else:
        with pytest.raises(ValueError, match="stay inside") as error:
            build()
        one_line(error)
    assert not (tmp_path / "fgvc" / "cub").exists()


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe", b"[1, 2]"])
def test_a_damaged_manifest_is_named_before_anything_is_replaced(content, tmp_path):
    source = noah_folder(tmp_path / "src")
    build_vtab(tmp_path / "root", ["dtd"], source, expected_sizes=None, **quiet)
    (tmp_path / "root" / MANIFEST).write_bytes(content)
    before = tree(tmp_path / "root")
    with pytest.raises(ValueError, match=MANIFEST) as error:
        build_vtab(tmp_path / "root", ["dtd"], source, expected_sizes=None, **quiet)
    one_line(error)
    assert tree(tmp_path / "root") == before


@pytest.mark.parametrize("first", ["moppa_nb.papermill_engine", "papermill"])
def test_the_papermill_engine_imports_on_its_own(first):
    second = "papermill" if first != "papermill" else "moppa_nb.papermill_engine"
    probe = (f"import sys, {first}, {second}; import moppa_nb.papermill_engine as engine, papermill.engines as engines; "
             "assert engines.papermill_engines.get_engine('ipc') is engine.IPCEngine; assert 'torch' not in sys.modules")
    package_root = Path(data.__file__).parent.parent                 # the moppa_nb under test
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=package_root,
                          env={**os.environ, "PYTHONPATH": str(package_root)})
    assert done.returncode == 0, done.stderr[-2000:]


# ---------------------------------------------------------------- 8. LoRA-family ranks checked against the Q/V projection at apply time
QV_RANK_OPTION = {"lora": "rank", "dora": "rank", "nola": "rank", "bi_lora": "dim"}    # the option that sets the Q/V factors' rank
SMALL = {"nola": {"num_bases": 4}}                                                     # keeps NOLA's random bases small


def no_method_modules(model) -> bool:
    return not adapted_methods(model) and not any("peft_" in name for name, _ in model.named_modules())


@pytest.mark.parametrize("method", list(QV_RANK_OPTION))
@pytest.mark.parametrize("rank", [100_000, 193])
def test_a_rank_wider_than_the_qv_projection_is_refused_by_apply_peft(method, rank):
    option, model = QV_RANK_OPTION[method], tiny_vit()                                 # Q/V slices of a 192-wide qkv: 192 x 192
    with pytest.raises(PeftError) as error:
        apply_peft(model, {method: {**SMALL.get(method, {}), option: rank}})
    message = one_line(error)
    assert method in message and option in message and str(rank) in message and "192" in message
    assert no_method_modules(model)
    apply_peft(tiny_vit(), {method: {**SMALL.get(method, {}), option: 192}})          # the widest rank that fits


@pytest.mark.parametrize("method", list(QV_RANK_OPTION))
def test_each_lora_family_method_checks_its_rank_when_it_installs(method):
    "Installed by hand (no apply_peft checks before it), the method itself refuses the rank, before it adds any module."
    option, cls = QV_RANK_OPTION[method], get_method(method)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, device="meta")   # shapes only
    with pytest.raises(PeftError) as error:
        cls(build_options(cls.Options, method, {**SMALL.get(method, {}), option: 100_000})).install(model, vit_layout(model))
    assert one_line(error) == f"{method}: {option} 100000 exceeds min(in, out) = 384 of the Q/V projection; use {option} <= 384."
    assert no_method_modules(model)


@pytest.mark.parametrize("method", list(QV_RANK_OPTION))
@pytest.mark.parametrize("rank", [0, -4, 2.5, "8", True, None])
def test_a_rank_that_is_not_a_positive_int_is_refused_in_one_line(method, rank):
    option, model = QV_RANK_OPTION[method], tiny_vit()
    with pytest.raises(PeftError) as error:
        apply_peft(model, {method: {option: rank}})
    assert option in one_line(error)
    assert no_method_modules(model)
    with pytest.raises(PeftError, match=rf"^{method}: {option} must be a positive int, got .*; use {option} in \[1, 192\]\.$"):
        check_rank(rank, 192, 576 // 3, method, option=option)


# ---------------------------------------------------------------- 9. temporary files name their writer's pid and host
def test_writer_gone_only_for_a_dead_process_of_this_host():
    here = writer_host()
    assert writer_tag() == f"{os.getpid()}@{here}"
    assert writer_gone(f"{dead_pid()}@{here}")
    assert not writer_gone(f"{os.getpid()}@{here}") and not writer_gone(f"{os.getppid()}@{here}")     # live
    assert not writer_gone(f"{dead_pid()}@another-host.example.org")                                    # not ours to judge
    assert not any(writer_gone(tag) for tag in (str(dead_pid()), f"@{here}", f"x@{here}", ""))          # malformed


def test_a_host_name_with_odd_characters_still_makes_a_temporary_name_cleanup_reads(tmp_path, monkeypatch):
    monkeypatch.setattr(adapt.socket, "gethostname", lambda: "node 7/gpu.cluster")
    assert writer_host() == "node-7-gpu.cluster"
    seen = []
    atomic_write(tmp_path / "metrics.json", lambda tmp: seen.append(tmp.name) or tmp.write_text("{}"))
    assert re.fullmatch(rf"\.metrics\.json\.{os.getpid()}@node-7-gpu\.cluster\.[a-z0-9_]+\.tmp", seen[0])
    killed = tmp_path / seen[0].replace(f".{os.getpid()}@", f".{dead_pid()}@", 1)
    killed.write_text("half")
    assert remove_stale_temporaries(tmp_path, "metrics.json") == [killed]


@pytest.mark.parametrize("writer", ["dead here", "live here", "dead on another host", "pid only, fresh", "pid only, old"])
def test_stale_temporaries_are_removed_only_for_dead_writers_of_this_host(writer, tmp_path):
    tag = {"dead here": f"{dead_pid()}@{writer_host()}", "live here": f"{os.getppid()}@{writer_host()}",
           "dead on another host": f"{dead_pid()}@another-host.example.org"}.get(writer, str(dead_pid()))
    left = tmp_path / f".metrics.json.{tag}.abcd_123.tmp"
    left.write_text("half")
    if writer == "pid only, old": os.utime(left, (time.time() - 7200,) * 2)
    atomic_write(tmp_path / "metrics.json", lambda tmp: tmp.write_text("{}"))
    assert left.exists() == (writer not in ("dead here", "pid only, old"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["metrics.json", *([left.name] if left.exists() else [])])


@pytest.mark.parametrize("writer", ["dead here", "live here", "dead on another host"])
def test_prune_removes_only_partial_cache_writes_of_dead_loaders_of_this_host(writer, vtab_root, tmp_path):
    cache = tmp_path / "cache"
    load(vtab_root, cache)
    entry = next(cache.glob("toy_*.pt"))
    tag = {"dead here": f"{dead_pid()}@{writer_host()}", "live here": f"{os.getppid()}@{writer_host()}",
           "dead on another host": f"{dead_pid()}@another-host.example.org"}[writer]
    partial = entry.with_name(f"{entry.stem}.{tag}.tmp")
    partial.write_bytes(b"half")
    deleted = prune_cache(cache)
    assert (partial in deleted) == (writer == "dead here") and partial.exists() == (writer != "dead here")
