"""Q/K low rank fitted to the attention input's full covariance (issue 15 screening, not in the library).

§1a factors ``q_proj`` and ``k_proj`` to minimise ``||(W - up @ down) D||_F`` with ``D`` the diagonal of the input's
root mean square: each input channel is weighed alone. The projection's output error on the calibration tokens is
``||(W - up @ down) C^(1/2)||_F`` with ``C`` the input's full second-moment matrix; its minimiser is the truncated
SVD of ``W L`` (``C = L L^T``), mapped back through ``L^-1``. ``shrinkage`` moves ``C`` toward its own diagonal
(1: §1a exactly; 0: the calibration covariance alone), a prior for inputs whose correlations differ from the
calibration text's.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from unittest import mock

import torch

from common import olica_layer_settings
from optimum_olica import olica_math as om
from optimum_olica.olica import OlicaLayerPruner


def covariance_low_rank(weight: torch.Tensor, second_moments: torch.Tensor, rank: int, shrinkage: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors ``(down, up)`` minimising ``||(W - up @ down) C_s^(1/2)||_F``, ``C_s`` the
    ``(in, in)`` matrix ``second_moments`` shrunk by ``shrinkage`` toward its diagonal (float64)."""
    diagonal = torch.diag(torch.diagonal(second_moments))
    shrunk = (1 - shrinkage) * second_moments.double() + shrinkage * diagonal.double()
    # A floor on the diagonal keeps the factor finite where a channel is silent (as §1a floors its scale).
    shrunk = shrunk + torch.eye(shrunk.shape[0], dtype=shrunk.dtype) * 1e-8 * float(torch.diagonal(shrunk).max())
    lower = torch.linalg.cholesky(shrunk)
    u, singular, vh = torch.linalg.svd(weight.double() @ lower, full_matrices=False)
    down = torch.linalg.solve_triangular(lower, vh[:rank], upper=False, left=False)
    return down, u[:, :rank] * singular[:rank]


@dataclass
class CovarianceLayerPruner(OlicaLayerPruner):
    """Olica with §1a fitted to the attention input's full covariance (shrunk by ``shrinkage``)."""

    shrinkage: float = 0.0
    _attention_gram: om.StreamingMoments | None = None

    @contextmanager
    def observe_dense(self, layer, layer_idx: int):
        moments = om.StreamingMoments(layer.self_attn.q_proj.in_features, gram=True)
        handle = layer.self_attn.q_proj.register_forward_pre_hook(lambda module, args: moments.update(args[0]))
        try:
            with super().observe_dense(layer, layer_idx):
                yield
        finally:
            handle.remove()
        self._attention_gram = moments

    def prune(self, layer, layer_idx: int):
        moments = self._attention_gram
        if moments is None or moments.count == 0:
            return super().prune(layer, layer_idx)
        second_moments = moments.gram / moments.count

        def factors(weight, diagonal, rank, output_weights=None):
            if output_weights is not None:
                raise ValueError("bench/whitened_qk.py predates qk_score_weighting: run it with qk_score_weighting=0.")
            return covariance_low_rank(weight, second_moments, rank, self.shrinkage)

        with mock.patch.object(om, "activation_weighted_low_rank", factors):
            pruned = super().prune(layer, layer_idx)
        self._attention_gram = None
        return pruned


def covariance_algorithm(shrinkage: float):
    """The ``layer_algorithm`` of ``prune_model``: Olica's settings, §1a on the shrunk full covariance."""
    def make(plan_config, config):
        return CovarianceLayerPruner(plan_config, **olica_layer_settings(plan_config, config),
                                     trajectory_weight=config.trajectory_weight, shrinkage=shrinkage)

    return make
