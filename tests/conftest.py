"""Shared test set-up: which (implementation, device) pairs this host can run, and one tolerance table.

Without CUDA the Triton kernels run under the interpreter: TRITON_INTERPRET must be set before any
ke_fast (hence triton.jit) import, so it happens here, at import time of the conftest, which pytest
loads before the test modules. With CUDA the interpreter stays off and Triton runs on CUDA tensors only.
"""
import os
from typing import NamedTuple

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
if HAS_CUDA:  # the oracles compare against fp64: TF32 convolutions and matmuls would be the error measured
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    # tests compare masked layers bit for bit with plain ones: cuDNN must not pick atomics-based algorithms
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False

# Under pytest-xdist every worker would start one intra-op thread per core: on a 16-core GPU host with 14
# workers that oversubscribes the CPU ~14x (the demo and compile tests then took over 200 s each). Share the
# cores between the workers instead.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
    torch.set_num_threads(_THREADS)
    os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))  # the CLI / DDP tests' subprocesses too
# On a GPU the sparse kernels would autotune every odd test shape over all their configs (a compile and a
# benchmark each); tests run one config, and test_sparse_conv.py runs every config once on its own.
if HAS_CUDA:
    os.environ.setdefault("KE_FAST_AUTOTUNE", "0")

import pytest  # noqa: E402

from ke_fast import ops  # noqa: E402
from ke_fast.ops import legal_implementations  # noqa: E402

# Per-dtype tolerances (one table for the whole suite), FlagGems style.
TOL = {torch.float32: dict(rtol=1.3e-6, atol=1e-5), torch.float16: dict(rtol=1e-3, atol=1e-3),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DEVICE = "cuda" if HAS_CUDA else "cpu"


def impl_pairs(has_cuda: bool, interpreting: bool, has_cpp: bool = True) -> list[tuple[str, str]]:
    """The (implementation, device) pairs a host can run: ("triton", "cuda") with CUDA, ("triton", "cpu")
    only under the interpreter, ("cpp", "cpu"), and ("reference", the host's main device).

    A host whose C++ kernels do not build still lists ("cpp", "cpu"): those tests then fail and say why."""
    host = "cuda" if has_cuda else "cpu"
    pairs = []
    for device in (["cuda"] if has_cuda else []) + ["cpu"]:
        for name in legal_implementations(device, interpreting=interpreting, cpp=has_cpp):
            if name != "reference" or device == host:
                pairs.append((name, device))
    return pairs


PAIRS = impl_pairs(HAS_CUDA, INTERPRETING)


class Impl(NamedTuple):
    name: str  # triton / cpp / reference, as KE_FAST_BACKEND takes it
    device: str  # where the test's tensors live


@pytest.fixture(autouse=True)
def _settings():
    """The ops read KE_FAST_* once (ops.reload_settings re-reads them): every test starts from the environment
    as it is, and after it (this fixture requests no other, so it is torn down after monkeypatch has restored
    the environment) the next test does too. A test that sets a KE_FAST_* variable calls ops.reload_settings()."""
    ops.reload_settings()
    yield
    ops.reload_settings()


@pytest.fixture(params=PAIRS, ids=[f"{n}-{d}" for n, d in PAIRS])
def impl(request, monkeypatch):
    """Run a test once per (implementation, device) pair legal on this host; tensors go on ``impl.device``."""
    name, device = request.param
    monkeypatch.setenv("KE_FAST_BACKEND", name)
    ops.reload_settings()
    return Impl(name, device)


def pytest_configure(config):
    config.addinivalue_line("markers", "interpreter_sample(keep=f): under the Triton interpreter, run the "
                            "triton-cpu cases for which keep(params) is true (a stated sample; all run elsewhere)")


def pytest_collection_modifyitems(config, items):
    """The interpreter runs each Triton program in Python (seconds per case): a test marked
    ``interpreter_sample(keep=f)`` runs its interpreted cases — those of the ("triton", "cpu") pair, or all of
    them for a test without an ``impl`` parameter (it calls Triton directly) — only where
    ``f(callspec.params)`` holds: a pairwise sample its marker states; every case runs on the other pairs.
    The rest are deselected (``pytest --collect-only -n 0`` counts them: "N deselected"); on a CUDA host none
    is."""
    if not INTERPRETING:
        return
    kept, dropped = [], []
    for item in items:
        marker = item.get_closest_marker("interpreter_sample")
        params = getattr(getattr(item, "callspec", None), "params", {})
        interpreted = tuple(params.get("impl", ("triton", "cpu"))) == ("triton", "cpu")
        if marker is not None and interpreted and not marker.kwargs["keep"](params):
            dropped.append(item)
        else:
            kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in units in the last place between two fp32 tensors of the same sign pattern."""
    ia = a.float().contiguous().view(torch.int32).to(torch.int64)
    ib = b.float().contiguous().view(torch.int32).to(torch.int64)
    # map the sign-magnitude ordering onto a monotone integer line
    ia = torch.where(ia < 0, -(ia & 0x7FFFFFFF), ia)
    ib = torch.where(ib < 0, -(ib & 0x7FFFFFFF), ib)
    return (ia - ib).abs()
