"""Where the kernels can run: whether Triton is interpreting, and the C++ CPU extension.

Choosing an implementation per call is not done here: :mod:`ke_fast.ops` registers each op's kernels
per device with ``torch.library`` and is the one place that reads the debug override.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from types import ModuleType

_ext: ModuleType | None = None
_ext_error: str | None = None
_interpreting: bool | None = None


def interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1``, which Triton itself
    reads when a kernel is defined: set it before ke_fast is imported). Read once; :func:`reload` reads again."""
    global _interpreting
    if _interpreting is None:
        _interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    return _interpreting


def reload() -> None:
    """Forget the environment read by :func:`interpreting` (``ke_fast.ops.reload_settings`` calls this)."""
    global _interpreting
    _interpreting = None


def _build_tag(source: Path) -> str:
    """Short hash of this CPU's model and feature flags, of the C++ source and of its path."""
    import hashlib
    import platform

    info = platform.machine() + platform.processor()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        info += "".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags", "Features"))}))
    except OSError:
        pass
    return hashlib.sha1(info.encode() + source.read_bytes() + str(source.resolve()).encode()).hexdigest()[:12]


def cpu_extension() -> ModuleType | None:
    """The compiled C++ CPU kernels, built on first use (ninja + the system compiler, OpenMP).

    Returns None, with one warning, when it cannot be built; callers then use the reference."""
    global _ext, _ext_error
    if _ext is not None or _ext_error is not None:
        return _ext
    try:
        from torch.utils.cpp_extension import load

        src = Path(__file__).with_name("csrc") / "ke_fast_cpu.cpp"
        # The build directory is named after the CPU (built with -march=native: a shared home never hands
        # one machine's build to another CPU), the source and its path: two checkouts on one machine would
        # otherwise share a directory, and ninja would either load the other's build (another version) or,
        # as the source path in its build file changed, rebuild it on every alternation (the same version).
        _ext = load(name=f"ke_fast_cpu_{_build_tag(src)}", sources=[str(src)],
                    extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # no compiler, no ninja, no headers: fall back, but say so once
        _ext_error = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"ke_fast: C++ CPU kernels unavailable, using the PyTorch reference path ({_ext_error})",
                      RuntimeWarning, stacklevel=2)
    return _ext


def cpu_extension_error() -> str | None:
    """Why the C++ CPU kernels could not be built (None if they were, or were never asked for)."""
    return _ext_error
