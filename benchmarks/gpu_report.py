"""One command for a GPU host: the CUDA tests, the paper-scale whole run and the kernel benchmarks.

    make gpu-report                     # or: python benchmarks/gpu_report.py
    python benchmarks/gpu_report.py --plan    # print what it would run, on any host

Run it first whenever a GPU is lent. Within ``--budget`` seconds (default 570: under 10 minutes on one
H100 / H200) it runs, each part in its own processes under its own time limit (a part that runs out of
time is killed with its process group and reported as timed out; the next part still runs):

1. the paper-scale whole run (issue 19): ResNet-18 with the ImageNet stem, 102 classes, 1,020 generated
   3x224x224 training images and as many test images (uint8 tensors in memory, learnable: a colour and a
   stripe frequency per class, plus noise; ``official_loop.synthetic_images``), batch 32, KELS 0.5,
   3 generations x 4 epochs (1 warm-up epoch), the training recipe's random-resized crop + flip on both sides.
   Contenders, one fresh process each, timed from building the model to the end of the last generation after
   an untimed warm-up of the same kernels:

   * ``official``: ``benchmarks/official_loop.py``'s loop (fp32, rebuild + reload each generation, per-layer
     reset, a host DataLoader whose workers crop and flip each image);
   * ``ke_fast``: ``Evolution`` with its defaults (data on the device, the augmentation there);
   * ``ke_fast-graphs``: ``graphs=True``: each training step one CUDA graph replay, batch making included, and
     the evaluation graphed (``ke_fast.step``);
   * ``ke_fast-graphs-off``: ``graphs=False`` (an ``Evolution`` keyword or a ``Config`` field, whichever exists;
     skipped, with a note, where neither does);
   * ``ke_fast-compile-default``: ``compile=True`` (``torch.compile``'s default mode; ``graphs=False`` too
     where that keyword exists, so the row measures the compiler alone);
   * ``ke_fast-compile-reduce-overhead``: ``compile="reduce-overhead"`` (the compiler's own CUDA graphs of the
     forward and backward; the alternative to ``graphs``: whichever is faster becomes the CUDA default).

   Per contender: wall seconds, speed-up over ``official`` (its wall / this wall), where the time went
   (train / eval / checkpoint / reset: ``Evolution.timings`` and the official loop's own split), and the
   final dense and fit accuracy with the history per generation.
2. the tests: ``pytest tests`` with every test on the CUDA device where it has one (the files that mention
   CUDA first, ``-n`` up to 8 workers); counts and the failing tests' names.
3. the kernel benchmarks ``benchmarks/test_bench_{reinit,masked,sparse}.py`` (``--benchmark-only``), each
   into its own pytest-benchmark JSON with the ledger.

It writes ``benchmarks/results/<gpu>-<date>-<commit>.json`` (``"kind": "gpu-report"``, with the ledger:
commit, clean tree, machine, command) and ``.md`` (``report.py``'s tables of it and of the kernel files),
and ``...-bench-<file>.json`` per kernel file. On a host without a GPU it prints the plan and exits 0.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ledger  # noqa: E402

REPO = ledger.REPO
BUDGET_S = 570.0
PAPER = dict(classes=102, images=1020, size=224, generations=3, epochs=4, warmup_epochs=1, batch_size=32,
             split_rate=0.5, seed=0, width=64, workers=8)
# --smoke: the same code path at toy sizes on whatever device there is (tests/test_ledger.py runs it on CPU)
SMOKE = dict(PAPER, classes=4, images=24, size=32, generations=2, epochs=1, batch_size=8, width=4, workers=0)
# (name, Evolution keywords, seconds allowed); "official" runs benchmarks/official_loop.py's loop
# ke_fast runs take ~5-20 s of training at this size by the H100 step times of issue 19 (11.6 ms eager, 3.6-3.9
# ms graphed, 384 steps) plus evaluation and start-up; the compiled ones add the compiler's minute
CONTENDERS = (("official", None, 120), ("ke_fast", {}, 60), ("ke_fast-graphs", {"graphs": True}, 60),
              ("ke_fast-graphs-off", {"graphs": False}, 60),
              ("ke_fast-compile-default", {"compile": True, "graphs": False}, 120),
              ("ke_fast-compile-reduce-overhead", {"compile": "reduce-overhead", "graphs": False}, 120))
TESTS_S = 150
KERNEL_FILES = (("reinit", 60), ("masked", 90), ("sparse", 180))
MIN_PART_S = 20  # a part with less time left than this is skipped, not started
STATUS = re.compile(r"\b(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")
NODE = re.compile(r"(tests/\S+?\.py::\S+)")


# ------------------------------------------------------------------------------------------------ the plan
def _test_files() -> list[str]:
    """Test files, those that mention CUDA first (they run first if time runs short)."""
    files = sorted((REPO / "tests").glob("test_*.py"))
    cuda = [f for f in files if "cuda" in f.read_text(errors="ignore").lower()]
    return [str(f.relative_to(REPO)) for f in cuda + [f for f in files if f not in cuda]]


def missing_modules() -> list[str]:
    """Packages the parts need that this environment lacks (each part would fail on its own without them)."""
    from importlib.util import find_spec

    needs = {"xdist": "pytest-xdist (tests in parallel)", "pytest_benchmark": "pytest-benchmark (kernel benchmarks)",
             "matplotlib": "matplotlib (ke_fast plots each run)", "pytest": "pytest"}
    return [what for module, what in needs.items() if find_spec(module) is None]


def tests_command() -> list[str]:
    from importlib.util import find_spec

    workers = max(1, min(8, os.cpu_count() or 1))
    parallel = ["-n", str(workers)] if find_spec("xdist") is not None else []
    return [sys.executable, "-m", "pytest", *_test_files(), "-v", "-p", "no:cacheprovider", *parallel, "-rfE"]


def bench_command(name: str, json_path: Path) -> list[str]:
    return [sys.executable, "-m", "pytest", f"benchmarks/test_bench_{name}.py", "--benchmark-only", "-q",
            "-p", "no:cacheprovider", f"--benchmark-json={json_path}"]


def worker_command(name: str, result: Path) -> list[str]:
    return [sys.executable, "benchmarks/gpu_report.py", "--worker", name, "--result", str(result)]


def plan(budget: float) -> str:
    short = lambda cmd: " ".join(Path(cmd[0]).name if i == 0 else a for i, a in enumerate(cmd))  # noqa: E731
    lines = [f"make gpu-report: within {budget:.0f} s on one GPU, in this order (each part killed at its limit):",
             "1. paper-scale whole run (ResNet-18 ImageNet stem, 102 classes, 1,020 + 1,020 generated 224^2 images, "
             "batch 32, KELS 0.5, 3 generations x 4 epochs), one fresh process per contender:"]
    for name, kwargs, seconds in CONTENDERS:
        what = "benchmarks/official_loop.py's loop" if kwargs is None else f"Evolution(**{kwargs})"
        lines.append(f"   - {name}: {what}, at most {seconds} s: {short(worker_command(name, Path('RESULT.json')))}")
    lines.append(f"2. tests, at most {TESTS_S} s: {short(tests_command())}")
    lines.append("3. kernel benchmarks:")
    for name, seconds in KERNEL_FILES:
        lines.append(f"   - at most {seconds} s: {short(bench_command(name, Path(f'<gpu>-<date>-<commit>-bench-{name}.json')))}")
    lines.append("writes benchmarks/results/<gpu>-<date>-<commit>.json and .md (and the -bench-*.json files)")
    missing = missing_modules()
    if missing:
        lines.append("missing here (install them first): " + ", ".join(missing))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ running parts
def run_limited(cmd: list[str], timeout: float, log_path: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd`` in its own process group with output to ``log_path``; kill the whole group at ``timeout``."""
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
    output = log_path.read_text(errors="replace")
    return {"rc": proc.returncode, "timed_out": timed_out, "seconds": time.perf_counter() - t0, "output": output}


def parse_tests(output: str) -> dict[str, Any]:
    """Counts per outcome and the failed / errored node ids from ``pytest -v`` output (partial output too)."""
    counts: dict[str, int] = {}
    failed: list[str] = []
    seen = set()
    for line in output.splitlines():
        status, node = STATUS.search(line), NODE.search(line)
        if not (status and node) or line.startswith(("FAILED ", "ERROR ")):  # -rfE summary lines repeat them
            continue
        key = (node.group(1), status.group(1))
        if key in seen:
            continue
        seen.add(key)
        counts[status.group(1).lower()] = counts.get(status.group(1).lower(), 0) + 1
        if status.group(1) in ("FAILED", "ERROR"):
            failed.append(node.group(1))
    return {"counts": counts, "failed": failed}


class Clock:
    """The report's time budget: what a part may still use."""

    def __init__(self, budget: float) -> None:
        self.end = time.perf_counter() + budget

    def allow(self, wanted: float) -> float:
        return min(wanted, self.end - time.perf_counter() - 5)


def _env() -> dict[str, str]:
    env = dict(os.environ, KE_FAST_LEDGER_COMMAND=os.environ.get(ledger.COMMAND_ENV) or "make gpu-report")
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("TRITON_INTERPRET", None)
    return env


def whole_run(clock: Clock, tmp: Path, log=print) -> dict[str, Any]:
    rows = []
    for name, kwargs, seconds in CONTENDERS:
        allowed = clock.allow(seconds)
        if allowed < MIN_PART_S:
            rows.append({"name": name, "note": "skipped: the report's time budget ran out"})
            continue
        result = tmp / f"whole-{len(rows)}.json"
        out = run_limited(worker_command(name, result), allowed, tmp / f"whole-{len(rows)}.log", _env())
        if result.is_file():
            row = json.loads(result.read_text())
        else:
            why = f"timed out after {allowed:.0f} s" if out["timed_out"] else f"failed (exit {out['rc']})"
            row = {"name": name, "note": why, "output_tail": out["output"][-3000:]}
        row["process_s"] = out["seconds"]
        rows.append(row)
        log(f"whole run: {name}: " + (f"{row['wall_s']:.1f} s" if row.get("wall_s") else row.get("note", "")))
    base = next((r.get("wall_s") for r in rows if r["name"] == "official"), None)
    for row in rows:
        if base and row.get("wall_s"):
            row["speed_up"] = base / row["wall_s"]
    return {"description": "ResNet-18 ImageNet stem, 102 classes, {images} generated 3x{size}x{size} training and as "
                           "many test images, batch {batch_size}, KELS {split_rate}, {generations} generations x "
                           "{epochs} epochs ({warmup_epochs} warm-up); random-resized crop + flip on both sides; "
                           "fresh process per contender; speed-up = official wall / this wall".format(**PAPER),
            "config": PAPER, "contenders": rows}


def tests_part(clock: Clock, tmp: Path) -> dict[str, Any]:
    allowed = clock.allow(TESTS_S)
    cmd = tests_command()
    if allowed < MIN_PART_S:
        return {"command": " ".join(cmd[1:]), "note": "skipped: the report's time budget ran out"}
    out = run_limited(cmd, allowed, tmp / "tests.log", _env())
    return {"command": "python " + " ".join(cmd[1:]), "rc": out["rc"], "timed_out": out["timed_out"],
            "seconds": out["seconds"], **parse_tests(out["output"]), "output_tail": out["output"][-3000:]}


def kernel_part(clock: Clock, tmp: Path, out_dir: Path, stem: str) -> list[dict[str, Any]]:
    parts = []
    for name, seconds in KERNEL_FILES:
        allowed = clock.allow(seconds)
        path = out_dir / f"{stem}-bench-{name}.json"
        entry: dict[str, Any] = {"file": f"benchmarks/test_bench_{name}.py"}
        if allowed < MIN_PART_S:
            parts.append(dict(entry, status="skipped: the report's time budget ran out"))
            continue
        out = run_limited(bench_command(name, path), allowed, tmp / f"bench-{name}.log", _env())
        entry.update(seconds=out["seconds"], rc=out["rc"])
        if path.is_file():
            entry["results"] = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)
        else:
            entry["status"] = f"timed out after {allowed:.0f} s" if out["timed_out"] else f"failed (exit {out['rc']})"
            entry["output_tail"] = out["output"][-2000:]
        parts.append(entry)
    return parts


# ------------------------------------------------------------------------------------------------ one contender
def stored_side(size: int) -> int:
    """The side training images are kept at for the random-resized crop: ke_fast.data.stored_size's rule
    (tests/test_ledger.py checks they agree), computed here so the official process never imports ke_fast."""
    return round(size * 256 / 224)


def _paper_images(p: dict[str, Any]):
    import official_loop

    train_x, train_y = official_loop.synthetic_images(p["images"], p["classes"], stored_side(p["size"]), seed=1)
    test_x, test_y = official_loop.synthetic_images(p["images"], p["classes"], p["size"], seed=2)
    return train_x, train_y, test_x, test_y


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _warm_up(build, p: dict[str, Any], device, amp: bool, ke: bool) -> None:
    """Untimed: the CUDA context, cuDNN's algorithm choice, the optimizer's imports and, for ke_fast (``ke``), its
    kernels' compilation (Triton; the C++ extension on CPU). The official side never imports ke_fast."""
    import torch
    import torch.nn.functional as F

    net = build().to(device)
    if ke:
        import ke_fast

        ke_fast.split(net, "kels", p["split_rate"])
        ke_fast.reinit_(net, 1)
    x = torch.randn(p["batch_size"], 3, p["size"], p["size"], device=device)
    y = torch.randint(0, p["classes"], (p["batch_size"],), device=device)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)  # creating one imports torch._dynamo (seconds)
    for use_amp in {False, amp}:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            F.cross_entropy(net(x), y).backward()
        opt.step()
    with torch.no_grad():
        if ke:
            with ke_fast.fit_only(net):
                net(x)
        net.eval()(x)
    _sync(device)


def worker(name: str, result: Path, smoke: bool = False) -> int:
    """Run one contender of the whole-run case and write its row to ``result`` (``smoke``: toy sizes, any
    device: a check of the code path, not a measurement)."""
    import inspect

    import torch

    p = SMOKE if smoke else PAPER
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    wanted = dict(next(k for n, k, _ in CONTENDERS if n == name) or {})
    row: dict[str, Any] = {"name": name}
    kwargs: dict[str, Any] = {}  # Evolution's keywords
    options: dict[str, Any] = {}  # Config fields (where a switch lives in the Config rather than in Evolution)
    if name != "official":
        import dataclasses

        from ke_fast.evolve import Config, Evolution

        accepted = inspect.signature(Evolution.__init__).parameters
        fields = {f.name for f in dataclasses.fields(Config)}
        for key, value in wanted.items():
            if key in accepted:
                kwargs[key] = value
            elif key in fields:
                options[key] = value
        if "graphs" in wanted and "graphs" not in kwargs and "graphs" not in options:
            if "compile" not in wanted:
                row["note"] = "skipped: neither Evolution nor Config has a graphs switch at this commit"
                result.write_text(json.dumps(row))
                return 0
        if "compile" in wanted and "compile" not in kwargs and "compile" not in options:
            row["note"] = "skipped: neither Evolution nor Config has a compile switch at this commit"
            result.write_text(json.dumps(row))
            return 0
        row["kwargs"], row["config"] = kwargs, options
    train_x, train_y, test_x, test_y = _paper_images(p)
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if name == "official":
            import official_loop

            cfg = official_loop.OfficialConfig(
                generations=p["generations"], epochs=p["epochs"], batch_size=p["batch_size"],
                warmup_epochs=p["warmup_epochs"], split_rate=p["split_rate"], seed=p["seed"],
                workers=min(p["workers"], os.cpu_count() or 1))
            train = official_loop.HostAugmented(train_x, train_y, p["size"], True)
            test = official_loop.HostAugmented(test_x, test_y, p["size"], False)
            build = lambda: official_loop.ResNet18(p["classes"], 3, "imagenet", p["width"])  # noqa: E731
            _warm_up(build, p, device, amp=False, ke=False)
            t0 = time.perf_counter()
            history = official_loop.run(cfg, train, test, Path(tmp), device, build, timings)
            _sync(device)
            wall = time.perf_counter() - t0
        else:
            from ke_fast.data import ImageSet
            from ke_fast.models import resnet18

            train = ImageSet.from_tensors(train_x, train_y, p["size"], True)
            test = ImageSet.from_tensors(test_x, test_y, p["size"], False)
            cfg = Config(split="kels", split_rate=p["split_rate"], generations=p["generations"], epochs=p["epochs"],
                         batch_size=p["batch_size"], seed=p["seed"], warmup_epochs=p["warmup_epochs"], **options)
            build = lambda: resnet18(num_classes=p["classes"], width=p["width"])  # noqa: E731
            _warm_up(build, p, device, amp=device.type == "cuda", ke=True)
            t0 = time.perf_counter()
            evo = Evolution(build(), train, test, cfg, Path(tmp) / "run", device=device, progress=False,
                            log=lambda _: None, **kwargs)
            history = evo.run()
            _sync(device)
            wall = time.perf_counter() - t0
            timings = dict(evo.timings)
    final = history[-1]
    row.update(wall_s=wall, timings=timings, dense_acc=final.get("dense_acc"), fit_acc=final.get("fit_acc"),
               history=[{k: v for k, v in r.items() if k == "generation" or k.startswith(("dense_", "fit_"))}
                        for r in history], device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               smoke=smoke)
    result.write_text(json.dumps(row, default=float))
    return 0


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The GPU report (make gpu-report): CUDA tests, the paper-scale "
                                                 "whole run, the kernel benchmarks, within a time budget")
    parser.add_argument("--plan", action="store_true", help="print what it would run and exit 0")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help=f"seconds for all parts (default {BUDGET_S:.0f})")
    parser.add_argument("--out-dir", type=Path, default=ledger.RESULTS, help="default: benchmarks/results/")
    parser.add_argument("--worker", choices=[n for n, _, _ in CONTENDERS], help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        if args.result is None:
            parser.error("--worker needs --result")
        return worker(args.worker, args.result, args.smoke)
    if not args.budget > 0:
        parser.error(f"--budget must be > 0 seconds, got {args.budget}")
    if args.plan:
        print(plan(args.budget))
        return 0
    if not ledger.gpus():
        print("no GPU on this host (nvidia-smi lists none): nothing measured. On a GPU host it would run:\n")
        print(plan(args.budget))
        return 0
    import torch

    if not torch.cuda.is_available():
        print("nvidia-smi lists a GPU but torch.cuda.is_available() is False (a CPU-only torch?): fix the "
              "environment; nothing measured. The plan:\n" + plan(args.budget))
        return 2
    stamp = ledger.stamp()
    stamp["machine"] = ledger.machine()  # torch imported now: its view of the GPU
    clock = Clock(args.budget)
    path = args.out_dir / ledger.results_path("", stamp).name
    with tempfile.TemporaryDirectory(prefix="ke_fast-gpu-report-") as tmp_name:
        tmp = Path(tmp_name)
        report: dict[str, Any] = {"kind": "gpu-report", "ledger": stamp, "budget_s": args.budget,
                                  "missing_modules": missing_modules()}
        if report["missing_modules"]:
            print("missing (the parts that need them will fail): " + ", ".join(report["missing_modules"]))
        report["whole_run"] = whole_run(clock, tmp)
        report["tests"] = tests_part(clock, tmp)
        print(f"tests: {report['tests'].get('counts')}")
        report["kernel_benchmarks"] = kernel_part(clock, tmp, args.out_dir, path.stem)
    report["ledger"]["load_average_end"] = ledger.load_average()
    ledger.write_json(path, report)
    import report as render

    md = [render.render(path)]
    for part in report["kernel_benchmarks"]:
        if part.get("results"):
            md.append(render.render(REPO / part["results"]))
    path.with_suffix(".md").write_text("\n".join(md))
    print(f"wrote {path} and {path.with_suffix('.md').name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
