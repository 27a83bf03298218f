"The fused hooks (LoRA-family qkv deltas, DoRA, RLRR, MoPPA) equal the split + cat computations they replaced, outputs and gradients."
import torch
import torch.nn.functional as F
from torch import nn

from moppa_nb.more_baselines import DoRAQV, ResidualRescaling
from moppa_nb.weight_space import LoRAQV


def lora_split_cat(lowrank, x, output):
    delta = torch.einsum("s...r,sor->s...o", torch.einsum("...c,src->s...r", x, lowrank.a), lowrank.b) * lowrank.scaling
    q, k, v = output.chunk(3, dim=-1)
    return torch.cat([q + delta[0], k, v + delta[1]], dim=-1)


def dora_split_cat(dora, qkv, x, output):
    q, k, v = output.chunk(3, dim=-1)
    bias = qkv.bias.chunk(3)
    frozen = torch.stack([q - bias[0], v - bias[2]])
    update = torch.einsum("s...r,sor->s...o", torch.einsum("...c,src->s...r", x, dora.a), dora.b) * dora.scaling
    gain = dora.adapted_weights(qkv.weight)[1].view(2, *[1] * (x.dim() - 1), -1)
    delta = (gain - 1) * frozen + gain * update
    return torch.cat([q + delta[0], k, v + delta[1]], dim=-1)


def grads_of(module, loss):
    module.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in module.named_parameters()}


def check(module, new, old, x):
    "Same output (no grad and grad) and the same gradients for the module's parameters and the input."
    with torch.no_grad():
        torch.testing.assert_close(new(x), old(x), atol=1e-6, rtol=1e-6)
    xg = x.clone().requires_grad_()
    weight = torch.randn_like(old(x))
    g_old = grads_of(module, (old(xg) * weight).sum()); gx_old = xg.grad.clone(); xg.grad = None
    g_new = grads_of(module, (new(xg) * weight).sum())
    torch.testing.assert_close(xg.grad, gx_old, atol=1e-5, rtol=1e-5)
    for name in g_old:
        torch.testing.assert_close(g_new[name], g_old[name], atol=1e-5, rtol=1e-5)


def test_lora_hook_equals_split_cat():
    torch.manual_seed(0)
    lowrank, qkv = LoRAQV(16, 16, rank=3, alpha=6.0), nn.Linear(16, 48).requires_grad_(False)
    nn.init.normal_(lowrank.b)
    check(lowrank, lambda x: lowrank.add_to_qkv(qkv, (x,), qkv(x)), lambda x: lora_split_cat(lowrank, x, qkv(x)), torch.randn(2, 7, 16))


def test_dora_hook_equals_split_cat():
    torch.manual_seed(0)
    qkv = nn.Linear(16, 48).requires_grad_(False)
    dora = DoRAQV(qkv, rank=3, alpha=6.0)
    nn.init.normal_(dora.b)
    with torch.no_grad(): dora.magnitude.mul_(1.3)
    check(dora, lambda x: dora.add_to_qkv(qkv, (x,), qkv(x)), lambda x: dora_split_cat(dora, qkv, x, qkv(x)), torch.randn(2, 7, 16))


def test_rlrr_hook_equals_split_cat_in_place_at_inference():
    torch.manual_seed(0)
    layer = nn.Linear(16, 48).requires_grad_(False)
    rescaling = ResidualRescaling(layer, slice(32, 48), "public")
    nn.init.normal_(rescaling.shift)
    def old(x):
        output, r = layer(x), rescaling.rows
        delta = F.linear(x * rescaling.scale_in, layer.weight[r]) * rescaling.scale_out + rescaling.shift
        return torch.cat([output[..., :r.start], output[..., r] + delta, output[..., r.stop:]], dim=-1)
    check(rescaling, lambda x: rescaling.rescale(layer, (x,), layer(x)), old, torch.randn(2, 7, 16))


def test_moppa_operator_equals_slice_cat_with_gradients():
    from moppa_nb.dct import spectral_filter
    from moppa_nb.moppa import MoPPAOperator, MoPPAOptions, SharedPriors
    from moppa_nb.registry import ViTLayout
    torch.manual_seed(0)
    layout = ViTLayout((4, 4), 1, 24, 3, 2)
    for residual in (False, True):
        for router in ("static", "input"):
            options = MoPPAOptions(residual=residual, router=router)
            shared = SharedPriors(layout, options)
            op = MoPPAOperator(layout, options, shared)
            op.shared_module = shared                                 # so named_parameters covers the shared maps here
            def old(x):
                prefix, patches = x[:, :1], x[:, 1:]
                filtered = spectral_filter(patches, op.mixed_response(op.router(patches)).to(x.dtype), (4, 4))
                return torch.cat([prefix, patches + filtered if residual else filtered], dim=1)
            check(op, op, old, torch.randn(2, 17, 24))
            with torch.no_grad():                                     # cached path, twice
                torch.testing.assert_close(op(torch.ones(2, 17, 24)), old(torch.ones(2, 17, 24)), atol=1e-6, rtol=1e-6)
                torch.testing.assert_close(op(torch.ones(2, 17, 24)), old(torch.ones(2, 17, 24)), atol=1e-6, rtol=1e-6)
