"""Building VTAB-1K and FGVC from their sources, offline: tiny fakes in each source format, converted and read back."""
import dataclasses
import http.server
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import zipfile

import pytest

from moppa_nb.adapt import writer_host, writer_tag
from moppa_nb.data import FGVC_TASKS, VTAB_CLASSES, Preprocessing, load_fgvc_task, load_vtab_task
from moppa_nb.datasets import (FGVC_SOURCES, MANIFEST, VTAB_SOURCE, Source, SourceUnreachable, build_fgvc, build_vtab,
                               extract, fake_fgvc_sources, fake_vtab_archive, fetch, file_digests, find_vtab_task_folders, main,
                               staging_folder, verify)

UNCHECKED = {name: tuple(dataclasses.replace(s, sha256=None, md5=None, size=None) for s in files)
             for name, files in FGVC_SOURCES.items()}     # the fakes are not the published files


def read_back(root, name):
    return load_fgvc_task(root, name, Preprocessing(size=6), cache_dir=False)


@pytest.mark.parametrize("name", list(FGVC_TASKS))
def test_fgvc_official_splits_from_fake_sources(tmp_path, name):
    fake_fgvc_sources(name, tmp_path / "downloads")
    built = build_fgvc(tmp_path / "fgvc", [name], "official", downloads=tmp_path / "downloads", sources=UNCHECKED,
                       log=lambda line: None)
    classes = FGVC_TASKS[name].num_classes
    task = read_back(tmp_path / "fgvc", name)
    # three images per class: one test image; Flowers' official val, else one of the two training images held out
    assert task.num_classes == classes
    assert task.record()["split_sizes"] == {"train": classes, "val": classes, "test": classes}
    assert sorted(set(task["train"][1].tolist())) == list(range(classes))
    assert (tmp_path / "fgvc" / FGVC_TASKS[name].folders[0]).is_dir()
    manifest = json.loads((tmp_path / "fgvc" / MANIFEST).read_text())
    assert manifest[name]["split_sizes"] == built[name]["split_sizes"]
    assert [f["sha256"] for f in manifest[name]["sources"]] == [
        file_digests(tmp_path / "downloads" / s.filename)["sha256"] for s in FGVC_SOURCES[name]]


def test_fgvc_vpt_splits_are_installed_as_given(tmp_path):
    fake_fgvc_sources("cub", tmp_path / "downloads")
    build_fgvc(tmp_path / "first", ["cub"], "official", downloads=tmp_path / "downloads", sources=UNCHECKED, seed=3)
    official = {split: json.loads((tmp_path / "first" / "cub" / f"{split}.json").read_text()) for split in ("train", "val", "test")}
    with zipfile.ZipFile(tmp_path / "json.zip", "w") as bundle:       # VPT's naming: CUB_200_2011/<split>.json
        for split, content in official.items():
            bundle.writestr(f"json/CUB_200_2011/{split}.json", json.dumps(content))
    built = build_fgvc(tmp_path / "fgvc", ["cub"], "vpt", split_archive=tmp_path / "json.zip",
                       downloads=tmp_path / "downloads", sources=UNCHECKED)
    assert built["cub"]["splits"] == "vpt"
    for split, content in official.items():
        assert json.loads((tmp_path / "fgvc" / "cub" / f"{split}.json").read_text()) == content
    assert read_back(tmp_path / "fgvc", "cub").num_classes == 200


def test_fgvc_split_keys_that_name_no_image_are_refused(tmp_path):
    fake_fgvc_sources("flowers", tmp_path / "downloads")
    split_folder = tmp_path / "splits" / "OxfordFlower"
    split_folder.mkdir(parents=True)
    for split in ("train", "val", "test"):
        (split_folder / f"{split}.json").write_text(json.dumps({f"image_{i:05d}.jpg": i for i in range(1, 103)}))
    with pytest.raises(FileNotFoundError, match=r"train.json lists 102 image\(s\) absent from .*image_00001.jpg"):
        build_fgvc(tmp_path / "fgvc", ["flowers"], "vpt", split_archive=tmp_path / "splits",
                   downloads=tmp_path / "downloads", sources=UNCHECKED)
    with pytest.raises(ValueError, match=r"holds no json splits for 'stanford_cars'; it holds \['oxford_flowers'\]"):
        fake_fgvc_sources("cars", tmp_path / "downloads")
        build_fgvc(tmp_path / "fgvc", ["cars"], "vpt", split_archive=tmp_path / "splits",
                   downloads=tmp_path / "downloads", sources=UNCHECKED)


def test_published_checksums_refuse_other_files(tmp_path):
    fake_fgvc_sources("dogs", tmp_path / "downloads")
    with pytest.raises(ValueError, match=r"images.tar: size \d+ differs from the published 793579520"):
        build_fgvc(tmp_path / "fgvc", ["dogs"], "official", downloads=tmp_path / "downloads")
    assert not (tmp_path / "fgvc").exists()                     # checked before anything is written
    path = tmp_path / "downloads" / "lists.tar"
    assert verify(path, Source("lists.tar", url="u", sha256=file_digests(path)["sha256"]))["checked_against"] == "sha256"


@pytest.mark.parametrize("suffix", ["zip", "tar.gz"])
def test_vtab_noah_archive_is_converted(tmp_path, suffix):
    archive = fake_vtab_archive(tmp_path / f"vtab-1k.{suffix}", {"cifar100": "cifar", "smallnorb_ele": "smallnorb_ele"},
                                sizes=(6, 3, 4), drop=("train800val200",))
    built = build_vtab(tmp_path / "vtab-1k", ["cifar", "smallnorb_ele"], archive, expected_sizes=None, log=lambda line: None)
    for task in ("cifar", "smallnorb_ele"):
        data = load_vtab_task(tmp_path / "vtab-1k", task, Preprocessing(size=6), cache_dir=False)
        assert data.num_classes == VTAB_CLASSES[task]
        assert data.record()["split_sizes"] == {"train800": 6, "val200": 3, "train800val200": 9, "test": 4}
        assert data["train800val200"][1].tolist() == data["train800"][1].tolist() + data["val200"][1].tolist()
        assert built[task]["derived_lists"] == ["train800val200"]
    assert not [p for p in (tmp_path / "vtab-1k").iterdir() if p.name.startswith(".")]        # no scratch folder left
    assert json.loads((tmp_path / "vtab-1k" / MANIFEST).read_text())["cifar"]["source"]["sha256"] == file_digests(archive)["sha256"]


def test_vtab_copy_with_train800val200_only_is_split_800_200(tmp_path):
    archive = fake_vtab_archive(tmp_path / "noah.zip", {"eurosat": "eurosat"}, sizes=(800, 200, 2), drop=("train800", "val200"))
    build_vtab(tmp_path / "vtab-1k", ["eurosat"], archive, log=lambda line: None)
    data = load_vtab_task(tmp_path / "vtab-1k", "eurosat", Preprocessing(size=6), cache_dir=False)
    assert data.record()["split_sizes"] == {"train800": 800, "val200": 200, "train800val200": 1000, "test": 2}
    assert data["val200"][1].tolist() == [i % 10 for i in range(200)]


def test_vtab_errors_name_the_problem(tmp_path):
    archive = fake_vtab_archive(tmp_path / "noah.zip", {"dtd": "dtd"})
    with pytest.raises(ValueError, match=r"split sizes \{'train800': 8, 'val200': 4, 'train800val200': 12\} differ"):
        build_vtab(tmp_path / "a", ["dtd"], archive)
    with pytest.raises(ValueError, match=r"holds no folder for task\(s\) \['svhn'\]; it holds \['dtd'\]"):
        build_vtab(tmp_path / "b", ["svhn"], archive, expected_sizes=None)
    folder = tmp_path / "copy"
    extract(archive, folder)
    test_list = folder / "vtab-1k" / "dtd" / "test.txt"
    test_list.write_text(test_list.read_text().replace(" 4\n", " 47\n"))    # a label beyond dtd's 47 classes
    with pytest.raises(ValueError, match=r"test.txt:5: label 47 outside \[0, 47\)"):
        build_vtab(tmp_path / "c", ["dtd"], folder, expected_sizes=None)
    test_list.write_text("images/test/missing.jpg 0\n")
    with pytest.raises(FileNotFoundError, match=r"lists 1 image\(s\) absent .*missing.jpg"):
        build_vtab(tmp_path / "d", ["dtd"], folder, expected_sizes=None)
    assert (folder / "vtab-1k" / "dtd" / "train800.txt").is_file()      # a folder given by the user is copied, not moved


def test_unsafe_archive_members_are_refused(tmp_path):
    with tarfile.open(tmp_path / "evil.tar", "w") as bundle:
        info = tarfile.TarInfo("../outside.txt"); info.size = 1
        bundle.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(ValueError, match="outside the target folder"):
        extract(tmp_path / "evil.tar", tmp_path / "out")
    assert not (tmp_path / "outside.txt").exists()


def test_tar_links_are_left_out(tmp_path):
    """Only files and folders come out of a tar archive, on every Python (3.11.2 has no extraction filters)."""
    with tarfile.open(tmp_path / "links.tar", "w") as bundle:
        info = tarfile.TarInfo("data/a.txt"); info.size = 1
        bundle.addfile(info, io.BytesIO(b"x"))
        link = tarfile.TarInfo("data/link"); link.type = tarfile.SYMTYPE; link.linkname = "/etc/passwd"
        bundle.addfile(link)
    out = extract(tmp_path / "links.tar", tmp_path / "out")
    assert (out / "data" / "a.txt").read_bytes() == b"x" and not (out / "data" / "link").is_symlink()


class _Server(http.server.BaseHTTPRequestHandler):
    "Serves `payload`, honouring 'Range: bytes=N-' only if `ranges`; records the Range headers it saw."
    payload, ranges, seen = bytes(range(256)) * 4, True, []

    def do_GET(self):
        asked = self.headers.get("Range")
        type(self).seen.append(asked)
        start = int(asked.removeprefix("bytes=").rstrip("-")) if asked and self.ranges else 0
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(self.payload) - start)); self.end_headers()
        self.wfile.write(self.payload[start:])

    def log_message(self, *args): pass


@pytest.mark.parametrize("ranges", [True, False])
def test_interrupted_download_resumes(tmp_path, ranges):
    _Server.ranges, _Server.seen = ranges, []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        (tmp_path / "file.bin.part").write_bytes(_Server.payload[:100])        # left by an interrupted run
        source = Source("file.bin", url=f"http://127.0.0.1:{server.server_port}/file.bin")
        path = fetch(source, tmp_path)
    finally:
        server.shutdown()
    assert path.read_bytes() == _Server.payload and not (tmp_path / "file.bin.part").exists()
    assert _Server.seen == ["bytes=100-"]


def test_offline_hub_and_manual_sources_give_one_line(tmp_path, capsys):
    with pytest.raises(SourceUnreachable, match=r"^cannot reach huggingface.co: .*offline mode is enabled; download https://huggingface.co/"
                                                r"datasets/XiN0919/VTAB-1k/resolve/main/vtab-1k.zip by hand into"):
        fetch(VTAB_SOURCE, tmp_path)                                          # HF_HUB_OFFLINE=1 (conftest)
    with pytest.raises(SystemExit) as stop:
        main(["vtab", "--root", str(tmp_path / "vtab-1k"), "--downloads", str(tmp_path)])
    error = capsys.readouterr().err
    assert stop.value.code == 2 and error.startswith("error: cannot reach huggingface.co") and error.count("\n") == 1
    assert "--from-archive PATH" in error
    with pytest.raises(SystemExit):
        main(["fgvc", "--root", str(tmp_path / "fgvc"), "--datasets", "nabirds", "--downloads", str(tmp_path)])
    assert "download it from https://dl.allaboutbirds.org/nabirds" in capsys.readouterr().err


def test_cli_builds_from_an_archive(tmp_path, capsys):
    archive = fake_vtab_archive(tmp_path / "noah.tar", {"kitti": "kitti"}, sizes=(800, 200, 3))
    main(["vtab", "--root", str(tmp_path / "vtab-1k"), "--tasks", "kitti_distance", "--from-archive", str(archive)])
    assert "kitti: {'train800': 800, 'val200': 200, 'train800val200': 1000, 'test': 3}" in capsys.readouterr().out
    assert load_vtab_task(tmp_path / "vtab-1k", "kitti", Preprocessing(size=6), splits=("test",), cache_dir=False).num_classes == 4


def test_a_folder_copy_is_read_in_place_but_never_overwritten(tmp_path):
    folder = extract(fake_vtab_archive(tmp_path / "noah.zip", {"svhn_cropped": "svhn"}), tmp_path / "copy")
    (folder / "notes").mkdir(); (folder / "notes" / "test.txt").write_text("not a task\n")   # ignored: no task name
    build_vtab(tmp_path / "vtab-1k", ["svhn"], folder, expected_sizes=None, log=lambda line: None)
    assert load_vtab_task(tmp_path / "vtab-1k", "svhn", Preprocessing(size=6), cache_dir=False).num_classes == 10
    with pytest.raises(ValueError, match="contains the output folder"):
        build_vtab(folder / "built", ["svhn"], folder, expected_sizes=None)


ROOT = __import__("pathlib").Path(__file__).parent.parent


@pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "dvc").is_file(), reason="needs the project's .venv (scripts/setup.sh)")
def test_data_walkthrough_of_data_readme_on_fake_vtab(tmp_path):
    """data/README.md's steps in a clone of this repository: build, `dvc add`, a remote, `dvc push`; a second clone pulls
    the same data, reads it, and `dvc status` of the data reports nothing missing; the pipeline still parses."""
    import subprocess
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "LANG": "C.UTF-8",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    def run(*command, cwd):
        done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{command}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
        return done.stdout + done.stderr
    first, second, remote = tmp_path / "first", tmp_path / "second", tmp_path / "remote"
    run("git", "clone", "-q", str(ROOT), str(first), cwd=tmp_path)
    (first / ".venv").symlink_to(ROOT / ".venv")
    archive = fake_vtab_archive(tmp_path / "noah.zip", {"dtd": "dtd", "kitti": "kitti"}, sizes=(8, 4, 5))
    run(".venv/bin/python", "-m", "moppa_nb.datasets", "vtab", "--root", "data/vtab-1k", "--tasks", "dtd", "kitti",
        "--from-archive", str(archive), "--any-size", cwd=first)                                 # 1. fetch and convert
    run(".venv/bin/dvc", "add", "data/vtab-1k", cwd=first)                                        # 2. register
    run("git", "add", "data/vtab-1k.dvc", "data/.gitignore", cwd=first)
    run(".venv/bin/dvc", "remote", "add", "-d", "storage", str(remote), cwd=first)               # 3. a remote
    run("git", "add", ".dvc/config", cwd=first); run("git", "commit", "-qm", "Register VTAB-1K", cwd=first)
    run(".venv/bin/dvc", "push", cwd=first)                                                       # 4. push
    run("git", "clone", "-q", str(first), str(second), cwd=tmp_path)
    (second / ".venv").symlink_to(ROOT / ".venv")
    run(".venv/bin/dvc", "pull", "data/vtab-1k.dvc", cwd=second)
    assert "up to date" in run(".venv/bin/dvc", "status", "data/vtab-1k.dvc", cwd=second)
    assert "prepare" in run(".venv/bin/dvc", "stage", "list", cwd=second)     # a dep on data/ beside data/vtab-1k.dvc parses
    data = load_vtab_task(second / "data" / "vtab-1k", "kitti", Preprocessing(size=6), cache_dir=False)
    assert data.num_classes == VTAB_CLASSES["kitti"] and len(data["test"][1]) == 5


# ---------------------------------------------------------------- each build stages in a folder of its own
def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def scratch(root) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".staging"))


@pytest.mark.parametrize("left", ["killed build here", "live build here", "another host's build", "earlier version's .staging"])
def test_a_leftover_staging_folder_neither_breaks_a_build_nor_doubles_a_task(left, tmp_path):
    archive = fake_vtab_archive(tmp_path / "vtab-1k.zip", {"dtd": "dtd"})                 # holds vtab-1k/dtd
    quiet = dict(expected_sizes=None, log=lambda line: None)
    build_vtab(tmp_path / "first", ["dtd"], archive, **quiet)
    root = tmp_path / "vtab-1k"
    name = {"killed build here": f".staging.{dead_pid()}@{writer_host()}.k1ll3d_x.partial",
            "live build here": f".staging.{os.getppid()}@{writer_host()}.l1ve_xyz.partial",
            "another host's build": f".staging.{dead_pid()}@another-host.example.org.n0t_0urs.partial",
            "earlier version's .staging": ".staging"}[left]
    shutil.copytree(tmp_path / "first" / "dtd", root / name / "dtd")                       # extracted there in another layout
    built = build_vtab(root, ["dtd"], archive, **quiet)                                      # no "Task 'dtd' appears twice"
    assert built["dtd"]["split_sizes"]["test"] == 5
    assert scratch(root) == ([] if left == "killed build here" else [name])                 # its own scratch folder is gone too
    assert list(find_vtab_task_folders(root)) == ["dtd"]                                     # dot-folders are not looked in
    build_vtab(tmp_path / "copy", ["dtd"], root, **quiet)                                    # a built root as a folder source


@pytest.mark.parametrize("builder", ["vtab", "fgvc"])
def test_a_failed_build_removes_its_staging_folder(builder, tmp_path):
    if builder == "vtab":
        archive = fake_vtab_archive(tmp_path / "vtab-1k.zip", {"dtd": "dtd"})
        with pytest.raises(ValueError, match="differ from VTAB-1K's"):
            build_vtab(tmp_path / "root", ["dtd"], archive, log=lambda line: None)          # the fake's sizes are not VTAB-1K's
    else:
        fake_fgvc_sources("flowers", tmp_path / "downloads")
        with pytest.raises(ValueError, match="holds no json splits"):
            build_fgvc(tmp_path / "root", ["flowers"], "vpt", split_archive=tmp_path / "downloads", downloads=tmp_path / "downloads",
                       sources=UNCHECKED, log=lambda line: None)
    assert scratch(tmp_path / "root") == []


def test_two_builders_get_two_staging_folders(tmp_path):
    first, second = staging_folder(tmp_path, log=lambda line: None), staging_folder(tmp_path, log=lambda line: None)
    assert first != second and first.is_dir() and second.is_dir()                           # the live writer's own stay
    assert all(p.name.startswith(f".staging.{writer_tag()}.") and p.name.endswith(".partial") for p in (first, second))
