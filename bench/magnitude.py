"""A data-free baseline for the ablation tables: uniform magnitude-based structured pruning of the same modules.

Same per-layer dimensions as Olica (so the same parameter count), but every choice is made from weight magnitudes
alone: Q/K are truncated by a plain (unweighted) SVD, value channels and FFN neurons are ranked by the norms of
their weights, nothing is rotated, refitted or calibrated. It runs through the same plan, pipeline and checkpoint
writing as Olica:

    prune_model(model, config, input_ids, layer_algorithm=magnitude_algorithm)
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from optimum_olica import OlicaError
from optimum_olica import olica_math as om
from optimum_olica.olica import LayerDecisions, assemble_pruned_layer, copy_dense_layer, pruned_layer_state


def magnitude_algorithm(plan_config, config) -> "MagnitudeLayerPruner":
    """The ``layer_algorithm`` of ``prune_model`` for the baseline."""
    if config.num_calibrated_layers > 0:
        raise OlicaError(
            "The magnitude baseline fits no calibration branch, so a recipe budgeting "
            f"num_calibrated_layers={config.num_calibrated_layers} would leave that budget unspent: set it to 0."
        )
    return MagnitudeLayerPruner(plan_config, skip_layers=tuple(config.skip_layers))


class MagnitudeLayerPruner:
    """Implements the pipeline's ``LayerAlgorithm`` with weight magnitudes only."""

    name = "magnitude"  # the report's and the resume fingerprint's method
    wants_dense_trajectory = False  # nothing is fitted, so nothing aims at the dense model's own states

    def __init__(self, plan_config, skip_layers: tuple[int, ...] = ()):
        self.plan_config = plan_config
        self.skip_layers = tuple(skip_layers)  # left dense: copied unchanged
        self.candidates = []

    def observe_dense(self, layer, layer_idx: int):
        return nullcontext()

    def observe_dense_trajectory(self, layer, layer_idx: int):
        return nullcontext()

    def fits_block(self, block, layer_idx: int) -> bool:
        return False  # nothing is refitted

    def observe_block(self, block, pruned, layer_idx: int):
        return nullcontext()

    def fit_block(self, block, pruned, layer_idx: int, features) -> None:
        return None

    def finish_layer(self, pruned, layer_idx: int) -> dict:
        return {}  # nothing fitted; the entry point adds the layer's dimensions

    def choose_calibrated_layers(self, count: int, exclude=()) -> list:
        return []

    def state_dict(self) -> dict:
        return {}  # nothing is carried from one layer to the next

    def load_state_dict(self, state: dict) -> None:
        pass

    @torch.no_grad()
    def prune(self, layer, layer_idx: int):
        if layer_idx in self.skip_layers:
            return copy_dense_layer(self.plan_config, layer_idx, layer)
        config = self.plan_config
        attention, mlp = layer.self_attn, layer.mlp
        heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, attention.head_dim
        reference = attention.o_proj.weight
        uniform = torch.ones(config.hidden_size, dtype=torch.float64, device=reference.device)
        # With a uniform second moment the weighted factorisation is the plain truncated SVD.
        query, key = (
            None if rank is None else om.activation_weighted_low_rank(projection.weight, uniform, rank)
            for projection, rank in (
                (attention.q_proj, config.query_ranks[layer_idx]), (attention.k_proj, config.key_ranks[layer_idx])
            )
        )
        v_proj, o_proj = attention.v_proj, attention.o_proj
        ones_values = torch.ones(heads, head_dim, dtype=torch.float64, device=reference.device)
        scores = om.value_neuron_scores(v_proj.weight, o_proj.weight, uniform, ones_values, heads, kv_heads, head_dim)
        keep = om.keep_top_neurons(scores, config.value_head_dims[layer_idx])
        ffn_scores = om.ffn_neuron_scores(
            mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, uniform,
            torch.ones(mlp.down_proj.in_features, dtype=torch.float64, device=reference.device),
        )
        decisions = LayerDecisions(
            query, key, *om.prune_value_output(v_proj.weight, v_proj.bias, o_proj.weight, keep, heads, kv_heads,
                                               head_dim),
            ffn_keep=om.keep_top_neurons(ffn_scores, config.intermediate_sizes[layer_idx]),
        )
        return assemble_pruned_layer(config, layer_idx, pruned_layer_state(layer, decisions),
                                     device=reference.device, dtype=reference.dtype)


__all__ = ["MagnitudeLayerPruner", "magnitude_algorithm"]
