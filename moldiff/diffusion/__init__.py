"""Gaussian diffusion over zero-CoM point clouds (and discrete diffusion of atom and bond classes,
:mod:`moldiff.diffusion.categorical`); it knows nothing of the network."""

from moldiff.diffusion.categorical import CategoricalDiffusion, CategoricalFeatures, MarginalTransition
from moldiff.diffusion.likelihood import (NLLTerms, estimate_nll, estimate_nll_categorical, kl_prior,
                                         position_reconstruction_nll, reconstruction_nll)
from moldiff.diffusion.losses import bond_epsilon_loss, degrees_of_freedom, epsilon_loss, squared_error_per_molecule
from moldiff.diffusion.pairing import PAIRINGS, optimal_rotations, pair_noise
from moldiff.diffusion.process import AtomFeatures, BondFeatures, NoisedState, add_noise, centred_noise, symmetric_edge_noise
from moldiff.diffusion.samplers import SAMPLERS, AncestralSampler, DDIMSampler, Sampler, SamplerStep, make_sampler
from moldiff.diffusion.schedules import NoiseSchedule
from moldiff.diffusion.times import TIME_SAMPLINGS, sample_times

__all__ = [
    "AtomFeatures",
    "BondFeatures",
    "CategoricalDiffusion",
    "CategoricalFeatures",
    "MarginalTransition",
    "TIME_SAMPLINGS",
    "sample_times",
    "AncestralSampler",
    "DDIMSampler",
    "NoiseSchedule",
    "PAIRINGS",
    "NLLTerms",
    "NoisedState",
    "SAMPLERS",
    "Sampler",
    "SamplerStep",
    "add_noise",
    "bond_epsilon_loss",
    "symmetric_edge_noise",
    "centred_noise",
    "degrees_of_freedom",
    "epsilon_loss",
    "estimate_nll",
    "estimate_nll_categorical",
    "position_reconstruction_nll",
    "kl_prior",
    "make_sampler",
    "optimal_rotations",
    "pair_noise",
    "reconstruction_nll",
    "squared_error_per_molecule",
]
