"""Ratio allocation (method §4): from a target fraction of ALL parameters to per-layer dimensions.

Pure arithmetic on config sizes: no tensors, no model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import OlicaError


# Reference split constant: attention products are pruned k times harder on Q/K than on V/O.
QK_TO_VO_FACTOR = 3.0
# The allocation's promise: the achieved fraction is within half a percentage point of the target.
TARGET_TOLERANCE = 0.005


@dataclass(frozen=True)
class PartRatios:
    """Fractions removed from each part of a pruned layer."""

    qk: float
    vo: float
    ffn: float


@dataclass(frozen=True)
class LayerDimensions:
    """What a pruned layer keeps (the Olica config's per-layer entries for one layer)."""

    query_rank: int | None
    key_rank: int | None
    value_head_dim: int
    intermediate_size: int
    calibration_rank: int


@dataclass(frozen=True)
class PruningPlan:
    """Per-layer dimensions and the parameter budget they reach."""

    layers: tuple[LayerDimensions, ...]
    ratios: PartRatios
    parameters_before: int
    parameters_after: int

    @property
    def achieved_ratio(self) -> float:
        return 1.0 - self.parameters_after / self.parameters_before

    def per_layer_lists(self) -> dict[str, list]:
        """The Olica config fields described by this plan."""
        return per_layer_lists(self.layers)


def per_layer_lists(layers) -> dict[str, list]:
    """The Olica config's per-layer fields for a sequence of ``LayerDimensions``."""
    return {
        "query_ranks": [layer.query_rank for layer in layers],
        "key_ranks": [layer.key_rank for layer in layers],
        "value_head_dims": [layer.value_head_dim for layer in layers],
        "intermediate_sizes": [layer.intermediate_size for layer in layers],
        "calibration_ranks": [layer.calibration_rank for layer in layers],
    }


class RatioTooHighError(OlicaError):
    """The target cannot be reached while keeping at least one neuron per pruned module."""


def reference_split(target: float) -> tuple[float, float]:
    """(qk, vo) ratios of the reference split for a target fraction ``target``; the FFN ratio is solved after."""
    vo = 2.0 * target / (1.0 + QK_TO_VO_FACTOR)
    qk = 2.0 * target if target <= 0.4 else QK_TO_VO_FACTOR * vo
    return min(qk, 0.99), min(vo, 0.99)


def factored_rank(out_features: int, in_features: int, qk_ratio: float, multiple: int = 1) -> int | None:
    """Rank of a factored Q or K projection, or None when factoring would not save parameters (§1a).

    ``multiple``: the rank is rounded to the nearest multiple of it (at least one multiple), for matmul shapes that
    vector units and tensor cores run at full speed.
    """
    if qk_ratio <= 0.0:
        return None
    rank = max(1, math.ceil((1.0 - qk_ratio) * out_features / 2.0))
    rank = max(multiple, multiple * round(rank / multiple))
    if rank * (in_features + out_features) >= in_features * out_features:
        return None
    return rank


def aligned_width(exact: float, multiple: int, full: int) -> int:
    """The width nearest to ``exact`` among the multiples of ``multiple`` and ``full`` itself, in [1, full]."""
    lower = multiple * math.floor(exact / multiple)
    # `full` is always a candidate, so the list is never empty.
    candidates = [width for width in (lower, lower + multiple, full) if 1 <= width <= full]
    return min(candidates, key=lambda width: (abs(width - exact), width))


def plan_dimensions(
    config,
    target: float,
    *,
    qk_ratio: float | None = None,
    vo_ratio: float | None = None,
    ffn_ratio: float | None = None,
    calibration_rank: int = 0,
    num_calibrated_layers: int = 0,
    skip_layers: tuple[int, ...] = (),
    dimension_multiple: int = 1,
) -> PruningPlan:
    """Per-layer dimensions that remove ``target`` of all parameters (within rounding, below 0.5 points).

    Q/K and V/O ratios follow the reference split unless given; the FFN ratio is then solved so the whole model,
    calibration branches included, hits the target. Layers in ``skip_layers`` keep their dimensions.

    Args:
        config: an Olica config at full dimensions (it provides ``count_parameters`` and ``layer_parameter_count``).
        target: fraction of all parameters to remove, in (0, 1).
        qk_ratio, vo_ratio, ffn_ratio: explicit part ratios; when all three are given, ``target`` is not solved for.
        calibration_rank: rank of each linear-calibration branch.
        num_calibrated_layers: how many layers will receive a branch (their parameters count against the budget).
        skip_layers: layers left dense.
        dimension_multiple: Q/K ranks and FFN widths are rounded to multiples of it: matmuls whose widths are not
            multiples of 8 run markedly slower (prefill on CPU: up to 1.35x for an FFN projection; tensor cores need
            them on GPUs). When rounding the FFN width would miss the target by more than 0.5 points (models with
            very few parameters per FFN neuron), the FFN keeps its exact width.

    Raises:
        RatioTooHighError: if the FFN would need to drop below one neuron per layer.
    """
    n_layers = config.num_hidden_layers
    d, h, g = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    d_h, d_ff = config.attention_head_dim, config.intermediate_size
    pruned_layers = [layer for layer in range(n_layers) if layer not in set(skip_layers)]
    if not pruned_layers:
        raise ValueError("skip_layers covers every layer: nothing left to prune.")
    before = config.count_parameters()

    default_qk, default_vo = reference_split(target)
    qk = default_qk if qk_ratio is None else qk_ratio
    vo = default_vo if vo_ratio is None else vo_ratio
    q_rank = factored_rank(h * d_h, d, qk, dimension_multiple)
    k_rank = factored_rank(g * d_h, d, qk, dimension_multiple)
    value_head_dim = d_h - math.floor(vo * d_h)
    if value_head_dim < 1:
        raise RatioTooHighError(f"vo_ratio={vo} would remove every value channel (head_dim={d_h}).")
    calibrated = min(num_calibrated_layers, len(pruned_layers)) if calibration_rank > 0 else 0

    def plan_with(intermediate_size: int) -> PruningPlan:
        layers = []
        for layer in range(n_layers):
            if layer in skip_layers:
                layers.append(LayerDimensions(None, None, d_h, d_ff, 0))
            else:
                layers.append(LayerDimensions(q_rank, k_rank, value_head_dim, intermediate_size, 0))
        candidate = config.from_base_config(config, **per_layer_lists(layers))
        # Branches are attached to `calibrated` layers chosen later from the data; their cost is known now.
        after = candidate.count_parameters() + calibrated * 2 * d * calibration_rank
        return PruningPlan(tuple(layers), PartRatios(qk, vo, 1 - intermediate_size / d_ff), before, after)

    if ffn_ratio is not None:
        return plan_with(aligned_width(d_ff - math.floor(ffn_ratio * d_ff), dimension_multiple, d_ff))

    # Parameters are affine in the FFN width: solve for it, then round to an integer (aligned) width.
    full, single = plan_with(d_ff).parameters_after, plan_with(1).parameters_after
    per_neuron = (full - single) / (d_ff - 1)
    exact = 1 + (before * (1 - target) - single) / per_neuron
    if round(exact) < 1:
        raise RatioTooHighError(
            f"ratio={target} is too high for this model: with qk_ratio={qk:.3f} and vo_ratio={vo:.3f} the FFN would "
            f"keep {round(exact)} neurons per layer. Lower the ratio or prune attention harder (qk_ratio/vo_ratio)."
        )
    plan = plan_with(aligned_width(exact, dimension_multiple, d_ff))
    if abs(plan.achieved_ratio - target) > TARGET_TOLERANCE:
        plan = plan_with(aligned_width(exact, 1, d_ff))
    return plan


__all__ = [
    "LayerDimensions",
    "PartRatios",
    "PruningPlan",
    "RatioTooHighError",
    "aligned_width",
    "factored_rank",
    "per_layer_lists",
    "plan_dimensions",
    "reference_split",
]
