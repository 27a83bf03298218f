"""Bad input and partial failure (issue #13): atomic apply/load, verified adapters, a cache that cannot go stale, option checks, compositions."""
import dataclasses
import json
import math
import os
import typing
import warnings
from functools import partial

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import nn
from timm.models.vision_transformer import VisionTransformer

from moppa_nb import PeftError, adapted_methods, apply_peft, list_methods, load_adapter, merge_peft, save_adapter
from moppa_nb import registry
from moppa_nb.adapt import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_state_dict, is_head_parameter
from moppa_nb.data import Preprocessing, load_fgvc_task, load_vtab_task, write_vtab_task
from moppa_nb.registry import PeftMethod, get_method, register_method
from moppa_nb import testing
from moppa_nb.testing import perturb_for_testing

IMAGE = 48


tiny_vit = partial(testing.tiny_vit, img_size=IMAGE, reg_tokens=1)   # two blocks, 5 classes, seed 0, eval mode


def images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))


def structure(model: nn.Module) -> dict:
    """Everything apply/load may change besides tensor values: modules, hooks, parameters, flags, plain attributes."""
    out = {}
    for name, module in model.named_modules():
        out[name] = {
            "id": id(module),
            "forward_hooks": [(k, id(h)) for k, h in module._forward_hooks.items()],
            "forward_pre_hooks": [(k, id(h)) for k, h in module._forward_pre_hooks.items()],
            "parameters": [(k, id(p), p.requires_grad) for k, p in module._parameters.items() if p is not None],
            "buffers": [(k, id(b)) for k, b in module._buffers.items() if b is not None],
            "attributes": sorted((k, repr(v)) for k, v in vars(module).items()
                                 if isinstance(v, (bool, int, float, str, type(None)))),
            "peft": sorted(k for k in vars(module) if k.startswith("peft_")),
        }
    return out


def values(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_values(before: dict, model: nn.Module) -> None:
    after = model.state_dict()
    assert set(after) == set(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key


# ---------------------------------------------------------------- 1. apply_peft is all or nothing
@pytest.fixture
def broken_method():
    """A method that installs modules, hooks, an attribute and a requires_grad change, then fails."""
    @register_method("broken")
    class Broken(PeftMethod):
        def install(self, model, layout):
            for block in model.blocks:
                block.peft_broken = nn.Linear(layout.embed_dim, layout.embed_dim)
                block.register_forward_hook(block.peft_broken.forward)
                block.norm1.register_forward_pre_hook(lambda module, args: args)
                block.attn.fused_attn = False
            model.head.weight.requires_grad_(False)
            model.patch_embed.extra_flag = True
            raise RuntimeError("injected failure during install")
    yield "broken"
    registry._METHODS.pop("broken", None)


FIRST_METHODS = ["lora", "ssf", "moppa", "coeff", "vpt", "fact", "adapter", "nola", "bitfit"]


@pytest.mark.parametrize("first", FIRST_METHODS)
def test_failed_install_of_the_second_method_leaves_the_model_unchanged(first, broken_method):
    model = tiny_vit().eval()
    before, tensors = structure(model), values(model)
    with pytest.raises(RuntimeError, match="injected failure"):
        apply_peft(model, [first, broken_method])
    assert structure(model) == before
    assert_same_values(tensors, model)
    assert not adapted_methods(model) and not hasattr(model, "peft_train_head")
    # a retry installs each hook once: the same hooks as on a fresh model
    apply_peft(model, first)
    fresh = apply_peft(tiny_vit(), first)
    hooks = lambda m: {n: (len(x._forward_hooks), len(x._forward_pre_hooks)) for n, x in m.named_modules()}
    assert hooks(model) == hooks(fresh)
    trainable = lambda m: {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable(model) == trainable(fresh)
    with torch.no_grad():
        model(images())


def test_lora_then_coeff_on_a_subclassed_attention_is_rolled_back():
    model = tiny_vit()
    attention = type(model.blocks[1].attn)
    model.blocks[1].attn.__class__ = type("MyAttention", (attention,), {})
    before = structure(model)
    with pytest.raises(PeftError, match="block 1 has MyAttention"):
        apply_peft(model, "lora+coeff")
    assert structure(model) == before
    apply_peft(model, "lora")
    assert all(len(block.attn.qkv._forward_hooks) == 1 for block in model.blocks)


@pytest.mark.parametrize("spec, train_head, match", [
    ("lora", "no", "train_head must be True or False"),
    ("lora", 1, "train_head must be True or False"),
    ("lora", None, "train_head must be True or False"),
    ({"lora": {"rank": 10**9}}, True, "'rank' of method 'lora' must be in"),
    ({"moppa": {"tau_init": float("nan")}}, True, "finite"),
    ("vpt+moppa", True, "cannot be composed"),
    ("lora+nonexistent", True, "Unknown PEFT method"),
])
def test_refused_apply_changes_nothing(spec, train_head, match):
    model = tiny_vit()
    before = structure(model)
    with pytest.raises(PeftError, match=match):
        apply_peft(model, spec, train_head=train_head)
    assert structure(model) == before


# ---------------------------------------------------------------- 2. adapters: verified, atomic, all or nothing
def trained(spec="lora", train_head=True, backbone_seed=0):
    model = apply_peft(tiny_vit(seed=backbone_seed), spec, train_head=train_head)
    torch.manual_seed(123)
    return perturb_for_testing(model).eval()


def same_backbone(source: nn.Module) -> VisionTransformer:
    target = tiny_vit()
    target.load_state_dict({k: v for k, v in source.state_dict().items() if "peft_" not in k}, strict=False)
    return target


def flip_payload_byte(path, offset_from_end=5):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def test_config_records_tensor_hashes_train_head_and_backbone(tmp_path):
    source = trained("lora")
    save_adapter(source, tmp_path)
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert set(config["tensors"]) == set(adapter_state_dict(source))
    assert all(len(h) == 64 for h in config["tensors"].values())
    assert config["train_head"] is True and config["format"] == 2
    assert config["backbone"]["class"].endswith("VisionTransformer")
    assert config["backbone"]["frozen_tensors"] > 0 and len(config["backbone"]["frozen_sha256"]) == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS])   # no temp files left


@pytest.mark.parametrize("offset", [1, 5, 40, 400])
@pytest.mark.parametrize("adapted_target", [False, True], ids=["plain-target", "adapted-target"])
def test_flipped_payload_bytes_are_detected_and_named(offset, adapted_target, tmp_path):
    source = trained("lora")
    save_adapter(source, tmp_path)
    flip_payload_byte(tmp_path / ADAPTER_WEIGHTS, offset)
    target = same_backbone(source)
    if adapted_target:
        apply_peft(target, "lora")
    before, tensors = structure(target), values(target)
    with pytest.raises(PeftError) as error:
        load_adapter(target, tmp_path)
    message = str(error.value)
    assert str(tmp_path / ADAPTER_WEIGHTS) in message
    assert "corrupted" in message and ("lora" in message or "head" in message)   # the tensor's name
    assert structure(target) == before
    assert_same_values(tensors, target)


@pytest.mark.parametrize("damage", ["empty", "truncated-header", "truncated-half", "garbage"])
def test_unreadable_weights_name_the_file(damage, tmp_path):
    save_adapter(trained("lora"), tmp_path)
    path = tmp_path / ADAPTER_WEIGHTS
    data = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated-header": data[:6], "truncated-half": data[:len(data) // 2],
                      "garbage": os.urandom(256)}[damage])
    target = tiny_vit()
    before = structure(target)
    with pytest.raises(PeftError, match=f"{ADAPTER_WEIGHTS}.*(truncated or damaged|corrupted)"):
        load_adapter(target, tmp_path)
    assert structure(target) == before


@pytest.mark.parametrize("content, match", [
    ("", "is not valid JSON"),
    ("{\"methods\": {\"lora\"", "is not valid JSON"),
    ("\xff\xfe garbage", "is not valid JSON"),
    ("[1, 2, 3]", "is not an adapter config"),
    ("{}", "is not an adapter config"),
    ("{\"methods\": [\"lora\"], \"layout\": {}, \"num_classes\": 5}", "'methods' \\(dict\\)"),
    ("{\"methods\": {\"lora\": {}}, \"layout\": {}}", "'num_classes' \\(int\\)"),
])
def test_unreadable_config_names_the_file(content, match, tmp_path):
    save_adapter(trained("lora"), tmp_path)
    (tmp_path / ADAPTER_CONFIG).write_bytes(content.encode("latin-1"))
    target = tiny_vit()
    before = structure(target)
    with pytest.raises(PeftError, match=match) as error:
        load_adapter(target, tmp_path)
    assert ADAPTER_CONFIG in str(error.value)
    assert structure(target) == before


@pytest.mark.parametrize("edit, match", [
    (lambda c: c["tensors"].pop(next(iter(c["tensors"]))), "does not hold the tensors"),
    (lambda c: c.update(num_classes=7), "number of classes"),
    (lambda c: c.update(methods={"lora": {"rank": 4, "alpha": 8.0}}), "wrong shapes.*peft_lora"),
    (lambda c: c.update(train_head="yes"), "'train_head' must be true or false"),
    (lambda c: c.update(methods={"lorra": {}}), "adapter_config.json: its methods cannot be applied: Unknown PEFT method 'lorra'"),
    (lambda c: c.update(methods={"lora": {"alpha": "8"}}), "adapter_config.json: its methods cannot be applied: LoRAOptions.alpha"),
    (lambda c: c.update(backbone=[1]), "adapter_config.json: 'backbone' must be an object"),
    (lambda c: c["backbone"].update(architecture="vit_base_patch16_224"), "another backbone.*architecture"),
])
def test_inconsistent_config_is_refused_and_the_model_is_left_as_it_was(edit, match, tmp_path):
    source = trained("lora")
    save_adapter(source, tmp_path)
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    edit(config)
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps(config))
    target = same_backbone(source)
    before, tensors = structure(target), values(target)
    with pytest.raises(PeftError, match=match):
        load_adapter(target, tmp_path)
    assert structure(target) == before
    assert_same_values(tensors, target)


@pytest.mark.parametrize("spec", ["lora", "moppa", "ssf", "bitfit"])
def test_another_backbone_is_refused_unless_forced(spec, tmp_path):
    source = trained(spec, backbone_seed=0)
    save_adapter(source, tmp_path)
    other = tiny_vit(seed=1)                                 # same architecture, other weights
    before = structure(other)
    with pytest.raises(PeftError, match="another backbone.*frozen_sha256.*force=True"):
        load_adapter(other, tmp_path)
    assert structure(other) == before
    load_adapter(other, tmp_path, force=True)
    for name, tensor in adapter_state_dict(source).items():
        assert torch.equal(dict(other.named_parameters())[name], tensor), name


@pytest.mark.parametrize("force", ["yes", 1, None])
def test_force_must_be_a_bool(force, tmp_path):
    source = trained("lora")
    save_adapter(source, tmp_path)
    target = same_backbone(source)
    with pytest.raises(PeftError, match="force must be True or False"):
        load_adapter(target, tmp_path, force=force)
    assert not adapted_methods(target)


def test_another_layout_is_refused_even_when_forced(tmp_path):
    save_adapter(trained("lora"), tmp_path)
    other = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2, num_classes=5, reg_tokens=1)
    with pytest.raises(PeftError, match="layout"):
        load_adapter(other, tmp_path, force=True)
    assert not adapted_methods(other)


@pytest.mark.parametrize("spec", ["lora", "moppa", "ssf", "vpt", "coeff", "fact", "linear"])
@pytest.mark.parametrize("train_head", [True, False])
def test_round_trip_with_and_without_the_head(spec, train_head, tmp_path):
    source = trained(spec, train_head=train_head)
    save_adapter(source, tmp_path)
    assert any(is_head_parameter(source, n) for n in adapter_state_dict(source)) == train_head
    target = same_backbone(source)
    with torch.no_grad():
        target.head.weight.copy_(source.head.weight); target.head.bias.copy_(source.head.bias)
    load_adapter(target, tmp_path)
    assert target.head.weight.requires_grad == train_head
    with torch.no_grad():
        assert torch.equal(source(images()), target.eval()(images()))


def test_adapted_target_with_other_train_head_is_refused(tmp_path):
    source = trained("lora", train_head=False)
    save_adapter(source, tmp_path)
    target = apply_peft(same_backbone(source), "lora", train_head=True)
    with pytest.raises(PeftError, match="train_head"):
        load_adapter(target, tmp_path)
    other_options = apply_peft(same_backbone(source), {"lora": {"alpha": 4.0}}, train_head=False)
    with pytest.raises(PeftError, match="methods or options"):
        load_adapter(other_options, tmp_path)


@pytest.mark.parametrize("spec", ["lora", "ssf", "fact", "nola"])
def test_saving_a_merged_model_is_refused(spec, tmp_path):
    model = merge_peft(trained(spec))
    with pytest.raises(PeftError, match="was merged.*before merging"):
        save_adapter(model, tmp_path)
    assert not (tmp_path / ADAPTER_WEIGHTS).exists()


def test_a_failed_save_keeps_the_previous_adapter(tmp_path, monkeypatch):
    import safetensors.torch
    first = trained("lora")
    save_adapter(first, tmp_path)
    saved = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def crash(tensors, filename, *args, **kwargs):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(perturb_for_testing(trained("lora")), tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == saved      # no temp file, old files intact
    monkeypatch.undo()
    load_adapter(same_backbone(first), tmp_path)


def test_legacy_adapter_without_hashes_loads_with_a_warning_only_when_forced(tmp_path):
    source = trained("lora")
    save_adapter(source, tmp_path)
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    legacy = {k: config[k] for k in ("methods", "layout", "num_classes")}
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps(legacy))
    with pytest.raises(PeftError, match="force=True"):                 # issue #27: refused unless forced
        load_adapter(same_backbone(source), tmp_path)
    with pytest.warns(UserWarning) as caught:
        target = load_adapter(same_backbone(source), tmp_path, force=True)
    messages = " | ".join(str(w.message) for w in caught)
    assert "no tensor hashes" in messages and "has no 'format'" in messages       # both gaps of the legacy file named
    with torch.no_grad():
        assert torch.equal(source(images()), target.eval()(images()))


# ---------------------------------------------------------------- 3. the decoded-image cache
def write_toy_vtab_task(root, n=4, shape=(8, 8), seed=0):
    """Write a two-class VTAB-style folder of random grey images under `root`; return the task's folder."""
    rng = np.random.default_rng(seed)
    split = lambda: (rng.integers(0, 256, (n, *shape), dtype=np.uint8), np.arange(n) % 2)
    return write_vtab_task(root, "toy", {"train800": split(), "val200": split(), "test": split()}, num_classes=2)


def load(root, cache, **kwargs):
    return load_vtab_task(root, "toy", Preprocessing(size=8, normalization="none"), cache_dir=cache, **kwargs)


@pytest.mark.parametrize("how", ["other-content", "same-size-new-mtime", "other-size"])
def test_replacing_an_image_invalidates_the_cache(how, tmp_path):
    folder = write_toy_vtab_task(tmp_path / "vtab")
    cache = tmp_path / "cache"
    first = load(tmp_path / "vtab", cache)
    relative = (folder / "test.txt").read_text().split()[0]
    path = folder / relative
    stat = path.stat()
    if how == "other-size":
        Image.fromarray(np.full((16, 16), 9, dtype=np.uint8)).save(path)
    else:
        Image.fromarray(np.full((8, 8), 9, dtype=np.uint8)).save(path)
    if how == "same-size-new-mtime":
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    again = load(tmp_path / "vtab", cache)
    assert again["test"][0][0].unique().tolist() == [9]
    assert torch.equal(again["train800"][0], first["train800"][0])


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "wrong-contents"])
def test_a_damaged_cache_file_is_rebuilt_with_a_warning(damage, tmp_path):
    write_toy_vtab_task(tmp_path / "vtab")
    cache = tmp_path / "cache"
    first = load(tmp_path / "vtab", cache)
    for path in cache.glob("toy_test_*.pt"):
        data = path.read_bytes()
        if damage == "wrong-contents":
            torch.save({"images": torch.zeros(1, 3, 8, 8, dtype=torch.uint8), "labels": torch.zeros(1, dtype=torch.int64)}, path)
        else:
            path.write_bytes({"empty": b"", "truncated": data[:len(data) // 3], "garbage": os.urandom(200)}[damage])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = load(tmp_path / "vtab", cache)
    messages = [str(w.message) for w in caught if "damaged cache file" in str(w.message)]
    assert len(messages) == 1 and "\n" not in messages[0] and "toy_test_" in messages[0]
    assert torch.equal(again["test"][0], first["test"][0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")                         # rebuilt: the next load is clean
        assert torch.equal(load(tmp_path / "vtab", cache)["test"][0], first["test"][0])


def test_an_uncreatable_cache_folder_is_a_clear_error(tmp_path):
    write_toy_vtab_task(tmp_path / "vtab")
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ValueError, match="Cannot create the cache folder .*a-file.*cache_dir=False"):
        load(tmp_path / "vtab", tmp_path / "a-file" / "cache")


@pytest.mark.parametrize("content, match", [
    ("[1, 2]", "must hold a JSON object"),
    ("{\"num_classes\": 2", "is not valid JSON"),
    ("", "is not valid JSON"),
    ("{\"num_classes\": true}", "positive int 'num_classes'"),
    ("{\"num_classes\": 0}", "positive int 'num_classes'"),
])
def test_bad_task_json_names_the_file(content, match, tmp_path):
    folder = write_toy_vtab_task(tmp_path / "vtab")
    (folder / "task.json").write_text(content)
    with pytest.raises(ValueError, match=match) as error:
        load(tmp_path / "vtab", False)
    assert str(folder / "task.json") in str(error.value)


@pytest.mark.parametrize("listed", ["/etc/passwd", "../outside.png", "images/../../outside.png", "../../../../etc/hosts"])
def test_list_file_paths_must_stay_inside_the_task_folder(listed, tmp_path):
    folder = write_toy_vtab_task(tmp_path / "vtab")
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "vtab" / "outside.png")
    (folder / "test.txt").write_text(f"{listed} 0\n")
    with pytest.raises(ValueError, match=r"test.txt:1: image path .* stay inside it"):
        load(tmp_path / "vtab", False, splits=("test",))


def test_fgvc_json_paths_must_stay_inside_the_dataset_folder(tmp_path):
    flowers = tmp_path / "fgvc" / "OxfordFlower"
    flowers.mkdir(parents=True)
    (flowers / "train.json").write_text(json.dumps({f"{i}.jpg": i for i in range(102)}))
    (flowers / "test.json").write_text(json.dumps({"../../secret.jpg": 0}))
    with pytest.raises(ValueError, match="test.json: image path '../../secret.jpg'"):
        load_fgvc_task(tmp_path / "fgvc", "flowers", splits=("test",), cache_dir=False)


# ---------------------------------------------------------------- 4. option values
NON_FINITE = [float("nan"), float("inf"), -float("inf")]


def float_fields() -> list:
    cases = []
    for name in list_methods():
        options = get_method(name).Options
        hints = typing.get_type_hints(options)
        for field in dataclasses.fields(options):
            if float in (hints[field.name], *typing.get_args(hints[field.name])):
                cases += [pytest.param(name, field.name, v, id=f"{name}.{field.name}={v}") for v in NON_FINITE]
    return cases


@pytest.mark.parametrize("method, option, value", float_fields())
def test_every_float_option_refuses_nan_and_infinity(method, option, value):
    with pytest.raises(PeftError, match=f"{get_method(method).Options.__name__}.{option} must be a finite number"):
        apply_peft(tiny_vit(), {method: {option: value}})


def test_the_float_fields_cover_the_reported_options():
    covered = {(p.values[0], p.values[1]) for p in float_fields()}
    assert {("moppa", "tau_init"), ("lora", "alpha"), ("ssf", "init_std"), ("coeff", "dropout"), ("fact", "scale")} <= covered


@pytest.mark.parametrize("method, options, match", [
    ("lora", {"rank": 10**9}, r"'rank' of method 'lora' must be in \[1, 192\]"),
    ("lora", {"rank": 193}, r"'rank' of method 'lora' must be in \[1, 192\]"),
    ("lora", {"rank": 0}, "LoRAOptions.rank must be at least 1, got 0."),
    ("nola", {"rank": 10**9}, r"'rank' of method 'nola' must be in \[1, 192\]"),
    ("fact", {"rank": 10**9}, r"'rank' of method 'fact' must be in \[1, 192\]"),
    ("adapter", {"bottleneck": 10**9}, r"'bottleneck' of method 'adapter' must be in \[1, 192\]"),
    ("adaptformer", {"bottleneck": 10**6}, r"'bottleneck' of method 'adaptformer' must be in \[1, 192\]"),
    ("lora", {"alpha": 0}, "LoRAOptions.alpha must be non-zero"),
    ("lora", {"alpha": 0.0}, "LoRAOptions.alpha must be non-zero"),
    ("adapter", {"scale": 0.0}, "AdapterOptions.scale must be non-zero"),
    ("adaptformer", {"scale": 0}, "AdaptFormerOptions.scale must be non-zero"),
    ("bi_adapter", {"scale": 0.0}, "BiAdapterOptions.scale must be non-zero"),
    ("nola", {"scale": 0.0}, "NOLAOptions.scale must be non-zero"),
    ("fact", {"scale": 0.0}, "FacTOptions.scale must be non-zero"),
    ("moppa", {"tau_init": 0.0}, "MoPPAOptions.tau_init must be positive, got 0.0."),
    ("moppa", {"tau_init": "5"}, "MoPPAOptions.tau_init must be float, got '5'."),
    ("lora", {"rank": 8.0}, "LoRAOptions.rank must be int, got 8.0."),
    ("lora", {"rank": True}, "LoRAOptions.rank must be int, got True."),
    ("vpt", {"deep": "no"}, "VPTOptions.deep must be bool, got 'no'."),
    ("vpt", {"num_tokens": 0}, "VPTOptions.num_tokens must be at least 1, got 0."),
    ("coeff", {"dropout": 1.0}, r"CoeffOptions.dropout must be in \[0, 1\), got 1.0."),
    ("ssf", {"init_std": -1.0}, "SSFOptions.init_std must be non-negative, got -1.0."),
    ("ssf", {"targets": ["nrom2"]}, "SSFOptions.targets must be a non-empty subset of .*Did you mean 'norm2'"),
    ("moppa", {"branches": ()}, "MoPPAOptions.branches must be a non-empty subset of"),
])
def test_absurd_option_values_are_refused_naming_the_option(method, options, match):
    model = tiny_vit()
    before = structure(model)
    with pytest.raises(PeftError, match=match):
        apply_peft(model, {method: options})
    assert structure(model) == before


def test_huge_rank_fails_before_allocating(monkeypatch):
    allocated = []
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: allocated.append(a) or real_empty(*a, **k))
    with pytest.raises(PeftError, match="'rank'"):
        apply_peft(tiny_vit(), {"lora": {"rank": 10**9}})
    assert not any(math.prod(int(d) for d in (a[0] if isinstance(a[0], tuple) else a)) > 10**8 for a in allocated if a)


# ---------------------------------------------------------------- 5. compositions that cannot run together
@pytest.mark.parametrize("spec", ["vpt+moppa", "moppa+vpt", {"vpt": {"deep": False, "num_tokens": 2}, "moppa": {}},
                                  ["vpt", "moppa", "lora"]])
def test_prompts_with_moppa_are_refused_when_applied(spec):
    model = tiny_vit()
    before = structure(model)
    with pytest.raises(PeftError, match=r"cannot be composed: \['vpt'\] change the number of tokens.*\['moppa'\] need"):
        apply_peft(model, spec)
    assert structure(model) == before


@pytest.mark.parametrize("spec", ["vpt+lora", "vpt+coeff", "vpt+ssf", "vpt+adapter", "moppa+lora", "moppa+coeff"])
def test_compositions_that_run_together_are_accepted_and_run(spec):
    model = apply_peft(tiny_vit(), spec).eval()
    with torch.no_grad():
        assert model(images()).shape == (2, 5)


def test_declared_requirements_are_generic():
    @register_method("grid_reader")
    class GridReader(PeftMethod):
        needs_token_grid = True
        def install(self, model, layout): pass
    try:
        with pytest.raises(PeftError, match=r"\['vpt'\] change .*\['grid_reader'\] need"):
            apply_peft(tiny_vit(), "vpt+grid_reader")
        apply_peft(tiny_vit(), "lora+grid_reader")
    finally:
        registry._METHODS.pop("grid_reader", None)
