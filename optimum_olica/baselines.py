"""A data-free baseline for the ablation tables: uniform magnitude-based structured pruning of the same modules.

Same per-layer dimensions as Olica (so the same parameter count), but every choice is made from weight magnitudes
alone: Q/K are truncated by a plain (unweighted) SVD, value channels and FFN neurons are ranked by the norms of
their weights, nothing is rotated, refitted or calibrated. It runs through the same pipeline as Olica.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from . import olica_math as om
from .modeling import OlicaDecoderLayer
from .olica import assemble_pruned_layer, copy_dense_layer, planned_dimensions


class MagnitudeLayerPruner:
    """Implements the pipeline's ``LayerAlgorithm`` with weight magnitudes only."""

    def __init__(self, plan_config, skip_layers: tuple[int, ...] = ()):
        self.plan_config = plan_config
        self.skip_layers = tuple(skip_layers)  # left dense: copied unchanged
        self.candidates = []

    def observe_dense(self, layer, layer_idx: int):
        return nullcontext()

    def refine(self, dense, pruned, layer_idx: int, replay) -> None:
        return None

    def observe_pruned(self, dense, pruned, layer_idx: int):
        return nullcontext()

    def finish_layer(self, pruned, layer_idx: int, outputs) -> dict:
        return planned_dimensions(self.plan_config, layer_idx)

    def choose_calibrated_layers(self, count: int, exclude=()) -> list:
        return []

    def state_dict(self) -> dict:
        return {}  # nothing is carried from one layer to the next

    def load_state_dict(self, state: dict) -> None:
        pass

    @torch.no_grad()
    def prune(self, layer, layer_idx: int) -> OlicaDecoderLayer:
        if layer_idx in self.skip_layers:
            return copy_dense_layer(self.plan_config, layer_idx, layer)
        config = self.plan_config
        attention, mlp = layer.self_attn, layer.mlp
        dtype, device = attention.o_proj.weight.dtype, attention.o_proj.weight.device
        heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, attention.head_dim
        d = config.hidden_size
        uniform = torch.ones(d, dtype=torch.float64, device=device)
        state = {name: tensor for name, tensor in layer.state_dict().items() if "norm" in name}
        for name, rank in (("q_proj", config.query_ranks[layer_idx]), ("k_proj", config.key_ranks[layer_idx])):
            projection = getattr(attention, name)
            if rank is None:
                state[f"self_attn.{name}.weight"] = projection.weight
            else:
                # With a uniform second moment the weighted factorisation is the plain truncated SVD.
                down, up = om.activation_weighted_low_rank(projection.weight, uniform, rank)
                state[f"self_attn.{name}.down.weight"], state[f"self_attn.{name}.up.weight"] = down, up
            if projection.bias is not None:
                state[f"self_attn.{name}{'' if rank is None else '.up'}.bias"] = projection.bias
        v_proj, o_proj = attention.v_proj, attention.o_proj
        ones_values = torch.ones(heads, head_dim, dtype=torch.float64, device=device)
        scores = om.value_neuron_scores(v_proj.weight, o_proj.weight, uniform, ones_values, heads, kv_heads, head_dim)
        keep = om.keep_top_neurons(scores, config.value_head_dims[layer_idx])
        v_weight, v_bias, o_weight = om.prune_value_output(
            v_proj.weight, v_proj.bias, o_proj.weight, keep, heads, kv_heads, head_dim
        )
        state["self_attn.v_proj.weight"], state["self_attn.o_proj.weight"] = v_weight, o_weight
        if v_bias is not None:
            state["self_attn.v_proj.bias"] = v_bias
        if o_proj.bias is not None:
            state["self_attn.o_proj.bias"] = o_proj.bias
        ffn_scores = om.ffn_neuron_scores(
            mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, uniform,
            torch.ones(mlp.down_proj.in_features, dtype=torch.float64, device=device),
        )
        keep_ffn = om.keep_top_neurons(ffn_scores, config.intermediate_sizes[layer_idx])
        gate, up, down, gate_bias, up_bias = om.prune_ffn(
            mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, keep_ffn, mlp.gate_proj.bias,
            mlp.up_proj.bias,
        )
        state.update({"mlp.gate_proj.weight": gate, "mlp.up_proj.weight": up, "mlp.down_proj.weight": down})
        if gate_bias is not None:
            state.update({"mlp.gate_proj.bias": gate_bias, "mlp.up_proj.bias": up_bias})
        if mlp.down_proj.bias is not None:
            state["mlp.down_proj.bias"] = mlp.down_proj.bias
        return assemble_pruned_layer(config, layer_idx, state, device=device, dtype=dtype)


__all__ = ["MagnitudeLayerPruner"]
