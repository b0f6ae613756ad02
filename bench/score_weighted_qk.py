"""Q/K low rank weighed by what their errors do to the attention scores (issue 15 screening, not in the library).

§1a (with ``qk_covariance_shrinkage``) keeps ``q_proj``'s and ``k_proj``'s outputs as a whole. The attention reads
them only through the scores ``q^T R k``: an error ``e`` in a query channel costs ``E[(e^T R k)^2]``, which is large
where the keys are large. RoPE turns channel ``j`` and ``j + d_h/2`` together by an angle that moves with the
distance, so over positions ``E[R k k^T R^T]`` is about diagonal with each pair's mean energy on both channels. Each
query output channel is weighed by the root of that pair energy of its KV head's keys, and each key channel by that
of its group's queries (summed over the group's heads): the best rank-``r`` map under input ``C = L L^T`` and output
weights ``w`` keeps ``W L V_r`` and ``V_r^T L^-1``, ``V_r`` the top right singular vectors of ``diag(w) W L``.
``output_shrinkage`` moves the weights' squares toward their mean (1: §1a unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common import olica_layer_settings
from optimum_olica import olica_math as om
from optimum_olica.olica import OlicaLayerPruner


def rotary_pair_energy(weight: torch.Tensor, bias: torch.Tensor | None, second_moments: torch.Tensor,
                       heads: int) -> torch.Tensor:
    """``(heads, head_dim)``: each output channel's mean square on inputs of second moments ``C``, averaged with the
    channel RoPE turns it with (``j`` and ``j + d_h/2``)."""
    weight = weight.double()
    energy = torch.einsum("oi,ij,oj->o", weight, second_moments.double(), weight)
    if bias is not None:
        energy = energy + bias.double().square()  # the mean's cross term is left out: a screen, not the library
    energy = energy.reshape(heads, 2, -1)
    return energy.mean(dim=1, keepdim=True).expand(heads, 2, energy.shape[-1]).reshape(heads, -1)


def output_weighted_low_rank(weight: torch.Tensor, lower: torch.Tensor, output_weights: torch.Tensor, rank: int):
    """``(down, up)`` minimising ``||diag(w) (W - up @ down) L||_F``."""
    whitened = weight.double() @ lower
    right = torch.linalg.svd(output_weights[:, None] * whitened, full_matrices=False).Vh[:rank]  # (r, in)
    down = torch.linalg.solve_triangular(lower, right, upper=False, left=False)
    return down, whitened @ right.T


@dataclass
class ScoreWeightedPruner(OlicaLayerPruner):
    """Olica with the Q/K low rank weighed by the other side's rotary pair energies."""

    output_shrinkage: float = 0.0
    _attention: object = None

    def prune(self, layer, layer_idx: int):
        self._attention = layer.self_attn
        try:
            return super().prune(layer, layer_idx)
        finally:
            self._attention = None

    def _query_key_factoring(self, layer_idx: int):
        attention, config = self._attention, self.plan_config
        moments = self._stats.attention_input
        second_moments = moments.raw_sum("gram").double() / moments.count
        lower = om.whitening_factor(om.shrink_to_diagonal(second_moments, self.qk_covariance_shrinkage))
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        q, k = attention.q_proj, attention.k_proj
        query_energy = rotary_pair_energy(q.weight, q.bias, second_moments, heads)
        key_energy = rotary_pair_energy(k.weight, k.bias, second_moments, kv_heads)
        group = heads // kv_heads
        weights = {
            id(q.weight): self._weights(key_energy.repeat_interleave(group, dim=0)),
            id(k.weight): self._weights(query_energy.reshape(kv_heads, group, -1).sum(dim=1)),
        }
        return lambda weight, rank: output_weighted_low_rank(weight, lower, weights[id(weight)], rank)

    def _weights(self, energy: torch.Tensor) -> torch.Tensor:
        energy = energy.reshape(-1)
        energy = (1 - self.output_shrinkage) * energy + self.output_shrinkage * energy.mean()
        return energy.clamp_min(1e-12 * float(energy.max())).sqrt()


def score_weighted_algorithm(output_shrinkage: float):
    """The ``layer_algorithm`` of ``prune_model``: Olica's settings (V/O as the recipe says), §1a weighed by the
    scores (needs ``qk_covariance_shrinkage < 1``, whose ``X^T X`` it reads)."""
    def make(plan_config, config):
        return ScoreWeightedPruner(plan_config, **olica_layer_settings(plan_config, config),
                                   trajectory_weight=config.trajectory_weight, output_shrinkage=output_shrinkage)

    return make
