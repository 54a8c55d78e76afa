"""Sampled molecules as a chemist sees them: :class:`GeneratedMolecule` (RDKit molecule, SMILES,
EDM-protocol verdicts and why a sample failed), made from the reverse process's raw arrays by
:func:`molecules_from_arrays` / :func:`interpret`, and scored by :func:`evaluate_molecules`. All
RDKit work is handed to :mod:`moldiff.chemistry`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np

from moldiff.chemistry import fragments as chem_fragments
from moldiff.chemistry.metrics import MetricsReport, MoleculeResult, evaluate_molecule, own_bonds_result, summarize
from moldiff.chemistry.report import assess_sample
from moldiff.inpainting import fragment_report
from moldiff.sampling import SampledArrays

if TYPE_CHECKING:  # RDKit types only
    from rdkit import Chem

__all__ = ["GeneratedMolecule", "molecules_from_arrays", "interpret", "evaluate_molecules"]


@dataclass(eq=False, repr=False)
class GeneratedMolecule:
    """One sampled molecule, as :meth:`MolDiffPipeline.sample` returns it.

    Every sample is returned; nothing is dropped or repaired. Atom ``i`` of ``mol`` is atom ``i``
    of ``symbols``/``positions``.

    Attributes:
        symbols: N element symbols.
        positions: ``(N, 3)`` float64 coordinates in Å (zero centroid); non-finite after a
            numerical fault, left as they came out.
        charges: ``(N,)`` integer charge channel as sampled (EDM's channel encodes the nuclear
            charge, not a formal charge), or ``None`` for a model without one. Formal charges,
            where RDKit could assign them, are on ``mol``'s atoms.
        mol: RDKit molecule with a 3D conformer, every sampled hydrogen an explicit atom, or
            ``None`` after a numerical fault. Bonds from RDKit's ``rdDetermineBonds`` when it
            succeeds (bond orders and formal charges a viewer shows sensibly); else the EDM
            table-bonded molecule if it sanitizes (under-bonded atoms then carry implicit
            hydrogens, EDM's convention); else coordinates only, no bonds (``bonds`` says which).
        smiles: EDM validity SMILES (largest fragment of the table-bonded molecule, hydrogens
            written as ``[H]`` atoms), ``None`` when invalid.
        valid: EDM validity (RDKit sanitizes the table-bonded molecule).
        mol_stable: EDM molecule stability (every atom's bond-order sum is an allowed valence).
        n_stable_atoms: number of EDM-stable atoms.
        reason: why the sample is invalid and/or unstable, or ``"numerical fault at reverse
            step k"``; ``None`` for a valid, stable molecule.
        rdkit_smiles: heavy-atom SMILES of the ``rdDetermineBonds`` molecule, ``None`` if that
            route failed.
        bonds: ``"rdDetermineBonds"``, ``"EDM table"`` or ``"none"`` (origin of ``mol``'s bonds).
        fault_step: reverse step at which the sample first became non-finite, -1 if never
            (``steps`` means the final decode).
        generated_bonds: for models that generate bonds, ``(P, 3)`` rows ``[i, j, order]`` the
            network generated with the atoms (the EDM metrics above still use the distance table).
        formal_charges: ``(N,)`` formal charges a categorical model generated with the atoms
            (``None`` for other models).
        own_valid, own_mol_stable, own_smiles: for models that generate bonds, the verdicts on the
            model's own bonds and charges (:func:`moldiff.chemistry.metrics.own_bonds_result`):
            RDKit sanitizes the molecule, EDM's valence rule holds, the largest fragment's SMILES
            (``None`` for other models; faulty samples are neither). When ``own_valid``, ``mol`` is
            that molecule and ``bonds`` is ``"model"``; the EDM flags above still use the table.
        own_reason: why the molecule is invalid and/or unstable on its own bonds, as ``reason``
            says it for EDM's table (``None`` when it is valid and stable, or for other models).
    """

    symbols: list[str]
    positions: np.ndarray
    charges: np.ndarray | None
    mol: "Chem.Mol | None"
    smiles: str | None
    valid: bool
    mol_stable: bool
    n_stable_atoms: int
    reason: str | None = None
    rdkit_smiles: str | None = None
    bonds: str = "none"
    fault_step: int = -1
    fragment_retained: bool | None = None
    fragment_rmsd: float | None = None
    generated_bonds: np.ndarray | None = None
    formal_charges: np.ndarray | None = None
    own_valid: bool | None = None
    own_mol_stable: bool | None = None
    own_smiles: str | None = None
    own_reason: str | None = None

    @property
    def num_atoms(self) -> int:
        return len(self.symbols)

    @property
    def fault(self) -> bool:
        """Whether the sample hit a numerical fault (NaN/inf) during sampling."""
        return self.fault_step >= 0

    @property
    def formula(self) -> str:
        """Hill formula of the sampled atoms, e.g. ``C3H7NO``."""
        return chem_fragments.format_formula(chem_fragments.element_counts(self.symbols))

    @property
    def result(self) -> MoleculeResult:
        """The EDM-protocol verdict, as :func:`moldiff.chemistry.metrics.summarize` takes it."""
        return MoleculeResult(self.smiles, self.valid, self.mol_stable, self.n_stable_atoms, self.num_atoms, self.reason)

    def __repr__(self) -> str:
        shown = self.rdkit_smiles or self.smiles
        return (
            f"GeneratedMolecule({self.formula}, valid={self.valid}, mol_stable={self.mol_stable}"
            + (f", smiles={shown!r}" if shown else "")
            + (f", reason={self.reason!r}" if self.reason and not self.valid else "")
            + ")"
        )


def _fault_reason(step: int, steps: int) -> str:
    where = " (final decode)" if step >= steps else ""
    return f"numerical fault at reverse step {step}{where}"


def molecules_from_arrays(
    arrays: SampledArrays, progress: Callable[[int], None] | None = None
) -> list[GeneratedMolecule]:
    """Turn raw samples into :class:`GeneratedMolecule` objects (bonds, RDKit molecule, EDM flags).

    ``progress(1)`` is called after each molecule. Samples with a numerical fault are not
    interpreted: invalid, unstable, ``mol=None``, the fault as ``reason``.
    """
    out = []
    for k in range(len(arrays.positions)):
        symbols = arrays.symbols(k)
        positions = np.asarray(arrays.positions[k], dtype=np.float64)
        step = int(arrays.fault_step[k])
        chem = assess_sample(symbols, positions, fault=_fault_reason(step, arrays.steps) if step >= 0 else None)
        r = chem.result
        charges = arrays.charges[k]
        formal = arrays.formal_charges[k] if arrays.formal_charges else None
        mol, bonds, own = chem.mol, chem.bonds, None
        if arrays.bonds and step < 0:  # judged on its own bonds too; a valid such molecule is the one written
            own = own_bonds_result(symbols, positions, arrays.bonds[k], formal)
            if own.valid:
                mol, bonds = own.mol, "model"
        out.append(
            GeneratedMolecule(
                symbols=symbols,
                positions=positions,
                charges=None if charges is None else np.asarray(charges),
                mol=mol,
                smiles=r.smiles,
                valid=r.valid,
                mol_stable=r.mol_stable,
                n_stable_atoms=r.n_stable_atoms,
                reason=r.reason,
                rdkit_smiles=chem.rdkit_smiles,
                bonds=bonds,
                fault_step=step,
                generated_bonds=arrays.bonds[k] if arrays.bonds else None,
                formal_charges=formal,
                own_valid=None if not arrays.bonds else bool(own is not None and own.valid),
                own_mol_stable=None if not arrays.bonds else bool(own is not None and own.mol_stable),
                own_smiles=None if own is None else own.smiles,
                own_reason=None if own is None else own.reason,
            )
        )
        if progress is not None:
            progress(1)
    return out


def interpret(arrays: SampledArrays, *, fragment=None, progress: Callable[[int], None] | None = None) -> list[GeneratedMolecule]:
    """:func:`molecules_from_arrays`, and with a ``fragment`` each molecule's fragment report."""
    molecules = molecules_from_arrays(arrays, progress=progress)
    if fragment is not None:
        for m in molecules:
            rep = fragment_report(fragment, m.symbols, m.positions, mol=m.mol)
            m.fragment_retained, m.fragment_rmsd = rep.retained, rep.rmsd
    return molecules



def evaluate_molecules(
    molecules: Iterable[GeneratedMolecule | tuple],
    reference: Iterable[str] | None = None,
    workers: int = 1,
) -> MetricsReport:
    """EDM-protocol metrics (atom/molecule stability, validity, uniqueness, novelty) of a set.

    Args:
        molecules: :class:`GeneratedMolecule` objects (their stored verdicts are used, numerical
            faults counting as invalid and unstable) and/or ``(symbols, positions)`` pairs with
            positions ``(N, 3)`` in Å.
        reference: SMILES of the training set for novelty (e.g.
            ``moldiff.data.qm9.training_smiles()``), or ``None`` to skip novelty.
        workers: processes for the RDKit work on plain pairs.

    Returns:
        :class:`~moldiff.chemistry.metrics.MetricsReport` (``format_table`` prints it).
    """
    from moldiff.chemistry.metrics import evaluate_molecules as _evaluate_pairs

    items = list(molecules)
    if not any(isinstance(m, GeneratedMolecule) for m in items):
        return _evaluate_pairs(items, reference=reference, workers=workers)
    results = [m.result if isinstance(m, GeneratedMolecule) else evaluate_molecule(*m) for m in items]
    return summarize(results, reference)
