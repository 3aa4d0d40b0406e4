"""The results ledger: every documented figure comes from a results file that says how it was made.

* The docs' ledger blocks (``<!-- ledger:FILE[#SELECT][@COLUMNS] -->`` ... ``<!-- /ledger -->``) equal what
  ``benchmarks/report.py`` generates from the committed files, and each file they quote records a commit of
  this repository, a clean tree, the machine and the command (and is no --quick smoke run).
* Every file under ``benchmarks/results/`` has a ledger section; report.py renders each.
* The tools the lead runs behave: the clean-tree flag, file names, the CLI benchmark's interleaving and
  statistics (with stand-in commands), ``gpu_report.py``'s plan on a host without a GPU, and the official
  loop doing the same work as ke_fast (same defaults, parameter names, masks, data; a reset that keeps the
  fit hypothesis).
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import cli_bench  # noqa: E402
import gpu_report  # noqa: E402
import ledger  # noqa: E402
import official_loop  # noqa: E402
import report  # noqa: E402

import ke_fast  # noqa: E402
from ke_fast.data import digits  # noqa: E402
from ke_fast.evolve import Config  # noqa: E402
from ke_fast.models import resnet18  # noqa: E402

RESULT_FILES = sorted(ledger.RESULTS.glob("*.json"))


# ------------------------------------------------------------------------------------------------ the docs
def _doc_blocks() -> list[tuple[Path, str, str]]:
    return [(doc, name, body) for doc in report.doc_files() for name, body in report.blocks(doc.read_text())]


def test_doc_blocks_equal_what_report_generates():
    """Passes with no block at all; each block present must be report.py's output for its file, verbatim."""
    for doc, name, body in _doc_blocks():
        file, _, _ = report.split_name(name)
        assert (ledger.RESULTS / file).is_file(), f"{doc.name}: ledger block names a missing file {file}"
        assert body == report.block_body(name), (
            f"{doc.name}: the ledger block {name!r} differs from its file: run "
            "`python benchmarks/report.py --update-readme` (and never edit a block by hand)")


def test_quoted_files_say_how_they_were_made():
    for doc, name, _ in _doc_blocks():
        file, _, _ = report.split_name(name)
        data = json.loads((ledger.RESULTS / file).read_text())
        assert not data.get("quick"), f"{doc.name} quotes {file}, a --quick smoke run"
        problems = ledger.problems(data.get("ledger"), quoted=True)
        assert not problems, f"{doc.name} quotes {file}: " + "; ".join(problems)


@pytest.mark.parametrize("path", RESULT_FILES, ids=[p.name for p in RESULT_FILES])
def test_every_results_file_has_a_ledger_and_renders(path):
    data = json.loads(path.read_text())
    assert not ledger.problems(data.get("ledger")), ledger.problems(data.get("ledger"))
    assert report.render(path).startswith(f"Source: `benchmarks/results/{path.name}`")


def test_the_checks_can_fail():
    """A stale block is rewritten; a legacy file (no command, dirty or unknown commit) cannot back a figure."""
    legacy = next(p for p in RESULT_FILES if json.loads(p.read_text())["ledger"].get("legacy"))
    text = f"x\n<!-- ledger:{legacy.name}#reinit -->\nstale figure\n<!-- /ledger -->\ny\n"
    new = report.update(text)
    assert new != text and "stale figure" not in new and new.startswith("x\n") and new.endswith("y\n")
    assert report.update(new) == new  # regenerating is idempotent
    assert ledger.problems(json.loads(legacy.read_text())["ledger"], quoted=True)
    assert ledger.problems({"commit": "0" * 40, "clean": True, "machine": {}, "command": "x"}, quoted=True)
    assert ledger.problems(None) and ledger.problems({"commit": "x"})


def test_block_names_select_groups_and_columns():
    assert report.split_name("a.json") == ("a.json", None, None)
    assert report.split_name("a.json#reinit|masked@ms,speed-up") == ("a.json", "reinit|masked", ["ms", "speed-up"])
    cpu = ledger.RESULTS / "cpu-2core-2026-11-24.json"
    text = report.render(cpu, "reinit resnet50 kels", ["GB/s"])
    assert "| benchmark | ms | GB/s |" in text and "wels" not in text
    with pytest.raises(ValueError, match="nothing matches"):
        report.render(cpu, "no such group")


# ------------------------------------------------------------------------------------------------ the ledger
def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                   capture_output=True)


def test_clean_flag_and_commit(tmp_path):
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.py").write_text("a = 1\n")
    _git(tmp_path, "add", "a.py")
    _git(tmp_path, "commit", "-qm", "a")
    head = ledger.commit(tmp_path)
    assert head and len(head) == 40 and ledger.dirty_paths(tmp_path) == []
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "x.json").write_text("{}")  # an output: still clean
    assert ledger.dirty_paths(tmp_path) == []
    (tmp_path / "a.py").write_text("a = 2\n")
    (tmp_path / "new.py").write_text("")
    assert sorted(ledger.dirty_paths(tmp_path)) == ["a.py", "new.py"]
    assert ledger.commit(tmp_path / "nowhere") is None
    assert ledger.is_commit(ledger.commit()) and not ledger.is_commit("6880d5f31b9a2bff27eda31383a0406755f91861")


def test_stamp_and_file_names():
    stamp = ledger.stamp(argv="python x.py")
    assert not ledger.problems(stamp)
    assert stamp["command"] == "python x.py" or stamp["command"] == ledger.os.environ.get(ledger.COMMAND_ENV)
    assert ledger.machine_slug({"gpu": "NVIDIA H100 80GB HBM3"}) == "h100-80gb-hbm3"
    assert ledger.machine_slug({"gpu": "NVIDIA H200", "cores": 16}) == "h200"
    assert ledger.machine_slug({"gpu": None, "cores": 2}) == "cpu-2core"
    fake = dict(stamp, commit="0123456789" * 4, clean=False, date="2026-12-04T10:00:00+00:00",
                machine={"gpu": None, "cores": 2})
    assert ledger.results_path("cli-demo-", fake).name == "cli-demo-cpu-2core-2026-12-04-0123456-dirty.json"
    assert ledger.results_path("", dict(fake, clean=True)).name == "cpu-2core-2026-12-04-0123456.json"


# ------------------------------------------------------------------------------------------------ cli_bench
_FAKE = ("import json, os, sys, time; out = sys.argv[1]; os.makedirs(out, exist_ok=True); "
         "open(sys.argv[2], 'a').write(sys.argv[3] + ' '); time.sleep(float(sys.argv[4])); "
         "json.dump({'history': [{'generation': 1, 'dense_acc': 0.5, 'fit_acc': 0.25, 'epoch_time_s': 1.0}]}, "
         "open(os.path.join(out, 'summary.json'), 'w'))")


def test_cli_bench_interleaves_and_pairs(tmp_path):
    order = tmp_path / "order.txt"

    def fake(name: str, sleep: float) -> cli_bench.Contender:
        argv = ["-c", _FAKE, "{out}", str(order), name, str(sleep)]
        return cli_bench.Contender(name, argv, ["-c", _FAKE, "{out}", str(order), name + "-warm", "0"])

    case = cli_bench.Case("t", "two stand-ins", [fake("official", 0.15), fake("ke_fast", 0.0)], 2,
                          ("official", "ke_fast"))
    entry = cli_bench.run_case(case, repeats=2, warmups=1, workdir=tmp_path, log=lambda _: None)
    assert order.read_text().split() == ["official-warm", "ke_fast-warm", "official", "ke_fast", "official", "ke_fast"]
    assert entry["order"] == ["official", "ke_fast", "official", "ke_fast"]
    official, ke = entry["contenders"]
    assert len(official["runs"]) == 2 and len(official["warmups"]) == 1
    walls = [r["wall_s"] for r in official["runs"]]
    assert official["min_s"] == min(walls) and official["max_s"] == max(walls) and official["min_s"] >= 0.15
    pairs = [a["wall_s"] / b["wall_s"] for a, b in zip(official["runs"], ke["runs"])]
    assert entry["ratio"]["pairs"] == pairs and entry["ratio"]["min"] == min(pairs)
    assert entry["history"] == [{"generation": 1, "dense_acc": 0.5, "fit_acc": 0.25}]  # timing columns dropped
    data = {"kind": "cli", "quick": False, "ledger": ledger.stamp(argv="test"), "cases": {"t": entry}}
    path = tmp_path / "cli.json"
    ledger.write_json(path, data)
    text = report.render(path)
    assert "| official |" in text and "| 1 | 50.0% | 25.0% |" in text and "official wall / ke_fast wall" in text


def test_cli_bench_failure_and_arguments(tmp_path, capsys):
    with pytest.raises(RuntimeError, match="exited 3"):
        cli_bench.run_once(["-c", "import sys; sys.exit(3)"], tmp_path / "o")
    assert cli_bench.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "python -m ke_fast run --no-progress --overwrite --out OUT --generations 3 --epochs 5" in out
    assert "python benchmarks/official_loop.py --out OUT --generations 3 --epochs 5" in out
    assert "--seeds 0 1 2 --baseline long" in out
    with pytest.raises(SystemExit):
        cli_bench.main(["--repeats", "0"])
    assert "--repeats must be >= 1" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ gpu_report
def test_gpu_report_plan(capsys):
    assert gpu_report.main(["--plan"]) == 0
    out = capsys.readouterr().out
    for part in ("--worker official", "--worker ke_fast-graphs-off", "--worker ke_fast-graphs ",
                 "--worker ke_fast-compile-default", "--worker ke_fast-compile-reduce-overhead",
                 "{'compile': 'reduce-overhead', 'graphs': False}", " -m pytest tests/",  # any interpreter name
                 "benchmarks/test_bench_sparse.py --benchmark-only", "102 classes"):
        assert part in out
    with pytest.raises(SystemExit):
        gpu_report.main(["--budget", "0"])


@pytest.mark.skipif(bool(ledger.gpus()), reason="on a GPU host make gpu-report measures (minutes)")
def test_gpu_report_on_a_cpu_host_prints_its_plan_and_writes_nothing(tmp_path):
    out = subprocess.run([sys.executable, "benchmarks/gpu_report.py", "--out-dir", str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "no GPU on this host" in out.stdout and "--worker official" in out.stdout
    assert list(tmp_path.iterdir()) == []


def test_gpu_report_reads_pytest_output():
    xdist = ("[gw0] [ 10%] PASSED tests/test_a.py::test_x[triton-cuda]\n"
             "[gw1] [ 20%] FAILED tests/test_b.py::test_y \n"
             "[gw0] [ 30%] SKIPPED tests/test_a.py::test_z \n"
             "FAILED tests/test_b.py::test_y - AssertionError\n")
    plain = "tests/test_a.py::test_x PASSED   [ 50%]\ntests/test_a.py::test_w ERROR  [100%]\n"
    assert gpu_report.parse_tests(xdist) == {"counts": {"passed": 1, "failed": 1, "skipped": 1},
                                             "failed": ["tests/test_b.py::test_y"]}
    assert gpu_report.parse_tests(plain) == {"counts": {"passed": 1, "error": 1}, "failed": ["tests/test_a.py::test_w"]}


def test_gpu_report_renders(tmp_path):
    rows = [{"name": "official", "wall_s": 40.0, "speed_up": 1.0, "dense_acc": 0.5, "fit_acc": 0.4,
             "timings": {"train": 30.0, "eval": 5.0, "checkpoint": 1.0, "reset": 4.0}},
            {"name": "ke_fast", "wall_s": 10.0, "speed_up": 4.0, "dense_acc": 0.52, "fit_acc": 0.41,
             "timings": {"train": 8.0, "eval": 1.0, "checkpoint": 0.5, "reset": 0.01}},
            {"name": "ke_fast-graphs-off", "note": "skipped: neither Evolution nor Config has a graphs switch"}]
    data = {"kind": "gpu-report", "ledger": ledger.stamp(argv="make gpu-report"),
            "whole_run": {"description": "d", "contenders": rows},
            "tests": {"command": "pytest tests", "counts": {"passed": 10, "failed": 1}, "failed": ["tests/a.py::b"],
                      "seconds": 99.0, "timed_out": False},
            "kernel_benchmarks": [{"file": "benchmarks/test_bench_reinit.py", "status": "timed out after 60 s"}]}
    path = tmp_path / "h200-x.json"
    ledger.write_json(path, data)
    text = report.render(path)
    assert "| ke_fast | 10 | 4 | 8 | 1 | 0.5 | 0.01 | 52.0% | 41.0% |  |" in text
    assert "has a graphs switch" in text
    assert "1 failed, 10 passed" in text and "`tests/a.py::b`" in text
    assert "timed out after 60 s" in text
    only = report.render(path, "whole-run")
    assert "| contender |" in only and "**tests**" not in only and "kernel benchmarks" not in only


def test_gpu_report_time_limit_kills_the_process_group(tmp_path):
    cmd = [sys.executable, "-c", "import subprocess, sys, time; "
           "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); print('started', flush=True); "
           "time.sleep(60)"]
    out = gpu_report.run_limited(cmd, 1.5, tmp_path / "log")
    # killed at 1.5 s instead of the 60 s the process and its child would take: 45 s leaves room for a loaded
    # machine's slow Python start and still tells a kill from a natural end
    assert out["timed_out"] and out["seconds"] < 45 and "started" in out["output"]


def test_gpu_report_data_sizes_match_ke_fast():
    from ke_fast.data import stored_size

    for size in (32, 64, 224, 227, 299):
        assert gpu_report.stored_side(size) == stored_size(size, True)


def test_gpu_report_graphs_row_is_skipped_without_the_keyword(tmp_path):
    from ke_fast.evolve import Evolution

    import inspect

    from dataclasses import fields as config_fields

    if "graphs" in inspect.signature(Evolution.__init__).parameters or "graphs" in {f.name for f in config_fields(Config)}:
        pytest.skip("Evolution or Config has a graphs switch: the row runs")
    assert gpu_report.worker("ke_fast-graphs-off", tmp_path / "r.json") == 0
    assert "has a graphs switch" in json.loads((tmp_path / "r.json").read_text())["note"]


# ------------------------------------------------------------------------------------------------ official loop
def test_official_defaults_are_ke_fast_defaults():
    ours, theirs = official_loop.OfficialConfig(), Config()
    shared = [f.name for f in fields(ours) if hasattr(theirs, f.name) and f.name not in ("generations", "epochs")]
    assert set(shared) >= {"batch_size", "lr", "momentum", "weight_decay", "warmup_epochs", "label_smoothing",
                           "split_rate", "seed"}
    for name in shared:
        assert getattr(ours, name) == getattr(theirs, name), name


@pytest.mark.parametrize("kw", [dict(num_classes=10, in_channels=1, stem="small", width=16),
                                dict(num_classes=102, in_channels=3, stem="imagenet", width=4)])
def test_official_model_and_masks_match_ke_fast(kw):
    theirs = resnet18(**kw)
    ours = official_loop.ResNet18(kw["num_classes"], kw["in_channels"], kw["stem"], kw["width"])
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    masks = official_loop.kels_masks(ours, 0.5)
    got = ke_fast.masks(ke_fast.split(theirs, "kels", 0.5))
    assert set(got) == set(masks)
    for name, mask in masks.items():
        assert torch.equal(got[name], mask.bool()), name


def test_official_digits_are_ke_fast_digits():
    ours_train, ours_test = official_loop.digits(20, 0)
    theirs_train, theirs_test, _, _ = digits(per_class=20, seed=0)
    for a, b in ((ours_train, theirs_train), (ours_test, theirs_test)):
        assert all(torch.equal(x, y) for x, y in zip(a.tensors, b.tensors))


def test_official_reset_keeps_the_fit_hypothesis():
    torch.manual_seed(0)
    net = official_loop.ResNet18(10, 1, "small", 4)
    masks = official_loop.kels_masks(net, 0.5)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    official_loop.reset_(net, masks)
    after = net.state_dict()
    for name, mask in masks.items():
        w0, w1, keep = before[f"{name}.weight"], after[f"{name}.weight"], mask.bool()
        assert torch.equal(w0[keep], w1[keep]), name
        assert (w0[~keep] != w1[~keep]).float().mean() > 0.99 or not (~keep).any(), name
    assert torch.equal(before["fc.bias"], after["fc.bias"])  # the classifier keeps every output


def test_official_run_end_to_end(tmp_path):
    """Two tiny generations: the second rebuilds, reloads the checkpoint with its float masks, resets."""
    g = torch.Generator().manual_seed(0)
    train = torch.utils.data.TensorDataset(torch.rand(20, 1, 8, 8, generator=g), torch.arange(20) % 10)
    test = torch.utils.data.TensorDataset(torch.rand(12, 1, 8, 8, generator=g), torch.arange(12) % 10)
    cfg = official_loop.OfficialConfig(generations=2, epochs=1)
    timings: dict = {}
    history = official_loop.run(cfg, train, test, tmp_path, torch.device("cpu"),
                                lambda: official_loop.ResNet18(10, 1, "small", 2), timings)
    assert [h["generation"] for h in history] == [1, 2]
    assert all(0 <= h["dense_acc"] <= 1 and 0 <= h["fit_acc"] <= 1 for h in history)
    assert set(timings) == {"train", "eval", "checkpoint", "reset"} and all(v > 0 for v in timings.values())
    state = torch.load(tmp_path / "generation.pt", weights_only=True)
    assert "conv1.mask" in state and state["conv1.mask"].dtype == torch.float32


def test_official_host_augmentation():
    x, y = official_loop.synthetic_images(6, 3, 40, seed=1)
    assert x.dtype == torch.uint8 and x.shape == (6, 3, 40, 40) and y.tolist() == [0, 1, 2, 0, 1, 2]
    test = official_loop.HostAugmented(x, y, 32, train=False)
    img, label = test[1]
    mean = torch.tensor(official_loop.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(official_loop.IMAGENET_STD).view(3, 1, 1)
    assert label == 1 and torch.allclose(img, (x[1, :, 4:36, 4:36].float() / 255 - mean) / std)
    train = official_loop.HostAugmented(x, y, 32, train=True)
    torch.manual_seed(0)
    views = [train[0][0] for _ in range(4)]
    assert all(v.shape == (3, 32, 32) for v in views) and not torch.equal(views[0], views[1])
