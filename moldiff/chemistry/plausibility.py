"""Are generated 3D structures physically sensible? PoseBusters checks and force-field relaxation.

Two independent, per-molecule questions (numpy + RDKit; PoseBusters is an optional extra):

* :func:`posebusters_checks`: PoseBusters' molecule checks (its ``mol`` configuration, no protein):
  sanitization, InChI, connectivity, radicals, bond lengths and angles and internal clashes against
  distance-geometry bounds, ring and double-bond flatness, and internal energy against an ETKDG
  ensemble. PoseBusters is imported only when asked for; :func:`require_posebusters` raises
  :class:`MissingExtraError` (one line naming ``pip install moldiff[checks]``) without it.
* :func:`relax`: minimize the molecule with an RDKit force field (MMFF94 or UFF), and report how far
  the heavy atoms moved (RMSD after optimal superposition, Å) and the strain energy (energy of the
  coordinates as generated minus the relaxed energy, kcal/mol; >= 0). A molecule the force field
  cannot type is reported as such (``untyped``), never dropped.

:func:`assess_plausibility` runs both over many molecules (in processes with ``workers`` > 1) and
:func:`summarize_plausibility` / :func:`format_plausibility` give the pass rates and strain numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from rdkit import Chem, rdBase
from rdkit.Chem import rdForceFieldHelpers, rdMolAlign

__all__ = [
    "CHECKS_EXTRA",
    "ENERGY_CONFORMERS",
    "check_energy_conformers",
    "FORCE_FIELDS",
    "MissingExtraError",
    "posebusters_available",
    "require_posebusters",
    "posebusters_checks",
    "RelaxResult",
    "relax",
    "Plausibility",
    "assess_plausibility",
    "summarize_plausibility",
    "format_plausibility",
]

#: How to install the optional dependencies of this module.
CHECKS_EXTRA = "pip install moldiff[checks]"
#: Conformers in the internal-energy check's reference ensemble in PoseBusters' ``mol`` configuration.
ENERGY_CONFORMERS = 50
#: ``--relax`` choices: name -> what reports call it.
FORCE_FIELDS = {"mmff": "MMFF94", "uff": "UFF"}


class MissingExtraError(ImportError):
    """An optional dependency is not installed (one-line message saying how to get it)."""


def _import_posebusters():
    try:
        import posebusters
    except ImportError as exc:
        raise MissingExtraError(f"PoseBusters checks need the optional posebusters package: {CHECKS_EXTRA}") from exc
    return posebusters


def require_posebusters() -> None:
    """Raise :class:`MissingExtraError` if PoseBusters cannot be imported."""
    _import_posebusters()


def posebusters_available() -> bool:
    try:
        _import_posebusters()
    except MissingExtraError:
        return False
    return True


def check_energy_conformers(energy_conformers) -> int:
    """``energy_conformers`` as an int, or :class:`ValueError` (one line) unless it is an integer >= 0."""
    if not isinstance(energy_conformers, (int, np.integer)) or isinstance(energy_conformers, bool) \
            or energy_conformers < 0:
        raise ValueError(f"energy_conformers must be an integer >= 0, got {energy_conformers!r}")
    return int(energy_conformers)


@lru_cache(maxsize=4)
def _buster(energy_conformers: int = ENERGY_CONFORMERS):
    """PoseBusters with its own ``mol`` configuration, the internal-energy ensemble made of
    ``energy_conformers`` conformers (0: that check left out), embedded on one thread: molecules are
    spread over processes by ``workers``, and RDKit would otherwise start a thread per core in each."""
    import yaml

    pb = _import_posebusters()
    config = yaml.safe_load((Path(pb.__file__).parent / "config" / "mol.yml").read_text(encoding="utf-8"))
    modules = []
    for module in config["modules"]:
        if module["function"] == "energy_ratio":
            if energy_conformers == 0:
                continue
            module = {**module, "parameters": {**module.get("parameters", {}), "num_threads": 1,
                                               "ensemble_number_conformations": energy_conformers}}
        modules.append(module)
    return pb.PoseBusters(config={**config, "modules": modules}, max_workers=0)


def posebusters_checks(mol: Chem.Mol, energy_conformers: int = ENERGY_CONFORMERS) -> dict[str, bool]:
    """PoseBusters' ``mol`` checks of one molecule (3D conformer, explicit hydrogens as generated).

    Args:
        mol: an RDKit molecule with bonds and one 3D conformer.
        energy_conformers: size of the ETKDG ensemble the internal-energy check compares against
            (PoseBusters' ``mol`` configuration: :data:`ENERGY_CONFORMERS`); fewer is faster, 0 leaves
            the internal-energy check out.

    Returns:
        ``{check name: passed}`` in PoseBusters' order, e.g. ``bond_lengths``,
        ``internal_steric_clash``, ``internal_energy``.
    """
    buster = _buster(check_energy_conformers(energy_conformers))
    with rdBase.BlockLogs():
        table = buster.bust([Chem.Mol(mol)], None, None, full_report=False)
    row = table.iloc[0]
    return {str(name): bool(row[name]) for name in table.columns}


# ----------------------------------------------------------------------------------- relaxation


@dataclass
class RelaxResult:
    """One force-field relaxation.

    Attributes:
        forcefield: ``"mmff"`` or ``"uff"``.
        mol: relaxed copy (superposed on the input's heavy atoms), ``None`` when not relaxed.
        energy_raw / energy_relaxed: force-field energies (kcal/mol) before and after.
        strain: ``energy_raw - energy_relaxed`` (kcal/mol).
        rmsd: heavy-atom RMSD (Å) between input and relaxed coordinates after superposition.
        converged: whether the minimizer converged within its iterations.
        untyped: the force field has no parameters for some atom (then nothing else is set).
        error: why the molecule was not relaxed, else ``None``.
    """

    forcefield: str
    mol: Chem.Mol | None = None
    energy_raw: float | None = None
    energy_relaxed: float | None = None
    strain: float | None = None
    rmsd: float | None = None
    converged: bool | None = None
    untyped: bool = False
    error: str | None = None


def _force_field(mol: Chem.Mol, forcefield: str):
    """The RDKit force field of ``mol`` or ``None`` when some atom cannot be typed."""
    if forcefield == "mmff":
        props = rdForceFieldHelpers.MMFFGetMoleculeProperties(mol)
        return None if props is None else rdForceFieldHelpers.MMFFGetMoleculeForceField(mol, props)
    if not rdForceFieldHelpers.UFFHasAllMoleculeParams(mol):
        return None
    return rdForceFieldHelpers.UFFGetMoleculeForceField(mol)


def relax(mol: Chem.Mol, forcefield: str = "mmff", max_iterations: int = 2000) -> RelaxResult:
    """Minimize ``mol``'s first conformer with MMFF94 (``"mmff"``) or UFF (``"uff"``).

    The input is not modified. Never raises for chemistry problems: an untyped atom gives
    ``untyped=True``, other failures an ``error``.
    """
    if forcefield not in FORCE_FIELDS:
        raise ValueError(f"unknown force field {forcefield!r}; choose {' or '.join(FORCE_FIELDS)}")
    out = Chem.Mol(mol)
    try:
        with rdBase.BlockLogs():
            out.UpdatePropertyCache(strict=False)
            Chem.GetSymmSSSR(out)
            ff = _force_field(out, forcefield)
            if ff is None:
                return RelaxResult(forcefield, untyped=True, error=f"{FORCE_FIELDS[forcefield]} cannot type every atom")
            ff.Initialize()
            e_raw = ff.CalcEnergy()
            status = 1
            for _ in range(max(1, max_iterations // 200)):
                status = ff.Minimize(maxIts=200)
                if status == 0:
                    break
            e_relaxed = ff.CalcEnergy()
            positions = np.asarray(ff.Positions(), dtype=np.float64).reshape(-1, 3)
    except Exception as exc:  # noqa: BLE001 - one molecule's failure is reported, not raised
        return RelaxResult(forcefield, error=f"{type(exc).__name__}: {exc}".splitlines()[0])
    if not (np.isfinite(e_raw) and np.isfinite(e_relaxed) and np.isfinite(positions).all()):
        return RelaxResult(forcefield, error="non-finite energy or coordinates")
    conf = out.GetConformer()
    for i, (x, y, z) in enumerate(positions.tolist()):
        conf.SetAtomPosition(i, (x, y, z))
    heavy = [a.GetIdx() for a in out.GetAtoms() if a.GetAtomicNum() > 1] or list(range(out.GetNumAtoms()))
    rmsd = rdMolAlign.AlignMol(out, mol, atomMap=[(i, i) for i in heavy])
    return RelaxResult(forcefield, out, float(e_raw), float(e_relaxed), float(e_raw - e_relaxed), float(rmsd), status == 0)


# ----------------------------------------------------------------------------------- many molecules


@dataclass
class Plausibility:
    """Plausibility of one molecule of a set (``index`` is its place in that set).

    ``checks``: PoseBusters results on the coordinates as given (``None`` if not run);
    ``relaxed_checks``: the same on the relaxed coordinates; ``relaxation``: :class:`RelaxResult`;
    ``error``: why the checks could not run (no bonded molecule, PoseBusters raised).
    """

    index: int
    checks: dict[str, bool] | None = None
    relaxation: RelaxResult | None = None
    relaxed_checks: dict[str, bool] | None = None
    error: str | None = None

    def row(self, checks: bool = True) -> dict:
        """Per-molecule CSV cells: ``pb_<check>`` and ``pb_all`` (with ``checks``; 0 when the
        molecule could not be checked), ``relax_*`` when relaxed, ``plausibility_error``."""
        row: dict = {}
        if checks:
            for name, ok in (self.checks or {}).items():
                row[f"pb_{name}"] = int(ok)
            row["pb_all"] = int(self.checks is not None and all(self.checks.values()))
        r = self.relaxation
        if r is not None:
            row.update(relax_rmsd=_round(r.rmsd), relax_strain=_round(r.strain), relax_energy=_round(r.energy_relaxed),
                       relax_error=r.error or "")
            if checks:
                row["pb_all_relaxed"] = "" if self.relaxed_checks is None else int(all(self.relaxed_checks.values()))
        if self.error is not None:
            row["plausibility_error"] = self.error
        return row


def _round(x: float | None, digits: int = 4):
    return None if x is None else round(x, digits)


def _molecule(item) -> tuple[Chem.Mol | None, str | None]:
    if isinstance(item, Chem.Mol):
        return item, None
    from .report import assess_sample

    symbols, positions = item
    chem = assess_sample(symbols, np.asarray(positions, dtype=np.float64))
    if chem.mol is None or chem.bonds == "none":
        return None, "no bonded RDKit molecule for these coordinates"
    return chem.mol, None


def _assess_one(job) -> Plausibility:
    index, item, checks, forcefield, conformers = job
    mol, error = _molecule(item)
    out = Plausibility(index, error=error)
    if mol is None:
        return out
    if checks:
        try:
            out.checks = posebusters_checks(mol, conformers)
        except MissingExtraError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported per molecule
            out.error = f"PoseBusters failed: {type(exc).__name__}: {exc}".splitlines()[0]
    if forcefield:
        out.relaxation = relax(mol, forcefield)
        if checks and out.relaxation.mol is not None:
            try:
                out.relaxed_checks = posebusters_checks(out.relaxation.mol, conformers)
            except Exception:  # noqa: BLE001 - relaxed checks are secondary
                out.relaxed_checks = None
    return out


def assess_plausibility(
    molecules: Iterable[tuple[int, object]],
    *,
    checks: bool = False,
    forcefield: str | None = None,
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
    energy_conformers: int = ENERGY_CONFORMERS,
) -> list[Plausibility]:
    """PoseBusters checks and/or relaxation of ``(index, molecule)`` pairs, in input order.

    Args:
        molecules: ``(index, mol)`` with an RDKit molecule (bonds and a 3D conformer), or
            ``(index, (symbols, positions))``, bonded here as :func:`~moldiff.chemistry.report.assess_sample` does.
        checks: run PoseBusters (raises :class:`MissingExtraError` at once without it).
        forcefield: ``"mmff"``, ``"uff"`` or ``None`` (no relaxation).
        workers: processes (1 = this process).
        progress: called with 1 after each molecule.
        energy_conformers: PoseBusters' internal-energy ensemble size (see :func:`posebusters_checks`).
    """
    conformers = check_energy_conformers(energy_conformers)
    if checks:
        require_posebusters()
    if forcefield is not None and forcefield not in FORCE_FIELDS:
        raise ValueError(f"unknown force field {forcefield!r}; choose {' or '.join(FORCE_FIELDS)}")
    jobs = [(int(i), m, checks, forcefield, conformers) for i, m in molecules]
    results = []
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            results.append(_assess_one(job))
            if progress is not None:
                progress(1)
        return results
    chunksize = max(1, min(16, len(jobs) // (4 * workers)))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for result in pool.map(_assess_one, jobs, chunksize=chunksize):
            results.append(result)
            if progress is not None:
                progress(1)
    return results


def _stats(values: Sequence[float]) -> dict:
    if not values:
        return {"mean": None, "median": None, "p90": None, "max": None}
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "median": float(np.median(a)), "p90": float(np.percentile(a, 90)),
            "max": float(a.max())}


def _pass_rates(tables: list[dict[str, bool] | None], n: int) -> dict:
    names = list(dict.fromkeys(k for t in tables if t for k in t))
    rates = {name: sum(bool(t and t.get(name)) for t in tables) / n for name in names} if n else {}
    return {"checks": rates, "all": (sum(bool(t) and all(t.values()) for t in tables) / n) if n else None}


def summarize_plausibility(results: Sequence[Plausibility], *, checks: bool, forcefield: str | None,
                           energy_conformers: int = ENERGY_CONFORMERS) -> dict:
    """JSON-ready summary of :func:`assess_plausibility` run with these ``checks`` / ``forcefield``
    (and ``energy_conformers``, recorded as ``posebusters.energy_conformers``).

    ``posebusters``: pass rate of each check and of all together over the molecules given (one
    that could not be checked counts as failing, and is named in ``errors``). ``relax``: RMSD and
    strain statistics of the relaxed molecules; untyped and failed ones counted and named by index.
    """
    out: dict = {}
    if checks:
        out["posebusters"] = {"config": "mol", "energy_conformers": int(energy_conformers), "n": len(results), **_pass_rates([r.checks for r in results], len(results)),
                              "errors": [r.index for r in results if r.checks is None]}
    if forcefield:
        ok = [r for r in results if r.relaxation is not None and r.relaxation.mol is not None]
        untyped = [r.index for r in results if r.relaxation is not None and r.relaxation.untyped]
        relaxed_ids = {id(r) for r in ok}
        failed = [r.index for r in results if id(r) not in relaxed_ids and r.index not in untyped]
        out["relax"] = {
            "forcefield": FORCE_FIELDS[forcefield],
            "n": len(results),
            "n_relaxed": len(ok),
            "n_converged": sum(bool(r.relaxation.converged) for r in ok),
            "n_untyped": len(untyped),
            "untyped": untyped,
            "n_failed": len(failed),
            "failed": failed,
            "rmsd_heavy": _stats([r.relaxation.rmsd for r in ok]),
            "strain_kcal_mol": _stats([r.relaxation.strain for r in ok]),
        }
        if checks:
            after = [r.relaxed_checks for r in ok]
            out["relax"]["posebusters_after"] = {"n": len(after), **_pass_rates(after, len(after))}
    return out


def _named(indices: Sequence[int], limit: int = 20) -> str:
    shown = ", ".join(f"#{i}" for i in indices[:limit])
    return shown + (f" and {len(indices) - limit} more" if len(indices) > limit else "")


def format_plausibility(summary: dict) -> str:
    """Printable table of :func:`summarize_plausibility`'s output."""
    lines = []
    pb = summary.get("posebusters")
    if pb:
        after = (summary.get("relax") or {}).get("posebusters_after")
        conformers = pb.get("energy_conformers", ENERGY_CONFORMERS)
        how = ("internal energy not checked" if conformers == 0 else
               f"internal energy against {conformers} conformers" if conformers != ENERGY_CONFORMERS else "")
        head = (f"PoseBusters (mol checks{'; ' + how if how else ''}) on {pb['n']} valid molecules"
                + ("   as generated   relaxed" if after else ""))
        lines.append(head)
        for name, rate in [*pb["checks"].items(), ("all checks", pb["all"])]:
            line = f"{name:>32}: {100 * rate:6.2f}%"
            if after:
                key = "all" if name == "all checks" else None
                other = after["all"] if key else after["checks"].get(name)
                line += "" if other is None else f"         {100 * other:6.2f}%"
            lines.append(line)
        if pb["errors"]:
            lines.append(f"  not checked (counted as failing): {_named(pb['errors'])}")
    rx = summary.get("relax")
    if rx:
        r, s = rx["rmsd_heavy"], rx["strain_kcal_mol"]
        lines.append(f"relaxation ({rx['forcefield']}) of {rx['n']} valid molecules: {rx['n_relaxed']} relaxed "
                     f"({rx['n_converged']} converged)")
        if rx["n_relaxed"]:
            lines.append(f"  heavy-atom RMSD moved: median {r['median']:.3f} Å, mean {r['mean']:.3f} Å, max {r['max']:.3f} Å")
            lines.append(f"  strain energy: median {s['median']:.2f}, mean {s['mean']:.2f}, "
                         f"90th percentile {s['p90']:.2f} kcal/mol")
        if rx["n_untyped"]:
            lines.append(f"  {rx['n_untyped']} not typed by {rx['forcefield']}: {_named(rx['untyped'])}")
        if rx["n_failed"]:
            lines.append(f"  {rx['n_failed']} not relaxed (no bonded molecule or a force-field error): {_named(rx['failed'])}")
    return "\n".join(lines)
