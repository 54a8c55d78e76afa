"""The maintained scripts stay importable and answer ``--help`` (docs/design.md, section 7).

A script does its work under ``if __name__ == "__main__":``, so importing it must not sample, train
or write anything. Each Python script has a ``main()`` that parses ``--help`` and exits 0; each
shell script must at least parse (``bash -n``). One-off studies leave ``scripts/`` once their
results are in ``docs/results/``; this test keeps the ones that stay from rotting.
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
PYTHON_SCRIPTS = sorted(SCRIPTS.glob("*.py"))
SHELL_SCRIPTS = sorted(SCRIPTS.glob("*.sh"))


def load(path: Path, monkeypatch):
    """Import a script as a module (registered while the test runs, as dataclasses need)."""
    name = f"moldiff_script_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def test_scripts_are_files_at_the_top_of_scripts():
    assert PYTHON_SCRIPTS, "no scripts found"
    folders = [p.name for p in SCRIPTS.iterdir() if p.is_dir() and p.name != "__pycache__"]
    assert not folders, f"scripts/ holds folders {folders}: keep maintained scripts flat, one file each"


@pytest.mark.parametrize("path", PYTHON_SCRIPTS, ids=lambda p: p.name)
def test_script_imports_without_running_and_answers_help(path, monkeypatch, capsys):
    module = load(path, monkeypatch)
    assert callable(getattr(module, "main", None)), f"{path.name} has no main()"
    monkeypatch.setattr(sys, "argv", [str(path), "--help"])
    with pytest.raises(SystemExit) as stop:
        module.main()
    assert stop.value.code in (0, None)
    assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("path", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_script_parses(path):
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
