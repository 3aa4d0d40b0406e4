"""pytest-benchmark set-up shared by the benchmark files: every JSON they write carries the ledger.

The ledger section (``benchmarks/ledger.py``: true commit of this repository, clean-tree flag, machine,
command) is taken when the session starts, before anything is measured, and added to the JSON that
``--benchmark-json`` writes; pytest-benchmark's own ``commit_info`` is corrected to the same commit (it reads
the git state of the working directory, which need not be this repository). ``make bench`` picks the path.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ledger  # noqa: E402

_STAMP: dict = {}


def pytest_configure(config) -> None:
    args = " ".join(str(a) for a in config.invocation_params.args)
    _STAMP.update(ledger.stamp(argv=f"python -m pytest {args}".strip()))


def pytest_benchmark_update_commit_info(config, commit_info) -> None:
    commit_info["id"] = _STAMP.get("commit")
    commit_info["dirty"] = not _STAMP.get("clean")
    commit_info["project"] = "ke_fast"


def pytest_benchmark_update_json(config, benchmarks, output_json) -> None:
    stamp = dict(_STAMP)
    names = ledger.gpus()  # torch is imported by now: its view of the GPUs, where nvidia-smi may be absent
    stamp["machine"] = dict(stamp["machine"], gpu=names[0] if names else None, gpu_count=len(names))
    stamp["load_average_end"] = ledger.load_average()
    output_json["ledger"] = stamp
