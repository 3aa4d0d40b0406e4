"""A build of the C++ CPU kernels that cannot hang (kernels/backend.py).

The kernels are compiled at install (setup.py) into ``ke_fast.kernels._cpu_<tag>``, found by
``backend.cpu_extension()``; where they are not, the first use builds them with torch's JIT loader under a lock
that cannot go stale, says so in one line first, and removes the 0-byte ``lock`` a killed build leaves behind
(torch waits forever while it exists). The kill test builds a tiny stand-in source through the same code path
(the lock, torch's JIT loader, ninja) in a fresh build directory (``TORCH_EXTENSIONS_DIR``): a few seconds
instead of the minute the real kernels take; that the real kernels compile is proven by the install and
``test_installed_module_is_found_when_installed``."""
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from ke_fast.kernels import backend

ROOT = Path(__file__).resolve().parents[1]
# a first use that never finds the module built at install, so it builds in TORCH_EXTENSIONS_DIR
FIRST_USE = ("import sys; from ke_fast.kernels import backend; backend._installed = lambda: None\n"
             "if len(sys.argv) > 1: backend.SOURCE = backend.Path(sys.argv[1])  # the tiny stand-in\n"
             "ext = backend.cpu_extension()\n"
             "ok = ext is not None and ext.wels_bits is not None\n"
             "print('LOADED' if ok else 'FAILED', backend.cpu_extension_error())\n")


@pytest.fixture
def fresh_backend(monkeypatch, tmp_path):
    """backend.cpu_extension() as in a new process, building (if it builds) under tmp_path."""
    monkeypatch.setattr(backend, "_ext", None)
    monkeypatch.setattr(backend, "_ext_error", None)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    return tmp_path / "ext" / f"ke_fast_cpu_{backend._build_tag(backend.SOURCE)}"


@pytest.fixture
def fake_load(monkeypatch):
    """torch's load() replaced: records the build directory and whether torch's lock existed when called."""
    calls = []

    def load(name, sources, extra_cflags, extra_ldflags, build_directory, verbose):
        calls.append({"name": name, "dir": Path(build_directory),
                      "lock_present": (Path(build_directory) / "lock").exists()})
        return types.SimpleNamespace(wels_bits=lambda *a: None)

    import torch.utils.cpp_extension as cpp

    monkeypatch.setattr(cpp, "load", load)
    return calls


def test_module_built_at_install_is_preferred(monkeypatch, fresh_backend):
    fake = types.ModuleType(f"ke_fast.kernels.{backend.INSTALLED_PREFIX}{backend.install_tag()}")
    monkeypatch.setitem(sys.modules, fake.__name__, fake)

    def no_build():
        raise AssertionError("built although the installed module matches")

    monkeypatch.setattr(backend, "_build_at_first_use", no_build)
    assert backend.cpu_extension() is fake


def test_install_tag_follows_source_and_cpu(tmp_path, monkeypatch):
    """Another source or another CPU gives another module name: a stale or foreign build is never loaded."""
    a = tmp_path / "k.cpp"
    a.write_text("int f() { return 1; }\n")
    before = backend.install_tag(a)
    assert backend.install_tag(a) == before
    copy = tmp_path / "other" / "k.cpp"  # the install tag ignores the path (a wheel is built elsewhere)
    copy.parent.mkdir()
    copy.write_text(a.read_text())
    assert backend.install_tag(copy) == before
    monkeypatch.setattr(backend, "_cpu_info", lambda: "another cpu")
    assert backend.install_tag(a) != before


def test_installed_module_is_found_when_installed():
    """After `make install` / `pip install --no-build-isolation -e .` the compiled module is the one loaded."""
    name = f"{backend.INSTALLED_PREFIX}{backend.install_tag()}"
    if not list(Path(backend.__file__).parent.glob(f"{name}.*")):
        pytest.skip(f"ke_fast was not installed with its compiled C++ kernels here (no kernels/{name}.*): "
                    f"`make install` builds them")
    ext = backend._installed()
    assert ext is not None and ext.__name__ == f"ke_fast.kernels.{name}"
    assert callable(ext.wels_bits) and callable(ext.apply_mask)


def test_first_use_build_says_so_in_one_line(fresh_backend, fake_load, monkeypatch, capsys):
    monkeypatch.setattr(backend, "_installed", lambda: None)
    assert backend.cpu_extension() is not None
    err = capsys.readouterr().err
    assert err.count("ke_fast: building the C++ CPU kernels") == 1 and str(fresh_backend) in err
    assert fake_load == [{"name": fresh_backend.name, "dir": fresh_backend, "lock_present": False}]


def test_stale_lock_is_removed_with_one_warning(fresh_backend, fake_load, monkeypatch):
    monkeypatch.setattr(backend, "_installed", lambda: None)
    fresh_backend.mkdir(parents=True)
    (fresh_backend / "lock").touch()  # what a killed build leaves: torch's 0-byte lock, no live holder
    with pytest.warns(RuntimeWarning, match="removed the build lock .* left by a killed build") as record:
        assert backend.cpu_extension() is not None
    assert len([w for w in record if "build lock" in str(w.message)]) == 1
    assert fake_load[0]["lock_present"] is False  # gone before torch's loader looked


@pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX; Windows judges the lock by its age")
def test_live_build_is_waited_for_not_removed(fresh_backend, fake_load, monkeypatch, capsys):
    """Another process holds the build lock (a live build): wait for it, say so, and leave its torch lock."""
    monkeypatch.setattr(backend, "_installed", lambda: None)
    fresh_backend.mkdir(parents=True)
    ready, go = fresh_backend.parent / "ready", fresh_backend.parent / "go"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time, pathlib\n"
        f"d = pathlib.Path({str(fresh_backend)!r})\n"
        "f = open(d / 'ke_fast.flock', 'a+'); fcntl.flock(f, fcntl.LOCK_EX); f.write('pid holder'); f.flush()\n"
        "(d / 'lock').touch()\n"
        f"pathlib.Path({str(ready)!r}).touch()\n"
        # released when this test starts to wait (an event, not a sleep that a slow test could outlast); the
        # 600 s bound is reached only by a build that never waits, which the asserts below then report
        f"go, t = pathlib.Path({str(go)!r}), time.monotonic()\n"
        "while not go.exists() and time.monotonic() < t + 600: time.sleep(0.01)\n"
        "(d / 'lock').unlink(); fcntl.flock(f, fcntl.LOCK_UN)\n")])
    import fcntl

    real_flock = fcntl.flock

    def flock(fd, op):  # the blocking acquire is the wait: let the holder finish now
        if op == fcntl.LOCK_EX:
            go.touch()
        return real_flock(fd, op)

    try:
        while not ready.exists():  # the holder's own exit is the other event: no wall-clock deadline needed
            assert holder.poll() is None, "the lock holder ended before taking the lock"
            time.sleep(0.05)
        monkeypatch.setattr(fcntl, "flock", flock)
        assert backend.cpu_extension() is not None
        assert go.exists(), "the build did not wait for the live holder"
    finally:
        go.touch()
        holder.wait(timeout=600)  # it ends as soon as it sees `go`; generous for a loaded machine
    assert "waiting for another process (pid holder)" in capsys.readouterr().err
    assert fake_load[0]["lock_present"] is False  # the holder released it; nothing was removed as stale


# the stand-in for kernels/csrc/ke_fast_cpu.cpp: one function named like the real module's, no torch headers
TINY_SOURCE = """#include <pybind11/pybind11.h>
static int wels_bits(int x) { return x; }
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("wels_bits", &wels_bits); }
"""


def test_killed_first_use_then_second_use_completes(tmp_path):
    """The bug this guards against: a first use killed mid-build left torch's lock, and every later use waited
    forever with no output. Here the first use is killed (with its compiler) once torch's lock exists; the
    second use removes the lock with one warning, says it builds, and loads the (stand-in) kernels."""
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), PYTHONWARNINGS="default")
    source = tmp_path / "tiny.cpp"
    source.write_text(TINY_SOURCE)
    first = subprocess.Popen([sys.executable, "-c", FIRST_USE, str(source)], env=env, cwd=ROOT,
                             start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # the events: torch's lock appears, or the first use ends (a failure); the bound only catches a hang
        # (idle: seconds; importing torch on a busy 2-core machine can take minutes)
        deadline = time.monotonic() + 1200
        while not list((tmp_path / "ext").glob("*/lock")):
            assert first.poll() is None, f"the first use ended before building: {first.communicate()}"
            assert time.monotonic() < deadline, "the first use never started its build"
            time.sleep(0.05)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the process and its ninja / compiler: mid-build
        first.communicate()
    (lock,) = (tmp_path / "ext").glob("*/lock")
    assert not list(lock.parent.glob("ke_fast_cpu_*.so"))
    second = subprocess.run([sys.executable, "-c", FIRST_USE, str(source)], env=env, cwd=ROOT, capture_output=True,
                            text=True, timeout=1200)  # one small compile: seconds idle, more on a loaded machine
    assert second.returncode == 0 and second.stdout.startswith("LOADED"), second.stdout + second.stderr
    assert second.stderr.count("removed the build lock") == 1, second.stderr
    assert second.stderr.count("ke_fast: building the C++ CPU kernels") == 1, second.stderr
    assert not lock.exists() and list(lock.parent.glob("ke_fast_cpu_*.so"))
