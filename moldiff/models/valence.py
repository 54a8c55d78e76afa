"""Valence inputs: what the noisy molecule's current elements and bond orders say about its valences.

A categorical model with bond classes sees, at every step, a whole noisy molecular graph: an element
and a formal charge per atom and a bond order per atom pair. Whether that graph can be completed to a
stable molecule is a global question. The clearest case is parity: every bond adds its order to two
atoms, so the atoms' valences must add up to an even number, and a composition with an odd sum can
never be stable (:func:`moldiff.chemistry.elements.valence_sum_parity`). A message-passing network
can count, but a count modulo 2 is a hard function for it to learn; the samples of recipe (a) end
with an odd sum about one time in five (docs/experiments.md, session 24).

DiGress (Vignac et al., ICLR 2023, section 4.3) gives its denoiser such structural facts of the noisy
graph as extra inputs, among them each atom's current valency. This module computes the same kind of
input for moldiff's categorical models (``model.valence_features``): per atom, whether its molecule's
valence sum is currently odd, and the atom's valence minus the orders of its current bonds, clipped
to [-2, 2] and one-hot encoded. They are read from the noisy classes the network is given, at
training and at sampling alike, so they are part of the network's input, not a rule applied to its
output: the network learns what to make of them.
"""

from __future__ import annotations

from typing import Sequence

import torch

from moldiff.chemistry.elements import allowed_valences, allowed_valences_charged

__all__ = ["VALENCE_INPUTS", "DEFICIT_RANGE", "valence_table", "valence_inputs"]

#: the deficit (valence minus bond orders) is clipped to [-DEFICIT_RANGE, DEFICIT_RANGE]
DEFICIT_RANGE = 2
#: input columns per atom: the molecule's odd-sum bit, then the one-hot clipped deficit
VALENCE_INPUTS = 1 + 2 * DEFICIT_RANGE + 1


def valence_table(elements: Sequence[str], charge_values: Sequence[int] = ()) -> torch.Tensor:
    """``(K, C)`` long: the valence of an atom of element class ``k`` in charge class ``c`` (``C = 1``
    without charge classes). The smallest valence the charge-aware rule allows
    (:data:`moldiff.chemistry.elements.CHARGED_VALENCE`; at charge 0 EDM's); a pair the rule does not
    list takes the neutral valence. Raises ``ValueError`` for an element without a valence."""
    charges = list(charge_values) or [0]
    rows = []
    for symbol in elements:
        neutral = allowed_valences(symbol)
        if not neutral:
            raise ValueError(f"valence inputs: element {symbol} has no valence in EDM's table")
        rows.append([min(allowed_valences_charged(symbol, q) or neutral) for q in charges])
    return torch.tensor(rows, dtype=torch.long)


def valence_inputs(types: torch.Tensor, charges: torch.Tensor | None, bonds: torch.Tensor, edge_index: torch.Tensor,
                   batch: torch.Tensor, num_graphs: int, table: torch.Tensor) -> torch.Tensor:
    """The valence input columns ``(n, VALENCE_INPUTS)`` float32 of a flat batch.

    Args:
        types: ``(n,)`` element classes; ``charges``: ``(n,)`` charge classes or ``None`` (class 0).
        bonds: ``(E,)`` bond orders (0: none) of the directed edges ``edge_index`` ``(2, E)``, each
            pair listed in both directions (every bond counts once for each of its atoms).
        batch: ``(n,)`` molecule of each atom; ``table``: :func:`valence_table`.

    Column 0 is 1 on every atom of a molecule whose valence sum is odd; columns 1.. are the one-hot
    of ``clip(valence - sum of bond orders, -2, 2)``.
    """
    table = table.to(types.device)
    valence = table[types.long(), torch.zeros_like(types, dtype=torch.long) if charges is None else charges.long()]
    used = torch.zeros_like(valence).index_add_(0, edge_index[0], bonds.long())
    total = torch.zeros(num_graphs, dtype=torch.long, device=types.device).index_add_(0, batch, valence)
    odd = (total % 2)[batch].unsqueeze(-1)
    deficit = (valence - used).clamp(-DEFICIT_RANGE, DEFICIT_RANGE) + DEFICIT_RANGE
    onehot = torch.nn.functional.one_hot(deficit, 2 * DEFICIT_RANGE + 1)
    return torch.cat([odd, onehot], -1).to(torch.float32)
