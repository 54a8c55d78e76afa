"""Element vocabularies: symbols, atomic numbers and the valences the EDM protocol allows.

The allowed valences are the facts of EDM's ``allowed_bonds`` table
(Hoogeboom et al. 2022, github.com/ehoogeboom/e3_diffusion_for_molecules, ``qm9/bond_analyze.py``).
An atom is "stable" when the sum of its bond orders equals its allowed valence (or is one of the
allowed valences where EDM lists several).

:data:`CHARGED_VALENCE` extends that rule to charged atoms (an option beside EDM's rule, never
replacing it): allowed valences per (element, formal charge), after the charged-stability table of
MiDi (Vignac et al. 2023, github.com/cvignac/MiDi, ``midi/analysis/rdkit_functions.py``
``allowed_bonds``), which EQGAT-diff (``experiments/data/metrics.py``) and FlowMol reuse.
See :data:`CHARGED_VALENCE` for where it deliberately differs from that table.
"""

from __future__ import annotations

from collections.abc import Iterable
from numbers import Integral
from types import MappingProxyType

import numpy as np

__all__ = [
    "QM9_ELEMENTS",
    "SYMBOL_TO_Z",
    "Z_TO_SYMBOL",
    "ALLOWED_VALENCE",
    "UnknownElementError",
    "to_symbols",
    "allowed_valences",
    "CHARGED_VALENCE",
    "allowed_valences_charged",
    "valence_sum_parity",
]

#: QM9's element vocabulary, in EDM's one-hot order (atom_decoder = H, C, N, O, F).
QM9_ELEMENTS: tuple[str, ...] = ("H", "C", "N", "O", "F")

# Symbols for Z = 1..86 (H..Rn); index i holds element Z = i + 1.
_SYMBOLS = (
    "H He Li Be B C N O F Ne Na Mg Al Si P S Cl Ar K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn Ga Ge As Se "
    "Br Kr Rb Sr Y Zr Nb Mo Tc Ru Rh Pd Ag Cd In Sn Sb Te I Xe Cs Ba La Ce Pr Nd Pm Sm Eu Gd Tb "
    "Dy Ho Er Tm Yb Lu Hf Ta W Re Os Ir Pt Au Hg Tl Pb Bi Po At Rn"
).split()

#: Element symbol -> atomic number (H..Rn).
SYMBOL_TO_Z: MappingProxyType[str, int] = MappingProxyType({s: i + 1 for i, s in enumerate(_SYMBOLS)})
_SYMBOL_SET = frozenset(_SYMBOLS)
#: Atomic number -> element symbol (1..86).
Z_TO_SYMBOL: MappingProxyType[int, str] = MappingProxyType({i + 1: s for i, s in enumerate(_SYMBOLS)})

#: EDM's ``allowed_bonds``: an int, or a frozenset where EDM lists several valences (P, Hg, Bi).
ALLOWED_VALENCE: MappingProxyType[str, int | frozenset[int]] = MappingProxyType(
    {
        "H": 1, "C": 4, "N": 3, "O": 2, "F": 1, "B": 3, "Al": 3, "Si": 4,
        "P": frozenset({3, 5}), "S": 4, "Cl": 1, "As": 3, "Br": 1, "I": 1,
        "Hg": frozenset({1, 2}), "Bi": frozenset({3, 5}),
    }
)  # fmt: skip


# Allowed valences of charged atoms, (element -> formal charge -> valences); the neutral row is added
# from EDM's table below. From MiDi's ``allowed_bonds`` unless marked; see CHARGED_VALENCE.
_CHARGED_ROWS: dict[str, dict[int, tuple[int, ...]]] = {
    "H": {1: (0,), -1: (0,)},                    # a bare proton / hydride has no bonds
    "B": {-1: (4,)},                             # added: borate, BF4-, BH4- (MiDi has no charged B)
    "C": {1: (3,), -1: (3,)},                    # carbocation, carbanion
    "N": {1: (4,), -1: (2,)},                    # MiDi lists N+ 2/3/4; here 4 only (ammonium, nitro)
    "O": {1: (3,), -1: (1,)},                    # oxonium; alkoxide, nitro O-, carboxylate O-
    "F": {-1: (0,)},                             # fluoride
    "P": {1: (4,)},                              # phosphonium
    "S": {1: (2, 3), 2: (4,), 3: (5,), -1: (1, 3)},  # S- 1 (thiolate) added beside MiDi's 3
    "Cl": {-1: (0,)},                            # added: chloride
    "Br": {1: (2,), -1: (0,)},                   # Br- added: bromide
    "I": {1: (2,), -1: (0,)},                    # added: iodonium, iodide
}  # fmt: skip


def _charged_valence_table() -> MappingProxyType:
    table = {}
    for symbol in ALLOWED_VALENCE:
        neutral = ALLOWED_VALENCE[symbol]
        rows = {0: frozenset({neutral}) if isinstance(neutral, int) else neutral}
        rows.update({charge: frozenset(v) for charge, v in _CHARGED_ROWS.get(symbol, {}).items()})
        table[symbol] = MappingProxyType(dict(sorted(rows.items())))
    return MappingProxyType(table)


#: Allowed valences per (element, formal charge) for charge-aware stability:
#: ``CHARGED_VALENCE["N"][1] == frozenset({4})``.
#:
#: Source: MiDi's ``allowed_bonds`` (github.com/cvignac/MiDi, ``midi/analysis/rdkit_functions.py``;
#: the same table is EQGAT-diff's ``experiments/data/metrics.py`` and FlowMol's), with these
#: deliberate differences:
#:
#: * charge 0 is EDM's :data:`ALLOWED_VALENCE` exactly (MiDi's neutral rows are looser: C 3/4, N 2/3,
#:   S 2/6), so a neutral molecule gets the same verdict as under EDM's rule;
#: * N+ allows 4 only (MiDi allows 2, 3 and 4, which its comment explains by NH+/NH2+ in QM9's
#:   charge assignment), so an N+ with three bonds is unstable;
#: * an (element, charge) pair not listed allows nothing, so that atom is unstable (MiDi falls back
#:   to the neutral row, and ignores the charge of elements listed as a bare number such as Cl);
#: * closed-shell ions MiDi lacks are added: B- 4, S- 1 (thiolate, beside MiDi's 3), Cl- 0, Br- 0,
#:   I- 0, I+ 2.
CHARGED_VALENCE: MappingProxyType[str, MappingProxyType[int, frozenset[int]]] = _charged_valence_table()


def allowed_valences_charged(symbol: str, charge: int) -> frozenset[int]:
    """Valences an atom of ``symbol`` with formal ``charge`` may have to count as stable under the
    charge-aware rule (:data:`CHARGED_VALENCE`); empty when the pair is not listed. For charge 0 this
    is :func:`allowed_valences` (EDM's rule)."""
    return CHARGED_VALENCE.get(symbol, MappingProxyType({})).get(int(charge), frozenset())


class UnknownElementError(ValueError):
    """An element symbol or atomic number that is not in the H..Rn table."""


def allowed_valences(symbol: str) -> frozenset[int]:
    """Valences an atom of ``symbol`` may have to count as stable (empty if EDM lists none)."""
    allowed = ALLOWED_VALENCE.get(symbol, frozenset())
    return frozenset({allowed}) if isinstance(allowed, int) else allowed


def _one_symbol(item: object, position: int) -> str:
    # Fast path first: metrics call this for every atom of every molecule.
    if type(item) is str and item in _SYMBOL_SET:
        return item
    # Atomic numbers may come as Python/numpy ints or as digit strings (e.g. an XYZ column).
    if isinstance(item, (Integral, np.integer)) and not isinstance(item, (bool, np.bool_)):
        symbol = Z_TO_SYMBOL.get(int(item))
    elif isinstance(item, str):
        text = item.strip()
        symbol = Z_TO_SYMBOL.get(int(text)) if text.isdigit() else text.capitalize()
        symbol = symbol if symbol in SYMBOL_TO_Z else None
    else:
        symbol = None
    if symbol is None:
        raise UnknownElementError(
            f"unknown element {item!r} at atom {position}: expected a symbol (H..Rn) "
            f"or an atomic number 1..{len(_SYMBOLS)}"
        )
    return symbol


def to_symbols(elements: Iterable[object]) -> tuple[str, ...]:
    """Normalise element symbols or atomic numbers to a tuple of symbols.

    Args:
        elements: length-n iterable of symbols (``"C"``, ``"cl"``) or atomic numbers
            (``6``, ``np.int64(17)``, ``"6"``).

    Returns:
        Tuple of n capitalised symbols, e.g. ``("C", "Cl")``.

    Raises:
        UnknownElementError: for anything that is not an element H..Rn.
    """
    if isinstance(elements, str):
        raise UnknownElementError(
            f"expected a sequence of elements, got the single string {elements!r}"
        )
    return tuple(_one_symbol(item, i) for i, item in enumerate(elements))


def valence_sum_parity(symbols: Iterable[object]) -> int | None:
    """Parity (0 or 1) of the sum of the atoms' allowed valences, or ``None`` when an element has
    no allowed valence or allowed valences of both parities (Hg).

    Every bond adds its order to two atoms, so the bond-order sums of any molecule add up to an even
    number: a composition whose valences add up to an odd number (parity 1, e.g. CH3 or C2H5N2)
    cannot have every atom stable, whatever its geometry.
    """
    total = 0
    for symbol in to_symbols(symbols):
        parities = {v % 2 for v in allowed_valences(symbol)}
        if len(parities) != 1:
            return None
        total += parities.pop()
    return total % 2
