"""create_backbone: every published layout fills the backbone exactly; wrong checkpoints fail naming their keys."""
import argparse
import hashlib

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from moppa_nb.backbones import BackboneLoadError, create_backbone, input_normalization, normalization_name

NAME, TINY = "vit_tiny_patch16_224", dict(img_size=32, depth=2)
HEAD = ("head.weight", "head.bias")


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(1)
    return timm.create_model(NAME, pretrained=False, num_classes=7, **TINY).eval()


def _projector(prefix: str) -> dict:
    "MoCo v3's MLP projector/predictor names: Linear, BatchNorm (with running stats), Linear."
    return {f"{prefix}.0.weight": torch.randn(16, 192), f"{prefix}.1.weight": torch.ones(16), f"{prefix}.1.bias": torch.zeros(16),
            f"{prefix}.1.running_mean": torch.zeros(16), f"{prefix}.1.running_var": torch.ones(16),
            f"{prefix}.1.num_batches_tracked": torch.tensor(5), f"{prefix}.3.weight": torch.randn(8, 16)}


def _layouts(state: dict) -> dict:
    "layout name -> (checkpoint object, expected record layout, expected nesting)."
    body = {k: v for k, v in state.items() if k not in HEAD}
    moco = {f"module.base_encoder.{k}": v for k, v in body.items()} | _projector("module.base_encoder.head")
    moco |= {f"module.momentum_encoder.{k}": v + 1 for k, v in body.items()} | _projector("module.momentum_encoder.head")
    moco |= _projector("module.predictor")
    mae = dict(state) | {"mask_token": torch.zeros(1, 1, 192), "decoder_embed.weight": torch.randn(64, 192),
                         "decoder_pos_embed": torch.zeros(1, 5, 64), "decoder_blocks.0.norm1.weight": torch.ones(64),
                         "decoder_norm.weight": torch.ones(64), "decoder_pred.weight": torch.randn(768, 64)}
    return {"plain": (dict(state), "timm", []),
            "nested_model": ({"model": dict(state), "epoch": 3}, "timm", ["model"]),
            "nested_state_dict": ({"state_dict": dict(state), "optimizer": {"lr": 0.1}}, "timm", ["state_dict"]),
            "nested_module": ({"module": dict(state)}, "timm", ["module"]),
            "compiled": ({f"_orig_mod.{k}": v for k, v in state.items()}, "module_prefixed", []),
            "moco_v3_pretrain": ({"epoch": 300, "arch": "vit_small", "state_dict": moco}, "moco_v3_pretrain", ["state_dict"]),
            "moco_v3_lineval": ({"state_dict": {f"module.{k}": v for k, v in state.items()}}, "module_prefixed", ["state_dict"]),
            "mae_pretrain": ({"model": mae, "args": argparse.Namespace(mask_ratio=0.75)}, "mae_pretrain", ["model"])}


def _check_filled(model, source_state: dict, record: dict):
    body = [k for k in model.state_dict() if k not in HEAD]
    assert record["tensors_loaded"] == len(body)
    for k in body: assert torch.equal(model.state_dict()[k], source_state[k]), k


@pytest.mark.parametrize("layout", list(_layouts({})))
@pytest.mark.parametrize("num_classes", [0, 3])
def test_layouts_fill_every_tensor(tmp_path, source, layout, num_classes):
    checkpoint, expected_layout, nesting = _layouts(source.state_dict())[layout]
    path = tmp_path / f"{layout}.pth"
    torch.save(checkpoint, path)
    model, record = create_backbone(NAME, path, num_classes=num_classes, **TINY)
    _check_filled(model, source.state_dict(), record)
    assert (record["layout"], record["nesting"]) == (expected_layout, nesting)
    assert record["head"] == ("none" if num_classes == 0 else "fresh")
    if num_classes: assert model.head.weight.shape == (num_classes, 192)
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert record["input_size"] == (3, 32, 32) and record["pretrained_input_size"] == (3, 224, 224)


def test_safetensors_round_trip(tmp_path, source):
    path = tmp_path / "backbone.safetensors"
    save_file(source.state_dict(), path)
    model, record = create_backbone(NAME, str(path), **TINY)
    _check_filled(model, source.state_dict(), record)
    assert record["file"] == str(path) and record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.eval()(x), source.forward_head(source.forward_features(x), pre_logits=True))


def test_sha256_is_streamed_over_the_whole_file(tmp_path, source):
    path = tmp_path / "big.pth"
    torch.save({"state_dict": source.state_dict(), "padding": torch.zeros(600_000)}, path)   # > 2 chunks of 1 MiB
    _, record = create_backbone(NAME, path, **TINY)
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_load_head(tmp_path, source):
    path = tmp_path / "lineval.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    model, record = create_backbone(NAME, path, num_classes=7, load_head=True, **TINY)
    assert record["head"] == "loaded" and record["tensors_loaded"] == len(source.state_dict())
    assert torch.equal(model.head.weight, source.head.weight)
    with pytest.raises(BackboneLoadError, match=r"2 with a wrong shape: head.weight \(7, 192\) \(model \(3, 192\)\), head.bias"):
        create_backbone(NAME, path, num_classes=3, load_head=True, **TINY)


def _renamed_block(state):
    return {k.replace("blocks.1.", "block.1."): v for k, v in state.items()}


def _missing_tensor(state):
    return {k: v for k, v in state.items() if k != "blocks.0.attn.proj.bias"}


def _wrong_shape(state):
    return dict(state) | {"pos_embed": torch.zeros(1, 5, 100)}


def _extra_tensor(state):
    return dict(state) | {"dist_token": torch.zeros(1, 1, 192)}


@pytest.mark.parametrize("corrupt, messages", [
    (_renamed_block, ["12 missing: blocks.1.norm1.weight, blocks.1.norm1.bias", ", ...", "12 unexpected: block.1.norm1.weight"]),
    (_missing_tensor, ["1 missing: blocks.0.attn.proj.bias."]),
    (_wrong_shape, ["1 with a wrong shape: pos_embed (1, 5, 100) (model (1, 5, 192))"]),
    (_extra_tensor, ["1 unexpected: dist_token."]),
])
@pytest.mark.parametrize("wrap", ["plain", "moco_v3_pretrain"])
def test_wrong_checkpoints_fail_naming_the_keys(tmp_path, source, corrupt, messages, wrap):
    state = corrupt(source.state_dict())
    if wrap == "moco_v3_pretrain": state = {"state_dict": {f"module.base_encoder.{k}": v for k, v in state.items()}}
    path = tmp_path / "wrong.pth"
    torch.save(state, path)
    with pytest.raises(BackboneLoadError) as error:
        create_backbone(NAME, path, **TINY)
    for message in messages: assert message in str(error.value)
    assert str(path) in str(error.value)


def test_no_state_dict_is_an_error(tmp_path):
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "empty.pth")
    with pytest.raises(BackboneLoadError, match="No state dict.*epoch"):
        create_backbone(NAME, tmp_path / "empty.pth", **TINY)


def test_timm_filter_resamples_position_embeddings(tmp_path):
    bigger = timm.create_model(NAME, pretrained=False, num_classes=0, img_size=64, depth=2)
    save_file(bigger.state_dict(), tmp_path / "64px.safetensors")
    model, record = create_backbone(NAME, tmp_path / "64px.safetensors", **TINY)
    assert model.pos_embed.shape == (1, 5, 192) and record["tensors_loaded"] == len(bigger.state_dict())
    assert torch.equal(model.blocks[1].mlp.fc2.weight, bigger.blocks[1].mlp.fc2.weight)


def test_mae_final_norm_follows_timm(tmp_path, source):
    "MAE pre-training keeps `norm` (class-token pool, as timm's .mae config); an avg-pool model with fc_norm is told so."
    torch.save({"model": dict(source.state_dict()) | {"mask_token": torch.zeros(1, 1, 192), "decoder_pred.weight": torch.zeros(4, 4)}},
               tmp_path / "mae.pth")
    with pytest.raises(BackboneLoadError, match=r"2 missing: fc_norm.weight, fc_norm.bias; 2 unexpected: norm.weight, norm.bias.*fc_norm=False"):
        create_backbone(NAME, tmp_path / "mae.pth", global_pool="avg", **TINY)
    model, record = create_backbone(NAME, tmp_path / "mae.pth", global_pool="avg", fc_norm=False, **TINY)
    assert torch.equal(model.norm.weight, source.norm.weight) and record["layout"] == "mae_pretrain"
    finetuned = timm.create_model(NAME, pretrained=False, global_pool="avg", num_classes=7, **TINY)   # MAE fine-tuned: fc_norm
    torch.save({"model": finetuned.state_dict()}, tmp_path / "mae_finetuned.pth")
    with pytest.raises(BackboneLoadError, match="global_pool='avg'"):
        create_backbone(NAME, tmp_path / "mae_finetuned.pth", **TINY)
    _, record = create_backbone(NAME, tmp_path / "mae_finetuned.pth", global_pool="avg", **TINY)
    assert record["tensors_loaded"] == len(finetuned.state_dict()) - 2


@pytest.mark.parametrize("layout, name, overlay, expected, named", [
    ("moco_v3_pretrain", NAME, None, ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), "imagenet"),   # the layout's
    ("mae_pretrain", NAME, None, ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), "imagenet"),
    ("plain", NAME, None, ((0.5,) * 3, (0.5,) * 3), "half"),                                         # augreg tag's config
    ("plain", "vit_tiny_patch16_224.augreg_in21k", None, ((0.5,) * 3, (0.5,) * 3), "half"),
    ("moco_v3_pretrain", NAME, dict(mean=(0.5,) * 3, std=(0.5,) * 3), ((0.5,) * 3, (0.5,) * 3), "half"),  # overlay wins
    ("plain", NAME, dict(mean=(0.1, 0.2, 0.3), std=(1.0,) * 3), ((0.1, 0.2, 0.3), (1.0,) * 3), None),
])
def test_input_normalization(tmp_path, source, layout, name, overlay, expected, named):
    checkpoint, *_ = _layouts(source.state_dict())[layout]
    torch.save(checkpoint, tmp_path / "w.pth")
    extra = {"pretrained_cfg_overlay": overlay} if overlay else {}
    _, record = create_backbone(name, tmp_path / "w.pth", **TINY, **extra)
    assert input_normalization(record) == expected
    if named: assert normalization_name(record) == named
    else:
        with pytest.raises(ValueError, match="no Preprocessing normalization"): normalization_name(record)


def test_mae_config_normalization(tmp_path):
    "timm's vit_base_patch16_224.mae config: ImageNet statistics (a one-block ViT-B keeps the test small)."
    mae = timm.create_model("vit_base_patch16_224.mae", pretrained=False, img_size=32, depth=1)
    save_file(mae.state_dict(), tmp_path / "mae.safetensors")
    _, record = create_backbone("vit_base_patch16_224.mae", tmp_path / "mae.safetensors", img_size=32, depth=1)
    assert normalization_name(record) == "imagenet" and record["normalization_source"].endswith("vit_base_patch16_224.mae")


def test_timm_pretrained_from_local_cache_only(tmp_path, monkeypatch, source):
    "file=None reads timm's pretrained file from the local caches; a missing one is an error, never a download."
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch"))
    with pytest.raises(FileNotFoundError, match="No local copy.*timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k/model.safetensors"):
        create_backbone(NAME, **TINY)
    repo = tmp_path / "hf" / "models--timm--vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    save_file(source.state_dict(), repo / "snapshots" / ("0" * 40) / "model.safetensors")
    model, record = create_backbone(NAME, **TINY)
    _check_filled(model, source.state_dict(), record)
    assert record["file"].endswith("model.safetensors") and normalization_name(record) == "half"


def test_pretrained_argument_is_refused(tmp_path):
    with pytest.raises(TypeError, match="pretrained=False"):
        create_backbone(NAME, tmp_path / "x.pth", pretrained=True)


def test_npz_that_is_not_big_vision_fails(tmp_path):
    np.savez(tmp_path / "foreign.npz", weights=np.zeros(3))
    with pytest.raises(BackboneLoadError, match="not a big_vision checkpoint"):
        create_backbone(NAME, tmp_path / "foreign.npz", **TINY)


def _to_big_vision(model) -> dict:
    "A ViT in the original JAX (AugReg) .npz names, the inverse of what timm's `_load_weights` reads."
    t = lambda x: x.detach().numpy()
    heads, dim = model.blocks[0].attn.num_heads, model.embed_dim
    w = {"embedding/kernel": t(model.patch_embed.proj.weight.permute(2, 3, 1, 0)), "embedding/bias": t(model.patch_embed.proj.bias),
         "cls": t(model.cls_token), "Transformer/posembed_input/pos_embedding": t(model.pos_embed),
         "Transformer/encoder_norm/scale": t(model.norm.weight), "Transformer/encoder_norm/bias": t(model.norm.bias),
         "head/kernel": t(model.head.weight.T), "head/bias": t(model.head.bias)}
    for i, block in enumerate(model.blocks):
        p = f"Transformer/encoderblock_{i}/"
        w |= {p + "LayerNorm_0/scale": t(block.norm1.weight), p + "LayerNorm_0/bias": t(block.norm1.bias),
              p + "LayerNorm_2/scale": t(block.norm2.weight), p + "LayerNorm_2/bias": t(block.norm2.bias)}
        for n, weight, bias in zip(("query", "key", "value"), block.attn.qkv.weight.chunk(3), block.attn.qkv.bias.chunk(3)):
            w |= {p + f"MultiHeadDotProductAttention_1/{n}/kernel": t(weight.T.reshape(dim, heads, -1)),
                  p + f"MultiHeadDotProductAttention_1/{n}/bias": t(bias.reshape(heads, -1))}
        w |= {p + "MultiHeadDotProductAttention_1/out/kernel": t(block.attn.proj.weight.reshape(dim, heads, -1).permute(1, 2, 0)),
              p + "MultiHeadDotProductAttention_1/out/bias": t(block.attn.proj.bias)}
        for r, fc in enumerate((block.mlp.fc1, block.mlp.fc2)):
            w |= {p + f"MlpBlock_3/Dense_{r}/kernel": t(fc.weight.T), p + f"MlpBlock_3/Dense_{r}/bias": t(fc.bias)}
    return w


def test_big_vision_npz(tmp_path, source):
    weights = _to_big_vision(source)
    np.savez(tmp_path / "augreg.npz", **weights)
    model, record = create_backbone(NAME, tmp_path / "augreg.npz", num_classes=7, **TINY)
    _check_filled(model, source.state_dict(), record)
    assert record["layout"] == "big_vision_npz" and record["head"] == "fresh"
    assert not torch.equal(model.head.weight, source.head.weight)
    model, record = create_backbone(NAME, tmp_path / "augreg.npz", num_classes=7, load_head=True, **TINY)
    assert torch.equal(model.head.weight, source.head.weight) and record["tensors_loaded"] == len(source.state_dict())
    with pytest.raises(BackboneLoadError, match="2 missing: head.weight, head.bias"):   # timm skips a head that does not fit
        create_backbone(NAME, tmp_path / "augreg.npz", num_classes=3, load_head=True, **TINY)
    np.savez(tmp_path / "no_norm.npz", **{k: v for k, v in weights.items() if "encoder_norm" not in k})
    with pytest.raises(BackboneLoadError, match="encoder_norm/scale"):
        create_backbone(NAME, tmp_path / "no_norm.npz", **TINY)
