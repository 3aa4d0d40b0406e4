"""Masked layers: fit mode equals the masked reference (forward and backward, every dtype and backend),
dense mode equals PyTorch, the masked_weight op is a clean custom op, and the layer state survives
state_dict / deepcopy / pickle / dtype casts."""
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ke_fast
import ke_fast.kernels as K
from ke_fast import MaskedConv1d, MaskedConv2d, MaskedLinear
from ke_fast import ops
from ke_fast.ops import masked_weight

from conftest import DTYPES, TOL

# (kind, C_in, C_out, kernel, stride, padding, dilation, batch, bias): odd sizes, every conv option once
CONFIGS = [
    ("conv2d", 3, 7, 3, 1, 1, 1, 1, True),
    ("conv2d", 5, 6, 3, 2, 1, 1, 3, True),
    ("conv2d", 17, 9, 3, 1, 1, 2, 3, False),
    ("conv2d", 17, 5, 2, 2, 0, 2, 1, True),
    ("conv1d", 5, 7, 3, 2, 1, 1, 3, True),
    ("conv1d", 17, 6, 3, 1, 1, 2, 1, False),
    ("linear", 17, 5, None, None, None, None, 3, True),
    ("linear", 3, 33, None, None, None, None, 1, True),
]
IDS = [f"{c[0]}-cin{c[1]}-cout{c[2]}-s{c[4]}-p{c[5]}-d{c[6]}-n{c[7]}-b{int(c[8])}" for c in CONFIGS]
SPATIAL = 7  # H = W = 7 (L = 7 for conv1d)


def make_layer(cfg, split_mode="wels", split_rate=0.5, seed=3, layer_index=1, dtype=torch.float32, gen_seed=0,
               device="cpu"):
    kind, cin, cout, k, stride, pad, dil, _, bias = cfg
    torch.manual_seed(gen_seed)
    kw = dict(split_mode=split_mode, split_rate=split_rate, seed=seed, layer_index=layer_index)
    if kind == "conv2d":
        layer = MaskedConv2d(cin, cout, k, stride=stride, padding=pad, dilation=dil, bias=bias, **kw)
    elif kind == "conv1d":
        layer = MaskedConv1d(cin, cout, k, stride=stride, padding=pad, dilation=dil, bias=bias, **kw)
    else:
        layer = MaskedLinear(cin, cout, bias=bias, **kw)
    with torch.no_grad():  # non-zero biases so a wrong bias mask shows
        if layer.bias is not None:
            layer.bias.uniform_(-1.0, 1.0)
    return layer.to(device=device, dtype=dtype)


def make_input(cfg, dtype, seed=1, device="cpu"):
    kind, cin, *_ = cfg
    batch = cfg[7]
    g = torch.Generator().manual_seed(seed)
    shape = {"conv2d": (batch, cin, SPATIAL, SPATIAL), "conv1d": (batch, cin, SPATIAL), "linear": (batch, cin)}[kind]
    return torch.randn(shape, generator=g).to(device=device, dtype=dtype)


def functional(cfg, x, w, b):
    kind, _, _, _, stride, pad, dil, _, _ = cfg
    if kind == "conv2d":
        return F.conv2d(x, w, b, stride=stride, padding=pad, dilation=dil)
    if kind == "conv1d":
        return F.conv1d(x, w, b, stride=stride, padding=pad, dilation=dil)
    return F.linear(x, w, b)


def reference(cfg, layer, x, gout):
    """Output, grad_x, grad_w, grad_b of the masked layer, in fp64 on the CPU from the same (rounded) values:
    the oracle, independent of every ke_fast implementation (plain torch ops only)."""
    m = K.unpack_mask(layer.fit_mask.cpu(), layer.weight.shape)
    bm = m.reshape(m.shape[0], -1).any(dim=1)  # output o is fit iff its filter keeps a weight
    w = layer.weight.detach().cpu().double().requires_grad_(True)
    b = None if layer.bias is None else layer.bias.detach().cpu().double().requires_grad_(True)
    x = x.detach().cpu().double().requires_grad_(True)
    out = functional(cfg, x, w * m, None if b is None else b * bm)
    out.backward(gout.cpu().double())
    return out.detach(), x.grad, w.grad, (None if b is None else b.grad), m, bm


def close(actual, expected, dtype):
    torch.testing.assert_close(actual.cpu().double(), expected.cpu().double(), **TOL[dtype])


# ---------------------------------------------------------------- fit mode vs reference

@pytest.mark.parametrize("split_mode", ["wels", "kels"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_fit_forward_backward_matches_reference(impl, cfg, dtype, split_mode):
    layer = make_layer(cfg, split_mode=split_mode, dtype=dtype, device=impl.device)
    layer.set_mode("fit")
    x = make_input(cfg, dtype, device=impl.device).requires_grad_(True)
    out = layer(x)
    assert out.dtype == dtype and out.device.type == impl.device
    g = torch.Generator().manual_seed(7)
    gout = torch.randn(out.shape, generator=g).to(device=impl.device, dtype=dtype)
    out.backward(gout)
    ref_out, ref_gx, ref_gw, ref_gb, m, bm = reference(cfg, layer, x, gout)
    # the bias mask the layer keeps is the output mask of its weight mask
    assert torch.equal(K.unpack_mask(layer.bias_mask.cpu(), (layer.weight.shape[0],)), bm)
    assert 0 < int(m.sum()) < m.numel()
    close(out, ref_out, dtype)
    assert x.grad.dtype == dtype and layer.weight.grad.dtype == dtype
    close(x.grad, ref_gx, dtype)
    # PyTorch's own CPU fp16 and bf16 conv2d weight gradients are up to 0.07 off fp64 on some x86 CPUs (with
    # plain nn.Conv2d too; it depends on the kernel the CPU gets): there the oracle is the same-dtype PyTorch
    # op on W*M, which ke_fast's gradient must equal (W*M, then the native op, then grad*M).
    if dtype in (torch.float16, torch.bfloat16) and cfg[0] == "conv2d" and not x.is_cuda:
        native = _native_grads(cfg, layer, x, gout, m, bm)
        close(layer.weight.grad, native[0], dtype)
        if layer.bias is not None:
            close(layer.bias.grad, native[1], dtype)
    else:
        close(layer.weight.grad, ref_gw, dtype)
    # gradients of reset entries are exactly zero (not merely small)
    gw = layer.weight.grad.cpu()
    assert (gw[~m] == 0).all()
    assert (gw[m] != 0).any()
    if layer.bias is not None:
        close(layer.bias.grad, ref_gb, dtype)
        assert (layer.bias.grad.cpu()[~bm] == 0).all()


def _native_grads(cfg, layer, x, gout, m, bm):
    """The oracle where fp64 is not one: plain PyTorch (CPU) on W*M in the layer's dtype."""
    w = layer.weight.detach().clone().requires_grad_(True)
    b = None if layer.bias is None else layer.bias.detach().clone().requires_grad_(True)
    zero = torch.zeros((), dtype=w.dtype)
    out = functional(cfg, x.detach(), torch.where(m, w, zero), None if b is None else torch.where(bm, b, zero))
    out.backward(gout)
    return w.grad, (None if b is None else b.grad)


def test_kels_reset_bias_is_masked_in_fit_mode(impl):
    """KELS at 0.5 resets whole filters: their outputs must be exactly zero in fit mode (bias masked too)."""
    cfg = CONFIGS[1]
    layer = make_layer(cfg, split_mode="kels", device=impl.device)
    layer.set_mode("fit")
    out = layer(make_input(cfg, torch.float32, device=impl.device))
    kept = -(-layer.out_channels // 2)
    assert (out[:, kept:] == 0).all()
    assert (out[:, :kept] != 0).any()


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_dense_mode_equals_plain_module(impl, cfg):
    layer = make_layer(cfg, device=impl.device)
    kind, cin, cout, k, stride, pad, dil, _, bias = cfg
    if kind == "conv2d":
        plain = nn.Conv2d(cin, cout, k, stride=stride, padding=pad, dilation=dil, bias=bias)
    elif kind == "conv1d":
        plain = nn.Conv1d(cin, cout, k, stride=stride, padding=pad, dilation=dil, bias=bias)
    else:
        plain = nn.Linear(cin, cout, bias=bias)
    plain = plain.to(impl.device)
    plain.load_state_dict({k_: v for k_, v in layer.state_dict().items() if k_ != "fit_mask"})
    assert layer.mode == "dense"
    x1 = make_input(cfg, torch.float32, device=impl.device).requires_grad_(True)
    x2 = x1.detach().clone().requires_grad_(True)
    o1, o2 = layer(x1), plain(x2)
    assert torch.equal(o1, o2)
    o1.sum().backward()
    o2.sum().backward()
    assert torch.equal(x1.grad, x2.grad)
    assert torch.equal(layer.weight.grad, plain.weight.grad)
    m = K.unpack_mask(layer.fit_mask.cpu(), layer.weight.shape)
    assert (layer.weight.grad.cpu()[~m] != 0).any()  # dense mode trains the reset entries too
    # and fit mode is really different
    layer.set_mode("fit")
    assert not torch.equal(layer(x1), o1)


def test_set_mode_rejects_unknown():
    layer = make_layer(CONFIGS[0])
    with pytest.raises(ValueError):
        layer.set_mode("sparse")
    assert layer.mode == "dense"


# ---------------------------------------------------------------- the custom op

def _words(shape, seed=5, device="cpu"):
    return ops.wels_mask_bits(shape, 0.5, seed=seed, stream=K.layer_stream(0, 0), device=device)


@pytest.mark.parametrize("out_dtype", [None, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("in_dtype", DTYPES, ids=str)
def test_masked_weight_op_forward_backward(impl, in_dtype, out_dtype):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 123, generator=g).to(device=impl.device, dtype=in_dtype).requires_grad_(True)
    words = _words(w.shape, device=impl.device)
    m = K.unpack_mask(words, w.shape)
    out = masked_weight(w, words, out_dtype)
    want_dtype = in_dtype if out_dtype is None else out_dtype
    assert out.dtype == want_dtype and out.shape == w.shape
    ref = torch.where(m, w.detach(), torch.zeros((), dtype=in_dtype)).to(want_dtype)
    # masking is exact and the cast is round-to-nearest-even: bit-identical to torch's .to()
    assert torch.equal(out, ref)
    gout = torch.randn(w.shape, generator=g).to(device=impl.device, dtype=want_dtype)
    out.backward(gout)
    assert w.grad.dtype == in_dtype
    assert torch.equal(w.grad, torch.where(m, gout, torch.zeros((), dtype=want_dtype)).to(in_dtype))


@pytest.mark.parametrize("out_dtype", [None, torch.bfloat16], ids=str)
def test_masked_weight_op_non_contiguous(impl, out_dtype):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(123, 5, generator=g).to(impl.device).requires_grad_(True)
    w = base.t()  # (5, 123), not contiguous: the mask follows the logical row-major order
    assert not w.is_contiguous()
    words = _words(w.shape, seed=9, device=impl.device)
    m = K.unpack_mask(words, w.shape)
    out = masked_weight(w, words, out_dtype)
    want = torch.where(m, w.detach(), torch.zeros((), device=impl.device)).to(out_dtype or torch.float32)
    assert torch.equal(out, want)
    gout = torch.randn(w.shape, generator=g).to(device=impl.device, dtype=out.dtype)
    out.backward(gout)
    assert torch.equal(base.grad, torch.where(m, gout, torch.zeros((), dtype=out.dtype)).float().t())


@pytest.mark.parametrize("out_dtype", [None, torch.bfloat16, torch.float16], ids=str)
def test_masked_weight_opcheck(impl, out_dtype):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(7, 3, 3, 3, generator=g).to(impl.device).requires_grad_(True)
    words = _words(w.shape, device=impl.device)
    op = torch.ops.ke_fast.masked_weight.default
    torch.library.opcheck(op, (w, words, out_dtype))
    torch.library.opcheck(op, (w.detach(), words, out_dtype))  # no-grad path too


def test_masked_weight_rejects_bad_words():
    w = torch.randn(5, 123)
    with pytest.raises(ValueError):
        masked_weight(w, torch.zeros(3, dtype=torch.int32), None)
    with pytest.raises(ValueError):
        masked_weight(w, torch.zeros(K.num_words(w.numel()), dtype=torch.int64), None)


# ---------------------------------------------------------------- autocast

@pytest.mark.parametrize("cfg", [CONFIGS[1], CONFIGS[4], CONFIGS[6]], ids=[IDS[1], IDS[4], IDS[6]])
def test_fit_mode_under_bf16_autocast(impl, cfg):
    layer = make_layer(cfg, split_mode="wels", device=impl.device)
    layer.set_mode("fit")
    x = make_input(cfg, torch.float32, device=impl.device)
    with torch.autocast(impl.device, dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    m = K.unpack_mask(layer.fit_mask.cpu(), layer.weight.shape)
    bm = K.unpack_mask(layer.bias_mask.cpu(), (layer.weight.shape[0],))
    # reference: the bf16-rounded operands, computed in fp64
    w = (layer.weight.detach().cpu() * m).to(torch.bfloat16).double()
    b = None if layer.bias is None else (layer.bias.detach().cpu() * bm).to(torch.bfloat16).double()
    ref = functional(cfg, x.cpu().to(torch.bfloat16).double(), w, b)
    close(out, ref, torch.bfloat16)
    out.float().sum().backward()
    gw = layer.weight.grad.cpu()
    assert gw.dtype == torch.float32
    assert (gw[~m] == 0).all() and (gw[m] != 0).any()


# ---------------------------------------------------------------- state

def small_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, stride=2), nn.Flatten(),
                         nn.Linear(6 * 3 * 3, 5))


def fit_out(model, x):
    with torch.no_grad(), ke_fast.fit_only(model):
        return model(x)


X = torch.randn(2, 3, 7, 7, generator=torch.Generator().manual_seed(3))


def test_dense_conv_state_dict_loads_into_split_layer():
    dense = nn.Conv2d(3, 8, 3, padding=1)
    layer = MaskedConv2d(3, 8, 3, padding=1, split_mode="wels", seed=4)
    before = layer.fit_mask.clone()
    res = layer.load_state_dict(dense.state_dict(), strict=True)
    assert not res.missing_keys and not res.unexpected_keys
    assert torch.equal(layer.weight, dense.weight) and torch.equal(layer.bias, dense.bias)
    assert torch.equal(layer.fit_mask, before)


def test_dense_model_state_dict_loads_into_split_model():
    dense = small_net(seed=1)
    model = ke_fast.split(small_net(seed=2), "kels", 0.5, seed=0)
    masks = ke_fast.masks(model)
    model.load_state_dict(dense.state_dict(), strict=True)
    for (n, p), (n2, p2) in zip(model.named_parameters(), dense.named_parameters()):
        assert n == n2 and torch.equal(p, p2)
    after = ke_fast.masks(model)
    assert masks.keys() == after.keys() and all(torch.equal(masks[k], after[k]) for k in masks)
    assert not torch.equal(fit_out(model, X), dense(X))


def test_masked_state_dict_round_trip_restores_masks():
    src = ke_fast.split(small_net(seed=1), "wels", 0.5, seed=1)
    dst = ke_fast.split(small_net(seed=2), "wels", 0.5, seed=2)
    ms, md = ke_fast.masks(src), ke_fast.masks(dst)
    assert any(not torch.equal(ms[k], md[k]) for k in ms)  # precondition: different seeds, different masks
    sd = src.state_dict()
    assert all(f"{n}.fit_mask" in sd for n in ms)
    assert not any(k.endswith("bias_mask") for k in sd)  # derived, not saved
    dst.load_state_dict(sd, strict=True)
    md = ke_fast.masks(dst)
    assert all(torch.equal(ms[k], md[k]) for k in ms)
    assert torch.equal(fit_out(dst, X), fit_out(src, X))


def test_loaded_mask_rebuilds_bias_mask():
    src = ke_fast.split(small_net(seed=1), "kels", 0.5)
    dst = ke_fast.split(small_net(seed=2), "wels", 0.5, seed=5)
    dst.load_state_dict(src.state_dict())
    for (_, a), (_, b) in zip(ke_fast.masked_layers(src), ke_fast.masked_layers(dst)):
        assert torch.equal(a.bias_mask, b.bias_mask)
    assert torch.equal(fit_out(dst, X), fit_out(src, X))


def test_fit_mask_of_wrong_length_fails_to_load():
    model = ke_fast.split(small_net(), "wels", 0.5, seed=1)
    before = model[0].fit_mask.clone()
    sd = model.state_dict()
    sd["0.fit_mask"] = torch.zeros(before.numel() + 1, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="fit_mask"):
        model.load_state_dict(sd)
    assert torch.equal(model[0].fit_mask, before)
    sd["0.fit_mask"] = before.to(torch.int64)  # right length, wrong dtype
    with pytest.raises(RuntimeError, match="fit_mask"):
        model.load_state_dict(sd)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copy_preserves_masks_and_outputs(how):
    model = ke_fast.split(small_net(), "wels", 0.5, seed=1).eval()
    model[2].set_mode("fit")  # a mixed state must survive too
    dense_before = model(X)
    fit_before = fit_out(model, X)
    clone = copy.deepcopy(model) if how == "deepcopy" else pickle.loads(pickle.dumps(model))
    assert [type(m) for m in clone.modules()] == [type(m) for m in model.modules()]
    assert [m.mode for _, m in ke_fast.masked_layers(clone)] == ["dense", "fit", "dense"]
    ma, mb = ke_fast.masks(model), ke_fast.masks(clone)
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
    for (_, a), (_, b) in zip(ke_fast.masked_layers(model), ke_fast.masked_layers(clone)):
        assert torch.equal(a.bias_mask, b.bias_mask)
    assert torch.equal(clone(X), dense_before)
    assert torch.equal(fit_out(clone, X), fit_before)
    # the copy is independent
    ke_fast.reinit_(clone, 1)
    assert torch.equal(fit_out(model, X), fit_before)
    ke_fast.revert(clone)
    assert isinstance(model[0], MaskedConv2d)


@pytest.mark.parametrize("cast", ["half", "bfloat16"])
def test_dtype_casts_keep_int32_masks(cast):
    model = ke_fast.split(small_net(), "wels", 0.5, seed=1)
    masks = ke_fast.masks(model)
    model = model.half() if cast == "half" else model.to(torch.bfloat16)
    dtype = torch.float16 if cast == "half" else torch.bfloat16
    for _, m in ke_fast.masked_layers(model):
        assert m.weight.dtype == dtype
        assert m.fit_mask.dtype == torch.int32 and m.bias_mask.dtype == torch.int32
    after = ke_fast.masks(model)
    assert all(torch.equal(masks[k], after[k]) for k in masks)
    out = fit_out(model, X.to(dtype))
    assert out.dtype == dtype


def test_masked_weight_with_non_contiguous_words(impl):
    x = torch.randn(2, 40).to(impl.device)
    words = torch.tensor([0, 7, -1, 7, 12345, 7], dtype=torch.int32, device=impl.device)[::2]  # 3 words, strided
    bits = [(w >> b) & 1 for w in (0, -1, 12345) for b in range(32)][:80]
    want = torch.where(torch.tensor(bits, dtype=torch.bool).view(2, 40), x.cpu(), torch.zeros(()))
    assert torch.equal(masked_weight(x, words).cpu(), want)
