"""The one door (ke_fast.ops): every ke_fast::* op has a CPU and a CUDA kernel, a fake kernel and, where it is
differentiable, an autograd rule; each passes torch.library.opcheck on every (implementation, device) pair the
host runs; KE_FAST_BACKEND offers only what is legal on the host; the test pairs never put Triton on CPU tensors
on a CUDA host."""
from pathlib import Path

import pytest
import torch

import ke_fast
import ke_fast.kernels as K
from ke_fast import ops
from ke_fast.kernels import backend

from conftest import PAIRS, impl_pairs

ROOT = Path(__file__).resolve().parents[1]


def _has(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"ke_fast::{op}", key)


@pytest.mark.parametrize("name", ops.OPS)
def test_every_op_has_device_and_fake_kernels(name):
    assert _has(name, "CPU") and _has(name, "CUDA"), name
    assert _has(name, "Meta"), f"{name}: no fake kernel"


def test_differentiable_op_has_an_autograd_rule_and_the_others_refuse_backward():
    w = torch.randn(4, 40, requires_grad=True)
    words = K.pack_mask(torch.rand(4, 40, generator=torch.Generator().manual_seed(0)) < 0.5)
    (g,) = torch.autograd.grad(torch.ops.ke_fast.masked_weight.default(w, words, None).sum(), w)
    assert torch.equal(g, K.unpack_mask(words, w.shape).float())
    x, bits, values, offsets, shape, bias = _op_args("sparse_linear", "cpu")[0]
    out = torch.ops.ke_fast.sparse_linear.default(x.requires_grad_(True), bits, values, offsets, shape, bias)
    with pytest.raises(RuntimeError, match="sparse_linear"):
        out.sum().backward()


def test_namespace_holds_exactly_the_listed_ops():
    defined = {n for n in dir(torch.ops.ke_fast) if not n.startswith("_") and
               isinstance(getattr(torch.ops.ke_fast, n), torch._ops.OpOverloadPacket)}
    assert defined == set(ops.OPS)


def _op_args(name, device):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 37, generator=g).to(device)
    words = ops.wels_mask_bits(w.shape, 0.5, seed=1, stream=2, device=device)
    if name == "masked_weight":
        return [(w.requires_grad_(True), words, torch.bfloat16), (w.detach(), words, None)]
    if name == "masked_weights":
        b = torch.randn(6, generator=g).to(device)
        bias_words = K.pack_mask(torch.tensor([1, 0, 1, 0, 0, 1], dtype=torch.bool)).to(device)
        table, tiles = K.masked.masks_table((w.numel(), b.numel()), torch.device(device))
        return [([w.requires_grad_(True), b.requires_grad_(True)], [words, bias_words], table, tiles, torch.bfloat16),
                ([w.detach(), b.detach()], [words, bias_words], table, tiles, torch.float32)]
    if name == "wels_bits_":
        return [(torch.empty(K.num_words(200), dtype=torch.int32, device=device), 200, 3, -5, 1 << 23)]
    if name == "reset_entries_":
        b = torch.randn(6, generator=g).to(device)
        bias_words = K.pack_mask(torch.tensor([1, 0, 1, 0, 0, 1], dtype=torch.bool)).to(device)
        jobs = ke_fast.kernels.reinit.prepare([w, b], [words, bias_words], "kaiming_uniform_a_sqrt5",
                                              [None, (37, 6)], None, "fan_in")
        weights, wd, table, tiles, has_normal = ke_fast.kernels.reinit.launch_table(jobs)
        return [(weights, wd, table, tiles, 7, -3, has_normal)]
    wc = torch.randn(5, 3, 3, 3, generator=g)
    if name == "sparse_conv2d":
        cw = K.sparse_conv.compress(wc, torch.rand(wc.shape, generator=g) < 0.5)
        x = torch.randn(2, 3, 6, 6, generator=g).to(device)
        return [(x, cw.bits.to(device), cw.values.to(device), cw.offsets.to(device), list(cw.shape),
                 torch.randn(5, generator=g).to(device), [1, 1], [1, 1], [1, 1], 1)]
    cw = K.sparse_conv.compress(w.cpu(), torch.rand(w.shape, generator=g) < 0.5)
    x = torch.randn(3, 37, generator=g).to(device)
    return [(x, cw.bits.to(device), cw.values.to(device), cw.offsets.to(device), list(cw.shape), None)]


@pytest.mark.parametrize("name", ops.OPS)
def test_opcheck_every_op(impl, name):
    op = getattr(torch.ops.ke_fast, name).default
    for args in _op_args(name, impl.device):
        torch.library.opcheck(op, args)


def test_ops_run_on_their_devices(impl):
    """The output of each op is on the input's device (no silent host round trip)."""
    for name in ("masked_weight", "sparse_conv2d", "sparse_linear"):
        args = _op_args(name, impl.device)[0]
        assert getattr(torch.ops.ke_fast, name).default(*args).device.type == impl.device


# ---- which implementation runs ---------------------------------------------------------------------

def test_simulated_cuda_host_never_runs_triton_on_cpu_tensors():
    pairs = impl_pairs(has_cuda=True, interpreting=False)
    assert ("triton", "cpu") not in pairs
    assert set(pairs) == {("triton", "cuda"), ("cpp", "cpu"), ("reference", "cuda")}
    # the interpreter adds Triton on CPU tensors only where it is on (a CPU host's test run)
    assert set(impl_pairs(has_cuda=False, interpreting=True)) == {("cpp", "cpu"), ("triton", "cpu"), ("reference", "cpu")}
    assert set(impl_pairs(has_cuda=False, interpreting=False)) == {("cpp", "cpu"), ("reference", "cpu")}


def test_this_hosts_pairs_are_legal():
    for name, device in PAIRS:
        assert name in ops.legal_implementations(device)
    if torch.cuda.is_available():
        assert ("triton", "cpu") not in PAIRS and ("triton", "cuda") in PAIRS


def test_legal_implementations():
    assert ops.legal_implementations("cuda", interpreting=True, cpp=True) == ("triton", "reference")
    assert ops.legal_implementations("cpu", interpreting=False, cpp=False) == ("reference",)
    assert ops.legal_implementations("cpu", interpreting=True, cpp=True) == ("cpp", "triton", "reference")
    assert ops.legal_implementations("mps") == ("reference",)


def test_default_is_host_default(monkeypatch):
    monkeypatch.delenv("KE_FAST_BACKEND", raising=False)
    ops.reload_settings()
    assert ops.implementation("cuda") == "triton"
    assert ops.implementation("cpu") == ("cpp" if backend.cpu_extension() is not None else "reference")


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setattr(backend, "interpreting", lambda: False)
    monkeypatch.setenv("KE_FAST_BACKEND", "triton")
    ops.reload_settings()
    w = torch.randn(4, 40)
    with pytest.raises(RuntimeError, match="KE_FAST_BACKEND=triton.*TRITON_INTERPRET"):
        ops.masked_weight(w, K.pack_mask(torch.ones(4, 40)))


def test_cpp_on_cuda_is_refused(monkeypatch):
    monkeypatch.setenv("KE_FAST_BACKEND", "cpp")
    ops.reload_settings()
    with pytest.raises(RuntimeError, match="KE_FAST_BACKEND=cpp.*CPU tensors only"):
        ops.implementation("cuda")


def test_cpp_unbuildable_is_refused_with_the_reason(monkeypatch):
    monkeypatch.setattr(backend, "cpu_extension", lambda: None)
    monkeypatch.setattr(backend, "cpu_extension_error", lambda: "OSError: no compiler")
    monkeypatch.setenv("KE_FAST_BACKEND", "cpp")
    ops.reload_settings()
    with pytest.raises(RuntimeError, match="could not be built.*no compiler"):
        ops.implementation("cpu")
    monkeypatch.setenv("KE_FAST_BACKEND", "auto")
    ops.reload_settings()
    assert ops.implementation("cpu") == "reference"  # the production fallback


def test_unknown_override_is_refused(monkeypatch):
    monkeypatch.setenv("KE_FAST_BACKEND", "cpu")  # the old spelling: cpp now
    ops.reload_settings()
    with pytest.raises(ValueError, match="KE_FAST_BACKEND must be one of auto, triton, cpp, reference"):
        ops.implementation("cpu")


def test_override_is_read_in_one_place():
    """Only ke_fast/ops.py reads KE_FAST_BACKEND; the launchers in kernels/ never choose an implementation."""
    readers = [p.relative_to(ROOT).as_posix() for p in list((ROOT / "ke_fast").glob("*.py")) +
               list((ROOT / "kernels").glob("*.py")) if "KE_FAST_BACKEND" in p.read_text()]
    assert readers == ["ke_fast/ops.py"]


def test_cpu_build_directory_is_per_checkout(tmp_path):
    """Two checkouts of the same source get two build directories of the C++ kernels: sharing one made ninja
    rebuild the extension (25-40 s) whenever the other checkout had loaded it; another source gets another."""
    from ke_fast.kernels import backend

    a, b = tmp_path / "a" / "k.cpp", tmp_path / "b" / "k.cpp"
    for p in (a, b):
        p.parent.mkdir()
        p.write_text("int f() { return 1; }\n")
    assert backend._build_tag(a) != backend._build_tag(b)
    assert backend._build_tag(a) == backend._build_tag(a)
    before = backend._build_tag(a)
    a.write_text("int f() { return 2; }\n")
    assert backend._build_tag(a) != before
