"""The Config (the one place options are checked, worded for Python or for the command line), the task
registry (ke_fast.tasks) and the regression task on scikit-learn's diabetes data: the loader, the metrics
by hand, a run and a study through the command line, and the flag rules.

Everything runs on the CPU with tiny configurations."""
from __future__ import annotations

import csv
import json
import math
import re

import numpy as np
import pytest
import torch

from ke_fast import cli
from ke_fast.config import Config, ConfigError
from ke_fast.data import DIABETES_TEST, diabetes
from ke_fast.evolve import Evolution
from ke_fast.models import MLP
from ke_fast.tasks import TASKS, Classify, Metric, Regression, headline_metric


# ---- the Config ----------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("split", "both"), ("split_rate", 0.0), ("split_rate", 1.5), ("split_rate", "0.5"), ("generations", 0),
    ("epochs", 1.5), ("batch_size", True), ("lr", 0.0), ("lr", math.nan), ("momentum", -0.1),
    ("weight_decay", math.inf), ("warmup_epochs", -1), ("label_smoothing", 1.5), ("seed", -1), ("seed", 2 ** 64),
    ("evolve_mode", "keep"), ("init", "ones"), ("reset_init", "ones"), ("task", "regress"), ("reset_from", ""),
    ("mask_criterion", "size"), ("resample_mask", 1), ("reset_bn", "yes"), ("amp", "bf16"), ("channels_last", 0.5),
])
def test_config_refuses_each_bad_value_naming_the_field(field, value):
    with pytest.raises(ConfigError) as exc:
        Config(**{field: value})
    assert exc.value.field == field and str(exc.value).startswith(field), str(exc.value)
    assert isinstance(exc.value, ValueError)
    flag = "--" + field.replace("_", "-")
    assert exc.value.render({}).startswith(flag), exc.value.render({})


def test_config_errors_in_python_and_in_flags():
    """One check, two wordings: the library's names and values, the command line's flags."""
    with pytest.raises(ConfigError) as exc:
        Config(mask_criterion="magnitude")  # KELS, the default split
    assert str(exc.value).startswith("mask_criterion='magnitude' applies to split='wels' only"), str(exc.value)
    assert exc.value.render({}).startswith("--mask-criterion magnitude applies to --split wels only")
    with pytest.raises(ConfigError) as exc:
        Config(resample_mask=True)
    assert exc.value.render({}).startswith("--resample-mask applies to --split wels only")
    cfg = Config(split="wels", resample_mask=True, mask_criterion="snip", task="regression")
    assert cfg.validate() is cfg
    cfg.lr = -1.0  # a field changed after construction is caught when the run validates it again
    with pytest.raises(ConfigError, match="lr"):
        cfg.validate()


# ---- the registry --------------------------------------------------------------------------------

def test_task_registry_and_headlines():
    assert TASKS == {"classify": Classify, "metric": Metric, "regression": Regression}
    assert [headline_metric(t) for t in TASKS] == [("acc", "top-1"), ("recall1", "Recall@1"), ("rmse", "RMSE")]
    assert [t.higher_is_better for t in TASKS.values()] == [True, True, False]
    for task in TASKS.values():  # the table's columns are the history's dense_/fit_ keys of the headline at least
        keys = [k for k, _ in task.columns]
        assert f"dense_{task.key}" in keys and f"fit_{task.key}" in keys
    with pytest.raises(ValueError, match="task"):
        headline_metric("regress")


# ---- regression on diabetes ----------------------------------------------------------------------

def test_diabetes_split_and_standardisation():
    from sklearn.datasets import load_diabetes

    train, test, targets, features = diabetes(seed=0)
    assert (targets, features) == (1, 10)
    assert len(train) == 442 - DIABETES_TEST and len(test) == DIABETES_TEST
    x, y = train.tensors
    assert x.dtype == y.dtype == torch.float32 and x.shape == (354, 10) and y.shape == (354,)
    # standardised with the training statistics: exactly 0 / 1 on the training side only
    torch.testing.assert_close(x.mean(0), torch.zeros(10), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std(0), torch.ones(10), atol=1e-5, rtol=0)
    assert abs(float(y.mean())) < 1e-5 and abs(float(y.std()) - 1) < 1e-5
    assert abs(float(test.tensors[1].mean())) > 1e-3  # the test side was not standardised on its own
    # every sample once, on one side: both sides are one affine image of sklearn's targets (the training
    # side's mean and std), so mapped back they are sklearn's targets, each once
    raw = torch.sort(torch.tensor(load_diabetes(scaled=False).target, dtype=torch.float64)).values
    both = torch.sort(torch.cat([y, test.tensors[1]]).double()).values
    scale = (raw[-1] - raw[0]) / (both[-1] - both[0])
    torch.testing.assert_close(both * scale + (raw[0] - scale * both[0]), raw, rtol=0, atol=1e-3)
    a, b = diabetes(seed=0), diabetes(seed=1)
    assert torch.equal(a[0].tensors[0], train.tensors[0])  # seeded
    assert not torch.equal(a[1].tensors[1], b[1].tensors[1])


def test_regression_metrics_by_hand():
    task = Regression(Config(task="regression"))
    y = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0])
    pred = torch.tensor([0.5, -1.0, 0.5, 2.0, 0.0])
    batches = [(torch.arange(3), y[:3]), (torch.arange(3, 5), y[3:])]
    result = task.evaluate(lambda idx: pred[idx].unsqueeze(1), batches)  # [B, 1] outputs, as an MLP gives
    sse = float(((pred - y) ** 2).sum())
    sst = float(((y - y.mean()) ** 2).sum())
    assert result == {"rmse": pytest.approx(math.sqrt(sse / 5)), "r2": pytest.approx(1 - sse / sst)}
    assert float(task.loss(pred.unsqueeze(1), y)) == pytest.approx(sse / 5)
    const = task.evaluate(lambda idx: pred[idx].unsqueeze(1), [(torch.arange(5), torch.ones(5))])
    assert math.isnan(const["r2"])  # R² of a constant target is undefined, never a made-up number


def test_regression_needs_one_output(tmp_path):
    train, test, _, features = diabetes(0)
    with pytest.raises(ValueError, match="outputs 3"):
        Evolution(MLP(features, (8,), 3), train, test, Config(task="regression"), tmp_path, device="cpu",
                  progress=False)


TINY = ["--task", "regression", "--generations", "2", "--epochs", "3", "--no-progress", "--device", "cpu"]


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_cli_regression_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["run", *TINY, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| mlp | diabetes: 354 train / 88 test samples |" in printed, printed
    assert "generation | dense RMSE |  fit RMSE |  dense R² |    fit R²" in printed, printed
    assert "(RMSE)" in printed and "%" not in printed.split("generation |")[1], printed
    rows = _rows(out / "history.csv")
    assert list(rows[0])[:5] == ["generation", "dense_rmse", "dense_r2", "fit_rmse", "fit_r2"]
    assert [int(r["generation"]) for r in rows] == [1, 2]
    # RMSE and R² are both of the same predictions: R² = 1 - n RMSE² / SST over the test targets
    y = diabetes(0)[1].tensors[1].double()
    sst = float(((y - y.mean()) ** 2).sum())
    for r in rows:
        for part in ("dense", "fit"):
            assert float(r[f"{part}_r2"]) == pytest.approx(1 - len(y) * float(r[f"{part}_rmse"]) ** 2 / sst, abs=1e-9)
    assert float(rows[-1]["dense_r2"]) > 0.1, rows  # it learns (a constant predictor scores about 0)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["task"] == "regression" and set(summary["final"]) == {
        "dense_rmse", "dense_r2", "fit_rmse", "fit_r2"}
    assert (out / "plot.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_regression_study_with_the_long_baseline(tmp_path, capsys):
    """--seeds with --baseline long on regression: the study aggregates RMSE and says lower is better."""
    out = tmp_path / "study"
    assert cli.main(["run", *TINY, "--seeds", "0", "1", "--baseline", "long", "--out", str(out)]) == 0
    capsys.readouterr()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metric"]["dense"] == "dense_rmse" and summary["metric"]["higher_is_better"] is False
    assert summary["metric"]["percent"] is False and "lower is better" in summary["metric"]["label"]
    per_seed = [_rows(out / f"seed-{s}" / "history.csv") for s in (0, 1)]
    for i, row in enumerate(summary["generations"]):
        values = [float(h[i]["dense_rmse"]) for h in per_seed]
        assert row["dense_rmse"]["values"] == pytest.approx(values)
        assert row["dense_rmse"]["std"] == pytest.approx(np.std(values, ddof=1))
    base = [float(_rows(out / f"seed-{s}" / "baseline" / "history.csv")[-1]["dense_rmse"]) for s in (0, 1)]
    assert summary["baseline"]["dense_rmse"]["mean"] == pytest.approx(np.mean(base))
    assert summary["baseline"]["epochs"] == 6
    md = (out / "results.md").read_text()
    assert "RMSE: lower is better" in md and "Test RMSE" in md, md
    assert re.search(r"\| 2 \| \d+\.\d{3} ± \d+\.\d{3} \| \d+\.\d{3} ± \d+\.\d{3} \|", md), md  # not percentages
    assert f"| long dense baseline, 6 epochs | {np.mean(base):.3f} ± {np.std(base, ddof=1):.3f} |" in md, md
    assert (out / "plot.png").stat().st_size > 0


@pytest.mark.parametrize("bad, word", [
    (["--dataset", "diabetes"], "--dataset"),  # classify runs on digits or images
    (["--task", "metric", "--dataset", "diabetes"], "--dataset"),
    (["--task", "regression", "--dataset", "digits"], "--dataset"),
    (["--task", "regression", "--dataset", "some/image/folder"], "--dataset"),
    (["--task", "regression", "--model", "resnet18"], "--model"),  # images only
    (["--model", "mlp"], "--model"),  # digits are images
    (["--task", "regression", "--per-class", "5"], "--per-class"),
    (["--task", "regression", "--image-size", "8"], "--image-size"),
    (["--task", "regression", "--embedding-dim", "4"], "--embedding-dim"),
    (["--task", "regression", "--width", "4"], "--width"),
])
def test_cli_regression_flag_rules(tmp_path, capsys, bad, word):
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "--out", str(tmp_path / "o"), "--device", "cpu", "--no-progress", *bad])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: ke-fast run ") and err.count("error:") == 1, err
    assert word in err.splitlines()[-1], err
    assert not (tmp_path / "o").exists()
