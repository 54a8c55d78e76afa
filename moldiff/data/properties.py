"""QM9 properties as EDM's conditional-generation protocol uses them (Hoogeboom et al. 2022, sec. 5.2).

What this module fixes, each checked against EDM's code (github.com/ehoogeboom/e3_diffusion_for_molecules):

* **The halves.** EDM halves the QM9 training split (``qm9/data/utils.py``, ``initialize_datasets``):
  ``np.random.seed(42)``, one ``np.random.permutation(100000)`` over the training molecules *in the
  order of EDM's ``train.npz``*, which is ascending QM9 index (the files are read in archive order and
  filtered by split membership, ``qm9/data/prepare/process.py``). The first 50,000 of the
  permutation are ``qm9_first_half``, the rest ``qm9_second_half``. The property classifiers train on
  the first half (``qm9/property_prediction/main_qm9_prop.py``: ``--dataset qm9_first_half``, and
  their "test" loader is the second half); the conditional generator trains on the second half
  (``eval_conditional_qm9.py`` asserts ``qm9_second_half``). The paper calls them D_a (classifier) and
  D_b (generator). :func:`edm_halves` names them by role: ``predictor`` and ``generator``.
* **Units.** EDM multiplies HOMO, LUMO and gap by 27.2114 (Hartree -> eV, ``qm9/dataset.py``) and its
  Table 3 reports them in meV; qm9pack stores Hartree, so :data:`EDM_SCALE` is 27211.4 meV/Ha.
  alpha stays in Bohr^3, mu in Debye, Cv in cal/(mol K).
* **Cv minus the atoms' share.** EDM's data loader subtracts the "thermochemical energy" of the free
  atoms from Cv (``subtract_thermo`` defaults to true in ``qm9/data/args.py``; ``ProcessedDataset``
  does the subtraction, ``add_thermo_targets`` builds it from QM9's ``atomref.txt``, where Cv is
  2.981 cal/(mol K) for each of H, C, N, O and F). So EDM's Cv target is ``Cv - 2.981 * N``. That
  does not change a predictor's error, but it changes the shuffle baseline (6.86 with it, 4.55
  without; EDM reports 6.857) and the normalisation.
* **Normalisation.** Mean and mean absolute deviation of each target over the QM9 *validation* split
  (``compute_mean_mad_from_dataloader(dataloaders['valid'], ...)`` in ``main_qm9_prop.py``, and
  ``compute_mean_mad`` for ``qm9_second_half`` in ``qm9/utils.py``); the classifiers are trained with
  an L1 loss on ``(y - mean) / mad``.
* **Baselines.** "Naive (upper bound)": the property classifier evaluated on the generator half with
  the labels shuffled (``eval_conditional_qm9.py``, task ``naive``: ``torch.randperm`` over the
  labels). "#Atoms": a classifier that sees only the number of atoms (``NumNodes`` in
  ``models_property.py``, an MLP of ``N / 29`` trained like the others, L1 loss), scored on the
  generator half. Here the #Atoms predictor is the per-size median of the predictor half, the exact
  minimiser of that L1 loss over all functions of N (EDM's small MLP approximates it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moldiff.data.qm9 import QM9, QM9_PROPERTIES, edm_split

__all__ = [
    "EDM_PROPERTIES",
    "EDM_UNITS",
    "EDM_SCALE",
    "HARTREE_TO_EV_EDM",
    "CV_ATOM_REFERENCE",
    "EDM_TABLE3",
    "HALVES_SEED",
    "PropertyHalves",
    "AtomCountBaseline",
    "edm_halves",
    "edm_targets",
    "from_edm_target",
    "to_edm_target",
    "property_norms",
    "naive_mae",
    "mean_pair_difference",
    "data_baselines",
    "CONDITION_UNITS",
    "condition_unit_factor",
    "CONDITION_SUFFIXES",
    "DEFAULT_SIZE_NEIGHBOURS",
    "PropertyConditioning",
    "canonical_property",
    "parse_condition_value",
]

#: EDM's six conditioning properties, in the column order of its Table 3.
EDM_PROPERTIES: tuple[str, ...] = ("alpha", "gap", "homo", "lumo", "mu", "cv")

#: The units EDM's Table 3 reports each property in.
EDM_UNITS: dict[str, str] = {"alpha": "Bohr^3", "gap": "meV", "homo": "meV", "lumo": "meV", "mu": "D",
                             "cv": "cal/(mol K)"}

#: EDM's Hartree -> eV factor (``qm9_to_eV`` in ``qm9/dataset.py``; CODATA 2018 gives 27.211386).
HARTREE_TO_EV_EDM = 27.2114

#: Factor from qm9pack's unit (:data:`moldiff.data.qm9.QM9_PROPERTIES`) to EDM's reporting unit.
EDM_SCALE: dict[str, float] = {"alpha": 1.0, "gap": 1000 * HARTREE_TO_EV_EDM, "homo": 1000 * HARTREE_TO_EV_EDM,
                               "lumo": 1000 * HARTREE_TO_EV_EDM, "mu": 1.0, "cv": 1.0}

#: Heat capacity of one free atom in QM9's ``atomref.txt``, cal/(mol K): 2.981 for each of H, C, N,
#: O, F (3R/2). EDM subtracts ``N`` times it from Cv.
CV_ATOM_REFERENCE = 2.981

#: EDM's Table 3 (Hoogeboom et al., ICML 2022), mean absolute error in :data:`EDM_UNITS`.
EDM_TABLE3: dict[str, dict[str, float]] = {
    "Naive (upper bound)": {"alpha": 9.01, "gap": 1470, "homo": 645, "lumo": 1457, "mu": 1.616, "cv": 6.857},
    "#Atoms": {"alpha": 3.86, "gap": 866, "homo": 426, "lumo": 813, "mu": 1.053, "cv": 1.971},
    "EDM": {"alpha": 2.76, "gap": 655, "homo": 356, "lumo": 584, "mu": 1.111, "cv": 1.101},
    "QM9 (lower bound)": {"alpha": 0.10, "gap": 64, "homo": 39, "lumo": 36, "mu": 0.043, "cv": 0.040},
}

#: ``np.random.seed`` of EDM's halving of the training split.
HALVES_SEED = 42

_TRAIN_SIZE = 100_000


@dataclass(frozen=True)
class PropertyHalves:
    """EDM's two halves of the QM9 training split, as positions into the index-ordered molecule list
    (the convention of :func:`moldiff.data.qm9.edm_split`), each 50,000 long, in EDM's order.

    ``predictor``: ``qm9_first_half``, the paper's D_a, on which the property classifiers are trained.
    ``generator``: ``qm9_second_half``, the paper's D_b, on which the conditional generator is trained
    and the classifiers are scored (their MAE there is Table 3's "QM9 (lower bound)" row).
    """

    predictor: np.ndarray
    generator: np.ndarray


def edm_halves(split: dict[str, np.ndarray] | None = None) -> PropertyHalves:
    """EDM's halving of the training split (see the module docstring for where each fact is from)."""
    train = (edm_split() if split is None else split)["train"]
    if len(train) != _TRAIN_SIZE:
        raise ValueError(f"EDM's halves are defined on its {_TRAIN_SIZE:,}-molecule training split, got {len(train)}")
    in_file_order = np.sort(train)  # EDM's train.npz lists the training molecules by ascending QM9 index
    perm = np.random.RandomState(HALVES_SEED).permutation(len(in_file_order))  # = np.random.seed(42); permutation
    half = len(in_file_order) // 2
    return PropertyHalves(predictor=in_file_order[perm[:half]], generator=in_file_order[perm[half:]])


def to_edm_target(name: str, values: np.ndarray, num_atoms: np.ndarray) -> np.ndarray:
    """qm9pack values of property ``name`` -> EDM's target: its reporting unit, and for ``cv`` the
    free atoms' share ``2.981 * N`` taken off (``num_atoms``: atoms per molecule, hydrogens included)."""
    if name not in EDM_SCALE:
        raise ValueError(f"unknown property {name!r}; EDM conditions on {', '.join(EDM_PROPERTIES)}")
    out = np.asarray(values, dtype=np.float64) * EDM_SCALE[name]
    if name == "cv":
        out = out - CV_ATOM_REFERENCE * np.asarray(num_atoms, dtype=np.float64)
    return out


def from_edm_target(name: str, values: np.ndarray, num_atoms: np.ndarray) -> np.ndarray:
    """EDM's target -> the molecule's property in EDM's reporting unit (``cv``: the whole heat
    capacity again, the atoms' share added back). The inverse of :func:`to_edm_target` up to the unit."""
    out = np.asarray(values, dtype=np.float64)
    if name == "cv":
        out = out + CV_ATOM_REFERENCE * np.asarray(num_atoms, dtype=np.float64)
    return out


def edm_targets(qm9: QM9, names=EDM_PROPERTIES, which: np.ndarray | None = None) -> np.ndarray:
    """``(M, P)`` float64 EDM targets (:func:`to_edm_target`) of molecules ``which`` (positions into
    ``qm9``; default all) for properties ``names``, in that column order."""
    rows = np.arange(len(qm9)) if which is None else np.asarray(which, dtype=np.int64)
    n = qm9.num_atoms[rows]
    missing = [k for k in names if k not in qm9.properties]
    if missing:
        raise ValueError(f"QM9 data lacks properties {missing}; known: {sorted(QM9_PROPERTIES)}")
    return np.stack([to_edm_target(k, qm9.properties[k][rows], n) for k in names], axis=1)


def property_norms(targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, mad)`` per column of ``targets`` ``(M, P)``: the mean and the mean absolute deviation
    from it, EDM's normalisation (compute it on the QM9 validation split, as EDM does)."""
    targets = np.asarray(targets, dtype=np.float64)
    mean = targets.mean(axis=0)
    return mean, np.abs(targets - mean).mean(axis=0)


def naive_mae(predictions: np.ndarray, labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """EDM's "Naive (upper bound)": the MAE of ``predictions`` ``(M,)`` or ``(M, P)`` against the labels
    shuffled across molecules (one seeded permutation, the same for every column). With a property
    predictor's outputs on the generator half this is EDM's definition; with ``predictions = labels``
    it is the data-only version (the predictor taken as exact)."""
    predictions = np.asarray(predictions, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions {predictions.shape} and labels {labels.shape} differ in shape")
    perm = np.random.default_rng(seed).permutation(len(labels))
    return np.abs(predictions - labels[perm]).mean(axis=0)


def mean_pair_difference(values: np.ndarray) -> np.ndarray:
    """``E|y_i - y_j|`` over all pairs ``i != j`` of each column of ``values`` ``(M,)`` or ``(M, P)``:
    what :func:`naive_mae` of exact predictions approaches, without the noise of one shuffle."""
    values = np.sort(np.asarray(values, dtype=np.float64), axis=0)
    m = len(values)
    if m < 2:
        raise ValueError("need at least two values")
    weight = (2 * np.arange(m) - m + 1).astype(np.float64)  # sorted y_k is larger than k of the others
    weight = weight.reshape((m,) + (1,) * (values.ndim - 1))
    return 2 * (weight * values).sum(axis=0) / (m * (m - 1))


class AtomCountBaseline:
    """EDM's "#Atoms" predictor: a property estimated from the number of atoms alone.

    Fitted as the per-size median of the training targets, the exact minimiser of EDM's L1 training
    loss over all functions of N. A size absent from the fit takes the value of the nearest fitted
    size (the smaller one on a tie).
    """

    def __init__(self, num_atoms: np.ndarray, targets: np.ndarray):
        num_atoms = np.asarray(num_atoms, dtype=np.int64)
        targets = np.asarray(targets, dtype=np.float64)
        if len(num_atoms) != len(targets) or not len(num_atoms):
            raise ValueError(f"{len(num_atoms)} sizes for {len(targets)} targets")
        self.sizes = np.unique(num_atoms)
        self.medians = np.stack([np.median(targets[num_atoms == n], axis=0) for n in self.sizes])

    def predict(self, num_atoms: np.ndarray) -> np.ndarray:
        """Estimates for molecules of ``num_atoms`` atoms, one row each."""
        num_atoms = np.asarray(num_atoms, dtype=np.int64)
        nearest = np.abs(num_atoms[:, None] - self.sizes[None, :]).argmin(axis=1)
        return self.medians[nearest]


def data_baselines(qm9: QM9, names=EDM_PROPERTIES, halves: PropertyHalves | None = None, seed: int = 0) -> dict:
    """EDM's two baselines that need no trained network, in :data:`EDM_UNITS`, on the generator half:

    ``naive``: :func:`naive_mae` with the labels as predictions (seed ``seed``); ``pair``: its exact
    expectation (:func:`mean_pair_difference`); ``atoms``: :class:`AtomCountBaseline` fitted on the
    predictor half. Each maps property name -> MAE.
    """
    halves = edm_halves() if halves is None else halves
    names = tuple(names)
    fit = edm_targets(qm9, names, halves.predictor)
    score = edm_targets(qm9, names, halves.generator)
    atoms = AtomCountBaseline(qm9.num_atoms[halves.predictor], fit)
    atoms_mae = np.abs(atoms.predict(qm9.num_atoms[halves.generator]) - score).mean(axis=0)
    return {
        "naive": dict(zip(names, naive_mae(score, score, seed).tolist())),
        "pair": dict(zip(names, mean_pair_difference(score).tolist())),
        "atoms": dict(zip(names, atoms_mae.tolist())),
    }


# ---------------------------------------------------------------------------- conditional generation
#: The units a condition is given in when no unit is written (``moldiff sample --condition``,
#: ``pipe.sample(condition=...)``): EDM's units, with the orbital energies in eV (EDM's data unit;
#: its Table 3 reports meV) and Cv the molecule's whole heat capacity (what ``moldiff predict``
#: prints; the atoms' share is taken off internally, as EDM's target is ``Cv - 2.981 N``).
CONDITION_UNITS: dict[str, str] = {"alpha": "Bohr^3", "gap": "eV", "homo": "eV", "lumo": "eV", "mu": "D",
                                   "cv": "cal/(mol K)"}

#: Unit suffixes accepted per property (lower case, spaces removed) -> factor to :data:`CONDITION_UNITS`.
CONDITION_SUFFIXES: dict[str, dict[str, float]] = {
    "alpha": {"": 1.0, "bohr3": 1.0, "bohr^3": 1.0},
    "gap": {"": 1.0, "ev": 1.0, "mev": 1e-3, "ha": HARTREE_TO_EV_EDM},
    "homo": {"": 1.0, "ev": 1.0, "mev": 1e-3, "ha": HARTREE_TO_EV_EDM},
    "lumo": {"": 1.0, "ev": 1.0, "mev": 1e-3, "ha": HARTREE_TO_EV_EDM},
    "mu": {"": 1.0, "d": 1.0, "debye": 1.0},
    "cv": {"": 1.0, "cal/mol/k": 1.0, "cal/(molk)": 1.0},
}

#: EDM target unit (:data:`EDM_UNITS`) per condition unit (:data:`CONDITION_UNITS`): meV per eV.
_TARGET_PER_CONDITION_UNIT: dict[str, float] = {"alpha": 1.0, "gap": 1000.0, "homo": 1000.0, "lumo": 1000.0, "mu": 1.0,
                                                "cv": 1.0}

#: Training molecules nearest to a condition whose sizes a conditional sample's atom count is drawn from.
DEFAULT_SIZE_NEIGHBOURS = 50


def condition_unit_factor(name: str) -> float:
    """How many of EDM's target units (:data:`EDM_UNITS`) make one condition unit (:data:`CONDITION_UNITS`):
    1000 meV per eV for the orbital energies, 1 otherwise."""
    return _TARGET_PER_CONDITION_UNIT[canonical_property(name)]


def canonical_property(name: str) -> str:
    """A property name as moldiff spells it (``"Cv"`` -> ``"cv"``); ``ValueError`` for names EDM does not condition on."""
    key = str(name).strip().lower()
    if key not in EDM_PROPERTIES:
        raise ValueError(f"unknown property {name!r}; EDM's conditioning properties are {', '.join(EDM_PROPERTIES)}")
    return key


def parse_condition_value(name: str, value) -> float:
    """A condition's value in :data:`CONDITION_UNITS`: a number (already in that unit) or a string
    with an optional unit suffix from :data:`CONDITION_SUFFIXES` (``"6.0eV"``, ``"6000meV"``,
    ``"0.22Ha"``, ``"1.5D"``). ``ValueError`` (one line) for anything else."""
    name = canonical_property(name)
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        number = float(value)
    else:
        import re

        text = str(value).strip()
        match = re.fullmatch(r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*(.*)", text)
        if match is None:
            raise ValueError(f"{name}={text!r}: not a number (e.g. {name}=1.5{_example_unit(name)})")
        suffix = match.group(2).replace(" ", "").lower()
        factors = CONDITION_SUFFIXES[name]
        if suffix not in factors:
            units = ", ".join(s for s in factors if s) or "none"
            raise ValueError(f"{name}={text!r}: unknown unit {match.group(2)!r} (accepted: {units}; default "
                             f"{CONDITION_UNITS[name]})")
        number = float(match.group(1)) * factors[suffix]
    if not np.isfinite(number):
        raise ValueError(f"{name}={value!r} is not a finite number")
    return number


def _example_unit(name: str) -> str:
    return {"gap": "eV", "homo": "eV", "lumo": "eV", "mu": "D"}.get(name, "")


def _encode(array: np.ndarray) -> str:
    import base64

    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def _decode(text: str, dtype, shape) -> np.ndarray:
    import base64

    return np.frombuffer(base64.b64decode(text), dtype=dtype).reshape(shape).copy()


@dataclass(frozen=True, eq=False)
class PropertyConditioning:
    """What a property-conditional model was trained with, saved in its pipeline (``metadata["conditioning"]``).

    ``names``: the conditioned properties, in the network's context order. The context of one
    molecule is ``[z_1 .. z_P, m_1 .. m_P]`` (``2 P`` columns): ``z_k = (y_k - mean_k) / mad_k`` for
    EDM's target ``y_k`` (:func:`edm_targets`: meV for orbital energies, ``Cv - 2.981 N``) when
    property ``k`` is given, else 0, and ``m_k`` is 1 when it is given, else 0. All columns 0 is the
    unconditional model (every property dropped). ``mean`` / ``mad``: EDM's normalisation
    (:func:`property_norms` over the QM9 validation split). ``low`` / ``high``: the smallest and
    largest value over the training molecules, in :data:`CONDITION_UNITS`. ``reference_values``
    ``(M, P)`` (float16, :data:`CONDITION_UNITS`) and ``reference_sizes`` ``(M,)``: the training
    molecules, for drawing the atom count of a conditional sample (:meth:`draw_sizes`).
    """

    names: tuple[str, ...]
    mean: np.ndarray
    mad: np.ndarray
    low: np.ndarray
    high: np.ndarray
    reference_values: np.ndarray
    reference_sizes: np.ndarray
    subset: str = "generator"

    @classmethod
    def from_data(cls, names, train_targets: np.ndarray, train_sizes: np.ndarray, valid_targets: np.ndarray,
                  subset: str = "generator") -> "PropertyConditioning":
        """Build it from EDM targets (:func:`edm_targets`, columns ``names``) of the training molecules
        (``train_sizes`` atoms each) and of the validation split (the normalisation)."""
        names = tuple(canonical_property(n) for n in names)
        mean, mad = property_norms(valid_targets)
        values = cls._to_condition_units(names, np.asarray(train_targets, dtype=np.float64), np.asarray(train_sizes))
        return cls(names, mean, mad, values.min(axis=0), values.max(axis=0), values.astype(np.float16),
                   np.asarray(train_sizes, dtype=np.uint8), subset)

    @staticmethod
    def _to_condition_units(names, targets: np.ndarray, sizes: np.ndarray) -> np.ndarray:
        out = np.array(targets, dtype=np.float64, copy=True)
        for k, name in enumerate(names):
            out[:, k] = from_edm_target(name, out[:, k], sizes) / _TARGET_PER_CONDITION_UNIT[name]
        return out

    @property
    def context_dim(self) -> int:
        """Context columns of the network: a value and a present bit per property."""
        return 2 * len(self.names)

    def targets(self, values: np.ndarray, sizes: np.ndarray) -> np.ndarray:
        """EDM targets ``(B, P)`` of values ``(B, P)`` in :data:`CONDITION_UNITS` for molecules of ``sizes`` atoms."""
        out = np.array(values, dtype=np.float64, copy=True)
        for k, name in enumerate(self.names):
            out[:, k] = out[:, k] * _TARGET_PER_CONDITION_UNIT[name]
            if name == "cv":
                out[:, k] -= CV_ATOM_REFERENCE * np.asarray(sizes, dtype=np.float64)
        return out

    def context(self, targets: np.ndarray, present: np.ndarray) -> np.ndarray:
        """``(B, 2P)`` float32 context from EDM targets ``(B, P)`` and a present mask ``(B, P)`` (bool)."""
        present = np.asarray(present, dtype=bool)
        z = (np.asarray(targets, dtype=np.float64) - self.mean) / self.mad
        z = np.where(present, z, 0.0)
        return np.concatenate([z, present.astype(np.float64)], axis=1).astype(np.float32)

    def check(self, condition: dict, n: int | None = None) -> dict[str, float | np.ndarray]:
        """``condition`` (property -> value) checked against this model: known property, conditioned by
        this model, inside the training range. A value is a number, a string with a unit
        (:func:`parse_condition_value`) or a sequence of them, one per molecule (``n`` of them when
        ``n`` is given). Returns name -> float, or ``(n,)`` float64 array, in
        :data:`CONDITION_UNITS`, in the model's property order. ``ValueError`` (one line) otherwise."""
        parsed: dict[str, float | np.ndarray] = {}
        for name, value in dict(condition).items():
            key = canonical_property(name)
            if key not in self.names:
                raise ValueError(f"condition {key}: this model conditions on {', '.join(self.names)} only")
            if key in parsed:
                raise ValueError(f"condition {key} given twice")
            if isinstance(value, (str, bytes)) or np.ndim(value) == 0:
                parsed[key] = parse_condition_value(key, value)
                continue
            if np.ndim(value) != 1 or not len(value):
                raise ValueError(f"condition {key}: give one value, or a flat sequence of one value per molecule")
            if n is not None and len(value) != n:
                raise ValueError(f"condition {key}: {len(value)} values for {n} molecules")
            parsed[key] = np.array([parse_condition_value(key, v) for v in value], dtype=np.float64)
        if not parsed:
            raise ValueError("condition is empty: give at least one property")
        lengths = {len(v) for v in parsed.values() if isinstance(v, np.ndarray)}
        if len(lengths) > 1:
            raise ValueError(f"condition: per-molecule values of different lengths {sorted(lengths)}")
        for key, value in parsed.items():
            k = self.names.index(key)
            outside = np.atleast_1d(value)[(np.atleast_1d(value) < self.low[k]) | (np.atleast_1d(value) > self.high[k])]
            if len(outside):
                unit = CONDITION_UNITS[key]
                raise ValueError(f"condition {key}={outside[0]:g} {unit} is outside the range seen in training "
                                 f"({self.low[k]:g} to {self.high[k]:g} {unit})")
        return {name: parsed[name] for name in self.names if name in parsed}

    def values(self, condition: dict[str, float | np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
        """``(values (n, P), present (n, P))`` of a checked condition (:meth:`check`) for ``n``
        molecules: each property's value per molecule in :data:`CONDITION_UNITS` (0 where not given)."""
        values = np.zeros((n, len(self.names)), dtype=np.float64)
        present = np.zeros((n, len(self.names)), dtype=bool)
        for key, value in condition.items():
            k = self.names.index(key)
            values[:, k] = np.broadcast_to(np.asarray(value, dtype=np.float64), (n,))
            present[:, k] = True
        return values, present

    def draw_sizes(self, condition: dict[str, float | np.ndarray], n: int, rng: np.random.Generator,
                   neighbours: int = DEFAULT_SIZE_NEIGHBOURS) -> np.ndarray:
        """``n`` atom counts for molecules conditioned on ``condition`` (checked, :meth:`check`): each
        drawn uniformly from the sizes of the ``neighbours`` training molecules nearest to its
        condition, the distance taken over the conditioned properties only, each in units of its
        spread (mean absolute deviation) over the training molecules. A nearest-neighbour estimate of
        p(N | c); EDM draws (c, N) together from the training histogram instead. One draw of
        ``rng.integers(k, size=n)`` whether the values are shared or per molecule."""
        cols = [self.names.index(key) for key in condition]
        ref = self.reference_values[:, cols].astype(np.float64)
        spread = np.abs(ref - ref.mean(axis=0)).mean(axis=0)
        spread = np.where(spread > 0, spread, 1.0)
        k = min(int(neighbours), len(ref))
        shared = not any(isinstance(v, np.ndarray) for v in condition.values())
        targets = self.values(condition, 1 if shared else n)[0][:, cols]
        nearest = np.empty((len(targets), k), dtype=np.int64)
        for lo in range(0, len(targets), 256):  # (rows, M) distances, a chunk at a time
            dist = ((((ref[None] - targets[lo : lo + 256, None]) / spread) ** 2).sum(-1))
            nearest[lo : lo + 256] = np.argpartition(dist, k - 1, axis=1)[:, :k]
        pick = rng.integers(k, size=n)
        rows = np.zeros(n, dtype=np.int64) if shared else np.arange(n)
        return self.reference_sizes[nearest[rows, pick]].astype(np.int64)

    def to_dict(self) -> dict:
        """JSON-ready form (the reference table base64-encoded)."""
        return {"names": list(self.names), "units": {n: CONDITION_UNITS[n] for n in self.names},
                "mean": self.mean.tolist(), "mad": self.mad.tolist(), "min": self.low.tolist(), "max": self.high.tolist(),
                "subset": self.subset, "reference_count": int(len(self.reference_sizes)),
                "reference_values_float16": _encode(self.reference_values.astype("<f2")),
                "reference_sizes_uint8": _encode(self.reference_sizes.astype(np.uint8))}

    @classmethod
    def from_dict(cls, d: dict) -> "PropertyConditioning":
        """Inverse of :meth:`to_dict`."""
        names = tuple(d["names"])
        m = int(d["reference_count"])
        return cls(names, np.asarray(d["mean"], dtype=np.float64), np.asarray(d["mad"], dtype=np.float64),
                   np.asarray(d["min"], dtype=np.float64), np.asarray(d["max"], dtype=np.float64),
                   _decode(d["reference_values_float16"], "<f2", (m, len(names))),
                   _decode(d["reference_sizes_uint8"], np.uint8, (m,)), d.get("subset", "generator"))
