"""Sparse WELS conv2d / linear (the ke_fast::sparse_conv2d / sparse_linear ops): every implementation the host
runs (Triton on the GPU or the interpreter, the reference) against F.conv2d / F.linear on W*M, the compressed format's round trip, its validation, and its size.

Inputs are rounded to the dtype under test first; the reference runs in fp64 on those rounded values, so
the only error allowed is the kernel's own (accumulation order and the final rounding), judged with TOL."""
import math

import pytest
import torch
import torch.nn.functional as F

from ke_fast.kernels import sparse_conv as sc
from ke_fast.ops import reload_settings

from conftest import DEVICE, DTYPES, PAIRS, TOL, Impl

SPARSE_PAIRS = [p for p in PAIRS if p[0] != "cpp"]  # the sparse ops have no C++ kernel (cpp runs the reference)


@pytest.fixture(params=SPARSE_PAIRS, ids=[f"{n}-{d}" for n, d in SPARSE_PAIRS])
def impl(request, monkeypatch):
    name, device = request.param
    monkeypatch.setenv("KE_FAST_BACKEND", name)
    reload_settings()
    return Impl(name, device)


def conv(x, cw, bias=None, stride=1, padding=0, dilation=1, groups=1):
    pair = lambda v: [v, v] if isinstance(v, int) else list(v)  # noqa: E731
    return torch.ops.ke_fast.sparse_conv2d.default(x, cw.bits, cw.values, cw.offsets, list(cw.shape), bias,
                                                   pair(stride), pair(padding), pair(dilation), groups)


def linear(x, cw, bias=None):
    return torch.ops.ke_fast.sparse_linear.default(x, cw.bits, cw.values, cw.offsets, list(cw.shape), bias)


def _mask(shape, density, gen):
    if density == 0:
        return torch.zeros(shape, dtype=torch.bool)
    if density == 1:
        return torch.ones(shape, dtype=torch.bool)
    return torch.rand(shape, generator=gen) < density


def _data(seed, x_shape, w_shape, density, dtype, bias, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    fan_in = math.prod(w_shape[1:])
    x = torch.randn(x_shape, generator=gen).to(dtype)
    w = (torch.randn(w_shape, generator=gen) / math.sqrt(fan_in)).to(dtype)
    m = _mask(w_shape, density, gen)
    b = torch.randn(w_shape[0], generator=gen).to(dtype) if bias else None
    return x.to(device), w.to(device), m.to(device), None if b is None else b.to(device)


def _check(out, ref, dtype):
    assert out.dtype == dtype
    assert out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])


# (C_in, C_out, groups, kernel, stride, padding, dilation, batch, density, bias): a representative set rather
# than the full cross product (the interpreter is slow). Every option value appears several times, paired
# with different others; C_in = 32 with 3x3 gives K = 288 > 256: more than one 8-word chunk per row.
CONV_CASES = [
    (3, 5, 1, 3, 1, 0, 1, 1, 0.5, True),
    (3, 8, 1, 3, 2, 1, 1, 3, 0.3, False),
    (5, 7, 1, 3, 1, 1, 2, 3, 0.1, True),
    (5, 4, 1, 3, 2, 0, 2, 1, 1.0, False),
    (17, 9, 1, 3, 1, 1, 1, 3, 0.5, False),
    (17, 19, 1, 3, 2, 1, 2, 1, 0.0, True),
    (17, 33, 1, 1, 1, 0, 1, 3, 0.3, True),
    (17, 6, 1, 3, 2, 0, 1, 3, 1.0, True),
    (32, 6, 1, 3, 1, 1, 1, 1, 0.5, True),
    (32, 17, 1, 3, 2, 1, 2, 3, 0.1, False),
    # depthwise: groups = C_in = C_out
    (6, 6, 6, 3, 1, 1, 1, 3, 0.5, True),
    (6, 6, 6, 3, 2, 0, 2, 1, 0.3, False),
    (6, 6, 6, 3, 1, 1, 2, 3, 1.0, True),
    (6, 6, 6, 3, 2, 1, 1, 1, 0.0, True),
    (6, 6, 6, 3, 1, 0, 1, 1, 0.1, False),
    (17, 17, 17, 7, 1, 3, 1, 1, 0.5, True),  # K = 49 > 32: popcounts of earlier words of the chunk
]


def _conv_id(case):
    c, n, g, k, s, p, d, b, dens, bias = case
    return f"C{c}-N{n}-g{g}-k{k}-s{s}-p{p}-d{d}-B{b}-dens{dens}-{'bias' if bias else 'nobias'}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CONV_CASES, ids=_conv_id)
def test_sparse_conv2d_matches_reference(impl, case, dtype):
    c_in, c_out, groups, ksz, stride, padding, dilation, batch, density, bias = case
    x, w, m, b = _data(hash(case) % 2**31, (batch, c_in, 7, 7), (c_out, c_in // groups, ksz, ksz), density, dtype,
                       bias, impl.device)
    cw = sc.compress(w, m).validate()
    out = conv(x, cw, b, stride=stride, padding=padding, dilation=dilation, groups=groups)
    ref = F.conv2d(x.double(), w.double() * m, None if b is None else b.double(), stride, padding, dilation, groups)
    _check(out, ref, dtype)
    assert out.is_contiguous(memory_format=torch.channels_last)  # every implementation's layout


def test_sparse_conv2d_tuple_args_and_channels_last_input(impl):
    x, w, m, b = _data(7, (2, 5, 7, 7), (9, 5, 3, 3), 0.5, torch.float32, True, impl.device)
    x = x.to(memory_format=torch.channels_last)
    cw = sc.compress(w, m)
    out = conv(x, cw, b, stride=(2, 1), padding=(1, 0), dilation=(1, 2))
    ref = F.conv2d(x.double(), w.double() * m, b.double(), (2, 1), (1, 0), (1, 2))
    _check(out, ref, torch.float32)


def test_sparse_conv2d_rejects_grouped_and_wrong_input(impl):
    x, w, m, _ = _data(8, (1, 6, 7, 7), (6, 3, 3, 3), 0.5, torch.float32, False, impl.device)
    with pytest.raises(ValueError, match="groups"):
        conv(x, sc.compress(w, m), groups=2)
    with pytest.raises(ValueError, match="x must be"):
        conv(x[:, :5], sc.compress(w, m), groups=2)


# (K, N, leading shape of x, density, bias); K = 300 and 520 span 2 and 3 chunks of 8 words.
LINEAR_CASES = [
    (70, 9, (5,), 0.5, True),
    (300, 13, (2, 3), 0.3, True),
    (300, 40, (4,), 0.1, False),
    (33, 5, (1,), 1.0, True),
    (70, 17, (3,), 0.0, True),
    (520, 7, (2,), 0.5, True),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: f"K{c[0]}-N{c[1]}-x{c[2]}-dens{c[3]}-bias{c[4]}")
def test_sparse_linear_matches_reference(impl, case, dtype):
    k, n, lead, density, bias = case
    x, w, m, b = _data(hash(case) % 2**31, (*lead, k), (n, k), density, dtype, bias, impl.device)
    cw = sc.compress(w, m).validate()
    ref = F.linear(x.double(), w.double() * m, None if b is None else b.double())
    _check(linear(x, cw, b), ref, dtype)


# ---- the skinny (split-K) kernel: up to SKINNY_MAX_ROWS GEMM rows ----------------------------------

def _skinny_cases():
    """Every (rows, density) pair once; dtype and number of K splits cycle so each appears with every row count.
    N = 77 spans two 64-wide output tiles, K = 283 two 8-word chunks (so up to two splits: 3 asks for more)."""
    out = []
    for i, rows in enumerate((1, 3, 8, 16)):
        for j, density in enumerate((0.0, 0.1, 0.3, 0.5, 1.0)):
            dtype = DTYPES[(i + j) % 3]
            split = (None, 1, 3)[(i + 2 * j) % 3]
            out.append(pytest.param(rows, density, dtype, split, id=f"rows{rows}-dens{density}-{str(dtype)[6:]}-"
                                                                     f"split{split}"))
    return out


@pytest.mark.skipif(not any(p[0] == "triton" for p in SPARSE_PAIRS), reason="Triton needs CUDA or the interpreter")
@pytest.mark.parametrize("rows,density,dtype,split_k", _skinny_cases())
def test_skinny_linear_matches_reference(rows, density, dtype, split_k):
    assert rows <= sc.SKINNY_MAX_ROWS
    x, w, m, b = _data(rows * 31 + int(density * 10), (rows, 283), (77, 283), density, dtype, rows % 2 == 1)
    cw = sc.compress(w, m).validate()
    out = sc.sparse_linear(x, cw.bits, cw.values, cw.offsets, list(cw.shape), b, split_k=split_k)
    _check(out, F.linear(x.double(), w.double() * m, None if b is None else b.double()), dtype)


def test_skinny_split_is_whole_chunks():
    dev = torch.device("cpu")
    for n, t, want in ((77, 17, None), (77, 17, 3), (77, 17, 2), (4096, 128, None), (5, 1, 8), (5, 300, 1000)):
        splits, words = sc.skinny_split(n, t, dev, want)
        assert words % sc.CHUNK_WORDS == 0 and 1 <= splits and (splits - 1) * words < t <= splits * words
        if want is not None:
            assert splits <= max(want, 1)


@pytest.mark.skipif(not any(p[0] == "triton" for p in SPARSE_PAIRS), reason="Triton needs CUDA or the interpreter")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hw,stride,padding", [((7, 5), (2, 1), (1, 0)), ((2, 2), (2, 2), (1, 1))],
                         ids=["12rows", "1row-padded"])
def test_skinny_conv_matches_reference(dtype, hw, stride, padding):
    """Batch-1 convs the skinny kernel runs: 4x3 = 12 output pixels, and one output pixel whose window reaches
    into the padding (the one-row FMA path); K = 17*9 = 153."""
    x, w, m, b = _data(5, (1, 17, *hw), (19, 17, 3, 3), 0.3, dtype, True)
    cw = sc.compress(w, m)
    out = sc.sparse_conv2d(x, cw.bits, cw.values, cw.offsets, list(cw.shape), b, list(stride), list(padding),
                           [1, 1], 1, split_k=1)
    ref = F.conv2d(x.double(), w.double() * m, b.double(), stride, padding)
    assert ref.shape[2] * ref.shape[3] <= sc.SKINNY_MAX_ROWS
    _check(out, ref, dtype)


# ---- the compressed format -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(5, 17, 3, 3), (6, 1, 7, 7), (4, 32, 3, 3), (9, 300), (3, 70), (2, 32)],
                         ids=str)
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_compress_decompress_round_trip(shape, dtype, density):
    _, w, m, _ = _data(1, (1,), shape, density, dtype, False)
    cw = sc.compress(w, m).validate()
    assert cw.shape == tuple(shape) and cw.values.dtype == dtype
    assert cw.values.numel() == int(m.sum())
    back = sc.decompress(cw)
    assert back.dtype == dtype and back.shape == w.shape
    assert torch.equal(back, w * m)
    assert sc.density_of(cw) == pytest.approx(float(m.float().mean()))


def test_values_are_chunk_major():
    """A block of consecutive rows reads one contiguous run of values per 256-wide chunk: rows a..b-1 of chunk c
    are values[offsets[a, c]:offsets[b, c]], their kept weights in (row, k) order."""
    _, w, m, _ = _data(2, (1,), (7, 600), 0.4, torch.float32, False)  # 3 chunks, the last one partial
    cw = sc.compress(w, m).validate()
    for c in range(3):
        cols = slice(256 * c, min(256 * (c + 1), 600))
        for a, b in ((0, 7), (2, 5)):
            end = cw.offsets[b, c] if b < 7 else (cw.offsets[0, c + 1] if c < 2 else cw.values.numel())
            assert torch.equal(cw.values[cw.offsets[a, c]:end], w[a:b, cols][m[a:b, cols]])


def _valid():
    """A linear weight with K = 300: T = 10 words per row, 2 chunks, a 12-bit tail word."""
    _, w, m, _ = _data(3, (1,), (6, 300), 0.5, torch.float32, False)
    return sc.compress(w, m).validate()


def _replace(cw, **kw):
    fields = dict(shape=cw.shape, bits=cw.bits.clone(), values=cw.values.clone(), offsets=cw.offsets.clone())
    fields.update(kw)
    return sc.Compressed(**fields)


def test_validate_catches_bad_bits_shape():
    cw = _valid()
    with pytest.raises(ValueError, match="bits"):
        _replace(cw, bits=cw.bits[:, :-1].contiguous()).validate()
    with pytest.raises(ValueError, match="bits"):
        _replace(cw, bits=cw.bits[:-1].contiguous()).validate()


def test_validate_catches_bad_dtypes():
    cw = _valid()
    with pytest.raises(ValueError, match="bits"):
        _replace(cw, bits=cw.bits.to(torch.int64)).validate()
    with pytest.raises(ValueError, match="offsets"):
        _replace(cw, offsets=cw.offsets.to(torch.int32)).validate()
    with pytest.raises(ValueError, match="values"):
        _replace(cw, values=cw.values.to(torch.float64)).validate()
    with pytest.raises(ValueError, match="values"):
        _replace(cw, values=cw.values.view(1, -1)).validate()


def test_validate_catches_values_too_short_or_long():
    cw = _valid()
    with pytest.raises(ValueError, match="values hold"):
        _replace(cw, values=cw.values[:-1].clone()).validate()
    with pytest.raises(ValueError, match="values hold"):
        _replace(cw, values=torch.cat([cw.values, cw.values[:1]])).validate()


def test_validate_catches_tampered_offsets():
    cw = _valid()
    assert cw.offsets.shape == (6, 2)
    for r, c in ((0, 1), (3, 0), (5, 1)):
        bad = cw.offsets.clone()
        bad[r, c] += 1
        with pytest.raises(ValueError, match="offsets do not match"):
            _replace(cw, offsets=bad).validate()
    with pytest.raises(ValueError, match="offsets"):
        _replace(cw, offsets=cw.offsets[:, :1].contiguous()).validate()


def test_validate_catches_tail_bits():
    cw = _valid()
    assert 300 % 32 == 12
    for bit in (12, 20, 31):  # bit 31 is the sign bit of the int32 word
        bits = cw.bits.clone()
        word = int(bits[2, -1]) & 0xFFFFFFFF | (1 << bit)
        bits[2, -1] = word - (1 << 32) if word >= 1 << 31 else word
        with pytest.raises(ValueError, match="beyond the row length"):
            _replace(cw, bits=bits).validate()


def test_validate_catches_flipped_bit():
    cw = _valid()
    bits = cw.bits.clone()
    bits[1, 4] ^= 1 << 5
    with pytest.raises(ValueError):
        _replace(cw, bits=bits).validate()


def test_compress_rejects_bad_mask():
    _, w, m, _ = _data(4, (1,), (4, 70), 0.5, torch.float32, False)
    with pytest.raises(ValueError, match="mask"):
        sc.compress(w, m.to(torch.uint8))
    with pytest.raises(ValueError, match="mask"):
        sc.compress(w, m[:, :-1])


def test_memory_bf16_half_density():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(256, 256, 3, 3, generator=gen).to(torch.bfloat16)
    m = torch.rand(w.shape, generator=gen) < 0.5
    cw = sc.compress(w, m).validate()
    dense = w.numel() * w.element_size()
    ratio = cw.nbytes() / dense
    print(f"\ncompressed 256x256x3x3 bf16 at density {float(m.float().mean()):.4f}: {cw.nbytes()} B / {dense} B "
          f"= {ratio:.4f}")
    assert 0.55 <= ratio <= 0.60


# ---- every autotuning config (the suite otherwise runs one: KE_FAST_AUTOTUNE=0 on GPUs) ------------

def _config_cases():
    out = []
    for dtype in DTYPES:
        for cfg in sc.gpu_configs(fp32=dtype == torch.float32):
            out.append(pytest.param(dtype, cfg, id=f"{str(dtype)[6:]}-{cfg.kwargs['BLOCK_M']}x"
                                                   f"{cfg.kwargs['BLOCK_N']}-w{cfg.num_warps}-s{cfg.num_stages}"))
    return out


@pytest.mark.parametrize("dtype,config", _config_cases())
def test_every_gpu_config_matches_reference(dtype, config):
    """Each config the GPU autotuner may pick, forced, on a conv and a linear that span several tiles and
    chunks (Triton on the GPU; under the interpreter on CPU hosts)."""
    x, w, m, b = _data(11, (2, 17, 9, 9), (130, 17, 3, 3), 0.4, dtype, True)
    cw = sc.compress(w, m)
    out = sc.sparse_conv2d(x, cw.bits, cw.values, cw.offsets, list(cw.shape), b, [1, 1], [1, 1], [1, 1], 1,
                           config=config)
    _check(out, F.conv2d(x.double(), w.double() * m, b.double(), 1, 1), dtype)
    x, w, m, b = _data(12, (3, 300), (140, 300), 0.4, dtype, False)
    cw = sc.compress(w, m)
    out = sc.sparse_linear(x, cw.bits, cw.values, cw.offsets, list(cw.shape), None, config=config)
    _check(out, F.linear(x.double(), w.double() * m), dtype)
