"""Several seeds in one study (ke_fast.study, ``ke-fast run --seeds`` / ``--baseline long``): the layout, the
aggregate against numpy, repeatability, resume inside a study, the compute-matched baseline, CLI refusals."""
from __future__ import annotations

import csv
import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

import ke_fast.kernels as K
from torch.utils.data import Subset

from ke_fast import cli
from ke_fast.data import digits
from ke_fast.evolve import Config, Evolution, load_checkpoint
from ke_fast.models import build_model
from ke_fast.study import Study, aggregate, baseline_config, plot, results_markdown, study_files

SEEDS = [0, 1, 2]
GENS, EPOCHS = 2, 2


def _tiny(generations: int = GENS, epochs: int = EPOCHS) -> list[str]:
    return ["--model", "small_cnn", "--per-class", "2", "--split", "wels", "--generations", str(generations),
            "--epochs", str(epochs), "--no-progress", "--device", "cpu"]


TINY = _tiny()


def _history(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _fit_masks(state: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.endswith("fit_mask")}


class _Recorder:
    """Records, per run folder, the (generation, epoch) pairs trained, the generations evolved (reset) and
    the model's state when its run starts; optionally raises KeyboardInterrupt at one (folder, g, epoch)."""

    def __init__(self, mp: pytest.MonkeyPatch, interrupt: tuple[Path, int, int] | None = None) -> None:
        self.trained: dict[Path, list[tuple[int, int]]] = {}
        self.evolved: dict[Path, list[int]] = {}
        self.initial: dict[Path, dict] = {}
        train, evolve, run = Evolution._train_epoch, Evolution._evolve, Evolution.run

        def _train_epoch(ev, net, opt, sched, g, epoch):
            if interrupt is not None and (ev.out, g, epoch) == interrupt:
                raise KeyboardInterrupt("simulated Ctrl-C")
            self.trained.setdefault(ev.out, []).append((g, epoch))
            return train(ev, net, opt, sched, g, epoch)

        def _evolve(ev, g):
            self.evolved.setdefault(ev.out, []).append(g)
            return evolve(ev, g)

        def _run(ev, resume=False):
            self.initial[ev.out] = {k: v.clone() for k, v in ev.model.state_dict().items()}
            return run(ev, resume)

        mp.setattr(Evolution, "_train_epoch", _train_epoch)
        mp.setattr(Evolution, "_evolve", _evolve)
        mp.setattr(Evolution, "run", _run)


def _make(seed: int):
    """A tiny model and the digits of one seed (2 training images per class, 200 test images)."""
    train, test, classes, channels = digits(per_class=2, seed=seed)
    return build_model("small_cnn", num_classes=classes, in_channels=channels), train, Subset(test, range(200))


def _study(out: Path, seeds: list[int] = SEEDS) -> Study:
    return Study(_make, Config(split="wels", generations=GENS, epochs=EPOCHS), seeds, out, baseline="long",
                 device="cpu", progress=False, log=lambda _: None, identity={"test": "tiny"})


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """One uninterrupted study: 3 seeds, WELS 0.5, 2 generations x 2 epochs, the long baseline."""
    out = tmp_path_factory.mktemp("study") / "ref"
    with pytest.MonkeyPatch.context() as mp:
        rec = _Recorder(mp)
        _study(out).run()
    return out, rec


def test_layout_and_summary_equal_numpy(study):
    out, _ = study
    top = {p.name for p in out.iterdir()}
    assert top == {"summary.json", "results.md", "plot.png", *(f"seed-{s}" for s in SEEDS)}
    for s in SEEDS:
        for run in (out / f"seed-{s}", out / f"seed-{s}" / "baseline"):
            assert {"last.pt", "history.csv", "summary.json", "plot.png"} <= {p.name for p in run.iterdir()}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == SEEDS and "ddof=1" in summary["std"]
    assert summary["val"] == []  # no validation list here (aggregate_val: test below)
    histories = [_history(out / f"seed-{s}" / "history.csv") for s in SEEDS]
    assert [r["generation"] for r in summary["generations"]] == list(range(1, GENS + 1))
    for i, row in enumerate(summary["generations"]):
        for metric in ("dense_acc", "fit_acc"):
            values = np.array([h[i][metric] for h in histories])
            assert row[metric]["values"] == values.tolist()
            assert row[metric]["mean"] == np.mean(values) and row[metric]["std"] == np.std(values, ddof=1)
    base = np.array([_history(out / f"seed-{s}" / "baseline" / "history.csv")[-1]["dense_acc"] for s in SEEDS])
    assert summary["baseline"]["kind"] == "long" and summary["baseline"]["epochs"] == GENS * EPOCHS
    assert summary["baseline"]["dense_acc"]["mean"] == np.mean(base)
    assert summary["baseline"]["dense_acc"]["std"] == np.std(base, ddof=1)
    # the table: one row per generation, the baseline beside the last one, the per-seed rows
    md = (out / "results.md").read_text()
    last = summary["generations"][-1]
    assert f"| {GENS} | {100 * last['dense_acc']['mean']:.1f} ± {100 * last['dense_acc']['std']:.1f} |" in md
    assert f"| long dense baseline, {GENS * EPOCHS} epochs | {100 * np.mean(base):.1f} ± " \
           f"{100 * np.std(base, ddof=1):.1f} |" in md
    assert all(f"\n| {s} | " in md for s in SEEDS)


def test_seeds_differ_and_a_repeat_is_identical(study, tmp_path):
    out, rec = study
    # different seeds: different WELS masks and different initial weights
    init = [rec.initial[out / f"seed-{s}"] for s in SEEDS]
    for a, b in ((0, 1), (0, 2), (1, 2)):
        masks_a, masks_b = _fit_masks(init[a]), _fit_masks(init[b])
        assert masks_a and all(not torch.equal(masks_a[k], masks_b[k]) for k in masks_a)
        weights = [k for k in init[a] if k.endswith(".weight") and k.replace("weight", "fit_mask") in init[a]]
        assert weights and all(not torch.equal(init[a][k], init[b][k]) for k in weights)
    # the baseline of a seed starts from the KE run's initial weights (same seed, same counter RNG)
    for s in SEEDS:
        ke, base = rec.initial[out / f"seed-{s}"], rec.initial[out / f"seed-{s}" / "baseline"]
        assert all(torch.equal(ke[k], base[k]) for k in ke if not k.endswith("fit_mask"))
    # a seed again: identical weights and histories (the timings aside); the resume test below repeats the
    # whole study and compares summary.json byte for byte
    again = tmp_path / "again"
    _study(again, seeds=[1]).run()
    for s in (1,):
        for sub in (f"seed-{s}", f"seed-{s}/baseline"):
            a, b = load_checkpoint(out / sub / "last.pt"), load_checkpoint(again / sub / "last.pt")
            assert a["model"].keys() == b["model"].keys()
            assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), sub
            assert [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in a["history"]] == \
                   [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in b["history"]]


def test_baseline_trains_generations_x_epochs_without_reset(study):
    out, rec = study
    for s in SEEDS:
        ke, base = out / f"seed-{s}", out / f"seed-{s}" / "baseline"
        assert rec.trained[ke] == [(g, e) for g in range(1, GENS + 1) for e in range(EPOCHS)]
        assert rec.evolved[ke] == list(range(2, GENS + 1))
        assert rec.trained[base] == [(1, e) for e in range(GENS * EPOCHS)]  # one schedule of G x E epochs
        assert base not in rec.evolved  # never reset
        ckpt = load_checkpoint(base / "last.pt")
        assert ckpt["config"]["generations"] == 1 and ckpt["config"]["epochs"] == GENS * EPOCHS
        assert ckpt["config"]["split_rate"] == 1.0 and ckpt["config"]["seed"] == s
        assert {k: ckpt["config"][k] for k in ("lr", "warmup_epochs", "batch_size")} == \
               {k: load_checkpoint(ke / "last.pt")["config"][k] for k in ("lr", "warmup_epochs", "batch_size")}
        masks = _fit_masks(ckpt["model"])
        weights = {k: ckpt["model"][k[: -len("fit_mask")] + "weight"] for k in masks}
        assert masks and all(bool(K.unpack_mask(masks[k], weights[k].shape).all()) for k in masks)
        (row,) = ckpt["history"]
        assert row["fit_acc"] == row["dense_acc"]  # every weight is fit: fit == dense


def test_baseline_config():
    cfg = Config(split="wels", split_rate=0.3, generations=5, epochs=7, lr=0.1, warmup_epochs=2, batch_size=8, seed=4)
    base = baseline_config(cfg)
    assert (base.generations, base.epochs, base.split_rate) == (1, 35, 1.0)
    assert (base.lr, base.warmup_epochs, base.batch_size, base.seed) == (0.1, 2, 8, 4)


def test_resume_inside_a_study_continues_the_interrupted_seed(study, tmp_path):
    ref, _ = study
    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as mp:
        _Recorder(mp, interrupt=(out / "seed-2", 2, 0))  # seed 2, generation 2: after generation 1's checkpoint
        interrupted = _study(out)
        with pytest.raises(KeyboardInterrupt):
            interrupted.run()
    assert interrupted.current.out == out / "seed-2" and interrupted.current.saved == (1, EPOCHS)
    assert not (out / "summary.json").exists()
    finished = {p: p.read_bytes() for s in (0, 1) for p in (out / f"seed-{s}").rglob("*") if p.is_file()}
    with pytest.MonkeyPatch.context() as mp:
        rec = _Recorder(mp)
        _study(out).run(resume=True)
    # seeds 0 and 1 (and their baselines) were only read; seed 2 continued at generation 2, then its baseline ran
    assert all(out / f"seed-{s}" not in rec.trained and out / f"seed-{s}" / "baseline" not in rec.trained
               for s in (0, 1))
    assert {p: p.read_bytes() for p in finished} == finished
    assert rec.trained[out / "seed-2"] == [(2, e) for e in range(EPOCHS)]
    assert rec.trained[out / "seed-2" / "baseline"] == [(1, e) for e in range(GENS * EPOCHS)]
    # and the result is the uninterrupted study's
    assert (out / "summary.json").read_bytes() == (ref / "summary.json").read_bytes()


def test_cli_interrupt_names_the_seed_and_the_resume_command(tmp_path, capsys):
    """Ctrl-C in seed 1 of ``--seeds 0 1``: exit 130, the seed's checkpoint and a command that resumes it."""
    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as mp:
        _Recorder(mp, interrupt=(out / "seed-1", 1, 0))
        assert cli.main(["run", *_tiny(1, 1), "--seeds", "0", "1", "--out", str(out)]) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert str(out / "seed-1") in err and "no checkpoint yet" in err, err
    command = shlex.split(err.split("continue with: ")[1])
    assert command[command.index("--seeds") + 1:][:2] == ["0", "1"] and command[-1] == "--resume"
    with pytest.MonkeyPatch.context() as mp:
        rec = _Recorder(mp)
        assert cli.main(["run", *command[4:]]) == 0  # the printed command, after "python -m ke_fast run"
    assert list(rec.trained) == [out / "seed-1"]
    assert json.loads((out / "summary.json").read_text())["seeds"] == [0, 1]


def test_one_seed_and_overwrite(tmp_path, capsys):
    """--baseline with --seed: a study of that one seed (std n/a); --overwrite replaces the whole study."""
    out = tmp_path / "run"
    (out / "seed-9" / "baseline").mkdir(parents=True)
    (out / "seed-9" / "baseline" / "last.pt").write_bytes(b"an old run")
    (out / "results.md").write_text("old")
    (out / "notes.txt").write_text("mine")
    assert cli.main(["run", *_tiny(1, 1), "--seed", "5", "--baseline", "long", "--out", str(out), "--overwrite"]) == 0
    assert "overwrite: deleted 2 files" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "plot.png", "results.md", "seed-5", "summary.json"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [5] and summary["generations"][0]["dense_acc"]["std"] is None
    assert "± n/a" in (out / "results.md").read_text()
    assert (out / "notes.txt").read_text() == "mine"


def test_aggregate_by_hand():
    histories = {3: [dict(generation=1, dense_acc=0.5, fit_acc=0.1)],
                 7: [dict(generation=1, dense_acc=0.7, fit_acc=0.3)]}
    s = aggregate(histories, {3: dict(dense_acc=0.6, fit_acc=0.6), 7: dict(dense_acc=0.8, fit_acc=0.8)})
    assert s["seeds"] == [3, 7]
    assert s["generations"][0]["dense_acc"] == dict(mean=pytest.approx(0.6), std=pytest.approx(0.2 / 2 ** 0.5),
                                                    values=[0.5, 0.7])
    assert s["baseline"]["dense_acc"]["mean"] == pytest.approx(0.7)
    with pytest.raises(ValueError, match="same, non-empty generations"):
        aggregate({0: histories[3], 1: []})
    with pytest.raises(ValueError, match="baselines"):
        aggregate(histories, {3: dict(dense_acc=0.6, fit_acc=0.6)})


def test_aggregate_metric_task_reads_recall_and_labels_it(tmp_path):
    """--task metric: the study's table and plot are over Recall@1 (the history has no accuracy)."""
    histories = {s: [dict(generation=1, dense_recall1=r, fit_recall1=r - 0.1, dense_recall4=1.0, fit_recall4=1.0)]
                 for s, r in ((0, 0.5), (1, 0.7))}
    s = aggregate(histories, task="metric")
    assert s["metric"] == dict(dense="dense_recall1", fit="fit_recall1", name="Recall@1", percent=True,
                               higher_is_better=True, label="test Recall@1 (%) on classes unseen in training")
    assert s["generations"][0]["fit_recall1"]["mean"] == pytest.approx(0.5)
    summary = dict(s, config=dict(Config(task="metric").__dict__), identity=None)
    text = results_markdown(summary)
    assert "Recall@1" in text and "| 1 | 60.0 ± 14.1 | 50.0 ± 14.1 |" in text
    plot(summary, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 0
    with pytest.raises(KeyError):
        aggregate(histories)  # classification keys are not in a metric history


@pytest.mark.parametrize("kwargs, words", [
    (dict(seeds=[]), "seeds"), (dict(seeds=[1, 1]), "distinct"), (dict(seeds=[-1]), "seeds"),
    (dict(seeds=[0], baseline="short"), "baseline"),
])
def test_study_argument_errors(tmp_path, kwargs, words):
    with pytest.raises(ValueError, match=words):
        Study(lambda seed: None, Config(), out_dir=tmp_path / "o", **kwargs)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("bad, words", [
    (["--seed", "1", "--seeds", "0", "1"], ("--seeds", "not allowed with", "--seed")),
    (["--seeds", "0", "0"], ("--seeds must be distinct",)),
    (["--seeds", "0", "-1"], ("--seeds must be in 0 .. 2^64-1", "-1")),
    (["--seeds"], ("--seeds", "expected at least one")),
    (["--baseline", "short"], ("--baseline", "invalid choice")),
])
def test_cli_study_argument_errors(tmp_path, capsys, bad, words):
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", *TINY, "--out", str(tmp_path / "o"), *bad])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("error:") == 1 and all(w in err for w in words), err
    assert not (tmp_path / "o").exists()


def test_cli_study_out_refusals(tmp_path, capsys):
    """A study never starts over a run or study without --resume / --overwrite, checked before any work."""
    single = tmp_path / "single"  # what a single run leaves (the checks look at file names only)
    single.mkdir()
    for name in ("last.pt", "prev.pt", "history.csv", "summary.json", "plot.png"):
        (single / name).write_bytes(b"x")
    partial = tmp_path / "partial"
    (partial / "seed-1").mkdir(parents=True)
    (partial / "seed-1" / "history.csv").write_text("generation\n1\n")
    nested = tmp_path / "nested"
    (nested / "seed-4" / "baseline").mkdir(parents=True)
    (nested / "seed-4" / "baseline" / "prev.pt").write_bytes(b"x")
    capsys.readouterr()
    for out, extra, words in ((single, [], ("holds a run", "last.pt", "--resume", "--overwrite")),
                              (single, ["--resume"], ("holds a single run", "--overwrite")),
                              (partial, [], ("holds a run", "seed-1/history.csv")),
                              (partial, ["--resume"], (str(partial / "seed-1"), "no checkpoint", "--overwrite")),
                              (nested, [], ("holds a run", "seed-4/baseline/prev.pt"))):
        before = _files(out)
        with pytest.raises(SystemExit) as exc:
            cli.main(["run", *TINY, "--seeds", "0", "1", "--out", str(out), *extra])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.count("error:") == 1 and all(w in err for w in words), (extra, err)
        assert _files(out) == before
    assert [p.name for p in study_files(nested)] == ["prev.pt"]


def test_aggregate_val_keeps_the_validations_during_training_per_epoch():
    """summary.json's ``val``: mean and sample std over the seeds at each (generation, epoch) of the evaluations
    during training; [] when the seeds were not evaluated at the same epochs."""
    from ke_fast.study import aggregate_val

    def rows(offset: float, epochs=(1, 2)) -> list[dict]:
        return [dict(generation=g, epoch=e, run_epoch=2 * (g - 1) + e, dense_val_acc=0.1 * e + offset,
                     dense_val_top5=0.5 + offset) for g in (1, 2) for e in epochs]

    val = aggregate_val({3: rows(0.0), 7: rows(0.2)})
    assert [(r["generation"], r["epoch"], r["run_epoch"]) for r in val] == [(1, 1, 1), (1, 2, 2), (2, 1, 3), (2, 2, 4)]
    assert val[1]["dense_val_acc"]["values"] == pytest.approx([0.2, 0.4])
    assert val[1]["dense_val_acc"]["mean"] == pytest.approx(0.3)
    assert val[1]["dense_val_acc"]["std"] == pytest.approx(0.2 / 2 ** 0.5)
    assert aggregate_val({3: rows(0.0), 7: rows(0.0, epochs=(2,))}) == [] and aggregate_val({3: []}) == []
    assert aggregate_val({3: rows(0.0)})[0]["dense_val_top5"]["std"] is None  # one seed
