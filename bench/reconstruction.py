"""A selection of FFN neurons screened for issue 15 and not kept: by reconstruction instead of by score.

The method's §2 scores rank each neuron alone; ``down_proj`` is refitted afterwards, so a neuron whose contribution
the kept ones reproduce costs nothing to drop. ``ReconstructionLayerPruner`` is Olica with one change: within each
layer (the widths are the shipped allocation's), the neurons kept are those that leave the smallest output error after
the optimal compensation of ``down_proj``, dropped greedily (optimal brain surgeon on ``down_proj``'s inputs, from
the Gram of its input on the dense layer). Measured on bench/allocation_screen.py: better in domain, far worse out of
it (the correlations it relies on are the calibration text's), so Olica keeps its scores.

    prune_model(model, config, input_ids, layer_algorithm=reconstruction_algorithm(damping=1e-2))
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from common import olica_layer_settings
from optimum_olica import olica_math as om
from optimum_olica.olica import OlicaLayerPruner


def neurons_kept_by_reconstruction(
    output_weight: Tensor, input_gram: Tensor, num_keep: int, damping: float = 1e-2, max_steps: int = 128,
) -> Tensor:
    """The input channels of a linear map that keep its output best once the kept ones are refitted.

    The heuristic scores rank each channel alone; the output projection is refitted afterwards, so a channel whose
    contribution the kept ones reproduce costs nothing to drop, however large its score. Channels are dropped
    greedily by the error that remains after the optimal compensation (optimal brain surgeon, a channel at a time):
    with ``H = Z^T Z + lam I`` and ``P = H^-1``, dropping the set ``S`` costs ``tr(W_S P_SS^-1 W_S^T)`` and moves
    the kept columns by ``-W_S P_SS^-1 P_S,:``. Each step drops the ``ceil(remaining / steps left)`` cheapest
    channels together (exactly, as one set), so the work is ``max_steps`` rank updates of ``P`` however many go.

    Args:
        output_weight (`torch.Tensor` of shape `(out, n)`): the projection whose inputs are selected (``down_proj``).
        input_gram (`torch.Tensor` of shape `(n, n)`): ``Z^T Z`` of its inputs on the calibration tokens.
        num_keep (`int`): channels kept, ``1 <= num_keep <= n``.
        damping (`float`): ``lam`` relative to the mean of ``diag(Z^T Z)``, > 0 (dead channels stay invertible).
        max_steps (`int`): most greedy steps; 1 drops every channel by its cost against the full set.

    Returns:
        `torch.LongTensor` of shape `(num_keep,)`: indices kept, ascending.
    """
    out_features, n = om._matrix_dims("output_weight", output_weight)
    om._check_shape("input_gram", input_gram, (n, n))
    om._check_int("num_keep", num_keep)
    om._check_int("max_steps", max_steps)
    om._check_real("damping", damping)
    if num_keep > n:
        raise ValueError(f"`num_keep` must be <= {n}, got {num_keep}.")
    if damping <= 0:
        raise ValueError(f"`damping` must be > 0, got {damping}.")
    weight = output_weight.detach().double().clone()
    hessian = input_gram.detach().double().clone()
    if not om._all_finite(hessian) or not om._all_finite(weight):
        raise ValueError("`output_weight` and `input_gram` must be finite.")
    hessian.diagonal().add_(damping * float(hessian.diagonal().mean().clamp_min(1e-30)))
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(hessian))
    dropped = torch.zeros(n, dtype=torch.bool, device=weight.device)
    to_drop = n - num_keep
    for step in range(max_steps):
        remaining = to_drop - int(dropped.sum())
        if remaining == 0:
            break
        count = -(-remaining // (max_steps - step))
        costs = weight.square().sum(dim=0) / inverse.diagonal().clamp_min(1e-300)
        costs[dropped] = float("inf")
        chosen = torch.sort(costs, stable=True).indices[:count]
        block_inverse = torch.linalg.inv(inverse[chosen][:, chosen])
        weight -= weight[:, chosen] @ block_inverse @ inverse[chosen]
        inverse -= inverse[:, chosen] @ block_inverse @ inverse[chosen]
        dropped[chosen] = True
    return (~dropped).nonzero().squeeze(1)



@dataclass
class ReconstructionLayerPruner(OlicaLayerPruner):
    """Olica whose FFN neurons are kept by ``neurons_kept_by_reconstruction`` instead of by their §2 scores."""

    selection_damping: float = 1e-2
    selection_shrinkage: float = 0.0  # the Gram shrunk this far toward its diagonal before the selection
    _intermediate_gram: om.StreamingMoments | None = None

    @contextmanager
    def observe_dense(self, layer, layer_idx: int):
        down_proj = layer.mlp.down_proj
        gram = om.StreamingMoments(down_proj.in_features, gram=True, dtype=self.statistics_dtype)
        handle = down_proj.register_forward_pre_hook(lambda module, args: gram.update(args[0]))
        try:
            with super().observe_dense(layer, layer_idx):
                yield
        finally:
            handle.remove()
        self._intermediate_gram = gram

    def _ffn_keep(self, mlp, layer_idx: int) -> Tensor:
        gram, self._intermediate_gram = self._intermediate_gram.raw_sum("gram"), None
        if self.selection_shrinkage > 0:
            gram = om.shrink_to_diagonal(gram, self.selection_shrinkage)
        return neurons_kept_by_reconstruction(mlp.down_proj.weight, gram, self.plan_config.intermediate_sizes[layer_idx],
                                              damping=self.selection_damping)


def reconstruction_algorithm(damping: float = 1e-2, shrinkage: float = 0.0):
    """The ``layer_algorithm`` of ``prune_model``: Olica's own settings, the reconstruction selection (its Gram shrunk
    by ``shrinkage`` toward the diagonal)."""
    def make(plan_config, config):
        return ReconstructionLayerPruner(plan_config, **olica_layer_settings(plan_config, config),
                                         selection_damping=damping, selection_shrinkage=shrinkage,
                                         trajectory_weight=config.trajectory_weight)

    return make


__all__ = ["ReconstructionLayerPruner", "neurons_kept_by_reconstruction", "reconstruction_algorithm"]
