"""The maths and the contracts of the MoPPA foundation: DCT, priors vs grid PDEs, router, installation, saving."""
import copy

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
from moppa_nb.registry import TrainingProgress, vit_layout
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


def test_extra_loss_checks_the_schedule_once_and_keeps_its_errors():
    model = apply_peft(small_vit(), "moppa")
    (method,) = model.peft_methods
    with pytest.raises(RuntimeError, match="needs a forward pass first"):
        method.extra_loss(model, TrainingProgress(epoch=0, total_epochs=10, scale=0.1))
    model(torch.randn(1, 3, 32, 48))
    with pytest.raises(ValueError, match="total_epochs must be positive, got 0"):
        method.extra_loss(model, TrainingProgress(epoch=0, total_epochs=0, scale=0.1))
    assert method.extra_loss(model, TrainingProgress(epoch=5, total_epochs=10, scale=0.1)) is None     # off: no term
    assert method.extra_loss(model, TrainingProgress(epoch=0, total_epochs=10, scale=0.0)) is None
    torch.testing.assert_close(method.extra_loss(model, TrainingProgress(epoch=1, total_epochs=10, scale=0.1)),
                               route_regularisation(model, 1, 10, 0.1))


# ---------------------------------------------------------------- the uniform router (no router)
def branch_filtered(patches: np.ndarray, response: np.ndarray, grid) -> np.ndarray:
    """One branch's output computed with scipy's DCT: patches (B, H*W, C) filtered by response (H, W, C)."""
    b, n, c = patches.shape
    spectrum = scipy.fft.dctn(patches.reshape(b, *grid, c), type=2, axes=(1, 2), norm="ortho")
    return scipy.fft.idctn(spectrum * response, type=2, axes=(1, 2), norm="ortho").reshape(b, n, c)


@pytest.mark.parametrize("branches, form", [(("heat", "wave", "poisson"), "reference"), (("heat", "wave"), "reference"),
                                            (("wave", "poisson"), "physical")])
def test_uniform_router_output_is_the_mean_of_the_branch_outputs(branches, form):
    model = apply_peft(small_vit(), {"moppa": {"router": "uniform", "branches": list(branches), "form": form}})
    layout = vit_layout(model)
    p, c = layout.num_prefix_tokens, layout.embed_dim
    x = torch.randn(2, layout.num_tokens, c)
    for operator in moppa_operators(model):
        with torch.no_grad():
            out = operator(x)
            responses = {b: np.broadcast_to(r.numpy(), (*layout.grid, c)) for b, r in operator.responses().items()}
        assert list(responses) == list(branches)
        expected = np.mean([branch_filtered(x[:, p:].numpy(), r, layout.grid) for r in responses.values()], axis=0)
        np.testing.assert_allclose(out[:, p:].numpy(), expected, atol=1e-5)
        assert torch.equal(out[:, :p], x[:, :p])


def test_uniform_router_has_no_parameters_and_equal_weights():
    uniform = apply_peft(small_vit(), {"moppa": {"router": "uniform", "branches": ["heat", "wave"]}})
    static = apply_peft(small_vit(), {"moppa": {"branches": ["heat", "wave"]}})
    assert not [name for name, _ in uniform.named_parameters() if ".router." in name]
    assert not [name for name in uniform.state_dict() if ".router." in name]
    blocks, heads = 2, 3
    assert count_trainable(static) - count_trainable(uniform) == blocks * (2 * heads + heads)   # logits + temperatures
    expected = torch.tensor([0.5, 0.5, 0.0])[None, :, None].expand(blocks, 3, heads)   # heat, wave 1/2 each; poisson masked
    assert torch.equal(route_weights(uniform), expected)
    assert torch.equal(route_weights(apply_peft(small_vit(), {"moppa": {"router": "uniform"}})), torch.full((blocks, 3, heads), 1 / 3))


def test_uniform_router_has_no_route_regularisation():
    model = apply_peft(small_vit(), {"moppa": {"router": "uniform"}})
    model(torch.randn(2, 3, 32, 48))
    assert route_regularisation(model, epoch=0, total_epochs=10, scale=0.1).item() == 0
    assert model.peft_methods[0].extra_loss(model, TrainingProgress(epoch=0, total_epochs=10, scale=0.1)) is None


def test_uniform_router_adapter_round_trip(tmp_path):
    source = apply_peft(small_vit(), {"moppa": {"router": "uniform", "branches": ["heat", "poisson"]}})
    with torch.no_grad():
        for p in source.parameters():
            if p.requires_grad: p.add_(0.05 * torch.randn_like(p))
    save_adapter(source, tmp_path / "adapter")
    target = small_vit()
    target.load_state_dict({k: v for k, v in source.state_dict().items() if "peft_" not in k}, strict=False)
    load_adapter(target, tmp_path / "adapter")
    assert moppa_operators(target)[0].options.router == "uniform"
    images = torch.randn(3, 3, 32, 48)
    assert torch.equal(source.eval()(images), target.eval()(images))
    with pytest.raises(PeftError, match="Incompatible adapter.*options"):
        load_adapter(apply_peft(small_vit(), {"moppa": {"branches": ["heat", "poisson"]}}), tmp_path / "adapter")


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
    with pytest.raises(PeftError, match="MoPPAOptions.router must be one of"):
        apply_peft(small_vit(), {"moppa": {"router": 1}})
    with pytest.raises(PeftError, match="MoPPAOptions.residual must be bool"):
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


# ---------------------------------------------------------------- defaults against the public formulas
# An independent transcription of the public MoPPA-like operator (`HCO`) and block forward, written from
# the formulas, not from moppa_nb: DCT-II by explicit cosine sums, responses exp(-|w|^2)^relu(k t),
# cos(|w|^2 relu(k t)), relu(k t), router softmax(P / tau) per head, no identity branch, CLS bypasses.
def public_cosine_map(n: int) -> torch.Tensor:
    """Row k, column x: sqrt(2/n) cos(pi k (x + 1/2) / n), row 0 divided by sqrt(2) (orthonormal DCT-II)."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    x = torch.arange(n, dtype=torch.float64)[None, :]
    weight = torch.cos(k * (x + 0.5) / n * np.pi) * np.sqrt(2 / n)
    weight[0] /= np.sqrt(2)
    return weight


def public_operator(x, grid, heads, k_maps, times, path_weight, temperature, prefix=1):
    """x: (B, prefix + H*W, C); k_maps: 3 x (H, W, heads); times: 3 x (head_dim,); path_weight (3, heads); temperature (heads,)."""
    b, _, c = x.shape
    h, w = grid
    d = c // heads
    cls, patches = x[:, :prefix], x[:, prefix:].reshape(b, h, w, c)
    cos_h, cos_w = public_cosine_map(h), public_cosine_map(w)
    spectrum = torch.einsum("nh,bhwc,mw->bnmc", cos_h, patches, cos_w)
    freq_n = torch.arange(h, dtype=torch.float64) * np.pi / h
    freq_m = torch.arange(w, dtype=torch.float64) * np.pi / w
    squared = (freq_n[:, None] ** 2 + freq_m[None, :] ** 2)[:, :, None]              # (H, W, 1)
    weight = torch.softmax(path_weight / temperature, dim=0)                          # (3, heads)
    coefficient = [torch.relu((k[..., None] * t).reshape(h, w, c)) for k, t in zip(k_maps, times)]
    response = (weight[0].repeat_interleave(d) * torch.pow(torch.exp(-squared), coefficient[0])
                + weight[1].repeat_interleave(d) * torch.cos(squared * coefficient[1])
                + weight[2].repeat_interleave(d) * coefficient[2])
    filtered = torch.einsum("nh,bnmc,mw->bhwc", cos_h, spectrum * response, cos_w).reshape(b, h * w, c)
    return torch.cat([cls, filtered], dim=1)


def public_route_term(path_weights, temperatures, epoch, total_epochs, scale):
    """Minus lambda(e) times the sum over blocks of mean(-a log(a + 1e-8)) over (branch, head) entries."""
    decay = (max(1 - epoch / total_epochs, 0.5) - 0.5) / 0.5
    entropy = sum(-torch.mean(a * torch.log(a + 1e-8))
                  for a in (torch.softmax(p / t, dim=0) for p, t in zip(path_weights, temperatures)))
    return -scale * decay * entropy


def operator_arguments(model, operator):
    names = ("heat", "wave", "poisson")
    return dict(k_maps=[model.peft_moppa.maps[n] for n in names], times=[operator.times[n] for n in names],
                path_weight=operator.router.logits, temperature=operator.router.tau)


def public_style_vit():
    """Square grid, one CLS token, no registers (as in the public code), in float64 with perturbed MoPPA tensors."""
    torch.manual_seed(0)
    plain = small_vit(img_size=40, reg_tokens=0, drop_path_rate=0.0).double().eval()
    model = apply_peft(copy.deepcopy(plain), "moppa").double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "peft_moppa" in name.split("."):
                p.add_(0.2 * torch.randn_like(p))
    return plain, model


def test_default_operator_matches_the_public_formulas():
    plain, model = public_style_vit()
    layout = vit_layout(model)
    operator = model.blocks[0].peft_moppa
    x = torch.randn(3, layout.num_tokens, layout.embed_dim, dtype=torch.float64)
    with torch.no_grad():
        ours = operator(x)
        theirs = public_operator(x, layout.grid, layout.num_heads, **operator_arguments(model, operator))
    diff = (ours - theirs).abs().max().item()
    print(f"operator, max abs diff vs public formulas: {diff:.2e}")
    assert diff < 1e-10
    assert (ours - x).abs().max() > 0.1                     # no identity branch: not trivially the input


def test_default_model_output_matches_the_public_block_forward():
    """x = x + Attn(Norm1(MoPPA(x))); x = x + MLP(Norm2(x)); final norm; head on CLS, with the plain model's modules."""
    plain, model = public_style_vit()
    layout = vit_layout(model)
    images = torch.randn(2, 3, 40, 40, dtype=torch.float64)
    with torch.no_grad():
        x = plain._pos_embed(plain.patch_embed(images))
        for block, operator in zip(plain.blocks, moppa_operators(model)):
            filtered = public_operator(x, layout.grid, layout.num_heads, **operator_arguments(model, operator))
            x = x + block.attn(block.norm1(filtered))
            x = x + block.mlp(block.norm2(x))
        theirs = plain.head(plain.norm(x)[:, 0])
        ours = model(images)
    diff = (ours - theirs).abs().max().item()
    print(f"whole model, max abs diff vs public block forward: {diff:.2e}")
    assert diff < 1e-10


@pytest.mark.parametrize("epoch", [0, 3, 7.5, 12, 20])
def test_default_route_regularisation_is_the_public_term(epoch):
    plain, model = public_style_vit()
    model.train()(torch.randn(2, 3, 40, 40, dtype=torch.float64))
    routers = [op.router for op in moppa_operators(model)]
    expected = public_route_term([r.logits for r in routers], [r.tau for r in routers], epoch, 20, 0.05)
    ours = route_regularisation(model, epoch, 20, 0.05)
    torch.testing.assert_close(ours, expected.to(ours.dtype), atol=1e-7, rtol=1e-6)   # the public log(a + 1e-8)


def test_route_regularisation_with_a_branch_mask_averages_over_the_active_branches():
    """The public code takes the mean over the active (branch, head) entries: 2 branches here, not 3."""
    model = apply_peft(small_vit(), {"moppa": {"branches": ["heat", "poisson"]}}).train()
    model(torch.randn(2, 3, 32, 48))
    routers = [op.router for op in moppa_operators(model)]
    assert routers[0].logits.shape[0] == 2
    expected = public_route_term([r.logits for r in routers], [r.tau for r in routers], 1, 10, 0.05)
    torch.testing.assert_close(route_regularisation(model, 1, 10, 0.05), expected, atol=1e-7, rtol=1e-6)


def test_summed_route_entropy_is_three_times_the_default():
    torch.manual_seed(1)
    mean = apply_peft(small_vit(), "moppa")
    total = apply_peft(copy.deepcopy(small_vit()), {"moppa": {"route_entropy": "sum"}})
    total.load_state_dict(mean.state_dict())
    images = torch.randn(2, 3, 32, 48)
    mean(images), total(images)
    torch.testing.assert_close(route_regularisation(total, 1, 10, 0.1), 3 * route_regularisation(mean, 1, 10, 0.1))


@pytest.mark.parametrize("placement", ["mlp", "both"])
def test_placement_before_the_mlp(placement):
    model = apply_peft(small_vit(), {"moppa": {"placement": placement}}).eval()
    block = model.blocks[0]
    assert len(moppa_operators(model)) == (2 if placement == "mlp" else 4)
    x = torch.randn(2, vit_layout(model).num_tokens, 48)
    with torch.no_grad():
        attention_input = block.peft_moppa(x) if placement == "both" else x
        expected = x + block.attn(block.norm1.forward(attention_input))
        expected = expected + block.mlp(block.norm2.forward(block.norm2.peft_moppa(expected)))
        torch.testing.assert_close(block(x), expected)
    model.train()(torch.randn(2, 3, 32, 48)).sum().backward()
    assert block.norm2.peft_moppa.times["heat"].grad is not None


def test_fast_filter_equals_the_split_cat_filter_on_a_small_model():
    "The bmm filter (in place without autograd, its own backward with it) gives the split + spectral_filter + cat model's outputs and gradients."
    import copy
    import timm
    from moppa_nb import apply_peft
    from moppa_nb.dct import spectral_filter
    from moppa_nb.moppa import moppa_operators

    def split_cat(op, x):                                     # the operator's forward before filter_patch_tokens
        p, (h, w) = op.layout.num_prefix_tokens, op.layout.grid
        prefix, patches = x.split([p, h * w], dim=1)
        filtered = spectral_filter(patches, op.mixed_response(op.router(patches)).to(x.dtype), (h, w))
        return x + torch.nn.functional.pad(filtered, (0, 0, p, 0)) if op.options.residual else torch.cat([prefix, filtered], dim=1)

    torch.manual_seed(0)
    images = torch.randn(3, 3, 32, 32)
    for options in ({}, {"residual": True}, {"router": "input", "placement": "both"}):
        model = apply_peft(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, num_classes=5),
                           {"moppa": options})
        reference = copy.deepcopy(model)
        for op in moppa_operators(reference):
            op.forward = lambda x, op=op: split_cat(op, x)
        for net in (model, reference): net.eval()
        with torch.no_grad():
            torch.testing.assert_close(model(images), reference(images), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(model(images), reference(images), atol=1e-5, rtol=1e-5)     # cached response
        with torch.inference_mode():
            torch.testing.assert_close(model(images), reference(images), atol=1e-5, rtol=1e-5)
        for net in (model, reference):
            net.train(); net.zero_grad(); net(images).square().mean().backward()
        for (name, a), b in zip(model.named_parameters(), reference.parameters()):
            if a.grad is not None or b.grad is not None:
                torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_the_dct_matrices_are_buffers_built_once_that_follow_the_model(monkeypatch):
    import moppa_nb.moppa as moppa_module
    model = apply_peft(small_vit(), "moppa").eval()
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        expected = model(x)
    monkeypatch.setattr(moppa_module, "dct_matrix", lambda *args, **kw: pytest.fail("a forward pass built a DCT matrix"))
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
        double = model.double()
        assert double.peft_moppa.dct_rows.dtype == torch.float64
        torch.testing.assert_close(double(x.double()), expected.double(), atol=1e-5, rtol=0)
    assert not any("dct" in key for key in model.state_dict())       # rebuilt, never saved


# ---------------------------------------------------------------- the filter's own backward
@pytest.mark.parametrize("prefix", [0, 1, 3])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("per_sample", [False, True])
def test_filter_patch_tokens_gradients_match_finite_differences(prefix, residual, per_sample):
    "The hand-written backward (the filter is symmetric) against torch.autograd.gradcheck's numerical Jacobian, in float64."
    from moppa_nb.moppa import filter_patch_tokens
    torch.manual_seed(0)
    grid, c = (3, 4), 5
    tokens = torch.randn(2, prefix + 12, c, dtype=torch.float64, requires_grad=True)
    response = torch.randn(*((2,) if per_sample else ()), *grid, c, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, r: filter_patch_tokens(t, r, grid, residual), (tokens, response))


def test_filter_patch_tokens_equals_spectral_filter_and_keeps_the_tokens_dtype_under_autocast():
    from moppa_nb.moppa import filter_patch_tokens
    torch.manual_seed(0)
    tokens, response = torch.randn(2, 1 + 12, 8), torch.rand(3, 4, 8)
    expected = torch.cat([tokens[:, :1], spectral_filter(tokens[:, 1:], response, (3, 4))], dim=1)
    torch.testing.assert_close(filter_patch_tokens(tokens, response, (3, 4)), expected)
    with torch.no_grad():                                              # the in-place path: the input is left as it was
        before = tokens.clone()
        torch.testing.assert_close(filter_patch_tokens(tokens, response, (3, 4), residual=True),
                                   expected + torch.nn.functional.pad(tokens[:, 1:], (0, 0, 1, 0)))
        torch.testing.assert_close(tokens, before, rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):                  # transforms in the tokens' dtype, not bf16
        filtered = filter_patch_tokens(tokens, response, (3, 4))
    assert filtered.dtype == torch.float32
    torch.testing.assert_close(filtered, expected)
    with pytest.raises(ValueError, match="3x4"):
        filter_patch_tokens(tokens[:, :10], response, (3, 4))


def test_a_compiled_moppa_model_trains_and_matches_the_eager_one():
    "torch.compile traces the filter's autograd Function: one training step gives the eager model's gradients."
    torch.manual_seed(0)
    eager = apply_peft(small_vit(), "moppa")
    compiled = copy.deepcopy(eager)
    compiled.compile()
    x = torch.randn(2, 3, 32, 48)
    for model in (eager, compiled):
        model.train()(x).square().mean().backward()
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)
