"""Files the library writes: the backbone's tensor hashes are checked on load, and a write that fails (a full disk) names
the file, leaves no partial file and keeps the previous one."""
import errno
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moppa_nb.adapt import WriteError, atomic_write
from moppa_nb.checkpoint import CHECKPOINT_NAME, read_checkpoint
from moppa_nb.experiment import build_model
from moppa_nb.pretrain import (BACKBONE_CONFIG, BACKBONE_WEIGHTS, BackboneCorrupted, PretrainConfig, build_backbone,
                               load_backbone, save_backbone)
from moppa_nb.testing import toy_task
from moppa_nb.train import fit

from test_train import CONFIG, timeless, tiny_moppa_vit

ARCHITECTURE = PretrainConfig(embed_dim=24, depth=1, num_heads=2).architecture()


def saved_backbone(folder: Path) -> Path:
    torch.manual_seed(0)
    return save_backbone(build_backbone(ARCHITECTURE), folder, ARCHITECTURE, {"note": "test"})


def tensor_bytes(weights: bytes, name: str) -> range:
    "Where tensor `name`'s data lies in a safetensors file: 8-byte header length, JSON header, then the data."
    length = int.from_bytes(weights[:8], "little")
    start, end = json.loads(weights[8:8 + length])[name]["data_offsets"]
    return range(8 + length + start, 8 + length + end)


def test_the_backbone_config_records_every_tensor_hash_and_writes_no_temporary_file(tmp_path):
    folder = saved_backbone(tmp_path / "backbone")
    config = json.loads((folder / BACKBONE_CONFIG).read_text())
    assert set(config["tensors"]) == set(load_file(folder / BACKBONE_WEIGHTS))
    assert all(len(h) == 64 for h in config["tensors"].values()) and config["note"] == "test"
    assert sorted(p.name for p in folder.iterdir()) == [BACKBONE_CONFIG, BACKBONE_WEIGHTS]


@pytest.mark.parametrize("tensor, count", [("cls_token", 1), ("blocks.0.attn.qkv.weight", 1000), ("fc_norm.bias", 3)])
def test_flipped_backbone_bytes_fail_naming_file_tensor_and_fix(tensor, count, tmp_path):
    folder = saved_backbone(tmp_path / "backbone")
    weights = folder / BACKBONE_WEIGHTS
    intact = weights.read_bytes()
    damaged = bytearray(intact)
    for i in tensor_bytes(intact, tensor)[:count]: damaged[i] ^= 0xFF
    weights.write_bytes(bytes(damaged))
    load_file(weights)                                           # safetensors alone does not notice
    with pytest.raises(BackboneCorrupted) as error:
        load_backbone(folder)
    message = str(error.value)
    assert f"{weights} is corrupted: tensor(s) ['{tensor}']" in message
    assert "dvc repro backbone" in message and f"delete {folder}" in message
    local = {"backbone": {"kind": "local", "path": str(folder)}}      # the pipeline's `kind: local` backbone
    with pytest.raises(BackboneCorrupted, match=r"is corrupted: tensor\(s\)"):
        build_model(local, num_classes=3)
    weights.write_bytes(intact)                                  # intact again: it loads, with the saved values
    model = build_model(local, num_classes=3)
    assert torch.equal(model.state_dict()[tensor], load_file(weights)[tensor])


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage-header"])
def test_unreadable_backbone_weights_name_the_file_and_fix(damage, tmp_path):
    folder = saved_backbone(tmp_path / "backbone")
    weights = folder / BACKBONE_WEIGHTS
    data = weights.read_bytes()
    weights.write_bytes({"empty": b"", "truncated": data[:len(data) // 2], "garbage-header": data[:8] + os.urandom(64) + data[72:]}[damage])
    with pytest.raises(BackboneCorrupted, match=f"{BACKBONE_WEIGHTS} cannot be read as safetensors.*dvc repro backbone"):
        load_backbone(folder)


@pytest.mark.parametrize("content", ["", "{\"architecture\": ", "[1, 2]", "{\"note\": 1}"])
def test_damaged_backbone_config_names_the_file(content, tmp_path):
    folder = saved_backbone(tmp_path / "backbone")
    (folder / BACKBONE_CONFIG).write_text(content)
    with pytest.raises(BackboneCorrupted, match=f"{BACKBONE_CONFIG} is damaged.*dvc repro backbone"):
        load_backbone(folder)


def test_a_backbone_without_hashes_loads_with_a_warning(tmp_path):
    folder = saved_backbone(tmp_path / "backbone")
    config = json.loads((folder / BACKBONE_CONFIG).read_text())
    del config["tensors"]
    (folder / BACKBONE_CONFIG).write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="records no tensor hashes"):
        load_backbone(folder)


# ---------------------------------------------------------------- a full disk during a write
def enospc(value, handle):
    handle.write(b"partial")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def torch_writer_on_a_full_disk(value, handle):
    "torch.save writing a file itself on a full device: RuntimeError '[enforce fail at inline_container.cc:...]', no errno."
    handle.write(b"partial")
    REAL_SAVE(value, "/dev/full")


REAL_SAVE = torch.save
FAILURES = {"ENOSPC": (enospc, "the disk is full"),
            "torch-writer": (torch_writer_on_a_full_disk, r"the write failed \(torch.save: \[enforce fail at inline_container.*the disk may be full")}


SMALL = replace(CONFIG, epochs=3, checkpoint_every=1)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return fit(tiny_moppa_vit(), toy_task(n=32), SMALL, tmp_path_factory.mktemp("whole"), progress=False)


@pytest.mark.parametrize("failure", list(FAILURES))
def test_a_full_disk_during_a_checkpoint_names_the_file_and_the_run_resumes(failure, uninterrupted, tmp_path, monkeypatch):
    if failure == "torch-writer" and not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    inject, message = FAILURES[failure]

    def save(value, handle):                                     # the disk fills up at the second checkpoint
        return (inject if value["epoch"] == 2 else REAL_SAVE)(value, handle)
    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(WriteError, match=f"Could not write {tmp_path / 'run' / CHECKPOINT_NAME}: {message}") as error:
        fit(tiny_moppa_vit(), toy_task(n=32), SMALL, tmp_path / "run", progress=False)
    assert "No partial file was left" in str(error.value)
    assert read_checkpoint(tmp_path / "run" / CHECKPOINT_NAME)["epoch"] == 1      # the previous checkpoint is intact
    assert not list((tmp_path / "run").glob(".*.tmp"))
    monkeypatch.undo()                                           # space again: the run resumes to the uninterrupted result
    resumed = fit(tiny_moppa_vit(), toy_task(n=32), SMALL, tmp_path / "run", progress=False)
    assert resumed["resumed_from_epoch"] == 1 and timeless(resumed["history"]) == timeless(uninterrupted["history"])


def test_other_failures_inside_a_write_are_not_disguised(tmp_path):
    def bug(tmp):
        tmp.write_bytes(b"partial")
        raise RuntimeError("a bug in the writer")
    with pytest.raises(RuntimeError, match="a bug in the writer"):
        atomic_write(tmp_path / "file.bin", bug)
    assert list(tmp_path.iterdir()) == []


def test_the_exported_package_imports_itself_relatively():
    """nbdev rewrites `from moppa_nb.x import` as `from .x import`, but skips a multi-line import whose last line is short."""
    package = Path(__file__).parent.parent / "moppa_nb"
    absolute = [f"{path.name}:{number}" for path in sorted(package.glob("*.py"))
                for number, line in enumerate(path.read_text().splitlines(), 1) if line.startswith("from moppa_nb")]
    assert not absolute, f"absolute imports of the package in its own modules: {absolute}"
