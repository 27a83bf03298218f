"""Each official form of a baseline against the formula of its released code, written here independently of the library.

Every test builds the adapted model, gives its trainable tensors random non-zero values, copies them into a plain copy of
the backbone whose forward functions are the released code's (re-typed from the repository named in each test, on timm's
module names), and compares logits and the gradients of the copied tensors, in float64, to 1e-5. Dropout is off (eval).
"""
import copy
import math
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moppa_nb import apply_peft
from moppa_nb.testing import perturb_for_testing, tiny_vit

TOL = 1e-5


def images(n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def leaf(t: torch.Tensor) -> torch.Tensor:
    "An independent float64 leaf with the values of `t`."
    return t.detach().clone().double().requires_grad_()


def compare(ours: nn.Module, official: nn.Module, pairs: list, x: torch.Tensor | None = None) -> tuple[float, float]:
    """Forward both on `x`, backpropagate the same loss, and check logits and gradients of `pairs`:
    (our parameter, the official leaf, a function taking our tensor to the official layout). Returns the max differences."""
    x = images() if x is None else x
    labels = torch.arange(x.shape[0]) % 5
    out_ours, out_official = ours(x), official(x)
    F.cross_entropy(out_ours, labels).backward()
    F.cross_entropy(out_official, labels).backward()
    forward = (out_ours - out_official).abs().max().item()
    assert forward < TOL, forward
    assert (out_ours - tiny_reference(x)).abs().max() > 1e-3, "the adapted model must differ from the backbone"
    gradient = 0.0
    for mine, theirs, to_official in pairs:
        assert theirs.grad is not None and theirs.grad.abs().max() > 0
        gradient = max(gradient, (to_official(mine.grad) - theirs.grad).abs().max().item())
    assert gradient < TOL, gradient
    print(f"max |logit diff| {forward:.2e}, max |grad diff| {gradient:.2e}")
    return forward, gradient


_PLAIN = {}


def plain_vit(**kwargs) -> nn.Module:
    "The float64 tiny ViT both sides start from (two blocks, width 192, MLP 768)."
    model = tiny_vit(**kwargs).double().eval()
    _PLAIN["model"] = copy.deepcopy(model)
    return model


def tiny_reference(x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return _PLAIN["model"](x)


def adapted(methods) -> tuple[nn.Module, nn.Module]:
    "(ours, a plain copy for the official forwards), ours perturbed so that every trainable tensor is non-zero."
    plain = plain_vit()
    ours = apply_peft(copy.deepcopy(plain), methods).double().eval()
    torch.manual_seed(3)
    perturb_for_testing(ours, scale=0.2)
    return ours, copy.deepcopy(plain)


def attention_forward(attn: nn.Module, x: torch.Tensor, qkv_delta, proj_delta) -> torch.Tensor:
    "timm's attention written out as the released FacT code does, with its deltas on qkv and proj."
    B, N, C = x.shape
    qkv = attn.qkv(x) + qkv_delta(x)
    qkv = qkv.reshape(B, N, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    a = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(dim=-1)
    out = (a @ v).transpose(1, 2).reshape(B, N, C)
    return attn.proj(out) + proj_delta(out)


# --- FacT: JieShibo/PETL-ViT, FacT/fact_tk.py and FacT/fact_tt.py ---------------------------------------------------

def set_official_fact(vit: nn.Module, u, v, s: float, tk: tuple | None = None, tt: list | None = None) -> None:
    """`fact_forward_attn` / `fact_forward_mlp` of the released code: `u` is FacTu.weight, `v` FacTv.weight; TK: (FacTc, FacTp);
    TT: per block the weights of q/k/v/proj/fc1/fc2 `_FacTs` Linears."""
    FacTu, FacTv = (lambda z: z @ u.T), (lambda z: z @ v.T)
    for index, block in enumerate(vit.blocks):
        def attn_forward(self, x, attn_mask=None, is_causal=False, idx=index * 12, b=index):
            if tk is not None:
                c = tk[0] @ tk[1][:, idx:idx + 4]
                cq, ck, cv, cp = c[:, :, 0], c[:, :, 1], c[:, :, 2], c[:, :, 3]
                def qkv_delta(z):
                    return torch.cat([FacTv(FacTu(z) @ cq), FacTv(FacTu(z) @ ck), FacTv(FacTu(z) @ cv)], dim=2) * s
                return attention_forward(self, x, qkv_delta, lambda z: FacTv(FacTu(z) @ cp) * s)
            w = tt[b]
            def qkv_delta(z):
                return torch.cat([FacTv(FacTu(z) @ w["q"].T), FacTv(FacTu(z) @ w["k"].T), FacTv(FacTu(z) @ w["v"].T)], dim=2) * s
            return attention_forward(self, x, qkv_delta, lambda z: FacTv(FacTu(z) @ w["proj"].T) * s)

        def mlp_forward(self, x, idx=index * 12 + 4, b=index):
            B, N, C = x.shape
            dim = u.shape[0]
            if tk is not None:
                c = tk[0] @ tk[1][:, idx:idx + 8]
                fc1_c, fc2_c = c[:, :, :4].reshape(dim, dim * 4), c[:, :, 4:].reshape(dim, dim * 4)
                h = self.fc1(x) + FacTv((FacTu(x) @ fc1_c).reshape(B, N, 4, dim)).reshape(B, N, 4 * C) * s
                x = self.act(h)
                h = self.fc2(x)
                x = x.reshape(B, N, 4, C)
                return h + FacTv(FacTu(x).reshape(B, N, 4 * dim) @ fc2_c.t()) * s
            w = tt[b]
            h = self.fc1(x) + FacTv((FacTu(x) @ w["fc1"].T).reshape(B, N, 4, dim)).reshape(B, N, 4 * C) * s
            x = self.act(h)
            h = self.fc2(x)
            x = x.reshape(B, N, 4, C)
            return h + FacTv(FacTu(x).reshape(B, N, 4 * dim) @ w["fc2"].T) * s

        block.attn.forward = types.MethodType(attn_forward, block.attn)
        block.mlp.forward = types.MethodType(mlp_forward, block.mlp)


def test_fact_tk_official_layout_matches_fact_tk_py():
    ours, official = adapted({"fact": {"variant": "tk", "rank": 4, "scale": 0.7}})
    f = ours.peft_fact
    u, v, core, p = leaf(f.u), leaf(f.v), leaf(f.core), leaf(f.p.T)            # FacTp is (r, 12 L): our p transposed
    set_official_fact(official, u, v, 0.7, tk=(core, p))
    compare(ours, official, [(f.u, u, lambda g: g), (f.v, v, lambda g: g), (f.core, core, lambda g: g), (f.p, p, lambda g: g.T)])


def test_fact_tk_per_slice_layout_is_another_function():
    ours, official = adapted({"fact": {"variant": "tk", "rank": 4, "tk_layout": "per_slice"}})
    f = ours.peft_fact
    set_official_fact(official, leaf(f.u), leaf(f.v), 1.0, tk=(leaf(f.core), leaf(f.p.T)))
    with torch.no_grad():
        assert (ours(images()) - official(images())).abs().max() > 1e-4


def test_fact_tt_matches_fact_tt_py():
    ours, official = adapted({"fact": {"variant": "tt", "rank": 4, "scale": 0.7}})
    f, r = ours.peft_fact, 4
    u, v = leaf(f.u), leaf(f.v)
    tt, pairs = [], [(f.u, u, lambda g: g), (f.v, v, lambda g: g)]
    fc1 = lambda c: c[4:8].reshape(4 * r, r)                                  # fc1_FacTs.weight: (4r, r)
    fc2 = lambda c: c[8:12].permute(1, 0, 2).reshape(r, 4 * r)                # fc2_FacTs.weight: (r, 4r)
    for block in ours.blocks:
        cores = block.peft_fact.cores
        w = {"q": leaf(cores[0]), "k": leaf(cores[1]), "v": leaf(cores[2]), "proj": leaf(cores[3]),
             "fc1": leaf(fc1(cores)), "fc2": leaf(fc2(cores))}
        tt.append(w)
        pairs += [(cores, w["q"], lambda g: g[0]), (cores, w["k"], lambda g: g[1]), (cores, w["v"], lambda g: g[2]),
                  (cores, w["proj"], lambda g: g[3]), (cores, w["fc1"], fc1), (cores, w["fc2"], fc2)]
    set_official_fact(official, u, v, 0.7, tt=tt)
    compare(ours, official, pairs)


@pytest.mark.parametrize("tt_init, fc2_bound", [("official", 1 / math.sqrt(4 * 16)), ("per_slice", 1 / math.sqrt(16))])
def test_fact_tt_init_bounds(tt_init, fc2_bound):
    "fact_tt.py's fc2_FacTs is nn.Linear(4r, r): PyTorch's default bound 1/sqrt(4r); the other cores 1/sqrt(r)."
    model = apply_peft(tiny_vit(), {"fact": {"tt_init": tt_init}})
    cores = model.blocks[0].peft_fact.cores.detach()
    assert cores[8:].abs().max() <= fc2_bound and cores[8:].abs().max() > 0.9 * fc2_bound
    assert cores[:8].abs().max() <= 1 / 4 and cores[:8].abs().max() > 0.9 / 4
