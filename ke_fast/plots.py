"""A run's figure (plot.png, :meth:`ke_fast.rundir.RunDir.write_plot`), built apart from the file it is saved to
so that its content can be checked without reading pixels.

matplotlib is imported inside the functions: importing it costs more than a small generation and most
imports of ke_fast never draw.
"""
from __future__ import annotations

from typing import Any, Sequence

NETS = (("dense_", "dense $N_g$", "o"), ("fit_", "fit $H^F_g$", "s"))  # history prefix, label, marker
SPLITS = (("", "test", "-"), ("val_", "val", ":"))  # metric prefix, label, line style


def pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def run_figure(history: Sequence[dict], val: Sequence[dict], task: Any, title: str) -> Any:
    """The run's figure: per generation, every plotted metric of the task (:attr:`ke_fast.tasks.Task.plotted`:
    top-1 and top-5 for classification) of N_g and H^F_g on the test list and, where the history holds them, on
    the validation list; with ``val`` rows (the evaluations during training,
    :attr:`ke_fast.evolve.Evolution.val_history`) a second panel: the validation metrics of N_g against the
    run's epoch, generations marked. Returns the matplotlib Figure (the caller saves and closes it)."""
    plt = pyplot()
    import matplotlib.ticker

    scale = 100 if task.percent else 1
    names = [name for _, name in task.plotted]
    ylabel = " / ".join(names) + (" (%)" if task.percent else "")
    fig, axes = plt.subplots(1, 2 if val else 1, figsize=(10.5 if val else 5.5, 3.6), squeeze=False)
    ax = axes[0, 0]
    gens = [r["generation"] for r in history]
    for split, split_label, style in SPLITS:
        for m, (metric, name) in enumerate(task.plotted):
            for n, (net, net_label, marker) in enumerate(NETS):
                key = net + split + metric
                if history and all(key in r for r in history):  # e.g. val_: only with a validation list
                    ax.plot(gens, [scale * r[key] for r in history], marker=marker, linestyle=style, color=f"C{n}",
                            fillstyle="full" if m == 0 else "none", label=f"{net_label} {name} ({split_label})")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set(xlabel="generation", ylabel=ylabel, title=title)
    if val:
        curve = axes[0, 1]
        x = [r["run_epoch"] for r in val]
        for m, (metric, name) in enumerate(task.plotted):
            key = "dense_val_" + metric
            if all(key in r for r in val):
                curve.plot(x, [scale * r[key] for r in val], marker=".", linestyle="-" if m == 0 else "--",
                           color="C0", label=f"dense $N_g$ {name} (val)")
        ends = sorted({r["run_epoch"] - r["epoch"] for r in val} - {0})  # the epochs before generations 2, 3 ...
        for e in ends:
            curve.axvline(e, color="grey", linewidth=0.8, alpha=0.5)
        curve.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        curve.set(xlabel="epoch of the run (grey: a generation ends)", ylabel=ylabel,
                  title="validation during training")
    for a in axes[0]:
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.tight_layout()
    return fig
