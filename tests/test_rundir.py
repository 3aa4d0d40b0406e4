"""The run folder (ke_fast.rundir): the overwrite / resume policy the library, the study and the command line
share (a folder holding a run is refused without touching it), the background checkpoint writer's errors
(never lost), and the resume hint's command under torchrun.

Everything runs on the CPU with tiny configurations (digits, the small CNN)."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import Subset

import ke_fast.rundir as R
from ke_fast import cli
from ke_fast.data import digits
from ke_fast.evolve import Config, Evolution, load_checkpoint
from ke_fast.models import build_model
from ke_fast.rundir import RunDir, RunExistsError, StudyDir
from ke_fast.study import Study


def _data(seed: int = 0):
    train, test, _, _ = digits(per_class=2, seed=seed)
    return train, Subset(test, range(40))


def _evolution(out: Path, seed: int = 0, **options) -> Evolution:
    torch.manual_seed(0)
    return Evolution(build_model("small_cnn", num_classes=10, in_channels=1, width=4), *_data(),
                     Config(generations=1, epochs=2, batch_size=10, seed=seed), out, device="cpu", progress=False,
                     log=lambda _: None, **options)


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_evolution_run_never_replaces_a_run_unless_asked(tmp_path, monkeypatch):
    """Evolution.run into a folder holding a run raises RunExistsError (a FileExistsError) before any work and
    leaves every file as it was; resume=True continues it, overwrite=True replaces it."""
    out = tmp_path / "run"
    _evolution(out).run()
    before = _files(out)
    assert {"last.pt", "history.csv", "summary.json", "plot.png"} <= set(before)
    trained = []
    real = Evolution._train_epoch
    monkeypatch.setattr(Evolution, "_train_epoch", lambda self, *a: trained.append(a[-2:]) or real(self, *a))
    with pytest.raises(RunExistsError) as exc:
        _evolution(out, seed=1).run()
    assert isinstance(exc.value, FileExistsError)
    assert str(out) in str(exc.value) and "resume=True" in str(exc.value) and "overwrite=True" in str(exc.value)
    assert trained == [] and _files(out) == before
    with pytest.raises(ValueError, match="exclude"):
        _evolution(out).run(resume=True, overwrite=True)
    assert _files(out) == before
    # a lone history.csv: a resume would start afresh over it, so it is refused too
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "history.csv").write_text("generation\n1\n")
    with pytest.raises(RunExistsError, match="no checkpoint"):
        _evolution(lone).run(resume=True)
    assert _files(lone) == {"history.csv": b"generation\n1\n"}

    _evolution(out).run(resume=True)  # finished: only read
    assert trained == [] and _files(out) == before
    logged = []
    ev = _evolution(out, seed=1)
    ev.log = logged.append
    ev.run(overwrite=True)
    assert load_checkpoint(out / "last.pt")["config"]["seed"] == 1 and trained  # a new run
    assert f"overwrite: deleted last.pt, history.csv, summary.json, plot.png of the previous run in {out}" in logged


def test_study_run_never_replaces_a_study_unless_asked(tmp_path):
    out = tmp_path / "study"

    def make(seed):
        return build_model("small_cnn", num_classes=10, in_channels=1, width=4), *_data(seed)

    def study():
        return Study(make, Config(generations=1, epochs=1, batch_size=10), [0], out, device="cpu", progress=False,
                     log=lambda _: None)

    study().run()
    before = _files(out)
    with pytest.raises(RunExistsError) as exc:
        study().run()
    assert "seed-0/last.pt" in str(exc.value) and _files(out) == before
    assert study().run(resume=True)["seeds"] == [0] and _files(out) == before
    (out / "notes.txt").write_text("mine")
    study().run(overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and (out / "seed-0" / "last.pt").is_file()
    # a single run's folder is no study to resume
    single = tmp_path / "single"
    _evolution(single).run()
    with pytest.raises(RunExistsError, match="single run"):
        StudyDir(single).check([0], resume=True)


def test_run_dir_policy_touches_nothing(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(NotADirectoryError):
        RunDir(a_file).check()
    RunDir(tmp_path / "missing").check()  # nothing there: fine, and nothing made
    assert not (tmp_path / "missing").exists()
    (tmp_path / "plot.png").write_bytes(b"x")
    with pytest.raises(RunExistsError) as exc:
        RunDir(tmp_path).check()
    # the command line words the same refusal with its flags
    assert exc.value.render({"out_dir": "--out"}).startswith(f"--out {str(tmp_path)!r} holds a run (plot.png)")
    assert exc.value.render({"out_dir": "--out"}).endswith("continue it with --resume, or start afresh and replace it "
                                                           "with --overwrite")
    assert (tmp_path / "plot.png").read_bytes() == b"x"


# ---- the background writer -------------------------------------------------------------------------

def _failing_save(monkeypatch, fail_at: int) -> list[int]:
    """Make the fail_at-th checkpoint write (1-based) raise OSError("disk full") in the writer thread."""
    calls = []
    real = R.save_atomic

    def save(obj, path, keep_previous=None):
        calls.append(len(calls) + 1)
        if len(calls) == fail_at:
            raise OSError(28, "No space left on device (simulated)")
        real(obj, path, keep_previous)

    monkeypatch.setattr(R, "save_atomic", save)
    return calls


def test_a_failed_checkpoint_write_is_raised_by_the_next_checkpoint(tmp_path, monkeypatch):
    """Checkpoints after every epoch: the first write fails in the background; the second checkpoint (the
    generation's end) raises it in the training thread, and run raises it, nothing silently lost."""
    calls = _failing_save(monkeypatch, fail_at=1)
    ev = _evolution(tmp_path / "run", checkpoint_every=0)
    with pytest.raises(OSError, match="simulated"):
        ev.run()
    assert calls == [1]  # the second checkpoint was never submitted: its submit raised the first one's error
    assert ev.saved is None and not (tmp_path / "run" / "last.pt").exists()


def test_a_failed_last_checkpoint_write_is_raised_at_the_end_of_run(tmp_path, monkeypatch):
    calls = _failing_save(monkeypatch, fail_at=2)
    ev = _evolution(tmp_path / "run", checkpoint_every=0)
    with pytest.raises(OSError, match="simulated"):
        ev.run()
    assert calls == [1, 2] and ev.saved == (1, 1)  # the first write completed, the last one failed
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 1


def test_writer_error_is_raised_once(monkeypatch):
    def boom(*_):
        raise OSError("disk full")

    monkeypatch.setattr(R, "save_atomic", boom)
    w = R._Writer()
    w.submit({}, Path("unused"), Path("unused"), "tag")
    with pytest.raises(OSError, match="disk full"):
        w.wait()
    w.wait()  # reported once
    assert w.done is None


# ---- the resume hint ---------------------------------------------------------------------------------

def _hint(monkeypatch, env: dict[str, str], argv: list[str]) -> str:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    p, r = cli._parser()
    args = p.parse_args(argv)
    args.given = cli._given(argv, vars(args))
    return cli._resume_command(args)


def test_resume_hint_names_the_interpreter_and_torchrun(monkeypatch):
    argv = ["run", "--model", "small_cnn", "--seeds", "0", "1", "--out", "runs/x y", "--no-progress"]
    single = _hint(monkeypatch, {"WORLD_SIZE": "1"}, argv)
    assert single == f"{shlex.join([sys.executable])} -m ke_fast run --model small_cnn --seeds 0 1 --no-progress " \
                     f"--out 'runs/x y' --resume", single
    ddp = _hint(monkeypatch, {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}, argv)
    assert ddp.endswith("-m torch.distributed.run --nproc_per_node=2 -m ke_fast run --model small_cnn --seeds 0 1 "
                        "--no-progress --out 'runs/x y' --resume"), ddp
    nodes = _hint(monkeypatch, {"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"}, argv)
    assert "--nproc_per_node=4 --nnodes=2 -m ke_fast run" in nodes and "rendezvous" in nodes, nodes


# -- the run's plot ------------------------------------------------------------------------------------------
def _rows(keys: list[str], gens: int = 3) -> list[dict]:
    return [dict(generation=g, **{k: 0.1 * g for k in keys}) for g in range(1, gens + 1)]


def _labels(ax) -> list[str]:
    return [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]


def test_run_plot_shows_top1_top5_of_dense_and_fit_on_test_and_val_and_the_val_curve():
    """The figure's content, not its pixels: per generation 8 curves (N_g / H^F_g x top-1 / top-5 x test / val),
    then the validation curve during training against the run's epoch, a mark where each generation ends."""
    from ke_fast.plots import pyplot, run_figure
    from ke_fast.tasks import TASKS

    keys = [f"{n}_{s}{m}" for n in ("dense", "fit") for s in ("", "val_") for m in ("acc", "top5")]
    val = [dict(generation=g, epoch=e, run_epoch=2 * (g - 1) + e, dense_val_acc=0.2, dense_val_top5=0.5, dense_acc=0.1)
           for g in (1, 2, 3) for e in (1, 2)]
    fig = run_figure(_rows(keys), val, TASKS["classify"], "KE KELS 0.5")
    per_gen, curve = fig.axes
    labels = _labels(per_gen)
    assert len(labels) == 8 and len(set(labels)) == 8
    assert {"dense $N_g$ top-1 (test)", "fit $H^F_g$ top-5 (val)"} <= set(labels)
    assert list(per_gen.get_lines()[0].get_ydata()) == pytest.approx([10, 20, 30])  # percent
    assert _labels(curve) == ["dense $N_g$ top-1 (val)", "dense $N_g$ top-5 (val)"]
    assert list(curve.get_lines()[0].get_xdata()) == [1, 2, 3, 4, 5, 6]
    assert [ln.get_xdata()[0] for ln in curve.get_lines()[2:]] == [2, 4]  # generations 1 and 2 end there
    pyplot().close(fig)
    fig = run_figure(_rows(["dense_acc", "fit_acc", "dense_top5", "fit_top5"]), [], TASKS["classify"], "t")
    assert len(fig.axes) == 1 and len(_labels(fig.axes[0])) == 4  # no validation list: test only, one panel
    pyplot().close(fig)
    fig = run_figure(_rows(["dense_rmse", "fit_rmse", "dense_r2", "fit_r2"]), [], TASKS["regression"], "t")
    assert _labels(fig.axes[0]) == ["dense $N_g$ RMSE (test)", "fit $H^F_g$ RMSE (test)"]  # R²: another scale
    pyplot().close(fig)
