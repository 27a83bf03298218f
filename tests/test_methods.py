"""One table of invariants over every registered method and the compositions the experiments use."""
import copy
import inspect
import subprocess
import sys
from dataclasses import dataclass
from functools import partial

import pytest
import torch
from torch import nn
from timm.models.vision_transformer import Attention, Block

from moppa_nb import PeftError, adapted_methods, apply_peft, list_methods, load_adapter, merge_peft, save_adapter
from moppa_nb.adapt import is_head_parameter
from moppa_nb.registry import PeftMethod, get_method, register_method
from moppa_nb.more_baselines import spt_allocation, spt_sensitivity
from moppa_nb import testing
from moppa_nb.testing import perturb_for_testing

IMAGE = 48   # 3 x 3 grid of 16 px patches, behind a CLS and a register token

@register_method("test_channel_scale")
class ChannelScale(PeftMethod):
    "A throwaway method registered here, not in the library: the table must cover it without being edited."
    identity_at_init, mergeable = True, False

    @dataclass(frozen=True)
    class Options:
        init: float = 1.0   # initial per-channel scale of every block's output

    def install(self, model, layout):
        for block in model.blocks:
            block.peft_test_channel_scale = nn.Parameter(torch.full((layout.embed_dim,), self.options.init))
            block.register_forward_hook(lambda module, args, out: out * module.peft_test_channel_scale)


# Every registered method with its default options, expected to behave as its class declares.
NEEDS_OPTIONS = {"spt": lambda: {"spt": {"allocation": spt_allocation_for_tests()}}}   # no usable default allocation


def registered_cases() -> dict:
    """id -> (methods, starts at the identity, mergeable) for every registered method, from the registry."""
    return {name: (NEEDS_OPTIONS[name]() if name in NEEDS_OPTIONS else name, get_method(name).identity_at_init,
                   get_method(name).mergeable) for name in list_methods()}


def composition(*names: str) -> tuple:
    """A composition starts at the identity, and merges, when all its methods do."""
    classes = [get_method(name) for name in names]
    return list(names), all(c.identity_at_init for c in classes), all(c.mergeable for c in classes)


# Options and compositions whose expectations differ from the defaults', or that the experiments use.
VARIANTS = {
    "vpt-shallow": ({"vpt": {"deep": False, "num_tokens": 4}}, False, False),
    "ssf-moppa-sites": ({"ssf": {"targets": ["patch_embed", "norm2", "final_norm"]}}, True, True),   # the public MoPPA code's sites
    "fact-tk": ({"fact": {"variant": "tk", "rank": 8}}, True, True),
    "coeff-identity": ({"coeff": {"parameterisation": "identity"}}, True, False),   # alpha = I, no residual
    "coeff-random": ({"coeff": {"parameterisation": "random"}}, False, False),
    "moppa-residual": ({"moppa": {"residual": True}}, False, False),   # X + filter(X): not the identity either
    "moppa-both": ({"moppa": {"placement": "both"}}, False, False),
    "moppa-uniform": ({"moppa": {"router": "uniform"}}, False, False),   # no router: fixed weights 1/3
    "rlrr-public-init": ({"rlrr": {"init": "public"}}, False, True),   # the public code's kaiming-uniform scales
    "moppa+rlrr+ssf-public": ({"moppa": {}, "rlrr": {}, "ssf": {"targets": ["patch_embed", "norm2", "final_norm"], "init_std": 0.02}},
                              False, False),                          # MoPPA with SSF where and as the public code puts it
    "bi_adapter-32bit": ({"bi_adapter": {"bits": 32}}, True, False),
    "bi_lora-32bit": ({"bi_lora": {"bits": 32}}, True, True),
    **{"+".join(names): composition(*names) for names in [("moppa", "ssf"), ("lora", "coeff"), ("rlrr", "ssf"),
       ("moppa", "rlrr", "ssf"), ("dora", "ssf"), ("dora", "coeff"), ("fact", "coeff")]},
}


tiny_vit = partial(testing.tiny_vit, img_size=IMAGE, reg_tokens=1)   # two blocks, 5 classes, seed 0, eval mode


def images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))


def spt_allocation_for_tests() -> dict:
    """SPT's allocation for `tiny_vit` from two random batches: some structured matrices, full vectors and sparse entries."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        batches = [(images(4), torch.tensor([0, 1, 2, 3])) for _ in range(2)]
        sensitivity = spt_sensitivity(tiny_vit(), batches)
    allocation = spt_allocation(sensitivity, budget=sum(s.numel() for s in sensitivity.values()) // 50)
    assert allocation["structured"] and allocation["full"] and allocation["sparse"]
    return allocation


CASES = {**registered_cases(), **VARIANTS}
TABLE = [pytest.param(*case, id=name) for name, case in CASES.items()]


def method_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable tensors outside the head: what the methods own."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad and not is_head_parameter(model, n)}


def test_the_table_covers_every_registered_method_and_one_registered_here():
    assert set(list_methods()) <= set(CASES)
    assert CASES["test_channel_scale"] == ("test_channel_scale", True, False)   # from the class, no table entry
    expected = {"moppa": False, "coeff": True, "vpt": False, "lora": True, "bi_adapter": False, "bi_lora": False, "snell": False}
    assert {name: CASES[name][1] for name in expected} == expected               # what the methods declare


BUILT_IN = {"linear", "full", "bitfit", "vpt", "adapter", "adaptformer", "lora", "ssf", "fact", "nola", "coeff", "moppa",
            "rlrr", "dora", "bi_adapter", "bi_lora", "spt", "snell"}


def test_every_method_is_registered():
    assert BUILT_IN <= set(list_methods())


@pytest.mark.parametrize("lookup, expected", [
    ("from moppa_nb.registry import list_methods; print(*list_methods())", sorted(BUILT_IN)),
    ("from moppa_nb.registry import get_method; print(get_method('lora').__module__)", ["moppa_nb.weight_space"]),
    ("import moppa_nb.adapt; from moppa_nb import list_methods; print(*list_methods())", sorted(BUILT_IN)),
    ("import moppa_nb.coeff; from moppa_nb.registry import list_methods; print(*list_methods())", sorted(BUILT_IN))])
def test_a_fresh_interpreter_s_registry_holds_every_built_in_method(lookup, expected):
    """`import moppa_nb` imports no method module: the registry imports the built-in ones before its first lookup."""
    done = subprocess.run([sys.executable, "-c", lookup], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == expected


@pytest.mark.parametrize("methods, identity, mergeable", TABLE)
def test_identity_at_init_and_perturbed_tensors_reach_the_output(methods, identity, mergeable):
    plain = tiny_vit().eval()
    adapted = apply_peft(copy.deepcopy(plain), methods).eval()
    x = images()
    with torch.no_grad():
        expected, start = plain(x), adapted(x)
        if not identity:
            assert (start - expected).abs().max() > 1e-4, "marked non-identity but starts at the plain model"
            return
        torch.testing.assert_close(start, expected, atol=1e-5, rtol=0)
        if not method_parameters(adapted):            # linear probe: nothing of the method to perturb
            return
        perturb_for_testing(adapted)
        assert (adapted(x) - expected).abs().max() > 1e-3


@pytest.mark.parametrize("methods, identity, mergeable", TABLE)
def test_gradients_reach_only_the_methods_and_the_head(methods, identity, mergeable):
    model = apply_peft(tiny_vit(), methods).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    owned = {n for n, _ in model.named_parameters()
             if is_head_parameter(model, n) or any(m.is_trainable(n) for m in adapted_methods(model))}
    assert trainable == owned
    for method in adapted_methods(model):
        if method.name == "linear":
            assert not method_parameters(model)
        else:
            assert any(method.is_trainable(n) for n in trainable), f"{method.name} trains nothing"
    model(images(3)).logsumexp(-1).mean().backward()
    for name, parameter in model.named_parameters():
        assert (parameter.grad is not None) == parameter.requires_grad, name
    owned_by_methods = method_parameters(model)
    if owned_by_methods:
        assert sum(p.grad.abs().sum() for p in owned_by_methods.values()) > 0


@pytest.mark.parametrize("methods, identity, mergeable", TABLE)
def test_one_optimiser_step_changes_only_trainable_tensors(methods, identity, mergeable):
    model = apply_peft(tiny_vit(), methods).train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    trainable = {n: p.detach().clone() for n, p in method_parameters(model).items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)   # every parameter offered
    model(images(3)).logsumexp(-1).mean().backward()
    optimizer.step()
    now = dict(model.named_parameters())
    assert all(torch.equal(now[n], before) for n, before in frozen.items())
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    if trainable:
        assert any(not torch.equal(now[n], before) for n, before in trainable.items())


@pytest.mark.parametrize("methods, identity, mergeable", TABLE)
def test_bf16_autocast_trains_and_evaluates_close_to_float32(methods, identity, mergeable):
    """Under bf16 autocast (the paper profile's GPU precision; CPU here) every method trains and evaluates, in place or not."""
    model = perturb_for_testing(apply_peft(tiny_vit(), methods))
    x = images()
    with torch.no_grad():
        reference = model.eval()(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), reference, atol=0.1 * reference.abs().max().item(), rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.train()(images(3)).float().logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("methods, identity, mergeable", TABLE)
def test_deep_copy_is_an_independent_model(methods, identity, mergeable):
    original = perturb_for_testing(apply_peft(tiny_vit(), methods)).eval()
    clone = copy.deepcopy(original)
    x = images()
    with torch.no_grad():
        before = original(x)
        assert torch.equal(clone(x), before)
        if method_parameters(original):
            perturb_for_testing(original)               # hooks and shared factors of the clone are the clone's own
            assert not torch.equal(original(x), before)
            assert torch.equal(clone(x), before)


@pytest.mark.parametrize("methods, identity, mergeable", TABLE)
def test_save_load_round_trip_reproduces_outputs(methods, identity, mergeable, tmp_path):
    source = apply_peft(tiny_vit(), methods)
    added = set(source.state_dict()) - set(tiny_vit().state_dict())
    assert added <= set(method_parameters(source)), "a method added persistent state that save_adapter would not save"
    backbone = {k: v.clone() for k, v in source.state_dict().items() if "peft_" not in k}   # before training
    perturb_for_testing(source)
    save_adapter(source, tmp_path)
    target = tiny_vit()
    target.load_state_dict(backbone)
    load_adapter(target, tmp_path)
    x = images()
    with torch.no_grad():
        assert torch.equal(source.eval()(x), target.eval()(x))


@pytest.mark.parametrize("methods, identity, mergeable", TABLE)
def test_merge_folds_into_a_plain_vit_or_refuses(methods, identity, mergeable):
    model = perturb_for_testing(apply_peft(tiny_vit(), methods)).eval()
    if not mergeable:
        with pytest.raises(PeftError, match="Cannot merge"):
            merge_peft(model)
        return
    x = images()
    with torch.no_grad():
        before = model(x)
        merge_peft(model)
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
        plain = tiny_vit().eval()
        plain.load_state_dict(model.state_dict())          # strict: exactly a plain ViT's tensors
        torch.testing.assert_close(plain(x), before, atol=1e-5, rtol=1e-5)


def test_vpt_with_moppa_is_refused_when_applied():
    model = tiny_vit()
    with pytest.raises(PeftError, match=r"\['vpt'\] change the number of tokens.*\['moppa'\] need"):
        apply_peft(model, ["vpt", "moppa"])
    assert not adapted_methods(model) and not any(m._forward_pre_hooks for m in model.modules())


def test_vpt_prompt_dropout_masks_each_image_in_training_only():
    """VPT's code drops prompt entries after expanding them to the batch (one mask per image), never at evaluation."""
    x = torch.randn(4, 3, IMAGE, IMAGE)
    dropped = apply_peft(tiny_vit(), {"vpt": {"num_tokens": 4, "dropout": 0.3}})
    plain = apply_peft(tiny_vit(), {"vpt": {"num_tokens": 4}})
    plain.load_state_dict(dropped.state_dict())
    torch.testing.assert_close(dropped.eval()(x), plain.eval()(x))
    seen = []
    dropped.blocks[1].register_forward_pre_hook(lambda module, args: seen.append(args[0][:, 2:6].detach()))   # after CLS + register
    torch.manual_seed(0)
    dropped.train()(x)
    zeros = seen[0] == 0
    assert 0.2 < zeros.float().mean() < 0.4
    assert not all(torch.equal(zeros[0], zeros[i]) for i in range(1, 4))
    with pytest.raises(PeftError, match=r"dropout must be in \[0, 1\)"):
        apply_peft(tiny_vit(), {"vpt": {"dropout": 1.5}})


@pytest.mark.parametrize("methods", [["ssf", "rlrr"], ["lora", "dora"], ["ssf", "dora"]])
def test_methods_reading_the_frozen_weight_come_first(methods):
    """RLRR and DoRA build W' from W: after SSF or LoRA on the same layer, hook and merge would disagree."""
    with pytest.raises(PeftError, match=f"list '{methods[1]}' before"):
        apply_peft(tiny_vit(), methods)


def test_coeff_refuses_attention_it_cannot_reach():
    model = tiny_vit()
    model.blocks[1].attn = nn.Identity()
    with pytest.raises(PeftError, match="block 1 has Identity"):
        apply_peft(model, "coeff")


def test_timm_layout_the_wrappers_rely_on():
    """Fails if timm changes the Attention/Block structure that the hooks of these methods assume."""
    for forward in (Attention.forward, Block.forward):
        parameters = inspect.signature(forward).parameters
        assert list(parameters)[:4] == ["self", "x", "attn_mask", "is_causal"]
        assert parameters["attn_mask"].default is None and parameters["is_causal"].default is False
    model = tiny_vit().eval()
    block = model.blocks[0]
    attn = block.attn
    assert type(block) is Block and type(attn) is Attention
    for name in ("qkv", "num_heads", "head_dim", "scale", "q_norm", "k_norm", "attn_drop", "proj", "fused_attn"):
        assert hasattr(attn, name), name
    assert isinstance(attn.qkv, nn.Linear) and attn.qkv.out_features == 3 * attn.num_heads * attn.head_dim
    assert isinstance(attn.proj, nn.Linear) and isinstance(attn.attn_drop, nn.Dropout)
    assert isinstance(block.norm1, nn.LayerNorm) and isinstance(block.norm2, nn.LayerNorm)
    assert isinstance(block.mlp.fc1, nn.Linear) and isinstance(block.mlp.fc2, nn.Linear)
    assert isinstance(model.patch_embed.proj, nn.Conv2d) and isinstance(model.norm, nn.LayerNorm)
    assert model.num_prefix_tokens == 2

    # The eager path applies attn_drop to the post-softmax maps (Coeff-Tuning hooks there), then @ V,
    # and matches the fused path; the final norm runs after the last block (VPT removes its prompts there).
    seen = []
    x = images()
    with torch.no_grad():
        fused = model(x)
        handles = [attn.attn_drop.register_forward_hook(lambda m, a, out: seen.append(("maps", out))),
                   model.blocks[-1].register_forward_hook(lambda m, a, out: seen.append(("last block", None))),
                   model.norm.register_forward_pre_hook(lambda m, a: seen.append(("norm", None)))]
        attn.fused_attn = False
        eager = model(x)
    for handle in handles:
        handle.remove()
    assert [what for what, _ in seen] == ["maps", "last block", "norm"]
    maps = seen[0][1]
    tokens = model.num_prefix_tokens + 9
    assert maps.shape == (2, attn.num_heads, tokens, tokens)
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, attn.num_heads, tokens))
    torch.testing.assert_close(eager, fused, atol=1e-5, rtol=0)
