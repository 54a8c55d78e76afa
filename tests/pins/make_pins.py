"""Record what every sampling route produces for fixed seeds, so that a rewrite of the sampling code
can be checked to give the same molecules (tests/test_sampling_pins.py compares against the file).
The pins were recorded at commit 3e91c0e, before the reverse loop was rewritten as one loop with
hooks; the routes are called through today's API. They were recorded again when the shipped `qm9`
weights changed (step 82,308 -> 86,308), with code that reproduced the earlier pins exactly on the
earlier weights (tests/test_sampling_pins.py passed on a clean clone just before).

    python tests/pins/make_pins.py            # writes tests/pins/sampling_pins.npz

Everything runs in float64, so the numbers depend on the arithmetic, not on a CPU's fp32 kernels.
Rerun it only when a change of output is intended, and say why in the commit.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

import moldiff  # noqa: E402
from moldiff.data.statistics import DatasetStatistics  # noqa: E402
from moldiff.diffusion import AtomFeatures, NoiseSchedule  # noqa: E402
from moldiff.models import DenoiserConfig, EGNNDenoiser  # noqa: E402
from moldiff.pipeline import MolDiffPipeline, SampleRequest  # noqa: E402

OUT = HERE / "sampling_pins.npz"


def random_pipeline(like: MolDiffPipeline, **denoiser) -> MolDiffPipeline:
    """A small untrained network (fixed seed) with the shipped model's statistics: exercises the
    bond and self-conditioning paths of the loop, which no shipped model has."""
    torch.manual_seed(0)
    cfg = DenoiserConfig(num_features=6, hidden=16, n_layers=2, **denoiser)
    stats = DatasetStatistics.from_dict(like.statistics.to_dict())
    return MolDiffPipeline(EGNNDenoiser(cfg), NoiseSchedule.polynomial(), AtomFeatures(5), stats, [1, 6, 7, 8, 9]).double()


def cases():
    """``name -> callable(pipes) -> SampledArrays`` for every sampling route."""
    from moldiff.inpainting import Fragment

    benzene = Fragment.from_smiles("c1ccccc1")
    return {
        "plain": lambda p: p["qm9"].sample_arrays(4, steps=6, seed=3),
        "ddim": lambda p: p["qm9"].sample_arrays(3, steps=5, seed=4, sampler="ddim", num_atoms=9),
        "edm_grid": lambda p: p["qm9"].sample_arrays(3, steps=5, seed=5, time_power=1.0, noise_scale=1.0),
        "data_composition": lambda p: p["given"].sample_arrays(3, steps=5, seed=6, composition="data"),
        "given_types": lambda p: p["given"].sample_arrays(2, steps=5, seed=7, types=[np.array([1, 1, 3, 0, 0, 0, 0])] * 2),
        "formula_given": lambda p: p["given"].generate(SampleRequest(2, formula="C3H6O", steps=5, seed=8)),
        "formula_draw_clamp": lambda p: p["qm9"].generate(SampleRequest(2, formula="C2H6O", steps=4, seed=9,
                                                                        formula_draws=1, resample=2)),
        "formula_clamp": lambda p: p["qm9"].generate(SampleRequest(2, formula="C2H4O", steps=4, seed=10, formula_draws=0,
                                                                   resample=2)),
        "fragment_guided": lambda p: moldiff.inpainting.inpaint_arrays(p["qm9"], 2, fragment=benzene, num_atoms=14,
                                                                       steps=4, seed=11, resample=2),
        "fragment_ddim_noise": lambda p: moldiff.inpainting.inpaint_arrays(
            p["qm9"], 2, fragment=benzene, num_atoms=12, steps=4, seed=12, sampler="ddim", resample=1,
            valence_guidance=0.0, initial_noise=(np.random.default_rng(0).standard_normal((24, 3)),
                                                 np.random.default_rng(1).standard_normal((24, 6)))),
        "bonds": lambda p: p["bonds"].sample_arrays(3, steps=4, seed=13),
        "bonds_ddim": lambda p: p["bonds_eps"].sample_arrays(2, steps=4, seed=14, sampler="ddim:0.5"),
        "self_condition": lambda p: p["selfcond"].sample_arrays(3, steps=4, seed=15),
    }


def pipelines() -> dict:
    qm9 = moldiff.load_pretrained("qm9").double()
    return {
        "qm9": qm9,
        "given": moldiff.load_pretrained("qm9-given").double(),
        "bonds": random_pipeline(qm9, bond_types=4, bond_output="logits"),
        "bonds_eps": random_pipeline(qm9, bond_types=4),
        "selfcond": random_pipeline(qm9, self_condition=True),
    }


def flatten(name: str, arrays) -> dict:
    out = {
        f"{name}/positions": np.concatenate(arrays.positions),
        f"{name}/types": np.concatenate(arrays.types),
        f"{name}/sizes": np.array([len(p) for p in arrays.positions]),
        f"{name}/fault_step": np.asarray(arrays.fault_step),
    }
    if arrays.bonds:
        out[f"{name}/bonds"] = np.concatenate([np.c_[np.full(len(b), k), b] for k, b in enumerate(arrays.bonds)])
    if "formula_route" in arrays.extra:
        out[f"{name}/route"] = np.array(arrays.extra["formula_route"])
    return out


def main() -> None:
    torch.set_num_threads(1)
    pipes = pipelines()
    record = {}
    for name, run in cases().items():
        record.update(flatten(name, run(pipes)))
        print(name, "done", flush=True)
    np.savez_compressed(OUT, **record)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
