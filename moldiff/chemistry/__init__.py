"""Chemistry layer (numpy + RDKit, no torch): elements, bond orders, RDKit molecules, EDM metrics, file IO."""

from .bonds import (
    BOND_LENGTHS_PM,
    BOND_MARGINS_PM,
    DeterminedBonds,
    edm_bond_matrix,
    edm_bond_order,
    pairwise_distances,
    rdkit_bond_orders,
)
from .elements import (
    ALLOWED_VALENCE,
    QM9_ELEMENTS,
    SYMBOL_TO_Z,
    Z_TO_SYMBOL,
    UnknownElementError,
    allowed_valences,
    to_symbols,
)
from .io import MoleculeFileError, MoleculeRecord, read_molecules, write_csv, write_sdf, write_xyz
from .metrics import (
    MetricsReport,
    MoleculeResult,
    StabilityResult,
    check_stability,
    evaluate_molecule,
    evaluate_molecules,
    format_table,
    reference_smiles,
    reference_smiles_set,
    summarize,
    validity_smiles,
)
from .rdkit import BOND_TYPES, build_mol, edm_mol, mol_to_smiles_edm, sanitize_error

__all__ = [
    # elements
    "QM9_ELEMENTS",
    "SYMBOL_TO_Z",
    "Z_TO_SYMBOL",
    "ALLOWED_VALENCE",
    "UnknownElementError",
    "allowed_valences",
    "to_symbols",
    # bonds
    "BOND_LENGTHS_PM",
    "BOND_MARGINS_PM",
    "edm_bond_order",
    "edm_bond_matrix",
    "pairwise_distances",
    "DeterminedBonds",
    "rdkit_bond_orders",
    # rdkit
    "BOND_TYPES",
    "build_mol",
    "edm_mol",
    "sanitize_error",
    "mol_to_smiles_edm",
    # metrics
    "StabilityResult",
    "MoleculeResult",
    "MetricsReport",
    "check_stability",
    "validity_smiles",
    "reference_smiles",
    "reference_smiles_set",
    "evaluate_molecule",
    "summarize",
    "evaluate_molecules",
    "format_table",
    # io
    "MoleculeFileError",
    "MoleculeRecord",
    "read_molecules",
    "write_sdf",
    "write_xyz",
    "write_csv",
]
