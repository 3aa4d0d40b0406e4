"""The files of a run and of a study (Lightning's checkpoint / logger seam), used alike by the command line,
:class:`ke_fast.study.Study` and the library.

A run folder (:class:`RunDir`) holds ``last.pt`` and ``prev.pt`` (the two newest checkpoints), ``history.csv``
(a row per generation), ``val.csv`` (a row per evaluation on the validation list during training, if any),
``summary.json`` and ``plot.png``; a study folder (:class:`StudyDir`) holds ``summary.json``, ``results.md``
and ``plot.png`` and a run folder per seed, ``seed-<n>/``, with the seed's baseline in ``seed-<n>/baseline/``.
Every file is written whole or not at all (a temporary file, then ``os.replace``); checkpoints are copied
at a step boundary and written by a background thread. The policy, the same everywhere: a folder that
holds a run is never started over unless asked (``overwrite``, which deletes the old run's files only once
every check has passed), and a resume continues only the run that wrote the checkpoint (the same settings,
data and architecture, compared by fingerprints).
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import threading
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from .config import Opt, OptionMessage

CHECKPOINTS = ("last.pt", "prev.pt")
RUN_FILES = (*CHECKPOINTS, "history.csv", "val.csv", "summary.json", "plot.png")  # what a run writes into its folder
STUDY_FILES = ("summary.json", "results.md", "plot.png")  # what a study writes into its folder itself
FORMAT = 2  # the checkpoint format this version writes ("format" in the checkpoint)
FORMATS = (1, 2)  # the formats it reads: 1 = the checkpoints written before the field existed


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or resumed; the message names the file."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file that is truncated or corrupt (not one whole torch.save)."""


class CheckpointWarning(UserWarning):
    """A resume that passed over a corrupt last.pt and continues from prev.pt."""


class RunExistsError(OptionMessage, FileExistsError):
    """A folder holds a run (or a study) that the request would start over; nothing was touched. The
    message names the way out: ``resume=True`` / ``overwrite=True`` (``--resume`` / ``--overwrite``)."""


def save_atomic(obj: Any, path: Path, keep_previous: Path | None = None) -> None:
    """torch.save to a temporary file, fsync, then os.replace: a crash never leaves a truncated file.

    With ``keep_previous``, the old ``path`` is moved there once the new file is complete, so at every
    moment at least one of the two holds a whole checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    if keep_previous is not None and path.exists():
        os.replace(path, keep_previous)
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    """Write a text file whole or not at all (a temporary file, then os.replace)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _snapshot(obj: Any) -> Any:
    """A copy of ``obj`` (nested dicts / lists / tuples) whose tensors are CPU copies owned by nobody else:
    what a background thread may write while training goes on. One device synchronisation at most."""
    cuda = []

    def copy(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            if x.device.type == "cuda":
                cuda.append(x.device)
                return x.detach().to("cpu", non_blocking=True)  # into pinned memory; synchronised below
            return x.detach().clone()
        if isinstance(x, dict):
            return {k: copy(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(copy(v) for v in x)
        return x

    out = copy(obj)
    for device in set(cuda):
        torch.cuda.synchronize(device)
    return out


class _Writer:
    """Writes one checkpoint at a time in a background thread: :meth:`submit` waits for the previous write,
    :meth:`wait` for the current one; an error of the write (disk full ...) is raised by the next of either."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.done: Any = None  # the tag of the last write that completed

    def submit(self, obj: Any, path: Path, keep_previous: Path, tag: Any) -> None:
        self.wait()

        def write() -> None:
            try:
                save_atomic(obj, path, keep_previous)
                self.done = tag
            except BaseException as exc:  # raised in the training thread by wait()
                self._error = exc

        self._thread = threading.Thread(target=write, name="ke_fast-checkpoint")
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint with ``weights_only=True``. Raises CorruptCheckpointError for a truncated or corrupt
    file, CheckpointError for a file that is no ke_fast checkpoint or of a format version this ke_fast cannot
    read (:data:`FORMATS`; a checkpoint without the field is format 1)."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise CorruptCheckpointError(f"checkpoint {str(path)!r} is corrupt or truncated "
                                     f"({type(exc).__name__}: {exc})") from exc
    if not isinstance(ckpt, dict) or "model" not in ckpt or "generation" not in ckpt:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a ke_fast checkpoint")
    version = ckpt.get("format", 1)
    if version not in FORMATS:
        raise CheckpointError(f"checkpoint {str(path)!r} has format version {version!r}; this ke_fast reads "
                              f"format versions {', '.join(map(str, FORMATS))} (a newer ke_fast wrote it?)")
    return ckpt


def _tensor_bytes(x: Any) -> bytes:
    """dtype, shape and raw bytes of a tensor (or of what torch.as_tensor makes of a label), on any device."""
    t = torch.as_tensor(x).detach().cpu().contiguous()
    return f"{t.dtype}{tuple(t.shape)}".encode() + t.reshape(-1).view(torch.uint8).numpy().tobytes()


def data_fingerprint(data: Dataset, samples: int = 8) -> str:
    """A cheap, deterministic identity of a data set: a hash of its size, its labels where they are at
    hand without decoding (a TensorDataset's last tensor, or the data set's own ``fingerprint()``, e.g.
    :class:`ke_fast.data.ImageSet`'s file list) and ``samples`` evenly spaced items."""
    n = len(data)
    h = hashlib.sha256(str(n).encode())
    if callable(getattr(data, "fingerprint", None)):
        h.update(data.fingerprint().encode())
    elif isinstance(data, TensorDataset):
        h.update(_tensor_bytes(data.tensors[-1]))
    for i in sorted({k * (n - 1) // max(1, samples - 1) for k in range(samples)}) if n else ():
        for x in data[i]:
            h.update(_tensor_bytes(x))
    return h.hexdigest()[:16]


def architecture_fingerprint(model: nn.Module) -> str:
    """A hash of the names, shapes and dtypes of a model's state_dict: what load_state_dict must match."""
    entries = (f"{k}:{tuple(v.shape)}:{v.dtype}" for k, v in model.state_dict().items())
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()[:16]


def run_identity(train_set: Dataset, test_set: Dataset, model: nn.Module) -> dict[str, Any]:
    """What a checkpoint records of its run besides the caller's identity: data sizes and fingerprints."""
    return dict(train_images=len(train_set), test_images=len(test_set), train_data=data_fingerprint(train_set),
                test_data=data_fingerprint(test_set), architecture=architecture_fingerprint(model))


_COMPUTED = dict(train_images="the number of training images", test_images="the number of test images",
                 train_data="the training data", test_data="the test data",
                 architecture="the architecture (state_dict names or shapes)")


def check_resumable(ckpt: dict, path: Path, config: dict[str, Any], identity: dict[str, Any]) -> None:
    """Raise CheckpointError, naming every difference, unless ``ckpt`` was written by this run: the same
    config (more generations aside, and the device-dependent amp / channels_last), the same caller identity,
    data sets and architecture. Fields a checkpoint lacks (older files) are not compared."""
    saved = ckpt.get("config") or {}
    changed = [f"{k}={saved[k]!r} (now {v!r})" for k, v in config.items() if k in saved
               and saved[k] != v and k not in ("amp", "channels_last", "graphs", "generations")]
    ident = ckpt.get("identity") or {}
    changed += [f"{k} {ident[k]} (now {v})" for k, v in identity.items()
                if k not in _COMPUTED and k in ident and ident[k] != v]
    if not changed:  # nothing the caller named differs: say which contents do
        changed = [f"{_COMPUTED[k]} ({ident[k]} in the checkpoint, now {identity[k]})" for k in _COMPUTED
                   if k in ident and k in identity and ident[k] != identity[k]]
    if changed:
        raise CheckpointError(f"checkpoint {str(path)!r} was written by a different run: {', '.join(changed)}; "
                              f"resume with the same settings or use another --out")


def _exists(path: Path, found: list[str]) -> RunExistsError:
    return RunExistsError("out_dir", Opt("out_dir"), f" {str(path)!r} holds a run ({', '.join(found)}): continue "
                          "it with ", Opt("resume", True), ", or start afresh and replace it with ",
                          Opt("overwrite", True))


def _no_checkpoint(path: Path, found: list[str], is_out_dir: bool = True) -> RunExistsError:
    where = [Opt("out_dir"), f" {str(path)!r}"] if is_out_dir else [repr(str(path))]
    return RunExistsError("resume", Opt("resume", True), ": ", *where, f" holds {', '.join(found)} but no checkpoint "
                          f"({' / '.join(CHECKPOINTS)}) to resume from; start afresh with ", Opt("overwrite", True))


def _check_request(path: Path, resume: bool, overwrite: bool) -> None:
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: continue the run, or replace it")
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"out_dir {str(path)!r} is a file, expected a folder")


class RunDir:
    """One run's folder: its layout, the overwrite / resume policy, checkpoints and result files. Only
    ``rank`` 0 writes or deletes anything."""

    def __init__(self, path: str | Path, rank: int = 0) -> None:
        self.path, self.rank = Path(path), rank
        self.last, self.prev = self.path / CHECKPOINTS[0], self.path / CHECKPOINTS[1]
        self._writer = _Writer()
        self._corrupt_last = False  # resumed from prev.pt past a corrupt last.pt

    def files(self) -> list[str]:
        """The run files (:data:`RUN_FILES`) the folder holds."""
        return [name for name in RUN_FILES if (self.path / name).is_file()]

    def check(self, resume: bool = False, overwrite: bool = False) -> None:
        """The policy, touching nothing: a folder holding a run starts over only with ``overwrite``; ``resume``
        needs a checkpoint where there are run files (else it would start afresh over them). Raises
        RunExistsError (a FileExistsError) or ValueError / NotADirectoryError."""
        _check_request(self.path, resume, overwrite)
        found = self.files()
        if found and not (resume or overwrite):
            raise _exists(self.path, found)
        if resume and found and not any(name in found for name in CHECKPOINTS):
            raise _no_checkpoint(self.path, found)

    def clear(self) -> list[str]:
        """Delete the run files (``overwrite``); returns their names."""
        found = self.files()
        if self.rank == 0:
            for name in found:
                (self.path / name).unlink()
        return found

    def latest(self) -> tuple[dict, Path] | None:
        """The newest whole checkpoint and its path: last.pt, else prev.pt (a crash between the two renames
        of save_atomic leaves only prev.pt; a corrupt or truncated last.pt is passed over with a
        CheckpointWarning), or None when there is none. Raises CheckpointError."""
        try:
            return load_checkpoint(self.last), self.last
        except FileNotFoundError:
            pass
        except CorruptCheckpointError as exc:
            if not self.prev.is_file():
                raise CorruptCheckpointError(f"{exc}; there is no {CHECKPOINTS[1]} to continue from") from exc
            try:
                ckpt = load_checkpoint(self.prev)
            except CheckpointError as second:
                raise CheckpointError(f"{exc}; and {second}") from second
            warnings.warn(f"{exc}; continuing from {str(self.prev)!r} (generation {ckpt['generation']}, epoch "
                          f"{ckpt['epoch']})", CheckpointWarning, stacklevel=3)
            self._corrupt_last = True
            return ckpt, self.prev
        return (load_checkpoint(self.prev), self.prev) if self.prev.is_file() else None

    @staticmethod
    def restore(ckpt: dict, path: Path, config: dict[str, Any], identity: dict[str, Any], model: nn.Module,
                task: Any) -> None:
        """Load ``ckpt`` (read from ``path``) into ``model`` and ``task`` once :func:`check_resumable` passes;
        a checkpoint that does not fit raises CheckpointError naming the file."""
        check_resumable(ckpt, path, config, identity)
        try:
            model.load_state_dict(ckpt["model"])
            task.load_state_dict(ckpt.get("task", ckpt.get("criterion")))  # format 1 calls it "criterion"
        except (RuntimeError, ValueError) as exc:  # e.g. a checkpoint written before identities were stored
            detail = " ".join(str(exc).split())  # one line: the error is printed as one
            raise CheckpointError(f"checkpoint {str(path)!r} does not fit this model: "
                                  f"{detail[:300]}{'...' if len(detail) > 300 else ''}") from None

    def save(self, state: dict[str, Any], tag: Any) -> None:
        """Copy ``state`` now (a step boundary) and write it as last.pt in the background, the one before it
        becoming prev.pt; the previous write completes first. ``tag`` becomes :attr:`saved` once written."""
        if self.rank != 0:
            return
        self._writer.wait()
        self.path.mkdir(parents=True, exist_ok=True)
        if self._corrupt_last:  # else save_atomic would rotate it over the whole prev.pt
            self.last.unlink(missing_ok=True)
            self._corrupt_last = False
        self._writer.submit(_snapshot(dict(state, format=FORMAT)), self.last, self.prev, tag)

    def wait(self) -> None:
        """Until the last checkpoint is on disk; raises the error of a write that failed."""
        self._writer.wait()

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Around a run: the last checkpoint is on disk when the block ends; when the block raises, its error is
        the one reported (a failed write's error only when the block ended normally)."""
        try:
            yield
        except BaseException:
            try:
                self._writer.wait()
            except BaseException:
                pass
            raise
        self._writer.wait()

    @property
    def saved(self) -> Any:
        """The tag of the last checkpoint completely written (None before the first)."""
        return self._writer.done

    def _write_csv(self, name: str, rows: list[dict]) -> None:
        tmp = self.path / (name + ".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, self.path / name)

    def write_val(self, val: list[dict]) -> None:
        """val.csv: the evaluations on the validation list during training (``generation``, ``epoch`` in the
        generation, ``run_epoch`` counted over the run, then the metrics of N_g: ``dense_val_acc`` ...)."""
        if self.rank == 0 and val:
            self.path.mkdir(parents=True, exist_ok=True)
            self._write_csv("val.csv", val)

    def write_results(self, history: list[dict], config: dict[str, Any], val: list[dict] | None = None) -> None:
        """history.csv, val.csv (:meth:`write_val`) and summary.json (the config, every generation's row, the last
        one's metrics and ``val``: the evaluations during training, [] without)."""
        if self.rank != 0:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        self._write_csv("history.csv", history)
        self.write_val(val or [])
        final = {k: v for k, v in history[-1].items() if k.startswith(("dense_", "fit_"))}
        write_text(self.path / "summary.json",
                   json.dumps(dict(config=config, history=history, final=final, val=list(val or [])), indent=2))

    def write_plot(self, history: list[dict], task: Any, title: str, val: list[dict] | None = None) -> None:
        """plot.png: :func:`ke_fast.plots.run_figure` (the task's metrics of N_g and H^F_g per generation on the
        test and validation lists; with ``val``, the validation curve during training)."""
        if self.rank != 0:
            return
        from .plots import pyplot, run_figure

        fig = run_figure(history, val or [], task, title)
        fig.savefig(self.path / "plot.png", dpi=120)
        pyplot().close(fig)


class StudyDir:
    """A study's folder: ``seed-<n>/`` run folders (each with ``baseline/``) and the study's own files."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def seed(self, seed: int) -> Path:
        """The run folder of one seed."""
        return self.path / f"seed-{seed}"

    def baseline(self, seed: int) -> Path:
        """The run folder of one seed's compute-matched baseline."""
        return self.seed(seed) / "baseline"

    def files(self) -> list[Path]:
        """Every file that belongs to a run or a study: a run's files (:data:`RUN_FILES`) and results.md in the
        folder itself (a single run's too: a study must not mix with one), and a run's files in every
        ``seed-*/`` folder and its ``baseline/``."""
        folders = [self.path]
        for d in sorted(self.path.glob("seed-*")) if self.path.is_dir() else ():
            if d.is_dir():
                folders += [d, d / "baseline"]
        top = dict.fromkeys((*RUN_FILES, *STUDY_FILES))
        return [f / n for f in folders for n in (top if f == self.path else RUN_FILES) if (f / n).is_file()]

    def check(self, seeds: list[int], resume: bool = False, overwrite: bool = False) -> None:
        """The policy of :meth:`RunDir.check` for a study of ``seeds``, touching nothing: no run or study files
        anywhere unless ``resume`` / ``overwrite``; ``resume`` refuses a single run in the folder and a seed
        folder with run files but no checkpoint. Raises RunExistsError or ValueError / NotADirectoryError."""
        _check_request(self.path, resume, overwrite)
        found = self.files()
        if found and not (resume or overwrite):
            names = [str(f.relative_to(self.path)) for f in found]
            raise _exists(self.path, names[:6] + (["..."] if len(names) > 6 else []))
        if not resume:
            return
        single = [name for name in CHECKPOINTS if (self.path / name).exists()]
        if single:
            raise RunExistsError("resume", Opt("resume", True), ": ", Opt("out_dir"), f" {str(self.path)!r} holds "
                                 f"a single run ({', '.join(single)}), not the seed-<n>/ folders of a study; use "
                                 "another ", Opt("out_dir"), ", or replace it with ", Opt("overwrite", True))
        for seed in seeds:
            for folder in (self.seed(seed), self.baseline(seed)):
                files = RunDir(folder).files()
                if files and not any(name in files for name in CHECKPOINTS):
                    raise _no_checkpoint(folder, files, is_out_dir=False)

    def clear(self) -> list[Path]:
        """Delete :meth:`files` and the seed folders that are empty afterwards; returns the deleted files.
        Other files stay, and so do the folders that hold them."""
        removed = self.files()
        for f in removed:
            f.unlink()
        folders = {d for f in removed for d in f.parents if d != self.path and self.path in d.parents}
        for d in sorted(folders, key=lambda p: len(p.parts), reverse=True):  # the deepest first
            if not any(d.iterdir()):
                d.rmdir()
        return removed
