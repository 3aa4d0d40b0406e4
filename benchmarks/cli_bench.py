"""Whole-process wall times of the command line: what a user waits for, imports and start-up included.

Each case runs its contenders as fresh processes, interleaved (A B A B ...: one round = every contender once,
in the listed order), ``--repeats`` rounds after ``--warmups`` warm-up rounds at tiny sizes (they fill the
page cache, build the C++ extension and Triton's caches; their times are kept but not counted). Per
contender: min / median / max wall seconds (and the children's CPU seconds); for a paired case the ratio
baseline / ke_fast of each round and their min / median / max (> 1: ke_fast is faster).

Cases:

* ``demo``: the README's demo as a user runs it, ``python -m ke_fast run --no-progress`` with every default
  (digits 20 per class, ResNet-18 width 16, KELS 0.5, 8 generations x 30 epochs), paired with
  ``benchmarks/official_loop.py`` doing the same work (same data, model, masks, schedule, sizes). The README
  quotes this case's ke_fast median and its accuracy per generation (recorded from the last round's
  summary.json), and the ratio to the official loop.
* ``study``: ``python -m ke_fast run --seeds 0 1 2 --baseline long --no-progress`` (the README's 3-seed study:
  six runs of the demo's size); the file keeps the study's results.md.
* ``cpu-run``: issue 19's CPU target, ``python -m ke_fast run --generations 3 --epochs 5`` against the official
  loop with ``--generations 3 --epochs 5``; ``cpu-run-no-plot``: the same with ``--no-plot`` (the official loop
  draws no plot: the same work);
* ``metric`` (only with ``--case metric``): ``python -m ke_fast run --task metric``, the README's metric run.

Each case writes ``benchmarks/results/cli-<case>-<machine>-<date>-<commit>.json`` (with the ledger: commit,
clean tree, machine, command); ``python benchmarks/report.py FILE`` renders it. ``--quick`` is a smoke run
(1 round, no warm-up, tiny sizes) written to a temporary folder unless ``--out-dir`` is given: never a
measurement. A machine shared with other jobs gives figures that say more about the load than the code: the
ledger records the load average before every process.

    python benchmarks/cli_bench.py                      # every case (make bench-cli)
    python benchmarks/cli_bench.py --case cpu-run --repeats 7
    python benchmarks/cli_bench.py --quick --dry-run    # print the commands only
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ledger  # noqa: E402

REPO = ledger.REPO
OFFICIAL = "benchmarks/official_loop.py"
TINY = ["--generations", "1", "--epochs", "1", "--per-class", "2", "--width", "4"]  # warm-up and --quick sizes
KE_RUN = ["-m", "ke_fast", "run", "--no-progress", "--overwrite", "--out", "{out}"]


@dataclasses.dataclass
class Contender:
    """One command of a case: ``python <argv>``, ``{out}`` standing for a fresh output folder per process."""

    name: str
    argv: list[str]
    warmup_argv: list[str]


@dataclasses.dataclass
class Case:
    name: str
    description: str
    contenders: list[Contender]
    repeats: int
    ratio: tuple[str, str] | None = None  # (baseline, ke_fast): the ratio is baseline wall / ke_fast wall


def cases(quick: bool = False) -> dict[str, Case]:
    """The cases; ``quick``: tiny sizes everywhere (a smoke run of the machinery)."""

    def ke(*sizes: str, extra: tuple[str, ...] = (), warm_extra: tuple[str, ...] = ()) -> Contender:
        return Contender("ke_fast", [*KE_RUN, *extra, *(TINY if quick else sizes)], [*KE_RUN, *warm_extra, *TINY])

    def official(*sizes: str) -> Contender:
        return Contender("official", [OFFICIAL, "--out", "{out}", *(TINY if quick else sizes)],
                         [OFFICIAL, "--out", "{out}", *TINY])

    return {
        "demo": Case("demo", "python -m ke_fast run with its defaults (digits 20 per class, ResNet-18 w16, KELS 0.5, "
                             "8 generations x 30 epochs) and the official-algorithm loop doing the same work",
                     [ke(), official("--generations", "8", "--epochs", "30")], 3, ("official", "ke_fast")),
        "study": Case("study", "python -m ke_fast run --seeds 0 1 2 --baseline long (six runs of the demo's size)",
                      [ke(extra=("--seeds", "0", "1", "2", "--baseline", "long"),
                          warm_extra=("--seeds", "0", "--baseline", "long"))], 2),
        "cpu-run": Case("cpu-run", "issue 19's CPU whole run: 3 generations x 5 epochs, ke_fast run against the "
                                   "official-algorithm loop, fresh processes",
                        [ke("--generations", "3", "--epochs", "5"), official("--generations", "3", "--epochs", "5")],
                        5, ("official", "ke_fast")),
        "cpu-run-no-plot": Case("cpu-run-no-plot", "cpu-run with ke_fast's --no-plot: the same work as the official "
                                                   "loop, which draws no plot.png",
                                [ke("--generations", "3", "--epochs", "5", extra=("--no-plot",)),
                                 official("--generations", "3", "--epochs", "5")], 5, ("official", "ke_fast")),
        "metric": Case("metric", "python -m ke_fast run --task metric with its defaults (README's metric run; "
                                 "not in the default set: minutes per round)",
                       [ke(extra=("--task", "metric"), warm_extra=("--task", "metric"))], 1),
    }


DEFAULT_CASES = ("demo", "study", "cpu-run", "cpu-run-no-plot")


def command(argv: list[str]) -> str:
    """The command line as a user types it, OUT standing for the per-process output folder."""
    return "python " + shlex.join(argv).replace("'{out}'", "OUT")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_once(argv: list[str], out: Path, python: str = sys.executable) -> dict[str, Any]:
    """One process: wall and CPU seconds, exit code, load average before it; raises if it fails."""
    cmd = [python, *[a.replace("{out}", str(out)) for a in argv]]
    load = ledger.load_average()
    cpu0 = _children_cpu()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return {"wall_s": wall, "cpu_s": _children_cpu() - cpu0, "load_before": load}


def _outputs(out: Path) -> dict[str, Any]:
    """What the run wrote that a reader wants: its history (generation, dense_*, fit_*) and a study's table."""
    found: dict[str, Any] = {}
    summary = out / "summary.json"
    if summary.is_file():
        data = json.loads(summary.read_text())
        history = data.get("history")
        if isinstance(history, list) and history and isinstance(history[0], dict):
            found["history"] = [{k: v for k, v in row.items() if k == "generation" or k.startswith(("dense_", "fit_"))}
                                for row in history]
    results_md = out / "results.md"
    if results_md.is_file():
        found["results_md"] = results_md.read_text()
    return found


def _stats(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def run_case(case: Case, repeats: int, warmups: int, workdir: Path, python: str = sys.executable,
             log=print) -> dict[str, Any]:
    """Run a case (warm-up rounds, then interleaved rounds); the case's entry of a results file."""
    runs: dict[str, list[dict]] = {c.name: [] for c in case.contenders}
    warm: dict[str, list[dict]] = {c.name: [] for c in case.contenders}
    outputs: dict[str, dict] = {}
    order = []
    for r in range(warmups + repeats):
        for c in case.contenders:
            out = workdir / f"{case.name}-{c.name}-{r}"
            argv = c.warmup_argv if r < warmups else c.argv
            result = run_once(argv, out, python)
            (warm if r < warmups else runs)[c.name].append(result)
            if r >= warmups:
                order.append(c.name)
                outputs[c.name] = _outputs(out)  # the last round's
            log(f"{case.name}: {c.name} {'warm-up' if r < warmups else f'round {r - warmups + 1}/{repeats}'} "
                f"{result['wall_s']:.2f} s")
    contenders = []
    for c in case.contenders:
        walls = [x["wall_s"] for x in runs[c.name]]
        history = outputs[c.name].get("history") or []
        final = history[-1] if history else {}
        contenders.append({
            "name": c.name, "command": command(c.argv), "runs": runs[c.name], "warmups": warm[c.name],
            **{f"{k}_s": v for k, v in _stats(walls).items()},
            "final": {"dense": final.get("dense_acc"), "fit": final.get("fit_acc")} if final else {},
            "history": history,
        })
    entry: dict[str, Any] = {"description": case.description, "repeats": repeats, "warmups": warmups,
                             "order": order, "contenders": contenders}
    ke = outputs.get("ke_fast", {})
    if ke.get("history"):
        entry["history"] = ke["history"]
    if ke.get("results_md"):
        entry["results_md"] = ke["results_md"]
    if case.ratio:
        base, this = case.ratio
        pairs = [b["wall_s"] / t["wall_s"] for b, t in zip(runs[base], runs[this])]
        entry["ratio"] = {"what": f"{base} wall / {this} wall, round by round (> 1: {this} is faster)",
                          "pairs": pairs, **_stats(pairs)}
    return entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Whole-process CLI wall times, paired and repeated "
                                                 "(results under benchmarks/results/)")
    parser.add_argument("--case", nargs="+", choices=list(cases()), default=list(DEFAULT_CASES),
                        help=f"default: {' '.join(DEFAULT_CASES)}")
    parser.add_argument("--repeats", type=int, help="rounds per case (default: demo 3, study 2, cpu-run and "
                                                    "cpu-run-no-plot 5, metric 1; --quick 1)")
    parser.add_argument("--warmups", type=int, help="warm-up rounds at tiny sizes (default 1; --quick 0)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, 1 round, no warm-up")
    parser.add_argument("--out-dir", type=Path, help="where the results files go (default: benchmarks/results/; "
                                                      "--quick: a temporary folder)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    args = parser.parse_args(argv)
    for name in ("repeats", "warmups"):
        v = getattr(args, name)
        if v is not None and v < (1 if name == "repeats" else 0):
            parser.error(f"--{name} must be >= {1 if name == 'repeats' else 0}, got {v}")
    chosen = [cases(args.quick)[name] for name in args.case]
    warmups = args.warmups if args.warmups is not None else (0 if args.quick else 1)
    if args.dry_run:
        for case in chosen:
            repeats = args.repeats or (1 if args.quick else case.repeats)
            print(f"{case.name}: {warmups} warm-up + {repeats} rounds of: "
                  + " | ".join(f"{c.name}: {command(c.argv)}" for c in case.contenders))
        return 0
    out_dir = args.out_dir or (Path(tempfile.gettempdir()) / "ke_fast-cli-bench" if args.quick else ledger.RESULTS)
    stamp = ledger.stamp()
    for case in chosen:
        repeats = args.repeats or (1 if args.quick else case.repeats)
        with tempfile.TemporaryDirectory(prefix="ke_fast-cli-") as tmp:
            entry = run_case(case, repeats, warmups, Path(tmp))
        data = {"kind": "cli", "quick": args.quick, "ledger": dict(stamp, load_average_end=ledger.load_average()),
                "cases": {case.name: entry}}
        path = out_dir / ledger.results_path(f"cli-{case.name}-", stamp).name
        ledger.write_json(path, data)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
