"""ke_fast without Triton (macOS, Windows, a CPU-only venv): importing it, split / reinit_ / fit_only, extraction
and a whole CPU ``ke_fast run`` work on the C++ kernels or the reference, and nothing imports Triton unless a
Triton implementation is chosen.

Triton is installed on this machine, so a subprocess makes it absent: ``sys.modules["triton"] = None`` makes
every ``import triton`` (and ``triton.*``) raise ModuleNotFoundError and ``importlib.util.find_spec`` answer
None, as for an uninstalled package. (A real check: ``python -m venv v && v/bin/pip install torch numpy`` plus
this package without its dependencies, see README.)"""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = "import sys; sys.modules['triton'] = None\n"


def _python(code: str, tmp_path, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=timeout)


def test_library_without_triton(tmp_path):
    out = _python("""
import torch
from torch import nn
import ke_fast
from ke_fast import ops
from ke_fast.models import resnet18
assert sys.modules['triton'] is None  # still blocked: nothing replaced it
assert 'triton' not in ops.legal_implementations('cpu') and ops.legal_implementations('cuda') == ('reference',)
torch.manual_seed(0)
for mode in ('kels', 'wels'):
    net = resnet18(num_classes=10, width=8, stem='small')
    ke_fast.split(net, mode, 0.5, seed=1)
    x = torch.randn(2, 3, 8, 8)
    net.train(); net(x)
    ke_fast.reinit_(net, generation=2)
    net.eval()
    with torch.no_grad(), ke_fast.fit_only(net):
        ref = net(x)
    small = ke_fast.extract_slim(net) if mode == 'kels' else ke_fast.extract_sparse(net)
    with torch.no_grad():
        torch.testing.assert_close(small(x), ref, rtol=1e-4, atol=1e-4)
w = torch.randn(6, 37)
bits = ke_fast.wels_mask_bits(w.shape, 0.5, seed=1, stream=2)
assert torch.equal(ops.masked_weight(w, bits), w * ke_fast.kernels.unpack_mask(bits, w.shape))
try:
    ke_fast.kernels.sparse_conv
except ImportError:
    pass
else:
    raise AssertionError('the Triton module imported without Triton')
print('OK', ops.implementation('cpu'))
""", tmp_path)
    assert out.returncode == 0 and out.stdout.startswith("OK"), out.stdout + out.stderr


def test_cli_run_without_triton(tmp_path):
    out = _python(f"""
from ke_fast.cli import main  # what `python -m ke_fast` runs, in this process (its exit would end it)
assert main(['run', '--generations', '1', '--epochs', '1', '--no-progress', '--out', {str(tmp_path / 'run')!r}]) == 0
assert sys.modules['triton'] is None
print('RUN OK')
""", tmp_path)
    assert out.returncode == 0 and "RUN OK" in out.stdout, out.stdout + out.stderr
    assert (tmp_path / "run" / "history.csv").exists() and (tmp_path / "run" / "last.pt").exists()
