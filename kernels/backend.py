"""Where the kernels can run: whether Triton is interpreting, and the C++ CPU extension.

Choosing an implementation per call is not done here: :mod:`ke_fast.ops` registers each op's kernels
per device with ``torch.library`` and is the one place that reads the debug override.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from pathlib import Path
from types import ModuleType

_ext: ModuleType | None = None
_ext_error: str | None = None
_interpreting: bool | None = None
_has_triton: bool | None = None


def interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1``, which Triton itself
    reads when a kernel is defined: set it before ke_fast is imported). Read once; :func:`reload` reads again."""
    global _interpreting
    if _interpreting is None:
        _interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    return _interpreting


def has_triton() -> bool:
    """Whether Triton can be imported here (it is not installed on macOS, Windows or a CPU-only venv)."""
    global _has_triton
    if _has_triton is None:
        import importlib.util

        try:
            _has_triton = importlib.util.find_spec("triton") is not None
        except (ImportError, ValueError):
            _has_triton = False
    return _has_triton


def reload() -> None:
    """Forget the environment read by :func:`interpreting` (``ke_fast.ops.reload_settings`` calls this)."""
    global _interpreting
    _interpreting = None


SOURCE = Path(__file__).with_name("csrc") / "ke_fast_cpu.cpp"
INSTALLED_PREFIX = "_cpu_"  # ke_fast.kernels._cpu_<install tag>: the module setup.py builds at install
CFLAGS = ["-O3", "-march=native", "-fopenmp"]  # the same for the install and the first-use build
LDFLAGS = ["-fopenmp"]
STALE_LOCK_SECONDS = 600  # without flock (not POSIX): a build lock this old is a killed build's


def _cpu_info() -> str:
    """This CPU's model and feature flags (the kernels are built with -march=native for it)."""
    import platform

    info = platform.machine() + platform.processor()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        info += "".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags", "Features"))}))
    except OSError:
        pass
    return info


def install_tag(source: Path = SOURCE) -> str:
    """Short hash of this CPU and of the C++ source: the name of the module built at install carries it, so a
    module built for another CPU (a shared file system) or from an older source is never loaded."""
    import hashlib

    return hashlib.sha1(_cpu_info().encode() + source.read_bytes()).hexdigest()[:12]


def _build_tag(source: Path) -> str:
    """Short hash of this CPU's model and feature flags, of the C++ source and of its path."""
    import hashlib

    return hashlib.sha1(_cpu_info().encode() + source.read_bytes() + str(source.resolve()).encode()).hexdigest()[:12]


def _installed() -> ModuleType | None:
    """The C++ kernels compiled when the package was installed (setup.py), if they match this CPU and source."""
    import importlib

    try:
        return importlib.import_module(f"{__package__}.{INSTALLED_PREFIX}{install_tag()}")
    except ImportError:
        return None


def cpu_extension() -> ModuleType | None:
    """The compiled C++ CPU kernels: the module built at install (``pip install -e .``) when it matches this
    CPU and source, else built on first use (ninja + the system compiler, OpenMP; one line on stderr says so
    before it starts).

    Returns None, with one warning, when it cannot be built; callers then use the reference."""
    global _ext, _ext_error
    if _ext is not None or _ext_error is not None:
        return _ext
    try:
        _ext = _installed() or _build_at_first_use()
    except Exception as exc:  # no compiler, no ninja, no headers: fall back, but say so once
        _ext_error = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"ke_fast: C++ CPU kernels unavailable, using the PyTorch reference path ({_ext_error})",
                      RuntimeWarning, stacklevel=2)
    return _ext


def _build_at_first_use() -> ModuleType:
    """torch's JIT build of the C++ kernels in their own build directory, which cannot hang on a killed build.

    torch's ``load`` guards a build with a 0-byte ``lock`` file in the build directory and waits, silently and
    forever, while it exists: a process killed mid-build leaves it behind. So the build runs under a second
    lock that cannot go stale (``flock`` on ``ke_fast.flock``: the kernel drops it when its holder dies);
    holding it, a torch ``lock`` can only be a killed build's, and is removed with one warning. (Without
    ``fcntl`` a ``lock`` older than STALE_LOCK_SECONDS counts as stale.)"""
    from torch.utils.cpp_extension import _get_build_directory, load

    # The build directory is named after the CPU (built with -march=native: a shared home never hands
    # one machine's build to another CPU), the source and its path: two checkouts on one machine would
    # otherwise share a directory, and ninja would either load the other's build (another version) or,
    # as the source path in its build file changed, rebuild it on every alternation (the same version).
    name = f"ke_fast_cpu_{_build_tag(SOURCE)}"
    build_dir = Path(_get_build_directory(name, verbose=False))
    with _build_lock(build_dir):
        if not any((build_dir / f"{name}{suffix}").exists() for suffix in (".so", ".pyd")):
            print(f"ke_fast: building the C++ CPU kernels (once per checkout and CPU, about a minute) in {build_dir}",
                  file=sys.stderr, flush=True)
        return load(name=name, sources=[str(SOURCE)], extra_cflags=CFLAGS, extra_ldflags=LDFLAGS,
                    build_directory=str(build_dir), verbose=False)


@contextlib.contextmanager
def _build_lock(build_dir: Path):
    """Hold ``build_dir/ke_fast.flock`` (waiting, with one line, for another live build), then remove a stale
    torch ``lock``."""
    torch_lock = build_dir / "lock"
    try:
        import fcntl
    except ImportError:  # no flock: judge torch's lock by its age
        fcntl = None
    if fcntl is None:
        if torch_lock.exists() and time.time() - torch_lock.stat().st_mtime > STALE_LOCK_SECONDS:
            _remove_stale(torch_lock, f"older than {STALE_LOCK_SECONDS} s")
        yield
        return
    with open(build_dir / "ke_fast.flock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            print(f"ke_fast: waiting for another process ({f.read().strip() or 'pid unknown'}) that builds the C++ "
                  f"CPU kernels in {build_dir}", file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()}\n")
            f.flush()
            if torch_lock.exists():  # we hold the only live build: this lock's owner died mid-build
                _remove_stale(torch_lock, "its build process is gone")
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_stale(lock: Path, why: str) -> None:
    warnings.warn(f"ke_fast: removed the build lock {lock} left by a killed build ({why}); building again",
                  RuntimeWarning, stacklevel=4)
    lock.unlink(missing_ok=True)


def cpu_extension_error() -> str | None:
    """Why the C++ CPU kernels could not be built (None if they were, or were never asked for)."""
    return _ext_error
