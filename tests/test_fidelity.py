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

from moppa_nb import adapted_methods, apply_peft
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
VIT_DEFAULTS: dict = {}      # tiny_vit's arguments for every test (empty: ViT-Ti's width; `test_official_forms_on_vit_s` sets ViT-S's)


def plain_vit(**kwargs) -> nn.Module:
    "The float64 tiny ViT both sides start from (two blocks, width 192, MLP 768, unless VIT_DEFAULTS says otherwise)."
    model = tiny_vit(**{**VIT_DEFAULTS, **kwargs}).double().eval()
    _PLAIN["model"] = copy.deepcopy(model)
    return model


def tiny_reference(x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return _PLAIN["model"](x)


def adapted(methods, **vit) -> tuple[nn.Module, nn.Module]:
    "(ours, a plain copy for the official forwards), ours perturbed so that every trainable tensor is non-zero; `vit`: tiny_vit's arguments."
    plain = plain_vit(**vit)
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


# --- AdaptFormer: ShoufaChen/AdaptFormer, models/custom_modules.py (Block.forward) and models/adapter.py -------------

def adapter_formula(x, down_w, down_b, up_w, up_b, scale, act=torch.relu):
    "models/adapter.py's Adapter.forward with add_residual=False and adapter_layernorm_option='none' (dropout off or 0)."
    return F.linear(act(F.linear(x, down_w, down_b)), up_w, up_b) * scale


def set_official_adaptformer(vit: nn.Module, weights: list, scale: float) -> None:
    for block, w in zip(vit.blocks, weights):
        def forward(self, x, attn_mask=None, is_causal=False, w=w):
            x = x + self.drop_path1(self.attn(self.norm1(x)))
            adapt_x = adapter_formula(x, *w, scale)
            residual = x
            x = self.drop_path2(self.mlp(self.norm2(x)))
            x = x + adapt_x
            return residual + x
        block.forward = types.MethodType(forward, block)


@pytest.mark.parametrize("train", [False, True])
def test_adaptformer_released_form_matches_custom_modules_block(train):
    "Default input='residual', add_to='residual'; in training with drop path 0.3 (adapter dropout 0, same seed) too."
    plain = plain_vit(drop_path_rate=0.3)
    ours = apply_peft(copy.deepcopy(plain), {"adaptformer": {"scale": 0.1, "dropout": 0.0}}).double()
    torch.manual_seed(3)
    perturb_for_testing(ours, scale=0.2)
    official, pairs, weights = copy.deepcopy(plain), [], []
    for block in ours.blocks:
        b = block.peft_adaptformer
        w = [leaf(b.down.weight), leaf(b.down.bias), leaf(b.up.weight), leaf(b.up.bias)]
        weights.append(w)
        pairs += [(p, q, lambda g: g) for p, q in zip((b.down.weight, b.down.bias, b.up.weight, b.up.bias), w)]
    set_official_adaptformer(official, weights, 0.1)
    ours.train(train), official.train(train)
    x = images()
    if train:   # the same drop-path draws on both sides
        torch.manual_seed(11); out_ours = ours(x)
        torch.manual_seed(11); out_official = official(x)
        assert (out_ours - out_official).abs().max() < TOL
        with torch.no_grad():
            torch.manual_seed(11); dropped = ours(x)
            torch.manual_seed(12); other = ours(x)
        assert (dropped - other).abs().max() > 1e-6       # drop path is active
        return
    compare(ours, official, pairs, x)


def test_adaptformer_paper_form_reads_norm2():
    ours, official = adapted({"adaptformer": {"scale": 0.5, "input": "norm", "add_to": "mlp"}})
    weights = [[leaf(t) for t in (b.peft_adaptformer.down.weight, b.peft_adaptformer.down.bias,
                                  b.peft_adaptformer.up.weight, b.peft_adaptformer.up.bias)] for b in ours.blocks]
    for block, w in zip(official.blocks, weights):      # the paper's equation: mlp(LN2 x') + s f(LN2 x')
        def forward(self, x, attn_mask=None, is_causal=False, w=w):
            x = x + self.attn(self.norm1(x))
            h = self.norm2(x)
            return x + self.mlp(h) + adapter_formula(h, *w, 0.5)
        block.forward = types.MethodType(forward, block)
    pairs = [(getattr(b.peft_adaptformer, n).weight, w[2 * i], lambda g: g) for b, w in zip(ours.blocks, weights)
             for i, n in enumerate(("down", "up"))]
    compare(ours, official, pairs)


# --- Bi-Adapter / Bi-LoRA: JieShibo/PETL-ViT, binary_adapter/adaptformer.py and lora.py (32-bit: plain linear maps) ---

@pytest.mark.parametrize("add_to, outside", [("residual", True), ("mlp", False)])
def test_bi_adapter_branch_outside_drop_path(add_to, outside):
    "forward_block: x + drop_path(mlp(norm2(x))) + adapter_mlp(x) * s; with add_to='mlp' the branch is dropped with the MLP."
    plain = plain_vit(drop_path_rate=0.5)
    ours = apply_peft(copy.deepcopy(plain), {"bi_adapter": {"bits": 32, "dropout": 0.0, "scale": 0.5, "add_to": add_to}}).double()
    torch.manual_seed(3)
    perturb_for_testing(ours, scale=0.2)
    official = copy.deepcopy(plain)
    for block, mine in zip(official.blocks, ours.blocks):
        down, up = leaf(mine.peft_bi_adapter.down.weight), leaf(mine.peft_bi_adapter.up.weight)
        def forward(self, x, attn_mask=None, is_causal=False, down=down, up=up):
            x = x + self.drop_path1(self.attn(self.norm1(x)))
            return x + self.drop_path2(self.mlp(self.norm2(x))) + F.linear(torch.relu(F.linear(x, down)), up) * 0.5
        block.forward = types.MethodType(forward, block)
    ours.train(), official.train()
    x = images(8)
    torch.manual_seed(5); out_ours = ours(x)
    torch.manual_seed(5); out_official = official(x)
    same = (out_ours - out_official).abs().max().item()
    assert (same < TOL) == outside, same
    ours.eval(), official.eval()
    compare(ours, official, [], x)                       # without drop path the two placements agree


class FixedMask(nn.Module):
    "A deterministic stand-in for dropout: zeroes every third unit of the last axis and rescales, the same on both sides."
    def forward(self, h):
        return h * (torch.arange(h.shape[-1]) % 3 != 0).to(h.dtype) * 1.5


def test_bi_lora_dropout_after_down_per_branch():
    "lora.py: q += s Up_q(Dropout(Down_q(x))), v likewise; a fixed mask stands in for the dropout on both sides."
    ours, official = adapted({"bi_lora": {"bits": 32, "dim": 6, "scale": 0.5}})
    pairs = []
    for block, mine in zip(official.blocks, ours.blocks):
        qv = mine.attn.peft_bi_lora
        qv.drop = FixedMask()
        a, b = leaf(qv.a), leaf(qv.b)
        pairs += [(qv.a, a, lambda g: g), (qv.b, b, lambda g: g)]
        def forward(self, x, attn_mask=None, is_causal=False, a=a, b=b):
            C = x.shape[-1]
            q_delta = F.linear(FixedMask()(F.linear(x, a[0])), b[0]) * 0.5
            v_delta = F.linear(FixedMask()(F.linear(x, a[1])), b[1]) * 0.5
            delta = torch.cat([q_delta, torch.zeros_like(q_delta), v_delta], dim=-1)
            return attention_forward(self, x, lambda z: delta, lambda z: 0)
        block.attn.forward = types.MethodType(forward, block.attn)
    compare(ours, official, pairs)


# --- half precision: SSF, Adapter, AdaptFormer on a bfloat16 backbone ---------------------------------------------

@pytest.mark.parametrize("method", ["ssf", "adapter", "adaptformer"])
def test_half_precision_backbone(method):
    plain = tiny_vit()
    ours = perturb_for_testing(apply_peft(copy.deepcopy(plain), method))
    half = copy.deepcopy(plain).to(torch.bfloat16)
    half = apply_peft(half, method)
    half.load_state_dict(ours.state_dict())               # the adapter's tensors stay float32; the backbone's are bfloat16
    x = torch.randn(2, 3, 32, 32)
    out = half(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(p.grad is not None for n, p in half.named_parameters() if p.requires_grad and "peft_" in n)
    reference = ours(x)
    assert (out.float() - reference).abs().max() < 0.1 * reference.abs().max()


# --- NOLA: UCDvision/NOLA, vit/NOLA.py (NOLA2) and vit/nola_mlp.py (NOLAmlp_ViT_timm) ---------------------------------

NOLA_RELEASED = {"rank": 4, "num_bases": 16, "bounds": "official", "init": "official", "targets": "mlp"}


def set_official_nola(vit: nn.Module, ours: nn.Module, rank: int) -> list:
    "NOLA_mlp(fc, NOLA2): fc(x) + (1/r) (x @ einsum('b,bdr->dr', alpha, A)) @ einsum('b,bdr->dr', beta, B); returns the pairs to compare."
    bases = {name: (ours.peft_nola[name].a.transpose(1, 2).double(), ours.peft_nola[name].b.transpose(1, 2).double())
             for name in ("fc1", "fc2")}                                            # A: (ka, C_in, r), B: (kb, r, C_out)
    pairs = []
    for block, mine in zip(vit.blocks, ours.blocks):
        for name in ("fc1", "fc2"):
            nola = getattr(mine.mlp, name).peft_nola
            alpha, beta = leaf(nola.a_coefficients), leaf(nola.b_coefficients)
            pairs += [(nola.a_coefficients, alpha, lambda g: g), (nola.b_coefficients, beta, lambda g: g)]
            A, B = bases[name]
            fc = getattr(block.mlp, name)
            def forward(self, x, fc=fc, alpha=alpha, beta=beta, A=A, B=B):
                a = torch.einsum("b,bdr->dr", alpha, A)
                b = torch.einsum("b,bdr->dr", beta, B)
                return F.linear(x, fc.weight, fc.bias) + (1.0 / rank) * ((x @ a) @ b)
            fc.forward = types.MethodType(forward, fc)
    return pairs


def test_nola_released_form_matches_nola2_on_the_mlp():
    ours, official = adapted({"nola": NOLA_RELEASED})
    compare(ours, official, set_official_nola(official, ours, 4))


def test_nola_released_init_and_bounds():
    "NOLA2 starts alpha and beta at 1/k and draws A, B with kaiming_uniform_(a=sqrt(5)) on (k, C_in, r) and (k, r, C_out)."
    plain = plain_vit()
    ours = apply_peft(copy.deepcopy(plain), {"nola": NOLA_RELEASED}).double().eval()
    official = copy.deepcopy(plain)
    pairs = set_official_nola(official, ours, 4)
    assert all(torch.equal(mine, torch.full_like(mine, 1 / 16)) for mine, _, _ in pairs)
    with torch.no_grad():
        x = images()
        assert (ours(x) - official(x)).abs().max() < TOL and (ours(x) - plain(x)).abs().max() > 0   # not the backbone at init
    for name, (d_in, d_out) in {"fc1": (192, 768), "fc2": (768, 192)}.items():
        for ours_stack, shape in ((ours.peft_nola[name].a.transpose(1, 2), (16, d_in, 4)), (ours.peft_nola[name].b.transpose(1, 2), (16, 4, d_out))):
            reference = nn.init.kaiming_uniform_(torch.empty(shape), a=math.sqrt(5))
            bound = math.sqrt(2 / (1 + 5)) * math.sqrt(3 / (shape[1] * shape[2]))
            assert reference.abs().max() <= bound
            assert 0.95 * bound < ours_stack.abs().max() <= bound


# --- RLRR: zstarN70/RLRR, models/networks.py (RLRRLinear, RLRRBlock, RLRREmbeddings, RLRREncoder) --------------------

def test_rlrr_released_matches_networks_py():
    from moppa_nb.more_baselines import RLRR_RELEASED
    ours, official = adapted(RLRR_RELEASED)
    pairs = []

    def rlrr_params(rescaling):
        "RLRRLinear's scale_col (1, in), scale_line (out, 1), shift_bias (1, out), from ours."
        col, line, shift = leaf(rescaling.scale_in[None]), leaf(rescaling.scale_out[:, None]), leaf(rescaling.shift[None])
        pairs.extend([(rescaling.scale_in, col, lambda g: g[None]), (rescaling.scale_out, line, lambda g: g[:, None]),
                      (rescaling.shift, shift, lambda g: g[None])])
        return col, line, shift

    def rlrr_linear(x, weight, bias, col, line, shift):
        return F.linear(x, (weight * col * line) + weight, bias + shift)     # RLRRLinear.forward

    def ssf(module):
        scale, shift = leaf(module.peft_ssf.scale), leaf(module.peft_ssf.shift)
        pairs.extend([(module.peft_ssf.scale, scale, lambda g: g), (module.peft_ssf.shift, shift, lambda g: g)])
        return scale, shift

    def ssf_ada(x, scale, shift):
        return x * scale + shift

    for block, mine in zip(official.blocks, ours.blocks):
        C = block.attn.qkv.in_features
        W, b = block.attn.qkv.weight, block.attn.qkv.bias
        q, k, v = (rlrr_params(mine.attn.qkv.peft_rlrr.parts[t]) for t in ("query", "key", "value"))
        o = rlrr_params(mine.attn.proj.peft_rlrr)
        f1, f2 = rlrr_params(mine.mlp.fc1.peft_rlrr), rlrr_params(mine.mlp.fc2.peft_rlrr)
        n1, n2 = ssf(mine.norm1), ssf(mine.norm2)

        def forward(self, x, attn_mask=None, is_causal=False, q=q, k=k, v=v, o=o, f1=f1, f2=f2, n1=n1, n2=n2, W=W, b=b, C=C):
            h = ssf_ada(self.norm1(x), *n1)
            heads, d = self.attn.num_heads, C // self.attn.num_heads
            split = lambda t: t.reshape(*t.shape[:2], heads, d).permute(0, 2, 1, 3)
            query = split(rlrr_linear(h, W[:C], b[:C], *q))
            key = split(rlrr_linear(h, W[C:2 * C], b[C:2 * C], *k))
            value = split(rlrr_linear(h, W[2 * C:], b[2 * C:], *v))
            probs = (query @ key.transpose(-1, -2) / math.sqrt(d)).softmax(dim=-1)
            context = (probs @ value).permute(0, 2, 1, 3).reshape(*h.shape)
            x = x + rlrr_linear(context, self.attn.proj.weight, self.attn.proj.bias, *o)
            h = ssf_ada(self.norm2(x), *n2)
            return x + rlrr_linear(self.mlp.act(rlrr_linear(h, self.mlp.fc1.weight, self.mlp.fc1.bias, *f1)),
                                   self.mlp.fc2.weight, self.mlp.fc2.bias, *f2)
        block.forward = types.MethodType(forward, block)
    patch, final = ssf(ours.patch_embed.proj), ssf(ours.norm)
    embed, norm = official.patch_embed.forward, official.norm.forward
    official.patch_embed.forward = lambda x: ssf_ada(embed(x), *patch)      # patch tokens, before the class token
    official.norm.forward = lambda x: ssf_ada(norm(x), *final)              # encoder_norm, then SSF
    compare(ours, official, pairs)


def test_rlrr_released_init():
    "kaiming_uniform_ on scale_col (1, in): +-sqrt(6/in); on scale_line (out, 1): fan_in 1, +-sqrt(6); shift 0; SSF N(1, .02), N(0, .02)."
    from moppa_nb.more_baselines import RLRR_RELEASED
    model = apply_peft(tiny_vit(), RLRR_RELEASED)
    part = model.blocks[0].attn.qkv.peft_rlrr.parts["key"]
    assert 0.9 * math.sqrt(6 / 192) < part.scale_in.abs().max() <= math.sqrt(6 / 192)
    assert 0.9 * math.sqrt(6) < part.scale_out.abs().max() <= math.sqrt(6) and not part.shift.any()
    scale = model.blocks[0].norm1.peft_ssf.scale
    assert 0.005 < (scale - 1).std() < 0.04


# --- SPT: ziplab/SPT counts sparse LayerNorm entries in the budget but tunes sparse entries of linear layers only ------

def test_spt_sparse_norm_entries_are_not_trained():
    from moppa_nb.more_baselines import spt_allocation, spt_sensitivity
    torch.manual_seed(0)
    plain = tiny_vit()
    batches = [(torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,))) for _ in range(2)]
    sensitivity = spt_sensitivity(copy.deepcopy(plain), batches)
    allocation = spt_allocation(sensitivity, budget=sum(s.numel() for s in sensitivity.values()) // 50)
    norm_units = [u for u in allocation["sparse"] if u.split(".")[-2].startswith("norm")]
    assert norm_units, "the allocation should pick some sparse LayerNorm entries"
    counts = {}
    for mode in ("frozen", "train"):
        model = apply_peft(copy.deepcopy(plain), {"spt": {"allocation": allocation, "sparse_norms": mode}})
        for unit in norm_units:                              # a LayerNorm tensor with sparse entries: trained or not
            layer, tensor = unit.rsplit(".", 1)
            deltas = getattr(model.get_submodule(layer), "peft_spt", None)
            assert (deltas is not None and tensor in deltas.values) == (mode == "train"), (mode, unit)
        counts[mode] = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "peft_spt" in n)
    assert counts["train"] - counts["frozen"] == sum(len(allocation["sparse"][u]) for u in norm_units)


@pytest.mark.parametrize("horizon, cooldown", [("training", 10), ("schedule", 10), ("schedule", 0)])
def test_route_regularisation_horizon_as_mopdo_decays_it(horizon, cooldown):
    """MoPPA's regulariser weight at epoch e: s * max(0, 1 - 2e / E) with E the schedule's epochs (`training`, the paper's
    words) or epochs + cool-down (`schedule`: MoPDO passes the scheduler's epoch count, 110 for 100 + 10)."""
    from moppa_nb.registry import TrainingProgress
    from moppa_nb.testing import tiny_vit
    torch.manual_seed(0)
    model = apply_peft(tiny_vit(), {"moppa": {"route_reg_horizon": horizon}})
    model(torch.randn(2, 3, 32, 32))
    method = adapted_methods(model)[0]
    entropy = -method.extra_loss(model, TrainingProgress(0.0, 100, 1.0, cooldown))          # the weight is 1 at epoch 0
    total = 100 + (cooldown if horizon == "schedule" else 0)
    for epoch in (10.0, 40.0, 50.0, 54.0):
        term = method.extra_loss(model, TrainingProgress(epoch, 100, 1.0, cooldown))
        official = max(0.0, 1 - 2 * epoch / total)
        if official == 0: assert term is None
        else: torch.testing.assert_close(-term, official * entropy, rtol=1e-6, atol=1e-9)


# --- SNELL: ssfgunner/SNELL, model/vision_transformer_timm.py (KLoRA, SNELL, AttentionSNELLParallel, MlpSNELLParallel) ---

def official_snell_weight(in_qs: torch.Tensor, out_qs: torch.Tensor, init_thres: float) -> torch.Tensor:
    "SNELL.pathIntegrals then SNELL.sparsify (KLoRA.pathIntegrals alone when init_thres is 0), num_Hs 2, SCALE_FACTOR_fc 0.1."
    coeff = 0.1 * torch.tensor([(-1) ** h for h in range(in_qs.shape[0])], dtype=in_qs.dtype)[:, None, None]
    weight = torch.sum(coeff * torch.cdist(in_qs, out_qs, p=2), dim=0)
    if init_thres == 0:
        return weight
    weight_abs = weight.detach().abs()
    thres = torch.quantile(weight_abs.flatten(), init_thres)
    return weight * F.threshold(weight_abs, float(thres), 0)


VIT_S = {"embed_dim": 384, "num_heads": 6}      # ViT-S/16's width and heads (two blocks)


@pytest.mark.parametrize("init_thres, vit", [(0.0, {}), (0.7, {}), (0.7, VIT_S)], ids=["klora", "snell", "snell-vit-s"])
def test_snell_matches_vision_transformer_timm_py(init_thres, vit):
    ours, official = adapted({"snell": {"rank": 4, "sparsity": init_thres}}, **vit)
    pairs = []

    def kernel(delta):
        "In_Qs, Out_Qs of one TuningModule, from ours."
        in_qs, out_qs = leaf(delta.inputs), leaf(delta.outputs)
        pairs.extend([(delta.inputs, in_qs, lambda g: g), (delta.outputs, out_qs, lambda g: g)])
        return in_qs, out_qs

    def tuned(x, kernels):                            # TuningModule.forward, eval: DropPath is the identity
        return F.linear(x, official_snell_weight(*kernels, init_thres).T)

    for block, mine in zip(official.blocks, ours.blocks):
        qkv = mine.attn.qkv.peft_snell.parts
        q, k, v = (kernel(qkv[t]) for t in ("query", "key", "value"))
        o = kernel(mine.attn.proj.peft_snell.parts["proj"])
        f1, f2 = kernel(mine.mlp.fc1.peft_snell.parts["fc1"]), kernel(mine.mlp.fc2.peft_snell.parts["fc2"])

        def forward(self, x, attn_mask=None, is_causal=False, q=q, k=k, v=v, o=o, f1=f1, f2=f2):
            h = self.norm1(x)                          # AttentionSNELLParallel.forward on separate q, k, v
            B, N, C = h.shape
            W, b = self.attn.qkv.weight, self.attn.qkv.bias
            heads = self.attn.num_heads
            split = lambda t: t.reshape(B, N, heads, C // heads).permute(0, 2, 1, 3)
            query = split(F.linear(h, W[:C], b[:C]) + tuned(h, q))
            key = split(F.linear(h, W[C:2 * C], b[C:2 * C]) + tuned(h, k))
            value = split(F.linear(h, W[2 * C:], b[2 * C:]) + tuned(h, v))
            attn = ((query @ key.transpose(-2, -1)) * (C // heads) ** -0.5).softmax(dim=-1)
            context = (attn @ value).transpose(1, 2).reshape(B, N, C)
            x = x + self.attn.proj(context) + tuned(context, o)
            h = self.norm2(x)                          # MlpSNELLParallel.forward
            hidden = self.mlp.act(self.mlp.fc1(h) + tuned(h, f1))
            return x + self.mlp.fc2(hidden) + tuned(hidden, f2)
        block.forward = types.MethodType(forward, block)
    official.cls_token = nn.Parameter(leaf(ours.cls_token))   # freeze_stages keeps the class token trainable
    pairs.append((ours.cls_token, official.cls_token, lambda g: g))
    compare(ours, official, pairs)


def test_snell_released_init_and_placement():
    "kaiming_uniform_(a=sqrt(5)) on In_Qs (H, in, r/2): fan_in in * r/2, bound 1/sqrt(fan_in); Out_Qs likewise; dropout and DropPath 0.1."
    model = apply_peft(tiny_vit(), "snell")
    qkv = model.blocks[0].attn.qkv.peft_snell
    query = qkv.parts["query"]
    assert tuple(query.inputs.shape) == (2, 192, 4) and tuple(query.outputs.shape) == (2, 192, 4)
    bound = 1 / math.sqrt(192 * 4)
    assert 0.9 * bound < query.inputs.abs().max() <= bound and 0.9 * bound < query.outputs.abs().max() <= bound
    fc1 = model.blocks[0].mlp.fc1.peft_snell.parts["fc1"]
    assert 0.9 / math.sqrt(768 * 4) < fc1.outputs.abs().max() <= 1 / math.sqrt(768 * 4)
    assert qkv.dropout.p == 0.1 and query.drop_path.drop_prob == 0.1
    assert isinstance(model.blocks[0].attn.proj.peft_snell.dropout, nn.Identity)


@pytest.mark.parametrize("check", [test_fact_tk_official_layout_matches_fact_tk_py, test_fact_tt_matches_fact_tt_py,
                                   test_adaptformer_paper_form_reads_norm2, test_nola_released_form_matches_nola2_on_the_mlp,
                                   test_rlrr_released_matches_networks_py], ids=lambda check: check.__name__[5:])
def test_official_forms_on_vit_s(check, monkeypatch):
    "The same comparisons on ViT-S/16's width and heads (384, 6; two blocks): the official forms hold at another width."
    monkeypatch.setitem(globals(), "VIT_DEFAULTS", VIT_S)
    check()
    assert _PLAIN["model"].embed_dim == 384 and _PLAIN["model"].blocks[0].attn.num_heads == 6
