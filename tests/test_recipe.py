"""Recipes (--recipe official|demo), per-generation epochs / lr, the per-epoch schedule, top-5 and the
validation split, CS-KD, --model through the registry and make-data (ke_fast.recipes, config, tasks, cli)."""
from __future__ import annotations

import csv
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from ke_fast import cli, recipes
from ke_fast.config import Config, ConfigError
from ke_fast.evolve import Evolution, _lr_lambda, load_checkpoint
from ke_fast.study import baseline_config
from ke_fast.tasks import Classify, cskd_loss


# -- recipes as data ------------------------------------------------------------------------------
def test_official_recipe_values_and_overrides():
    r = recipes.resolve("official", "resnet18", {})
    assert (r["generations"], r["epochs"], r["batch_size"], r["lr"], r["momentum"], r["weight_decay"],
            r["label_smoothing"], r["warmup_epochs"], r["schedule"], r["image_size"], r["width"]) == \
        (5, 200, 32, 0.256, 0.9, 1e-4, 0.1, 5, "epoch", 224, None)  # width None: the architecture's 64
    assert recipes.resolve("official", "vgg11_bn", {})["weight_decay"] == 5e-4
    assert recipes.resolve("official", "vgg11_bn", {"weight_decay": 0.0})["weight_decay"] == 0.0  # a flag wins
    demo = recipes.resolve("demo", "resnet18", {"epochs": (3, 2), "lr": None})
    assert demo["epochs"] == (3, 2) and demo["lr"] == 0.05 and demo["width"] == 16 and demo["schedule"] == "step"
    assert recipes.resolve("demo", "small_cnn", {})["width"] is None  # no width option: the model's own
    with pytest.raises(ValueError, match="recipe must be one of"):
        recipes.resolve("paper", "resnet18", {})
    assert recipes.default_recipe(True) == "official" and recipes.default_recipe(False) == "demo"


# -- Config: per-generation values and the new fields ----------------------------------------------
def test_config_per_generation_epochs_and_lr():
    cfg = Config(generations=3, epochs=[4, 2, 1], lr=(0.1, 0.05, 0.05))
    assert cfg.epochs == (4, 2, 1) and [cfg.epochs_in(g) for g in (1, 2, 3)] == [4, 2, 1] and cfg.total_epochs == 7
    assert cfg.lr_in(2) == 0.05 and Config(generations=2, epochs=3).total_epochs == 6
    base = baseline_config(cfg)
    assert (base.generations, base.epochs, base.lr, base.split_rate) == (1, 7, 0.1, 1.0)


@pytest.mark.parametrize("kwargs, field", [
    (dict(generations=3, epochs=(4, 2)), "epochs"), (dict(epochs=(0,), generations=1), "epochs"),
    (dict(generations=2, lr=(0.1, -1.0)), "lr"), (dict(schedule="hourly"), "schedule"),
    (dict(regularizer="mixup"), "regularizer"), (dict(regularizer="cskd", task="regression"), "regularizer"),
    (dict(val_every=-1), "val_every"), (dict(val_every=1.5), "val_every"), (dict(recipe="paper"), "recipe")])
def test_config_refuses_bad_values(kwargs, field):
    with pytest.raises(ConfigError) as info:
        Config(**kwargs)
    assert info.value.field == field


@pytest.mark.parametrize("words, flag", [
    (["--generations", "3", "--epochs", "4,2"], "--epochs"), (["--epochs", "a,b"], "--epochs"),
    (["--lr", "0.1,0"], "--lr"), (["--schedule", "hourly"], "--schedule"), (["--val-every", "-2"], "--val-every"),
    (["--recipe", "paper"], "--recipe"), (["--regularizer", "mixup"], "--regularizer"),
    (["--model", "no_such_net"], "--model"), (["--model", "no_such_module:make"], "--model"),
    (["--label-smoothing", "2"], "--label-smoothing"), (["--width", "8", "--model", "densenet_tiny"], "--width")])
def test_cli_bad_new_flags_exit_2_naming_the_flag(tmp_path, capsys, words, flag):
    with pytest.raises(SystemExit) as info:
        cli.main(["run", *words, "--device", "cpu", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and flag in err.strip().splitlines()[-1], err
    assert not (tmp_path / "o").exists()


# -- the schedule: once per epoch, as the official cosine_lr ----------------------------------------
def _official_cosine(epoch: int, warmup: int, epochs: int) -> float:
    """utils/schedulers.py L39-46 of the official code, as a factor of the peak lr."""
    if epoch < warmup:
        return (epoch + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / (epochs - warmup)))


def test_epoch_schedule_is_the_official_per_epoch_cosine():
    cfg = Config(generations=2, epochs=(12, 8), warmup_epochs=3, schedule="epoch")
    for g, epochs in ((1, 12), (2, 8)):
        f, steps = _lr_lambda(cfg, 7, g), 7
        for e in range(epochs):
            values = {f(e * steps + i) for i in range(steps)}
            assert values == {_official_cosine(e, 3, epochs)}  # constant within the epoch, the official value
    step = _lr_lambda(Config(epochs=12, warmup_epochs=3), 7)
    assert step(1) != step(2)  # the default schedule still moves every step


# -- top-5, CS-KD ------------------------------------------------------------------------------------
def test_top5_counts_the_five_largest():
    out = torch.tensor([[9., 8, 7, 6, 5, 4], [1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 0, 1]])
    y = torch.tensor([4, 0, 5])  # 5th largest: top-5 hit; smallest: miss; largest: top-1 hit
    got = Classify(Config()).evaluate(lambda x: x, [(out, y)])
    assert got == {"acc": 1 / 3, "top5": 2 / 3}


def test_cskd_loss_is_the_hand_computation():
    out = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    partner = torch.tensor([[1.0, 1.0, 0.0], [0.0, 3.0, -2.0]])
    y = torch.tensor([0, 2])
    t, n = 4.0, 2
    ce = -sum((1 - 0.1) * torch.log_softmax(out[i], 0)[y[i]] + 0.1 / 3 * torch.log_softmax(out[i], 0).sum()
              for i in range(n)) / n
    kl = sum((torch.softmax(partner[i] / t, 0) * (torch.log_softmax(partner[i] / t, 0)
                                                   - torch.log_softmax(out[i] / t, 0))).sum() for i in range(n))
    expected = ce + 3 * kl * t * t / n
    assert torch.allclose(cskd_loss(out, partner, y, 0.1), expected, atol=1e-6)


def test_cskd_forward_loss_pairs_and_gradients():
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    task = Classify(Config(regularizer="cskd"))
    assert task.pairs and not Classify(Config()).pairs
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])  # anchors, then their same-class partners
    loss = task.forward_loss(net, x, y)
    with torch.no_grad():
        partner = net(x[3:])
    assert torch.allclose(loss, cskd_loss(net(x[:3]), partner, y[:3], 0.1))
    loss.backward()  # the partners' forward carries no gradient: equal to the loss with a constant target
    g = net.weight.grad.clone()
    net.zero_grad()
    cskd_loss(net(x[:3]), partner.clone(), y[:3], 0.1).backward()
    assert torch.allclose(g, net.weight.grad)


# -- the validation split in the loop ----------------------------------------------------------------
def test_evolution_scores_val_and_validates_every_n_epochs(tmp_path):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 5, generator=g), torch.arange(24) % 3
    data = TensorDataset(x, y)
    lines = []
    ev = Evolution(torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)), data, data,
                   Config(generations=2, epochs=(2, 1), val_every=1, regularizer="cskd"), tmp_path, device="cpu",
                   progress=False, log=lines.append, val_set=TensorDataset(x[:9], y[:9]))
    history = ev.run()
    keys = {"dense_acc", "dense_top5", "dense_val_acc", "dense_val_top5", "fit_val_acc", "fit_val_top5"}
    assert keys <= set(history[0]) and len(history) == 2
    during = [ln for ln in lines if " epoch " in ln and "val" in ln]
    assert len(during) == 3, lines  # every epoch of both generations (2 + 1)
    with open(tmp_path / "history.csv") as f:
        assert keys <= set(next(csv.reader(f)))
    # every evaluation during training is kept: val.csv, summary.json's "val", the checkpoint (a resume keeps it)
    at = [(1, 1, 1), (1, 2, 2), (2, 1, 3)]  # (generation, epoch, run_epoch)
    assert [(r["generation"], r["epoch"], r["run_epoch"]) for r in ev.val_history] == at
    assert all({"dense_val_acc", "dense_val_top5", "dense_acc"} <= set(r) for r in ev.val_history)
    with open(tmp_path / "val.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["generation"]), int(r["epoch"]), int(r["run_epoch"])) for r in rows] == at
    assert [float(r["dense_val_acc"]) for r in rows] == [r["dense_val_acc"] for r in ev.val_history]
    assert json.loads((tmp_path / "summary.json").read_text())["val"] == ev.val_history
    assert load_checkpoint(tmp_path / "last.pt")["val_history"] == ev.val_history


def test_a_resume_keeps_the_validations_during_training(tmp_path):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 5, generator=g), torch.arange(12) % 3
    data = TensorDataset(x, y)

    def evolution(generations: int) -> Evolution:
        return Evolution(torch.nn.Linear(5, 3), data, data, Config(generations=generations, epochs=2, val_every=1),
                         tmp_path, device="cpu", progress=False, log=lambda _: None, val_set=data)

    first = evolution(1)
    first.run()
    more = evolution(2)
    more.run(resume=True)  # a second generation: the first one's rows come from the checkpoint
    assert more.val_history[:2] == first.val_history and len(first.val_history) == 2
    assert [(r["generation"], r["epoch"], r["run_epoch"]) for r in more.val_history] == [(1, 1, 1), (1, 2, 2),
                                                                                          (2, 1, 3), (2, 2, 4)]
    assert json.loads((tmp_path / "summary.json").read_text())["val"] == more.val_history


# -- the command line end to end ----------------------------------------------------------------------
def test_cli_official_recipe_on_make_data_flower102(tmp_path, capsys):
    root = tmp_path / "flower102"
    assert cli.main(["make-data", "flower102", str(root), "--classes", "3", "--per-class", "2", "--scale",
                     "0.2"]) == 0
    assert (root / "lists" / "trn.csv").exists() and (root / "lists" / "val.csv").exists()
    out = tmp_path / "run"
    assert cli.main(["run", "--dataset", str(root), "--image-size", "64", "--generations", "1", "--epochs", "1",
                     "--device", "cpu", "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    line = next(ln for ln in printed.splitlines() if ln.startswith("recipe "))
    for part in ("recipe official", "batch_size 32", "lr 0.256", "schedule epoch", "warmup_epochs 5",
                 "image_size 64", "width standard", "val_every 10"):
        assert part in line, line
    assert "6 train / 6 val / 6 test images" in printed and "dense top5" in printed and "val N_g" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["recipe"] == "official" and summary["config"]["lr"] == 0.256
    for key in ("dense_acc", "dense_top5", "fit_top5", "dense_val_acc", "dense_val_top5", "fit_val_acc",
                "fit_val_top5"):
        assert 0 <= summary["final"][key] <= 1
    ckpt = torch.load(out / "last.pt", weights_only=False)
    assert ckpt["model"]["conv1.weight"].shape[0] == 64  # the full-width ResNet-18, not the demo's 16


def test_cli_study_per_generation_epochs_long_baseline_cskd(tmp_path, capsys):
    out = tmp_path / "study"
    assert cli.main(["run", "--generations", "2", "--epochs", "2,1", "--lr", "0.05,0.02", "--per-class", "3",
                     "--batch-size", "16", "--model", "small_cnn", "--regularizer", "cskd",
                     "--seed", "1", "--baseline", "long", "--device", "cpu", "--no-progress", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["epochs"] == [2, 1] and summary["baseline"]["epochs"] == 3
    base = json.loads((out / "seed-1" / "baseline" / "summary.json").read_text())
    assert base["config"]["epochs"] == 3 and base["config"]["lr"] == 0.05 and base["config"]["regularizer"] == "cskd"
    assert "dense_top5" in summary["generations"][0]
    assert "3 epochs" in (out / "results.md").read_text()
    assert "recipe demo" in capsys.readouterr().out


def test_cli_model_module_function(tmp_path, monkeypatch, capsys):
    (tmp_path / "mynets.py").write_text(
        "import torch\n"
        "def net(num_classes, in_channels):\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(in_channels, 4, 3), torch.nn.AdaptiveAvgPool2d(1),\n"
        "                               torch.nn.Flatten(), torch.nn.Linear(4, num_classes))\n")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", "--model", "mynets:net", "--generations", "1", "--epochs", "1", "--per-class", "2",
                     "--device", "cpu", "--no-progress", "--out", str(tmp_path / "o")]) == 0
    assert "| mynets:net |" in capsys.readouterr().out


def test_resume_command_keeps_per_generation_values():
    p, r = cli._parser()
    argv = ["run", "--generations", "3", "--epochs", "4,2,1", "--lr", "0.1", "--out", "o"]
    args = p.parse_args(argv)
    args.given = cli._given(argv, vars(args))
    command = cli._resume_command(args)
    assert "--epochs 4,2,1" in command and "--lr 0.1" in command and command.endswith("--resume")
