"""moldiff: E(3)-equivariant diffusion (EDM) for 3D molecules.

    >>> import moldiff
    >>> pipe = moldiff.load_pretrained()              # the shipped QM9 model, or a checkpoint dir
    >>> mols = pipe.sample(100, steps=50, seed=0)     # list[GeneratedMolecule]
    >>> print(moldiff.format_table(moldiff.evaluate_molecules(mols)))

Names are imported on first use, so ``import moldiff`` (and ``moldiff --help``) does not load
torch or RDKit.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("moldiff")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

# public name -> module that defines it
_EXPORTS = {
    "load_pretrained": "moldiff.pipeline",
    "MolDiffPipeline": "moldiff.pipeline",
    "GeneratedMolecule": "moldiff.molecules",
    "SampleRequest": "moldiff.pipeline",
    "CheckpointError": "moldiff.pipeline",
    "evaluate_molecules": "moldiff.molecules",
    "format_table": "moldiff.chemistry.metrics",
    "sample_passing": "moldiff.filters",
    "Keep": "moldiff.filters",
    "tune_allocator": "moldiff.runtime",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'moldiff' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
