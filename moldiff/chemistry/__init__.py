"""Chemistry layer (numpy + RDKit, no torch): elements, bond orders, RDKit molecules, EDM metrics, file IO.

Re-exports each submodule's public names (its ``__all__``); the lists live in one place.
"""

from . import bonds, elements, io, metrics, rdkit
from .bonds import *  # noqa: F401,F403
from .elements import *  # noqa: F401,F403
from .io import *  # noqa: F401,F403
from .metrics import *  # noqa: F401,F403
from .rdkit import *  # noqa: F401,F403

__all__ = [*elements.__all__, *bonds.__all__, *rdkit.__all__, *metrics.__all__, *io.__all__]
