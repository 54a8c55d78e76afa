"""Shared fixtures: the real QM9 data (parsed once into the user cache, ~10 s the first time)."""

import pytest


@pytest.fixture(scope="session")
def qm9():
    from moldiff.data.qm9 import load_qm9

    return load_qm9()


@pytest.fixture(scope="session")
def split():
    from moldiff.data.qm9 import edm_split

    return edm_split()
