"""The results ledger: where a results file goes and what it records about how it was made.

Every file under ``benchmarks/results/`` carries a ``ledger`` section (written by :func:`stamp`):

* ``commit``: ``git rev-parse HEAD`` of this repository when the measurement started;
* ``clean``: True when ``git status --porcelain`` listed nothing outside ``benchmarks/results/`` (results
  written earlier in the same session are outputs, not code) — ``dirty_paths`` names what was not clean;
* ``machine``: CPU model, cores, memory, GPU name(s) or None, torch / triton / Python versions, load average;
* ``command``: the command that wrote the file (``KE_FAST_LEDGER_COMMAND`` when a Makefile target sets it,
  e.g. ``make bench``) and ``argv``, the process's own command line;
* ``date``: UTC, ISO 8601.

File names: ``<prefix><machine>-<date>-<short commit>[-dirty].json``, machine = a GPU's name (``h200``,
``h100-80gb-hbm3``) or ``cpu-<cores>core``. This module imports neither torch nor ke_fast (the CLI
benchmark's parent process and ``gpu_report.py``'s plan stay light); :func:`machine` reads the versions
from the installed packages and the GPU from torch only when torch is already imported, else nvidia-smi.

    python benchmarks/ledger.py path [--prefix cli-demo-]    # the path a results file of this run gets
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SCHEMA = 1
COMMAND_ENV = "KE_FAST_LEDGER_COMMAND"
REQUIRED = ("commit", "clean", "machine", "command")  # what a figure-bearing file must state
MACHINE_KEYS = ("cpu", "cores", "gpu", "torch", "triton")


def _git(*args: str, repo: Path = REPO) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def commit(repo: Path = REPO) -> str | None:
    """The full hash of HEAD, or None outside a git checkout."""
    out = _git("rev-parse", "HEAD", repo=repo)
    return out.strip() if out else None


def dirty_paths(repo: Path = REPO) -> list[str] | None:
    """Paths ``git status --porcelain`` lists, except those under benchmarks/results/ (None: not a checkout)."""
    out = _git("status", "--porcelain", "--untracked-files=all", repo=repo)
    if out is None:
        return None
    paths = []
    for line in out.splitlines():
        path = line[3:].split(" -> ")[-1].strip('"')
        if not path.startswith("benchmarks/results/"):
            paths.append(path)
    return paths


def is_commit(sha: str, repo: Path = REPO) -> bool:
    """True when ``sha`` names a commit of this repository."""
    return bool(sha) and _git("cat-file", "-e", f"{sha}^{{commit}}", repo=repo) is not None


def _version(package: str) -> str | None:
    mod = sys.modules.get(package)
    if mod is not None and getattr(mod, "__version__", None):
        return str(mod.__version__)
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def gpus() -> list[str]:
    """Names of the visible GPUs: from torch when it is already imported, else nvidia-smi; [] if none."""
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_available():
                return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            return []
        except Exception:  # a broken driver: fall through to nvidia-smi
            pass
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def load_average() -> list[float] | None:
    """The 1 / 5 / 15-minute load averages (a shared machine's figures are only as good as its load)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    names = gpus()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "memory_gb": _memory_gb(),
        "gpu": names[0] if names else None,
        "gpu_count": len(names),
        "torch": _version("torch"),
        "triton": _version("triton"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average": load_average(),
    }


def machine_slug(info: dict[str, Any]) -> str:
    """``h200`` / ``h100-80gb-hbm3`` for a GPU host, ``cpu-<cores>core`` otherwise."""
    if info.get("gpu"):
        name = re.sub(r"^nvidia\s+", "", info["gpu"].strip().lower())
        return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "gpu"
    return f"cpu-{info.get('cores') or 0}core"


def command_line(argv: list[str] | None = None) -> str:
    """This process's command line, ``python`` standing for the interpreter."""
    argv = list(sys.argv if argv is None else argv)
    if argv and argv[0].endswith(("pytest/__main__.py", "pytest")):
        argv = ["-m", "pytest", *argv[1:]]
    return " ".join(["python", *map(shlex.quote, argv)])


def stamp(argv: str | None = None) -> dict[str, Any]:
    """The ``ledger`` section of a results file, taken now (call it before measuring)."""
    dirty = dirty_paths()
    argv = argv or command_line()
    return {
        "schema": SCHEMA,
        "commit": commit(),
        "clean": None if dirty is None else not dirty,
        "dirty_paths": (dirty or [])[:30],
        "machine": machine(),
        "command": os.environ.get(COMMAND_ENV) or argv,
        "argv": argv,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "env": {k: v for k, v in sorted(os.environ.items())
                if k.startswith(("KE_FAST_", "TRITON_", "OMP_", "MKL_", "CUDA_VISIBLE"))},
    }


def results_path(prefix: str = "", ledger: dict[str, Any] | None = None, suffix: str = ".json") -> Path:
    """``benchmarks/results/<prefix><machine>-<date>-<short commit>[-dirty]<suffix>`` for a stamp."""
    ledger = ledger or stamp()
    date = (ledger.get("date") or _dt.date.today().isoformat())[:10]
    short = (ledger.get("commit") or "nocommit")[:7]
    dirty = "" if ledger.get("clean") else "-dirty"
    return RESULTS / f"{prefix}{machine_slug(ledger['machine'])}-{date}-{short}{dirty}{suffix}"


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` atomically (a temporary file, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


def problems(ledger: Any, *, quoted: bool = False) -> list[str]:
    """What a results file's ``ledger`` section lacks. ``quoted``: the file backs a figure in the docs, so its
    commit must be a commit of this repository, measured on a clean tree, with the command recorded."""
    if not isinstance(ledger, dict):
        return ["no 'ledger' section (commit, clean, machine, command)"]
    out = [f"ledger lacks {key!r}" for key in REQUIRED if key not in ledger]
    machine_info = ledger.get("machine")
    if not isinstance(machine_info, dict):
        out.append("ledger.machine is not a dict")
    else:
        out += [f"ledger.machine lacks {key!r}" for key in MACHINE_KEYS if key not in machine_info]
    if quoted:
        if not (isinstance(ledger.get("commit"), str) and is_commit(ledger["commit"])):
            out.append(f"ledger.commit {ledger.get('commit')!r} is not a commit of this repository")
        if ledger.get("clean") is not True:
            out.append("measured on a tree with uncommitted changes (ledger.clean is not true)")
        if not ledger.get("command"):
            out.append("no command recorded")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("path", help="print the results path for this machine, date and commit")
    p.add_argument("--prefix", default="", help="file name prefix, e.g. 'cli-demo-'")
    p.add_argument("--suffix", default=".json")
    args = parser.parse_args(argv)
    print(results_path(args.prefix, suffix=args.suffix).relative_to(REPO))
    return 0


if __name__ == "__main__":
    sys.exit(main())
