"""Shared fixtures: the real QM9 data (parsed once into the user cache, ~10 s the first time), and
the maintained scripts of scripts/ imported as modules."""

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture(scope="session")
def qm9():
    from moldiff.data.qm9 import load_qm9

    return load_qm9()


@pytest.fixture(scope="session")
def split():
    from moldiff.data.qm9 import edm_split

    return edm_split()


@pytest.fixture
def load_script(monkeypatch):
    """``load_script("name")``: scripts/name.py as a module, registered in ``sys.modules`` while the
    test runs (dataclasses defined in a script need that)."""

    def load(name: str):
        module_name = f"moldiff_script_{name}"
        spec = importlib.util.spec_from_file_location(module_name, SCRIPTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, module_name, module)
        spec.loader.exec_module(module)
        return module

    return load
