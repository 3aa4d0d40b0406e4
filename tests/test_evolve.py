"""The KE generation loop (ke_fast.evolve) and the CLI: a shortened demo, kill-and-resume, corrupt
checkpoints, CLI errors, the evolve modes, 2-process DDP on CPU (gloo), and the CLI's protections (no run
overwritten, resume checks, errors before work, Ctrl-C, --help).

Everything runs on the CPU with tiny configurations (digits, ResNet-18 of width 4)."""
from __future__ import annotations

import csv
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ke_fast.kernels as K
from ke_fast import cli
from ke_fast.data import DIGITS_MAX_PER_CLASS, DataError, digits
from ke_fast.evolve import CheckpointError, Config, Evolution, load_checkpoint, save_atomic
from ke_fast.rundir import CheckpointWarning
from ke_fast.masks import masked_layers
from ke_fast.models import resnet18

from conftest import HAS_CUDA

REPO = Path(__file__).resolve().parents[1]
TIMING_KEYS = {"epoch_time_s"}  # wall-clock: the only history field allowed to differ between runs


def _env() -> dict:
    env = dict(os.environ)
    if not HAS_CUDA:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _cli(args: list[str], cwd: Path, timeout: float = 1800) -> subprocess.CompletedProcess:
    # the timeout catches a hang only: these runs take seconds idle, but several minutes on a 2-core machine
    # shared with a parallel reference run and other test workers (180 s was seen to expire there)
    return subprocess.run([sys.executable, "-m", "ke_fast", "run", *args], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def _tiny_model(width: int = 4) -> torch.nn.Module:
    return resnet18(num_classes=10, in_channels=1, stem="small", width=width)


def _comparable(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in history]


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), f"{k} differs"


# ---- 1. shortened demo ------------------------------------------------------------------------

def test_demo_fit_accuracy_rises(tmp_path):
    train, test, classes, channels = digits(per_class=20, seed=0)
    torch.manual_seed(0)
    cfg = Config(split="kels", split_rate=0.5, generations=4, epochs=8)  # CLI defaults otherwise (lr 0.05 ...)
    out = tmp_path / "demo"
    ev = Evolution(_tiny_model(), train, test, cfg, out, device="cpu", progress=False, log=lambda _: None)
    history = ev.run()

    assert [r["generation"] for r in history] == [1, 2, 3, 4]
    for r in history:
        assert 0.0 <= r["dense_acc"] <= 1.0 and 0.0 <= r["fit_acc"] <= 1.0
        assert r["train_loss"] == r["train_loss"]  # not NaN
    accs = [(round(r["dense_acc"], 3), round(r["fit_acc"], 3)) for r in history]
    print("demo (dense, fit) per generation:", accs)
    # KE's signature: the fit hypothesis starts near chance and improves over the generations.
    assert history[-1]["fit_acc"] > history[0]["fit_acc"] + 0.05, accs
    assert history[-1]["dense_acc"] > 0.3, accs  # the dense net learns at all (chance: 0.1)

    for name in ("history.csv", "summary.json", "plot.png", "last.pt", "prev.pt"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert not list(out.glob("*.tmp"))
    with open(out / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["generation"]) for r in rows] == [1, 2, 3, 4]
    assert [float(r["fit_acc"]) for r in rows] == pytest.approx([r["fit_acc"] for r in history])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"]["fit_acc"] == pytest.approx(history[-1]["fit_acc"])
    assert summary["config"]["generations"] == 4 and summary["config"]["epochs"] == 8
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["generation"] == 4 and ckpt["epoch"] == 8
    assert len(ckpt["history"]) == 4
    _assert_same_weights(ckpt["model"], {k: v.cpu() for k, v in ev.model.state_dict().items()})


# ---- 2. kill and resume -----------------------------------------------------------------------

RESUME_ARGS = ["--generations", "3", "--epochs", "4", "--width", "4", "--per-class", "10", "--no-progress",
               "--device", "cpu", "--checkpoint-every", "0"]


def test_kill_and_resume_is_bit_identical(tmp_path):
    killed, ref = tmp_path / "killed", tmp_path / "ref"
    cmd = [sys.executable, "-m", "ke_fast", "run", *RESUME_ARGS, "--out", str(killed)]
    # the uninterrupted reference run goes on meanwhile, in a folder of its own
    ref_log = open(tmp_path / "ref_stderr.txt", "w")
    ref_proc = subprocess.Popen([sys.executable, "-m", "ke_fast", "run", *RESUME_ARGS, "--out", str(ref)],
                                cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=ref_log)
    try:
        _kill_resume_and_compare(tmp_path, cmd, killed, ref, ref_proc)
    finally:
        if ref_proc.poll() is None:
            ref_proc.kill()
            ref_proc.wait(timeout=60)
        ref_log.close()


def _kill_resume_and_compare(tmp_path, cmd, killed, ref, ref_proc):
    with open(tmp_path / "stdout.txt", "w") as so, open(tmp_path / "stderr.txt", "w") as se:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=so, stderr=se)
        seen = None
        try:
            # no wall-clock deadline: the run ends on its own (3 tiny generations), and its end is the event
            # that stops the watch; a deadline would fail the test whenever the parallel reference slowed it
            while proc.poll() is None:
                try:
                    ckpt = load_checkpoint(killed / "last.pt")
                except (FileNotFoundError, CheckpointError, OSError, RuntimeError, EOFError):
                    time.sleep(0.005)  # not written yet, or being replaced
                    continue
                if ckpt["generation"] >= 2:
                    proc.send_signal(signal.SIGKILL)
                    seen = (ckpt["generation"], ckpt["epoch"])
                    break
                time.sleep(0.005)
        finally:
            if proc.poll() is None and seen is None:
                proc.kill()
            proc.wait(timeout=60)
    assert seen is not None, f"no generation-2 checkpoint seen; rc={proc.returncode}, " \
                             f"stderr={(tmp_path / 'stderr.txt').read_text()[-2000:]}"
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    print("killed at (generation, epoch):", seen)
    assert seen[0] == 2, seen
    before = load_checkpoint(killed / "last.pt") if (killed / "last.pt").exists() else None
    assert before is None or len(before["history"]) < 3  # genuinely interrupted

    resumed = _cli([*RESUME_ARGS, "--out", str(killed), "--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    # a bound for a hang only: the reference runs 12 tiny epochs (seconds idle), minutes on a loaded machine
    assert ref_proc.wait(timeout=1800) == 0, (tmp_path / "ref_stderr.txt").read_text()[-3000:]

    a, b = load_checkpoint(killed / "last.pt"), load_checkpoint(ref / "last.pt")
    assert a["generation"] == b["generation"] == 3
    _assert_same_weights(a["model"], b["model"])
    assert [r["generation"] for r in a["history"]] == [1, 2, 3]
    assert _comparable(a["history"]) == _comparable(b["history"])
    sa = json.loads((killed / "summary.json").read_text())
    sb = json.loads((ref / "summary.json").read_text())
    assert _comparable(sa["history"]) == _comparable(sb["history"])


def test_resume_after_crash_during_evaluation_keeps_every_generation(tmp_path, monkeypatch):
    """A crash after the last epoch's checkpoint but before the generation's evaluation (a window of
    the size of one evaluation pass in every generation) must not lose that generation's row."""
    train, test, _, _ = digits(per_class=5, seed=0)
    test = torch.utils.data.Subset(test, range(200))  # evaluation is not what this test is about
    cfg = dict(generations=2, epochs=2)

    def make(out):
        return Evolution(_tiny_model(), train, test, Config(**cfg), out, device="cpu", progress=False,
                         log=lambda _: None)

    ref = make(tmp_path / "ref").run()

    original = Evolution.evaluate
    calls = {"n": 0}

    def crashing(self, data=None):
        calls["n"] += 1
        if calls["n"] == 3:  # the dense evaluation of generation 2
            raise KeyboardInterrupt("simulated kill")
        return original(self, data)

    monkeypatch.setattr(Evolution, "evaluate", crashing)
    with pytest.raises(KeyboardInterrupt):
        make(tmp_path / "crash").run()
    monkeypatch.setattr(Evolution, "evaluate", original)
    history = make(tmp_path / "crash").run(resume=True)
    assert [r["generation"] for r in history] == [1, 2]
    assert _comparable(history) == _comparable(ref)


def test_resume_after_crash_between_rotation_and_save(tmp_path, monkeypatch):
    """save_atomic moves last.pt to prev.pt once the new file is complete, then renames the new file:
    a crash in between leaves only prev.pt. Resuming must continue from prev.pt, not silently start
    again at generation 1."""
    import os

    train, test, _, _ = digits(per_class=5, seed=0)
    test = torch.utils.data.Subset(test, range(200))
    out = tmp_path / "run"

    def make():
        return Evolution(_tiny_model(), train, test, Config(generations=2, epochs=2), out, device="cpu",
                         progress=False, log=lambda _: None, checkpoint_every=0)

    real_replace = os.replace
    calls = {"n": 0}

    def crashing_replace(src, dst):
        if str(src).endswith("last.pt.tmp"):
            calls["n"] += 1
            if calls["n"] == 3:  # generation 2, epoch 1 (after g1 e1, g1's end): last.pt was just moved to prev.pt
                raise KeyboardInterrupt("simulated kill")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crashing_replace)
    with pytest.raises(KeyboardInterrupt):
        make().run()
    monkeypatch.setattr(os, "replace", real_replace)
    assert not (out / "last.pt").exists() and (out / "prev.pt").exists()
    assert load_checkpoint(out / "prev.pt")["generation"] == 1

    epochs_trained = []
    real_train = Evolution._train_epoch
    monkeypatch.setattr(Evolution, "_train_epoch",
                        lambda self, net, opt, sched, g, e: epochs_trained.append((g, e)) or
                        real_train(self, net, opt, sched, g, e))
    history = make().run(resume=True)
    assert [r["generation"] for r in history] == [1, 2]
    assert (1, 0) not in epochs_trained, f"resume restarted from scratch: {epochs_trained}"


# ---- 3. corrupt / truncated checkpoints -------------------------------------------------------

def test_truncated_last_checkpoint_continues_from_prev_with_a_warning(tmp_path, capsys):
    """--resume with a truncated last.pt continues from prev.pt (a warning names both) and ends as the
    uninterrupted run did; prev.pt stays whole until a new last.pt is; both broken: exit 2 naming both."""
    out = tmp_path / "run"
    args = ["--generations", "1", "--epochs", "2", "--width", "4", "--per-class", "5", "--no-progress",
            "--device", "cpu", "--checkpoint-every", "0", "--out", str(out)]
    assert cli.main(["run", *args]) == 0
    capsys.readouterr()
    reference = json.loads((out / "summary.json").read_text())["history"]
    last, prev = out / "last.pt", out / "prev.pt"
    assert (load_checkpoint(prev)["generation"], load_checkpoint(prev)["epoch"]) == (1, 1)
    prev_bytes = prev.read_bytes()
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])

    res = _cli([*args, "--resume"], tmp_path)
    assert res.returncode == 0, (res.returncode, res.stderr[-3000:])
    assert "Traceback" not in res.stderr
    warning = next(line for line in res.stderr.splitlines() if line.startswith("ke-fast run: warning: "))
    assert str(last) in warning and "truncated" in warning and str(prev) in warning, warning
    assert f"resumed from {prev}: generation 1, epoch 1" in res.stdout
    assert _comparable(json.loads((out / "summary.json").read_text())["history"]) == _comparable(reference)
    ckpt = load_checkpoint(last)  # a whole new last.pt; the corrupt one was not rotated over prev.pt
    assert (ckpt["generation"], ckpt["epoch"]) == (1, 2)
    assert prev.read_bytes() == prev_bytes

    for path in (last, prev):  # both broken: nothing to continue from
        path.write_bytes(path.read_bytes()[:100])
    res = _cli([*args, "--resume"], tmp_path)
    _one_error_line(res, str(last), str(prev))


def test_library_resume_past_a_corrupt_last_checkpoint_warns(tmp_path):
    train, test, _, _ = digits(per_class=2, seed=0)
    test = torch.utils.data.Subset(test, range(50))

    def make():
        return Evolution(_tiny_model(), train, test, Config(generations=1, epochs=2), tmp_path, device="cpu",
                         progress=False, log=lambda _: None, checkpoint_every=0)

    make().run()
    (tmp_path / "last.pt").write_bytes(b"garbage")
    ev = make()
    with pytest.warns(CheckpointWarning, match="prev.pt"):
        ev.run(resume=True)
    assert ev.start == (1, 1)


def _old_style(ckpt: dict) -> dict:
    """A checkpoint as ke_fast wrote it before the format field (main at ab0367b): no "format", the task's
    state under "criterion"."""
    old = {k: v for k, v in ckpt.items() if k not in ("format", "task")}
    return dict(old, criterion=ckpt["task"])


def test_checkpoint_format_versions(tmp_path, capsys):
    """Checkpoints carry "format": 2; one without the field (format 1, written before it existed) resumes;
    a format this version does not know is refused, naming the version."""
    out = tmp_path / "run"
    args = [*TINY_ARGS, "--checkpoint-every", "0", "--epochs", "2", "--out", str(out)]
    assert cli.main(["run", *args]) == 0
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["format"] == 2 and "criterion" not in ckpt
    save_atomic(_old_style(load_checkpoint(out / "prev.pt")), out / "last.pt")  # generation 1, epoch 1
    capsys.readouterr()
    assert cli.main(["run", *args, "--resume"]) == 0
    assert f"resumed from {out / 'last.pt'}: generation 1, epoch 1" in capsys.readouterr().out
    assert load_checkpoint(out / "last.pt")["format"] == 2

    save_atomic(dict(load_checkpoint(out / "last.pt"), format=3), out / "last.pt")
    before = _files(out)
    with pytest.raises(CheckpointError, match="format version 3"):
        load_checkpoint(out / "last.pt")
    assert cli.main(["run", *args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "format version 3" in err and str(out / "last.pt") in err, err
    assert _files(out) == before


def test_load_checkpoint_errors_name_the_file(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint\x00\x01\x02" * 10)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(garbage)
    assert str(garbage) in str(exc.value)

    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(foreign)
    assert str(foreign) in str(exc.value)

    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def test_save_atomic_leaves_no_tmp(tmp_path):
    path = tmp_path / "ckpt.pt"
    obj = dict(model={"w": torch.arange(6.0)}, generation=1, epoch=2)
    save_atomic(obj, path)
    save_atomic(dict(obj, epoch=3), path)  # overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]
    ckpt = load_checkpoint(path)
    assert ckpt["epoch"] == 3 and torch.equal(ckpt["model"]["w"], torch.arange(6.0))


# ---- 4. CLI errors ----------------------------------------------------------------------------

@pytest.mark.parametrize("bad, word", [
    (["--split", "foo"], "--split"), (["--generations", "0"], "--generations"), (["--epochs", "-1"], "--epochs"),
    (["--split-rate", "1.5"], "--split-rate"), (["--split-rate", "0"], "--split-rate"),
    (["--seed", "-1"], "--seed"), (["--weight-decay", "-0.1"], "--weight-decay"), (["--lr", "nan"], "--lr"),
    (["--device", "tpu"], "--device"), (["--device", "meta"], "--device"),
    (["--per-class", "174"], "--per-class"),  # digit 8 has 174 images: none would be left for testing
    (["--width", "8"], "--width"), (["--model", "densenet_tiny", "--width", "8"], "--width"),  # no width to set
    (["--resample-mask"], "--resample-mask"),  # KELS masks never change
    (["--image-size", "32"], "--image-size"),  # digits are 8x8, never resized
    (["--resume", "--overwrite"], "--overwrite"),
    (["--checkpoint-every", "-1"], "--checkpoint-every"), (["--checkpoint-every", "inf"], "--checkpoint-every"),
    (["--data-on-device", "1.5"], "--data-on-device"),
    (["--no-amp"], "--no-amp"),  # bf16 autocast is never on off CUDA: the flag would do nothing
])
def test_cli_argument_errors(tmp_path, capsys, bad, word):
    """Every argument error exits 2 before any work with the run subcommand's usage line and one error line."""
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "--out", str(tmp_path / "o"), "--device", "cpu", "--model", "small_cnn", "--generations", "1",
                  "--epochs", "1", "--no-progress", *bad])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: ke-fast run "), err
    assert err.splitlines()[-1].startswith("ke-fast run: error: ") and word in err.splitlines()[-1], err
    assert err.count("error:") == 1, err
    assert not (tmp_path / "o").exists()


def test_cli_dataset_errors(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    no_images = tmp_path / "no_images"
    for d in ("train/a", "test/a"):
        (no_images / d).mkdir(parents=True)
    for folder, words in ((empty, ("train/", "test/")), (no_images, ("no images",))):
        rc = cli.main(["run", "--dataset", str(folder), "--device", "cpu", "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert rc == 2, err
        assert "error" in err and str(folder) in err and all(w in err for w in words), err
    # the real exit code of the module, for a folder that does not exist
    res = _cli(["--dataset", "/nonexistent/ke_fast_data", "--device", "cpu", "--out", str(tmp_path / "o")], tmp_path)
    assert res.returncode == 2
    assert "/nonexistent/ke_fast_data" in res.stderr and "does not exist" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "o").exists()


def test_compiled_training_step_matches_eager(tmp_path):
    """compile=True (torch.compile of forward + loss) trains a generation on the CPU to the weights and
    accuracy of the eager step, up to float reassociation."""
    from ke_fast.models import MLP

    train, test, _, _ = digits(per_class=5, seed=0)
    runs = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        ev = Evolution(MLP(64, (32,), 10), train, test, Config(generations=1, epochs=3, batch_size=10, warmup_epochs=1),
                       tmp_path / str(compiled), device="cpu", progress=False, log=lambda _: None, compile=compiled)
        runs[compiled] = ev.run(), {k: v.clone() for k, v in ev.model.state_dict().items()}
    (eager, w_eager), (comp, w_comp) = runs[False], runs[True]
    print("eager", eager[0], "compiled", comp[0])
    assert eager[0]["dense_acc"] > 0.3  # it learnt: chance is 0.1
    assert comp[0]["dense_acc"] == pytest.approx(eager[0]["dense_acc"], abs=0.02)
    assert comp[0]["train_loss"] == pytest.approx(eager[0]["train_loss"], rel=1e-3)
    for k in w_eager:
        torch.testing.assert_close(w_comp[k], w_eager[k], rtol=1e-3, atol=1e-4, msg=k)


# ---- 5. evolve modes --------------------------------------------------------------------------

def _params(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{name: (tensor clone, bool fit mask)} for the weight and bias of every masked layer."""
    out = {}
    for name, m in masked_layers(model):
        out[name + ".weight"] = (m.weight.detach().clone(), K.unpack_mask(m.fit_mask, m.weight.shape).bool())
        if m.bias is not None:
            out[name + ".bias"] = (m.bias.detach().clone(), K.unpack_mask(m.bias_mask, m.bias.shape).bool())
    return out


def _evolution(tmp_path, torch_seed: int = 0, **cfg) -> Evolution:
    train, test, _, _ = digits(per_class=5, seed=0)
    torch.manual_seed(torch_seed)
    return Evolution(_tiny_model(), train, test, Config(**cfg), tmp_path / "ev", device="cpu", progress=False,
                     log=lambda _: None)


def _pretend_training(ev: Evolution) -> None:
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in ev.model.parameters():
            p.add_(torch.randn(p.shape, generator=g) + 0.5)


@pytest.mark.parametrize("mode", ["rewind", "zero", "rand"])
def test_evolve_modes(tmp_path, mode):
    ev = _evolution(tmp_path, evolve_mode=mode)
    gen0 = _params(ev.model)
    assert any((~mask).any() for _, mask in gen0.values())  # there is something to reset
    _pretend_training(ev)
    trained = _params(ev.model)
    ev._evolve(2)
    after = _params(ev.model)
    for name, (w, mask) in after.items():
        w0, t = gen0[name][0], trained[name][0]
        assert torch.equal(w[mask], t[mask]), f"{name}: fit entries changed"
        reset = ~mask
        if not reset.any():
            continue
        if mode == "rewind":
            assert torch.equal(w[reset], w0[reset]), f"{name}: reset entries not back at generation 0"
        elif mode == "zero":
            assert bool((w[reset] == 0).all()), name
        else:
            assert bool((w[reset] != t[reset]).all()), f"{name}: reset entries not re-drawn"
            assert bool((w[reset] != w0[reset]).any()), name
            assert w[reset].abs().max() < 10, name  # a sane initialisation, not garbage


def test_rewind_values_are_regenerated_not_stored(tmp_path):
    """Generation-0 weights come from the counter RNG: a second Evolution under a different torch seed
    starts from the same values, so "rewind" needs no stored copy."""
    a = _params(_evolution(tmp_path, torch_seed=0, evolve_mode="rewind").model)
    b = _params(_evolution(tmp_path, torch_seed=99, evolve_mode="rewind").model)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name][0], b[name][0]), name
    c = _params(_evolution(tmp_path, seed=1, evolve_mode="rewind").model)  # the run seed does matter
    assert any(not torch.equal(a[n][0], c[n][0]) for n in a)


def test_rand_resets_are_reproducible(tmp_path):
    evs = [_evolution(tmp_path, torch_seed=s, evolve_mode="rand") for s in (0, 7)]
    for ev in evs:
        _pretend_training(ev)
        ev._evolve(3)
    for (n, x), (_, y) in zip(evs[0].model.state_dict().items(), evs[1].model.state_dict().items()):
        assert torch.equal(x, y), n


def _bn_of(conv_name: str) -> str:
    if conv_name.endswith("downsample.0"):
        return conv_name[:-1] + "1"
    head, _, last = conv_name.rpartition(".")
    return (head + "." if head else "") + last.replace("conv", "bn")


@pytest.mark.parametrize("reset_bn", [True, False])
def test_reset_bn(tmp_path, reset_bn):
    ev = _evolution(tmp_path, reset_bn=reset_bn)
    modules = dict(ev.model.named_modules())
    g = torch.Generator().manual_seed(5)
    bns = {n: m for n, m in modules.items() if isinstance(m, torch.nn.BatchNorm2d)}
    with torch.no_grad():
        for bn in bns.values():
            for t in (bn.weight, bn.bias, bn.running_mean):
                t.copy_(torch.randn(t.shape, generator=g) + 3.0)
            bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=g) + 2.0)
    before = {n: {k: v.clone() for k, v in bn.state_dict().items()} for n, bn in bns.items()}
    ev._evolve(2)
    checked = 0
    for name, m in masked_layers(ev.model):
        if not isinstance(m, torch.nn.Conv2d):
            continue
        bn = bns[_bn_of(name)]
        assert bn.num_features == m.out_channels
        keep = K.unpack_mask(m.bias_mask, (m.out_channels,)).bool()
        reset = ~keep
        assert reset.any() and keep.any(), name
        b0 = before[_bn_of(name)]
        for k in ("weight", "bias", "running_mean", "running_var"):
            assert torch.equal(getattr(bn, k)[keep], b0[k][keep]), f"{name}: fit channel of {k} changed"
        if reset_bn:
            assert bool((bn.weight[reset] == 1).all()) and bool((bn.bias[reset] == 0).all()), name
            assert bool((bn.running_mean[reset] == 0).all()) and bool((bn.running_var[reset] == 1).all()), name
        else:
            for k in ("weight", "bias", "running_mean", "running_var"):
                assert torch.equal(getattr(bn, k), b0[k]), f"{name}: {k} changed without reset_bn"
        checked += 1
    assert checked >= 17  # every conv of ResNet-18 (incl. the downsample convs) has its BatchNorm


# ---- 6. DDP on CPU (gloo) ---------------------------------------------------------------------

DDP_ARGS = ["--generations", "2", "--epochs", "2", "--width", "4", "--per-class", "5", "--split", "wels",
            "--resample-mask", "--seed", "3", "--no-progress", "--device", "cpu"]


def test_ddp_two_processes_cpu(tmp_path):
    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    work = tmp_path / "cwd"
    work.mkdir()
    # --standalone: torchrun's own rendezvous store binds a free port itself (a port picked here and bound
    # later by torchrun could be taken in between)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ke_fast",
           "run", *DDP_ARGS, "--out", str(ddp_dir)]
    res = subprocess.run(cmd, cwd=work, env=_env(), capture_output=True, text=True,
                         timeout=1800)  # a bound for a hang only: minutes on a loaded 2-core machine
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    # one set of files (rank 0 only), nothing else anywhere
    assert sorted(p.name for p in ddp_dir.iterdir()) == ["history.csv", "last.pt", "plot.png", "prev.pt",
                                                         "summary.json"]
    assert list(work.iterdir()) == []
    assert res.stdout.count("generation  2:") == 1  # per-generation log from rank 0 only
    with open(ddp_dir / "history.csv", newline="") as f:
        assert [int(r["generation"]) for r in csv.DictReader(f)] == [1, 2]

    assert cli.main(["run", *DDP_ARGS, "--out", str(single_dir)]) == 0  # single process, same seed
    a, b = load_checkpoint(ddp_dir / "last.pt"), load_checkpoint(single_dir / "last.pt")
    masks_a = {k: v for k, v in a["model"].items() if k.endswith("fit_mask")}
    masks_b = {k: v for k, v in b["model"].items() if k.endswith("fit_mask")}
    assert masks_a and masks_a.keys() == masks_b.keys()
    for k in masks_a:
        assert torch.equal(masks_a[k], masks_b[k]), k
    # the generation-2 masks were re-drawn (WELS resample), so they differ from the generation-0 ones
    torch.manual_seed(0)
    ref = Evolution(_tiny_model(), *digits(5)[:2], Config(split="wels", seed=3), tmp_path / "x", device="cpu",
                    progress=False, log=lambda _: None)
    gen0 = {k: v for k, v in ref.model.state_dict().items() if k.endswith("fit_mask")}
    assert any(not torch.equal(gen0[k], masks_a[k]) for k in masks_a)


@pytest.mark.parametrize("device, cuda, count, rank, ranks, expected", [
    ("cpu", True, 1, 1, 2, ("cpu", "gloo")),  # the reported case: rank 1 must not touch cuda:1
    (None, False, 0, 1, 2, ("cpu", "gloo")),
    ("cuda", True, 2, 1, 2, ("cuda:1", "nccl")),
    (None, True, 2, 0, 2, ("cuda:0", "nccl")),
    ("cuda:1", True, 2, 0, 1, ("cuda:1", "nccl")),
])
def test_resolve_device(device, cuda, count, rank, ranks, expected):
    """(device, backend) per rank without a GPU: the CUDA facts are arguments, e.g. one GPU and two local
    ranks (torchrun --nproc_per_node=2 on a 1-GPU host)."""
    assert cli.resolve_device(device, cuda, count, rank, ranks) == expected


@pytest.mark.parametrize("device, cuda, count, rank, ranks, words", [
    ("cuda", True, 1, 1, 2, ("--device cuda", "2 local ranks", "1 CUDA device")),
    (None, True, 1, 0, 2, ("--device cuda", "default", "2 local ranks", "1 CUDA device")),
    ("cuda", False, 0, 0, 1, ("--device cuda", "not available")),
    ("cuda:2", True, 2, 0, 1, ("--device cuda:2", "cuda:0 .. cuda:1", "2 CUDA device")),
    ("cuda:0", True, 2, 0, 2, ("--device cuda:0", "2 local ranks", "one GPU")),
    ("gpu", True, 1, 0, 1, ("--device", "cpu, cuda or cuda:N", "'gpu'")),
])
def test_resolve_device_errors(device, cuda, count, rank, ranks, words):
    """Requests that cannot be met raise, naming --device and the counts."""
    with pytest.raises(ValueError) as exc:
        cli.resolve_device(device, cuda, count, rank, ranks)
    assert all(w in str(exc.value) for w in words), str(exc.value)


def test_cli_device_under_torchrun_on_one_gpu(tmp_path, capsys, monkeypatch):
    """Rank 1 of 2 on a simulated 1-GPU host: --device cuda exits 2 before any work; --device cpu starts
    a gloo group, never asks CUDA anything and never calls set_device."""
    for k, v in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)
    cuda_calls, calls = [], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_calls.append("is_available") or True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda_calls.append("device_count") or 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: cuda_calls.append(f"set_device({d})"))
    monkeypatch.setattr(cli, "init_process_group", lambda backend: calls.append(("init", backend)))
    monkeypatch.setattr(cli, "_run", lambda args, device: calls.append(("run", device)) or 0)
    monkeypatch.setattr(cli.dist, "destroy_process_group", lambda: calls.append(("destroy",)))
    out = tmp_path / "o"

    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "--device", "cuda", "--out", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--device cuda" in err and "2 local ranks" in err and "1 CUDA device" in err, err
    assert calls == [] and not out.exists()

    cuda_calls.clear()
    assert cli.main(["run", "--device", "cpu", "--out", str(out)]) == 0
    assert calls == [("init", "gloo"), ("run", "cpu"), ("destroy",)]
    assert cuda_calls == []


def test_rewind_needs_an_unsplit_model(tmp_path):
    """"rewind" regenerates initial weights ke_fast drew itself; a pre-split model has none: refuse."""
    import ke_fast

    train, test, _, _ = digits(per_class=2, seed=0)
    model = ke_fast.split(_tiny_model(), "kels", 0.5)
    with pytest.raises(ValueError, match="rewind"):
        Evolution(model, train, test, Config(evolve_mode="rewind"), tmp_path, device="cpu", progress=False)


def test_resume_with_a_different_config_is_refused(tmp_path):
    train, test, _, _ = digits(per_class=2, seed=0)
    test = torch.utils.data.Subset(test, range(50))
    Evolution(_tiny_model(), train, test, Config(generations=1, epochs=1), tmp_path, device="cpu",
              progress=False, log=lambda _: None).run()
    ev = Evolution(_tiny_model(), train, test, Config(generations=2, epochs=1, lr=0.5), tmp_path, device="cpu",
                   progress=False, log=lambda _: None)
    with pytest.raises(CheckpointError, match="lr=0.05"):
        ev.run(resume=True)


# ---- 7. CLI: nothing lost, nothing silently wrong ---------------------------------------------

TINY_ARGS = ["--model", "small_cnn", "--per-class", "2", "--generations", "1", "--epochs", "1", "--no-progress",
             "--device", "cpu"]


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def _one_error_line(res: subprocess.CompletedProcess, *words: str) -> None:
    """Exit 2, no traceback, and the last stderr line is the error, naming ``words``."""
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("ke-fast run: error: ") and all(w in last for w in words), res.stderr[-3000:]


def test_cli_never_overwrites_a_run(tmp_path, capsys):
    """A second run into a folder holding a run is refused (its files stay byte-identical) unless --overwrite."""
    out = tmp_path / "run"
    assert cli.main(["run", *TINY_ARGS, "--out", str(out)]) == 0
    before = _files(out)
    assert set(before) == {"last.pt", "history.csv", "summary.json", "plot.png"}  # 1 epoch: one checkpoint

    _one_error_line(_cli([*TINY_ARGS, "--out", str(out)], tmp_path), str(out), "--resume", "--overwrite")
    assert _files(out) == before
    # history.csv without a checkpoint: --resume would start afresh and replace it, so it is refused too
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "history.csv").write_text("generation\n1\n")
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", *TINY_ARGS, "--out", str(lone), "--resume"])
    assert exc.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert _files(lone) == {"history.csv": b"generation\n1\n"}

    capsys.readouterr()
    assert cli.main(["run", *TINY_ARGS, "--seed", "1", "--out", str(out), "--overwrite"]) == 0
    assert "overwrite: deleted last.pt, history.csv, summary.json, plot.png" in capsys.readouterr().out
    assert load_checkpoint(out / "last.pt")["config"]["seed"] == 1  # a new run
    assert not (out / "prev.pt").exists()  # nothing of the old one is left
    assert json.loads((out / "summary.json").read_text())["config"]["seed"] == 1


def test_cli_resume_checks_data_and_model(tmp_path):
    """--resume with other training data (--per-class) or another --model is refused, naming the flag."""
    out = tmp_path / "run"
    assert cli.main(["run", *TINY_ARGS, "--generations", "2", "--out", str(out)]) == 0
    (out / "last.pt").unlink()  # a crash between the two renames: resume continues from prev.pt
    before = _files(out)
    res = _cli([*TINY_ARGS, "--generations", "2", "--per-class", "3", "--out", str(out), "--resume"], tmp_path)
    _one_error_line(res, "--per-class 2 (now 3)", str(out / "prev.pt"))
    assert _files(out) == before
    res = _cli([*TINY_ARGS, "--generations", "2", "--model", "densenet_tiny", "--out", str(out), "--resume"], tmp_path)
    _one_error_line(res, "--model small_cnn (now densenet_tiny)")
    assert _files(out) == before


def test_resume_checks_data_contents_and_architecture(tmp_path):
    """Without flags to compare (the library), the data sets' and the architecture's fingerprints decide."""
    train, test, _, _ = digits(per_class=2, seed=0)
    test = torch.utils.data.Subset(test, range(50))
    cfg = Config(generations=1, epochs=1)

    def make(model, train_set):
        return Evolution(model, train_set, test, cfg, tmp_path, device="cpu", progress=False, log=lambda _: None)

    make(_tiny_model(), train).run()
    x, y = train.tensors
    relabelled = torch.utils.data.TensorDataset(x, y.roll(1))  # same images and size, other labels
    with pytest.raises(CheckpointError, match="training data"):
        make(_tiny_model(), relabelled).run(resume=True)
    with pytest.raises(CheckpointError, match="architecture"):
        make(_tiny_model(width=8), train).run(resume=True)
    with pytest.raises(ValueError, match="test_set is empty"):
        Evolution(_tiny_model(), train, torch.utils.data.Subset(test, []), cfg, tmp_path, device="cpu")


def test_digits_keep_a_test_image_per_class():
    from sklearn.datasets import load_digits

    assert DIGITS_MAX_PER_CLASS == int(torch.bincount(torch.tensor(load_digits().target)).min()) - 1
    _, test, _, _ = digits(per_class=DIGITS_MAX_PER_CLASS)
    assert set(test.tensors[1].tolist()) == set(range(10))
    with pytest.raises(DataError, match="per_class"):
        digits(per_class=DIGITS_MAX_PER_CLASS + 1)


def test_cli_out_must_be_a_writable_folder(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    for out, words in ((a_file, ("is a file",)), (a_file / "sub", ("is a file", str(a_file))),
                       (Path("/proc/ke_fast_out"), ("cannot write",))):
        with pytest.raises(SystemExit) as exc:
            cli.main(["run", *TINY_ARGS, "--out", str(out)])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.startswith("usage: ke-fast run "), err
        assert "--out" in err and all(w in err for w in words), err
    assert a_file.read_text() == "keep me"


def test_cli_corrupt_image_is_named_before_training(tmp_path, capsys):
    from PIL import Image

    root = tmp_path / "data"
    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            Image.new("RGB", (8, 8), (40, 80, 120)).save(root / split / c / "ok.png")
    good = (root / "train" / "a" / "ok.png").read_bytes()
    for name, data in (("garbage.png", b"not an image at all" * 8), ("truncated.png", good[: len(good) // 2])):
        bad = root / "train" / "b" / name
        bad.write_bytes(data)
        rc = cli.main(["run", "--dataset", str(root), "--model", "small_cnn", "--device", "cpu", "--no-progress",
                       "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert rc == 2 and str(bad) in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "o").exists()
        bad.unlink()


def test_cli_resume_says_fresh_or_finished(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["run", *TINY_ARGS, "--out", str(out), "--resume"]) == 0
    assert "starting afresh" in capsys.readouterr().out
    before = _files(out)
    assert cli.main(["run", *TINY_ARGS, "--out", str(out), "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "finished" in printed and "generation 2" not in printed and "resumed from" not in printed, printed
    assert _files(out) == before  # nothing trained, nothing rewritten


def test_cli_help_shows_every_default_once(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    options = text[text.index("options:"):].split("\n  -")[1:]  # one block per option: "-lr LR  help ..."
    assert len(options) >= 20
    for block in options:
        words = block.split()
        takes_value = len(words) > 1 and (words[1].isupper() or words[1].startswith("{"))  # a metavar or choices
        helptext = " ".join(words[2:] if takes_value else words[1:])
        assert re.sub(r"\(default: [^)]*\)", "", helptext).strip(), f"-{words[0]} has no help text"
        assert helptext.count("default") == 1 if takes_value else helptext.count("default") <= 1, helptext


def test_cli_ctrl_c_says_how_to_resume(tmp_path):
    """SIGINT after the first checkpoint: exit 130 and one line with the checkpoint and the command to resume."""
    out = tmp_path / "run"
    # a run far longer than the test waits for; the child gets Python's own SIGINT handler even where the
    # test runner's process ignores SIGINT (an ignored signal stays ignored across exec)
    child = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
             "sys.argv = ['ke_fast', 'run', *sys.argv[1:]]; runpy.run_module('ke_fast', run_name='__main__')")
    args = [*TINY_ARGS, "--generations", "10000", "--weight-decay", "0", "--out", str(out)]
    with open(tmp_path / "stderr.txt", "w+") as se:
        proc = subprocess.Popen([sys.executable, "-c", child, *args], cwd=tmp_path, env=_env(),
                                stdout=subprocess.DEVNULL, stderr=se)
        try:
            # the event is the first checkpoint; the bound catches a run that never writes one (idle: seconds)
            deadline = time.monotonic() + 900
            while not (out / "last.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            assert (out / "last.pt").exists(), f"no checkpoint; rc={proc.poll()}"
            proc.send_signal(signal.SIGINT)
            rc = proc.wait(timeout=600)  # SIGINT ends it within a step; generous for a loaded machine
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=60)
        se.seek(0)
        err = se.read()
    assert rc == 130, (rc, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("ke-fast run: interrupted") and str(out / "last.pt") in last, err[-3000:]
    command = last.partition("continue with: ")[2]
    words = shlex.split(command)
    # the interpreter that ran, and only the flags given (not the defaults _check filled in: --seed, --width)
    assert words[:4] == [sys.executable, "-m", "ke_fast", "run"] and words[-1] == "--resume", last
    flags = sorted(w for w in words[4:] if w.startswith("--"))
    assert flags == sorted(["--model", "--per-class", "--generations", "--epochs", "--no-progress", "--device",
                            "--weight-decay", "--out", "--resume"]), last
    resumed = cli._parser()[0].parse_args(words[3:])
    assert resumed.resume and Path(resumed.out) == out and resumed.generations == 10000, last
    assert resumed.model == "small_cnn" and resumed.per_class == 2 and resumed.weight_decay == 0, last


def test_exit_fast_runs_exit_handlers_flushes_and_keeps_the_status(tmp_path):
    """`python -m ke_fast` ends through cli.exit_fast (no module teardown): the atexit handlers still run, what
    was written to stdout but not flushed arrives, and the status is the one given."""
    code = ("import atexit, sys\n"
            "from ke_fast.cli import exit_fast\n"
            "atexit.register(lambda: open(sys.argv[1], 'w').write('handler ran'))\n"
            "sys.stdout.write('unflushed')\n"
            "exit_fast(3)\n"
            "print('not reached')\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "flag")], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 3, out.stderr
    assert out.stdout == "unflushed"
    assert (tmp_path / "flag").read_text() == "handler ran"


def test_no_plot_draws_no_plot_and_says_so(tmp_path, capsys):
    """--no-plot: the run writes history.csv, summary.json and the checkpoint, no plot.png, and its last line
    does not claim one."""
    from ke_fast import cli

    out = tmp_path / "run"
    assert cli.main(["run", *TINY_ARGS, "--no-plot", "--out", str(out)]) == 0
    assert (out / "history.csv").exists() and (out / "summary.json").exists() and (out / "last.pt").exists()
    assert not (out / "plot.png").exists()
    assert capsys.readouterr().out.splitlines()[-1].endswith("history.csv, summary.json and the checkpoint last.pt")
    study = tmp_path / "study"  # a study: neither its runs nor the study itself draw one
    assert cli.main(["run", *TINY_ARGS, "--seeds", "0", "1", "--no-plot", "--out", str(study)]) == 0
    assert (study / "summary.json").exists() and not list(study.rglob("plot.png"))
    assert capsys.readouterr().out.splitlines()[-1].endswith("summary.json, results.md and seed-<n>/ run folders")
