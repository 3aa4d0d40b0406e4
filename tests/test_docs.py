"""Every ```python block of README.md and docs/*.md runs as written (each block on its own, in a fresh
namespace, in a temporary working directory). A block may be skipped only when the line before its fence is
``<!-- no-run: reason -->`` (for what needs a GPU or a data set on disk), and the reason must be given."""
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
NO_RUN = re.compile(r"<!--\s*no-run:\s*(.*?)\s*-->\s*$")


def blocks():
    for path in DOCS:
        text = path.read_text()
        for i, m in enumerate(FENCE.finditer(text)):
            before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
            line = text.count("\n", 0, m.start()) + 1
            skip = NO_RUN.search(before)
            yield pytest.param(m.group(1), skip.group(1) if skip else None,
                               id=f"{path.relative_to(ROOT)}:{line}")


def test_the_docs_have_snippets():
    assert len(list(blocks())) >= 5  # a broken fence pattern would make every other test here vanish


@pytest.mark.parametrize("code, no_run", list(blocks()))
def test_snippet_runs(code, no_run, tmp_path, monkeypatch):
    if no_run is not None:
        assert no_run, "a no-run marker must say why"
        pytest.skip(f"no-run: {no_run}")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "<snippet>", "exec"), {"__name__": "__snippet__"})


def test_no_file_points_outside_the_repository():
    texts = {p: p.read_text() for p in [*DOCS, ROOT / "ARCHITECTURE.md", *sorted((ROOT / "ke_fast").glob("*.py"))]}
    bad = [f"{p.relative_to(ROOT)}: {m.group(0)!r}" for p, t in texts.items()
           for m in re.finditer(r"(?<![\w/])(?:\.\./|shared/)[\w./-]*", t)
           if not (p.parent / m.group(0)).resolve().is_relative_to(ROOT)  # a link within the repository is fine
           or m.group(0).startswith("shared/")]
    assert not bad, bad
