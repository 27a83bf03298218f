"""The maths and the contracts of the MoPPA foundation: DCT, priors vs grid PDEs, router, installation, saving."""
import numpy as np
import pytest
import scipy.fft
import scipy.linalg
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from moppa_nb import PeftError, apply_peft, count_trainable, load_adapter, route_regularisation, route_weights, save_adapter
from moppa_nb.dct import dct2, dct_matrix, idct2, spectral_filter
from moppa_nb.moppa import MoPPAOperator, MoPPAOptions, SharedPriors, moppa_operators
from moppa_nb.priors import neumann_laplacian
from moppa_nb.registry import vit_layout
from moppa_nb.router import entropy_weight


def small_vit(**overrides) -> VisionTransformer:
    kwargs = dict(img_size=(32, 48), patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=7, reg_tokens=2)
    kwargs.update(overrides)
    return VisionTransformer(**kwargs)


# ---------------------------------------------------------------- DCT
@pytest.mark.parametrize("shape", [(14, 14), (7, 9), (1, 5)])
def test_dct2_is_scipy_orthonormal_dct_and_round_trips(shape):
    x = torch.randn(3, 4, *shape)
    expected = scipy.fft.dctn(x.numpy(), type=2, axes=(-2, -1), norm="ortho")
    np.testing.assert_allclose(dct2(x).numpy(), expected, atol=1e-5)
    assert (idct2(dct2(x)) - x).abs().max() < 1e-6


def test_dct_matrix_is_cached_per_size_device_dtype():
    assert dct_matrix(14, "cpu", torch.float32) is dct_matrix(14, "cpu", torch.float32)
    assert dct_matrix(14, "cpu", torch.float64).dtype == torch.float64


# ---------------------------------------------------------------- priors against the grid PDEs
def discrete_single_branch(branch: str, grid=(5, 6), form="physical"):
    """A MoPPA operator with one branch, the exact discrete Laplacian, no residual, all channels alike."""
    vit = small_vit(img_size=(8 * grid[0], 8 * grid[1]), reg_tokens=0)
    layout = vit_layout(vit)
    options = MoPPAOptions(form=form, branches=(branch,), laplacian="discrete", residual=False)
    shared = SharedPriors(layout, options)
    operator = MoPPAOperator(layout, options, shared).double()
    shared.double()
    return layout, operator


def run_operator(layout, operator, grid_values: np.ndarray) -> np.ndarray:
    """Filter one scalar field (broadcast to every channel); return channel 0 of the patch tokens."""
    n = grid_values.size
    tokens = torch.zeros(1, layout.num_prefix_tokens + n, layout.embed_dim, dtype=torch.float64)
    tokens[0, layout.num_prefix_tokens:] = torch.from_numpy(grid_values)[:, None]
    with torch.no_grad():
        out = operator(tokens)
    assert torch.equal(out[:, :layout.num_prefix_tokens], tokens[:, :layout.num_prefix_tokens])
    channels = out[0, layout.num_prefix_tokens:]
    assert torch.allclose(channels, channels[:, :1].expand_as(channels))     # same response on every channel
    return channels[:, 0].numpy()


def test_heat_branch_is_matrix_exponential_of_grid_laplacian():
    layout, operator = discrete_single_branch("heat")
    with torch.no_grad():
        operator.times["heat"].fill_(0.35); operator.speeds["heat"].fill_(2.0)     # k t = 0.7
    lap = neumann_laplacian(layout.grid).numpy()
    u = np.random.default_rng(0).normal(size=lap.shape[0])
    np.testing.assert_allclose(run_operator(layout, operator, u), scipy.linalg.expm(-0.7 * lap) @ u, atol=1e-10)


def test_wave_branch_is_cos_t_sqrt_laplacian():
    layout, operator = discrete_single_branch("wave")
    c, t = 1.5, 0.6
    with torch.no_grad():
        operator.times["wave"].fill_(t); operator.speeds["wave"].fill_(c)
    lap = neumann_laplacian(layout.grid).numpy()
    n = lap.shape[0]
    # propagator of u'' = -c^2 L u: its top-left block is cos(c t sqrt(L)), computed without the DCT
    propagator = scipy.linalg.expm(t * np.block([[np.zeros((n, n)), np.eye(n)], [-c ** 2 * lap, np.zeros((n, n))]]))
    u = np.random.default_rng(1).normal(size=n)
    np.testing.assert_allclose(run_operator(layout, operator, u), propagator[:n, :n] @ u, atol=1e-8)


def test_poisson_branch_solves_laplace_equation_on_non_constant_modes():
    layout, operator = discrete_single_branch("poisson")
    with torch.no_grad():
        operator.times["poisson"].fill_(1.0); operator.shared.maps["poisson"].fill_(1.0)
    lap = neumann_laplacian(layout.grid).numpy()
    f = np.random.default_rng(2).normal(size=lap.shape[0])
    u = run_operator(layout, operator, f)
    np.testing.assert_allclose(lap @ u, f - f.mean(), atol=1e-9)
    assert abs(u.mean() - f.mean()) < 1e-12       # the mean (zero frequency) passes at the source gain


def test_reference_form_responses_at_init():
    layout, operator = discrete_single_branch("poisson", form="reference")
    with torch.no_grad():
        operator.times["poisson"].fill_(0.5)
    u = np.random.default_rng(3).normal(size=layout.grid[0] * layout.grid[1])
    np.testing.assert_allclose(run_operator(layout, operator, u), 0.5 * u, atol=1e-12)   # relu(k t) gain


# ---------------------------------------------------------------- router
def test_router_weights_sum_to_one_and_masked_branches_are_zero():
    model = apply_peft(small_vit(), {"moppa": {"branches": ["heat", "poisson"]}})
    weights = route_weights(model)                      # (blocks, 3, heads) in (heat, wave, poisson) order
    assert weights.shape == (2, 3, 3)
    torch.testing.assert_close(weights.sum(1), torch.ones(2, 3))
    assert torch.equal(weights[:, 1], torch.zeros(2, 3))
    assert (weights[:, [0, 2]] > 0).all()


def test_entropy_schedule_full_at_start_zero_from_mid_training():
    assert entropy_weight(0, 100, 0.05) == 0.05
    assert 0 < entropy_weight(49, 100, 0.05) < 0.05
    assert all(entropy_weight(e, 100, 0.05) == 0 for e in (50, 51, 99, 100))


@pytest.mark.parametrize("router", ["static", "input"])
def test_route_regularisation_rewards_entropy_and_reaches_router(router):
    model = apply_peft(small_vit(), {"moppa": {"router": router}})
    model(torch.randn(2, 3, 32, 48))
    term = route_regularisation(model, epoch=0, total_epochs=10, scale=0.1)
    assert term.item() < 0                                # minus a positive entropy
    term.backward()
    for operator in moppa_operators(model):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in operator.router.parameters())
    assert route_regularisation(model, epoch=5, total_epochs=10, scale=0.1).item() == 0


# ---------------------------------------------------------------- installation into timm ViTs
@pytest.mark.parametrize("kwargs", [dict(), dict(reg_tokens=0, class_token=False, global_pool="avg"),
                                    dict(img_size=56, patch_size=8, embed_dim=64, num_heads=4)])
def test_prefix_tokens_bypass_and_shapes(kwargs):
    model = apply_peft(small_vit(**kwargs), "moppa")
    layout = vit_layout(model)
    tokens = torch.randn(2, layout.num_tokens, layout.embed_dim)
    out = model.blocks[0].peft_moppa(tokens)
    assert out.shape == tokens.shape
    assert torch.equal(out[:, :layout.num_prefix_tokens], tokens[:, :layout.num_prefix_tokens])
    assert model(torch.randn(2, 3, *model.patch_embed.img_size)).shape == (2, 7)


def test_moppa_sits_before_attention_only():
    """x + attn(norm1(moppa(x))): the residual stream and the MLP branch see the unfiltered tokens."""
    model = apply_peft(small_vit(), "moppa").eval()
    block = model.blocks[0]
    x = torch.randn(2, vit_layout(model).num_tokens, 48)
    with torch.no_grad():
        expected = x + block.attn(block.norm1.forward(block.peft_moppa(x)))   # .forward skips the hook
        expected = expected + block.mlp(block.norm2.forward(expected))
        torch.testing.assert_close(block(x), expected)


def test_gradients_reach_only_moppa_and_head_and_backbone_stays_bit_identical():
    model = apply_peft(small_vit(drop_path_rate=0.0), "moppa")
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable_before and all("peft_moppa" in n.split(".") or n.startswith("head.") for n in trainable_before)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)   # every parameter offered
    loss = model(torch.randn(4, 3, 32, 48)).logsumexp(-1).mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in trainable_before), name
    optimizer.step()
    for name, before in frozen_before.items():
        assert torch.equal(dict(model.named_parameters())[name], before), name
    assert any(not torch.equal(dict(model.named_parameters())[n], b) for n, b in trainable_before.items())


def test_reference_parameter_count_on_vit_base_is_public_codes():
    model = apply_peft(timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100), "moppa")
    assert count_trainable(model, exclude_head=True) == 9_936
    assert count_trainable(model, exclude_head=False) == 9_936 + 768 * 100 + 100
    physical = apply_peft(timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100),
                          {"moppa": {"form": "physical"}})
    print(f"MoPPA physical form on ViT-B/16, head excluded: {count_trainable(physical):,}")
    assert count_trainable(physical) == 14 * 14 * 12 + 12 * (3 * 64 + 2 * 12 + 3 * 12 + 12)


# ---------------------------------------------------------------- saving
def test_save_load_reproduces_outputs_and_refuses_mismatch(tmp_path):
    source = apply_peft(small_vit(), "moppa")
    with torch.no_grad():
        for p in source.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    save_adapter(source, tmp_path / "adapter")
    target = small_vit()
    target.load_state_dict({k: v for k, v in source.state_dict().items() if "peft_" not in k}, strict=False)
    load_adapter(target, tmp_path / "adapter")
    images = torch.randn(3, 3, 32, 48)
    assert torch.equal(source.eval()(images), target.eval()(images))
    with pytest.raises(PeftError, match="Incompatible adapter.*layout"):
        load_adapter(small_vit(embed_dim=64, num_heads=4), tmp_path / "adapter")
    with pytest.raises(PeftError, match="Incompatible adapter.*options"):
        load_adapter(apply_peft(small_vit(), {"moppa": {"router": "input"}}), tmp_path / "adapter")
    with pytest.raises(PeftError, match="No adapter"):
        load_adapter(small_vit(), tmp_path / "nothing-here")


# ---------------------------------------------------------------- bad input
def test_clear_errors_for_bad_input():
    model = apply_peft(small_vit(), "moppa")
    layout = vit_layout(model)
    with pytest.raises(PeftError, match=r"3 prefix \+ 4x6 patch tokens = 27, got 25"):
        model.blocks[0].peft_moppa(torch.randn(1, 25, 48))
    with pytest.raises(PeftError, match="Unknown PEFT method 'mopa'.*Did you mean 'moppa'"):
        apply_peft(small_vit(), "mopa")
    with pytest.raises(PeftError, match="Option 'router' of method 'moppa' must be one of"):
        apply_peft(small_vit(), {"moppa": {"router": 1}})
    with pytest.raises(PeftError, match="Option 'residual' of method 'moppa' must be bool"):
        apply_peft(small_vit(), {"moppa": {"residual": "yes"}})
    with pytest.raises(PeftError, match="Unknown option 'brnaches'.*Did you mean 'branches'"):
        apply_peft(small_vit(), {"moppa": {"brnaches": ["heat"]}})
    with pytest.raises(PeftError, match="subset of"):
        apply_peft(small_vit(), {"moppa": {"branches": ["heat", "light"]}})
    with pytest.raises(PeftError, match="already adapted"):
        apply_peft(model, "moppa")
    with pytest.raises(PeftError, match="VisionTransformer"):
        apply_peft(torch.nn.Linear(3, 3), "moppa")
    with pytest.raises(PeftError, match="fixed grid"):
        apply_peft(small_vit(dynamic_img_size=True), "moppa")
    assert layout.num_prefix_tokens == 3


def test_moppa_trains_after_first_running_under_inference_mode():
    """The DCT matrices are cached: one made under inference_mode must still work in a training step."""
    from moppa_nb.dct import dct_matrix
    dct_matrix.cache_clear()
    model = apply_peft(small_vit(img_size=(40, 48)), "moppa")       # a grid no other test uses
    with torch.inference_mode():
        model.eval()(torch.randn(1, 3, 40, 48))
    model.train()(torch.randn(2, 3, 40, 48)).sum().backward()
    assert model.blocks[0].peft_moppa.times["heat"].grad is not None
