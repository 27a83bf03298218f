"""Mini-VTAB generation (layout, determinism, disjointness) and a tiny pre-training run (save / load / probe)."""
import json

import numpy as np
import pytest
import torch

from moppa_nb.data import Preprocessing, TaskData, load_vtab_task
from moppa_nb.fashion_mnist import FASHION_MNIST_FILES, fashion_mnist_arrays, fashion_mnist_dir
from moppa_nb.mini_vtab import (IMAGE_SIZE, MINI_GROUPS, MINI_TASKS, animal_mnist_arrays, build_mini_vtab, deduplicate, image_hashes,
                                mini_task_splits)
from moppa_nb.pretrain import (BACKBONE_CONFIG, BACKBONE_WEIGHTS, PretrainConfig, build_backbone, distill_backbone,
                               linear_probe_accuracy, load_backbone, pixel_features, pretrain_backbone, vit_features)

TEST_SIZE = 30


@pytest.fixture(scope="module")
def all_splits():
    return {task: mini_task_splits(task, seed=0, test_size=TEST_SIZE) for task in MINI_TASKS}


def test_task_table():
    assert len(MINI_TASKS) == 8 and [len(tasks) for tasks in MINI_GROUPS.values()] == [2, 3, 3]
    assert sorted(t for tasks in MINI_GROUPS.values() for t in tasks) == sorted(MINI_TASKS)


def test_splits_have_vtab_sizes_and_valid_labels(all_splits):
    for task, splits in all_splits.items():
        assert {s: len(l) for s, (_, l) in splits.items()} == {"train800": 800, "val200": 200, "test": TEST_SIZE}, task
        for images, labels in splits.values():
            assert images.dtype == np.uint8 and images.shape[1:] == (IMAGE_SIZE, IMAGE_SIZE)
            assert labels.dtype == np.int64 and 0 <= labels.min() and labels.max() < MINI_TASKS[task].num_classes
        assert len(np.unique(splits["train800"][1])) == MINI_TASKS[task].num_classes, task


def test_no_image_in_two_splits(all_splits):
    for task, splits in all_splits.items():
        hashes = {split: set(image_hashes(images)) for split, (images, _) in splits.items()}
        assert not hashes["train800"] & hashes["val200"], task
        assert not (hashes["train800"] | hashes["val200"]) & hashes["test"], task


def test_animal_mnist_is_deduplicated():
    images, labels = animal_mnist_arrays()
    kept, kept_labels = deduplicate(images, labels)
    assert len(set(image_hashes(images))) == 9716 and len(images) == 10_000
    assert len(set(image_hashes(kept))) == len(kept) <= 9716 and len(kept) > 9600
    doubled, doubled_labels = deduplicate(np.concatenate([kept[:3], kept[:3]]), np.array([0, 1, 2, 0, 1, 5]))
    assert len(doubled) == 2 and doubled_labels.tolist() == [0, 1]     # the image labelled 2 and 5 is dropped


def test_generation_is_deterministic_and_seeded(all_splits):
    for task in ("textures", "blood_cells", "location", "mnist"):
        again = mini_task_splits(task, seed=0, test_size=TEST_SIZE)
        for split in again:
            np.testing.assert_array_equal(again[split][0], all_splits[task][split][0])
            np.testing.assert_array_equal(again[split][1], all_splits[task][split][1])
        other = mini_task_splits(task, seed=1, test_size=TEST_SIZE)
        assert not np.array_equal(other["train800"][0], all_splits[task]["train800"][0])


def test_blood_cells_are_drawn_independently_with_every_type_in_every_split(all_splits):
    """Drawn one by one (no shared source image between splits, unlike textures): the splits' class shares agree."""
    shares = {split: np.bincount(labels, minlength=6) / len(labels) for split, (_, labels) in all_splits["blood_cells"].items()
              if split != "test"}
    assert MINI_TASKS["blood_cells"].num_classes == 6 and all((share > 0.1).all() for share in shares.values())
    assert np.abs(shares["train800"] - shares["val200"]).max() < 0.08


def test_unknown_task_suggests():
    with pytest.raises(ValueError, match="Did you mean 'orientation'"):
        mini_task_splits("orientaton")


def test_written_tasks_load_with_the_vtab_loader(tmp_path, all_splits):
    folders = build_mini_vtab(tmp_path / "mini", tasks=["digits", "count"], test_size=TEST_SIZE)
    assert sorted(folders) == ["count", "digits"]
    for task, folder in folders.items():
        assert {p.name for p in folder.iterdir()} == {"images", "train800.txt", "val200.txt", "train800val200.txt", "test.txt", "task.json"}
        info = json.loads((folder / "task.json").read_text())
        assert (info["num_classes"], info["group"], info["seed"]) == (MINI_TASKS[task].num_classes, MINI_TASKS[task].group, 0)
        data = load_vtab_task(tmp_path / "mini", task, Preprocessing(size=IMAGE_SIZE, normalization="half"), cache_dir=False)
        assert data.num_classes == MINI_TASKS[task].num_classes
        assert {s: len(l) for s, (_, l) in data.splits.items()} == {"train800": 800, "val200": 200, "train800val200": 1000, "test": TEST_SIZE}
        for split in ("train800", "val200", "test"):
            np.testing.assert_array_equal(data[split][0][:, 1].numpy(), all_splits[task][split][0])
            np.testing.assert_array_equal(data[split][1].numpy(), all_splits[task][split][1])


def test_upstream_is_disjoint_from_downstream(all_splits):
    folder = fashion_mnist_dir()
    if not all((folder / name).is_file() for name in FASHION_MNIST_FILES):
        pytest.skip(f"Fashion-MNIST not fetched into {folder} (see moppa_nb.mini_vtab.fetch_fashion_mnist)")
    upstream = set(image_hashes(fashion_mnist_arrays("train")[0]))
    assert len(upstream) > 59_000
    downstream = set()
    for task in MINI_TASKS:
        full = mini_task_splits(task, seed=0, test_size=1000) if task in ("animal_mnist", "mnist", "digits") else all_splits[task]
        for images, _ in full.values():
            downstream |= set(image_hashes(images))
    assert not upstream & downstream


def test_tiny_distillation_saves_and_loads(tmp_path):
    config = PretrainConfig(embed_dim=24, depth=1, num_heads=2, upstream_images=48, steps=3, batch_size=8, warmup_steps=1)
    images = np.random.default_rng(0).integers(0, 256, (60, 28, 28), dtype=np.uint8)
    summary = pretrain_backbone(tmp_path / "backbone", config, images=images)
    assert (tmp_path / "backbone" / BACKBONE_WEIGHTS).is_file()
    saved = json.loads((tmp_path / "backbone" / BACKBONE_CONFIG).read_text())
    assert saved["architecture"] == config.architecture() == summary["architecture"]
    assert saved["recipe"]["steps"] == 3 and saved["upstream_images"] == 48 and np.isfinite(saved["final_loss"])
    model = load_backbone(tmp_path / "backbone", num_classes=5, drop_path_rate=0.1)
    assert model.head.out_features == 5 and tuple(model.patch_embed.grid_size) == (7, 7)
    assert model(torch.zeros(2, 3, 28, 28)).shape == (2, 5)
    again = load_backbone(tmp_path / "backbone" / BACKBONE_CONFIG)
    assert all(torch.equal(a, b) for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()) if not k.startswith("head"))


def test_distillation_is_deterministic_and_learns():
    config = PretrainConfig(embed_dim=24, depth=1, num_heads=2, steps=12, batch_size=8, warmup_steps=1, lr=3e-3)
    images = torch.randint(0, 256, (32, 28, 28), dtype=torch.uint8)
    maps = images.float().view(32, 7, 4, 7, 4).mean((2, 4)).reshape(32, 49, 1).expand(-1, -1, 4).contiguous()
    first, losses = distill_backbone(images, maps, config)
    second, _ = distill_backbone(images, maps, config)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert np.mean(losses[-5:]) < 0.75 * np.mean(losses[:5])      # 12 steps on a learnable target: the loss falls
    with pytest.raises(ValueError, match="maps must be"):
        distill_backbone(images, maps[:, :48], config)


def test_load_backbone_refuses_missing_or_mismatched(tmp_path):
    with pytest.raises(FileNotFoundError, match="No saved backbone"):
        load_backbone(tmp_path)
    config = PretrainConfig(embed_dim=24, depth=1, num_heads=2, upstream_images=16, steps=1, batch_size=4, warmup_steps=1)
    pretrain_backbone(tmp_path / "b", config, images=np.zeros((16, 28, 28), dtype=np.uint8))
    saved = json.loads((tmp_path / "b" / BACKBONE_CONFIG).read_text())
    saved["architecture"]["depth"] = 2
    (tmp_path / "b" / BACKBONE_CONFIG).write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="does not match its architecture"):
        load_backbone(tmp_path / "b")


def test_linear_probe_separates_an_easy_task():
    g = torch.Generator().manual_seed(0)
    def split(n):
        labels = torch.randint(0, 3, (n,), generator=g)
        images = torch.randint(0, 60, (n, 1, 8, 8), dtype=torch.uint8, generator=g).repeat(1, 3, 1, 1)
        images[torch.arange(n), :, labels * 2] += 150
        return images, labels
    task = TaskData("easy", 3, {"train800": split(60), "val200": split(30), "test": split(60)}, Preprocessing(size=8, normalization="half"))
    result = linear_probe_accuracy(pixel_features, task, weight_decays=(1e-3, 1e-1))
    assert result["test_acc"] == 1.0 and result["feature_dim"] == 64 and result["weight_decay"] in (1e-3, 1e-1)
    features = vit_features(build_backbone(PretrainConfig(embed_dim=24, depth=1, num_heads=2).architecture()))
    assert linear_probe_accuracy(features, TaskData("easy28", 3, {s: (torch.nn.functional.interpolate(i.float(), 28).to(torch.uint8), l)
                                                                       for s, (i, l) in task.splits.items()}, task.preprocessing))["feature_dim"] == 24


def test_tiny_masked_image_modelling_pretrains_without_a_teacher(tmp_path, monkeypatch):
    """objective 'mim': no teacher is built, the loss is finite, weights move from their initialisation, and the loss falls
    on a fixed batch of structured images (so the objective learns something)."""
    import moppa_nb.pretrain as pretrain
    monkeypatch.setattr(pretrain, "mobilenet_v2_imagenet", lambda: pytest.fail("MIM must not build the teacher"))
    config = PretrainConfig(objective="mim", embed_dim=24, depth=1, num_heads=2, upstream_images=48, steps=40, batch_size=16,
                            warmup_steps=1, lr=3e-3, mask_ratio=0.5)
    rows = (np.arange(28)[None, :, None] * 9 % 256).astype(np.uint8)
    images = np.broadcast_to(rows, (60, 28, 28)).copy()                      # stripes: masked pixels follow from the visible
    summary = pretrain_backbone(tmp_path / "mim", config, images=images)
    saved = json.loads((tmp_path / "mim" / BACKBONE_CONFIG).read_text())
    assert saved["recipe"]["objective"] == "mim" and saved["objective"].startswith("masked-image modelling")
    assert json.loads((tmp_path / "mim" / "timing.json").read_text())["teacher_seconds"] == 0.0
    model = load_backbone(tmp_path / "mim")
    torch.manual_seed(config.seed)
    initial = pretrain.build_backbone(config.architecture())
    assert not torch.equal(model.blocks[0].attn.qkv.weight, initial.blocks[0].attn.qkv.weight)
    student, losses = pretrain.mim_backbone(torch.from_numpy(images), config)
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    assert summary["final_loss"] == pytest.approx(float(np.mean(losses[-50:])))    # deterministic: the same recipe, the same losses


def test_tiny_contrastive_pretraining_learns_to_tell_images_apart(tmp_path, monkeypatch):
    """objective 'contrastive' (MoCo v3): no teacher is built, its recipe is recorded, and on drawn scenes the InfoNCE loss,
    which starts at that of chance, falls below it as the query encoder learns to find each image's other view."""
    import moppa_nb.pretrain as pretrain
    from moppa_nb.mini_vtab import count_image, drawn_splits, task_rng
    monkeypatch.setattr(pretrain, "mobilenet_v2_imagenet", lambda: pytest.fail("contrastive must not build the teacher"))
    config = PretrainConfig(objective="contrastive", embed_dim=48, depth=1, num_heads=2, upstream_images=256, steps=100,
                            batch_size=32, warmup_steps=10, lr=1e-3)
    images = np.ascontiguousarray(drawn_splits(count_image, task_rng("contrastive", 0), 1)["train800"][0][:256])
    summary = pretrain_backbone(tmp_path / "moco", config, images=images)
    saved = json.loads((tmp_path / "moco" / BACKBONE_CONFIG).read_text())
    assert saved["recipe"]["objective"] == "contrastive" and saved["objective"].startswith("contrastive (MoCo v3)")
    losses = pretrain.contrastive_backbone(torch.from_numpy(images), config)[1]
    chance = 2 * 2 * config.temperature * np.log(config.batch_size)             # two symmetric terms, each 2 tau x CE at chance
    assert np.mean(losses[:5]) == pytest.approx(chance, abs=0.1), (losses[:5], chance)
    assert np.mean(losses[-20:]) < chance - 0.1 and np.mean(losses[-20:]) < np.mean(losses[:20]) - 0.1, losses
    assert summary["final_loss"] == pytest.approx(float(np.mean(losses[-50:])))    # deterministic: the same recipe, the same losses


def test_tiny_supervised_pretraining_learns_the_upstream_classes(tmp_path, monkeypatch):
    """objective 'supervised': no teacher is built, labels are required, its recipe is recorded, and the cross-entropy on
    random views of striped images (classes: the stripes' period) starts at chance and falls below it."""
    import moppa_nb.pretrain as pretrain
    monkeypatch.setattr(pretrain, "mobilenet_v2_imagenet", lambda: pytest.fail("supervised must not build the teacher"))
    config = PretrainConfig(objective="supervised", embed_dim=48, depth=1, num_heads=2, upstream_images=256, steps=100,
                            batch_size=32, warmup_steps=10, lr=1e-3, crop_scale=0.8)
    rng = np.random.default_rng(0)
    labels = rng.integers(4, size=256)
    rows = np.arange(28)[None, :] + rng.integers(28, size=(256, 1))
    stripes = (np.sin(2 * np.pi * rows / np.array([2.5, 4, 7, 14])[labels][:, None]) > 0) * 200 + 30
    images = np.ascontiguousarray(np.broadcast_to(stripes[:, :, None], (256, 28, 28)).astype(np.uint8))
    with pytest.raises(ValueError, match="needs the images' labels"): pretrain_backbone(tmp_path / "none", config, images=images)
    summary = pretrain_backbone(tmp_path / "sup", config, images=images, labels=labels)
    saved = json.loads((tmp_path / "sup" / BACKBONE_CONFIG).read_text())
    assert saved["recipe"]["objective"] == "supervised" and saved["objective"].startswith("supervised")
    losses = pretrain.supervised_backbone(torch.from_numpy(images), torch.from_numpy(labels), config)[1]
    chance = np.log(4)
    assert np.mean(losses[:5]) == pytest.approx(chance, abs=0.3), (losses[:5], chance)
    assert np.mean(losses[-20:]) < chance - 0.3, losses
    assert summary["final_loss"] == pytest.approx(float(np.mean(losses[-50:])))    # deterministic: the same recipe, the same losses


def test_pretraining_code_identity_leaves_out_the_downstream_tasks():
    """A backbone is kept while `pretrain_identity` is unchanged: adding or editing a mini-VTAB task must not pre-train it again."""
    from moppa_nb.identity import modules_identity
    code = modules_identity(["moppa_nb.pretrain"])
    assert "moppa_nb.fashion_mnist" in code and "moppa_nb.mini_vtab" not in code
