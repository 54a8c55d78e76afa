"""Every ``docs/...`` and ``scripts/...`` path that the README, the docs pages or a script names exists.

Files move (results live in ``docs/results/``, one folder per study) and one-off scripts leave the
tree; a page that still names the old path fails here. Paths written ``<commit>:scripts/name.py``
(for ``git show``) name history on purpose and are skipped, as are templates such as
``docs/<something>``. A path may be a glob (``scripts/bench_sample*.py``) or an output prefix that a
script completes with an extension (``docs/results/learning_curve/learning_curve``).
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: a path starting at docs/ or scripts/, not preceded by a word character, ':' (git show), '/' or '.'
PATH = re.compile(r"(?<![\w:/.])((?:docs|scripts)/[\w./*-]*)")
SOURCES = sorted([ROOT / "README.md", *ROOT.glob("docs/**/*.md"), *ROOT.glob("scripts/*.py"), *ROOT.glob("scripts/*.sh")])


def referenced_paths(text: str) -> set[str]:
    return {m.group(1).rstrip(".,;:-") for m in PATH.finditer(text)}


def resolves(path: str) -> bool:
    if "*" in path:
        return any(ROOT.glob(path))
    target = ROOT / path
    return target.exists() or any(target.parent.glob(target.name + ".*"))


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_paths_exist(source):
    missing = sorted(p for p in referenced_paths(source.read_text()) if not resolves(p))
    assert not missing, f"{source.relative_to(ROOT)} names missing paths: {missing}"


def test_the_results_index_names_every_study_folder():
    index = (ROOT / "docs" / "results" / "README.md").read_text()
    folders = sorted(p.name for p in (ROOT / "docs" / "results").iterdir() if p.is_dir())
    assert folders
    unnamed = [name for name in folders if f"`{name}/`" not in index]
    assert not unnamed, f"docs/results/README.md does not describe {unnamed}"
