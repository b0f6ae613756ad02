"""Ratio allocation (method §4): from a target fraction of ALL parameters to per-layer dimensions.

Pure arithmetic on config sizes: no tensors, no model.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
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


class RatioUnreachableError(OlicaError):
    """The FFN is too coarse to land within 0.5 points of the target (a model with very few parameters)."""


class RatioTooLowError(OlicaError):
    """The Q/K and V/O ratios alone remove more than the target: the FFN cannot give parameters back."""


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


def value_width(head_dim: int, vo_ratio: float, multiple: int = 1) -> int:
    """Per-head value width for ``vo_ratio``, aligned like the other widths (``aligned_width``).

    The exact width keeps ``head_dim - floor(vo_ratio * head_dim)`` channels; with ``multiple`` > 1 it becomes the
    nearest multiple of ``multiple`` or ``head_dim`` itself, so the ``v_proj`` rows and ``o_proj`` columns of every
    head come in the blocks group-wise quantized kernels read (32, 64, 128).
    """
    exact = head_dim - math.floor(vo_ratio * head_dim)
    if exact < 1:
        raise RatioTooHighError(f"vo_ratio={vo_ratio} would remove every value channel (head_dim={head_dim}).")
    return aligned_width(exact, multiple, head_dim)


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
        dimension_multiple: Q/K ranks, value head widths and FFN widths are rounded to multiples of it (a value
            head may also keep its full ``head_dim``): matmuls whose widths are not multiples of 8 run markedly
            slower (prefill on CPU: up to 1.35x for an FFN projection; tensor cores need them on GPUs), and
            group-wise quantized formats take whole blocks of 32 to 256. The FFN width is solved after the attention
            widths are rounded, so it absorbs their rounding. When rounding the FFN width would miss the target by
            more than 0.5 points (models with very few parameters per FFN neuron), the FFN keeps its exact width.

    Raises:
        RatioTooHighError: if the FFN would need to drop below one neuron per layer.
        RatioTooLowError: if the Q/K and V/O ratios alone remove more than ``target`` + 0.5 points (pinned part
            ratios too high for a small target); both errors give the range of targets these ratios allow.
        RatioUnreachableError: if no FFN width lands within 0.5 points of ``target`` (one neuron per layer is worth
            more than a point: tiny models); it gives the nearest reachable ratios.

    With ``ffn_ratio`` pinned and ``qk_ratio`` or ``vo_ratio`` not, nothing is solved (``target`` only sets the
    defaults of the unpinned parts): a plan that misses ``target`` by more than 0.5 points is returned with a warning.
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
    value_head_dim = value_width(d_h, vo, dimension_multiple)
    # choose_calibrated_layers never gives the last pruned layer a branch: budget only the branches attached.
    calibrated = min(num_calibrated_layers, len(pruned_layers) - 1) if calibration_rank > 0 else 0
    branches = calibrated * 2 * d * calibration_rank
    plan_with = _plans_by_ffn_width(config, skip_layers, (q_rank, k_rank, value_head_dim), (qk, vo), branches)

    if ffn_ratio is not None:
        plan = plan_with(aligned_width(d_ff - math.floor(ffn_ratio * d_ff), dimension_multiple, d_ff))
        if (qk_ratio is None or vo_ratio is None) and abs(plan.achieved_ratio - target) > TARGET_TOLERANCE:
            warnings.warn(
                f"ffn_ratio={ffn_ratio} is pinned, so ratio={target} is not solved for: it only sets the unpinned "
                f"qk_ratio={qk:.3f}/vo_ratio={vo:.3f}, and the plan removes {plan.achieved_ratio:.1%} of the "
                "parameters. Leave ffn_ratio unset to reach ratio, or pin all three part ratios.",
                stacklevel=2,
            )
        return plan

    whole_ffn, single_neuron = plan_with(d_ff), plan_with(1)
    reach = _Reach(target, qk, vo, qk_ratio is not None, vo_ratio is not None,
                   whole_ffn.achieved_ratio, single_neuron.achieved_ratio,
                   _value_rounding(d_h, vo, dimension_multiple))
    per_neuron = (whole_ffn.parameters_after - single_neuron.parameters_after) / (d_ff - 1)
    exact = 1 + (before * (1 - target) - single_neuron.parameters_after) / per_neuron
    if round(exact) < 1:
        hardest = _highest_with_hardest_attention(config, branches, skip_layers, dimension_multiple)
        unrounded = _highest_with_hardest_attention(config, branches, skip_layers, 1)
        raise RatioTooHighError(reach.too_high_message(round(exact), hardest, unrounded, dimension_multiple))
    return _plan_at_solved_ffn_width(plan_with, exact, per_neuron, target, dimension_multiple, d_ff, reach)


def aligned_widths_with_total(counts: list[int], multiple: int, full: int) -> list[int]:
    """Per-layer widths near ``counts``, in multiples of ``multiple`` (or ``full``), that sum exactly to ``sum(counts)``.

    Each count is rounded down to a multiple (at least one multiple, at most ``full``); the widths furthest below
    their counts then gain a multiple in turn (or reach ``full``) until the sum is met. Only the last step may add less
    than a multiple, in one layer, when ``sum(counts)`` is not a sum of multiples: the total is the budget, the
    alignment comes second.
    """
    if any(not 1 <= count <= full for count in counts):
        raise ValueError(f"every count must be in [1, {full}], got {counts}.")
    total = sum(counts)
    widths = [min(full, max(min(multiple, full), multiple * (count // multiple))) for count in counts]
    while sum(widths) > total:  # only when counts below one multiple were raised to one
        layer = max((i for i in range(len(widths)) if widths[i] > 1), key=lambda i: (widths[i] - counts[i], -i))
        widths[layer] -= min(multiple, sum(widths) - total, widths[layer] - 1)
    while sum(widths) < total:
        layer = max((i for i in range(len(widths)) if widths[i] < full), key=lambda i: (counts[i] - widths[i], -i))
        widths[layer] += min(multiple, full - widths[layer], total - sum(widths))
    return widths


def plan_with_ffn_widths(config, plan: PruningPlan, widths: list[int]) -> PruningPlan:
    """``plan`` with the FFN widths ``widths`` (one per layer) in place of its own; the count is computed again.

    The part ratios are kept: widths redistributed over the same pruned layers remove the same share of the FFN.
    """
    if len(widths) != len(plan.layers):
        raise ValueError(f"{len(widths)} FFN widths for a plan of {len(plan.layers)} layers.")
    layers = tuple(dataclasses.replace(layer, intermediate_size=width) for layer, width in zip(plan.layers, widths))
    branches = plan.parameters_after - config.from_base_config(config, **per_layer_lists(plan.layers)).count_parameters()
    after = config.from_base_config(config, **per_layer_lists(layers)).count_parameters() + branches
    return PruningPlan(layers, plan.ratios, plan.parameters_before, after)


def _plans_by_ffn_width(config, skip_layers, attention: tuple, ratios: tuple, branch_parameters: int):
    """``plan_with(intermediate_size)``: the plan with the attention dimensions ``(q_rank, k_rank, value_head_dim)``
    fixed and that FFN width in every pruned layer (skipped layers keep their dimensions)."""
    d_h, d_ff = config.attention_head_dim, config.intermediate_size
    before = config.count_parameters()

    def plan_with(intermediate_size: int) -> PruningPlan:
        layers = tuple(
            LayerDimensions(None, None, d_h, d_ff, 0) if layer in skip_layers
            else LayerDimensions(*attention, intermediate_size, 0)
            for layer in range(config.num_hidden_layers)
        )
        candidate = config.from_base_config(config, **per_layer_lists(layers))
        # Branches are attached to layers chosen later from the data; their cost is known now.
        after = candidate.count_parameters() + branch_parameters
        return PruningPlan(layers, PartRatios(*ratios, 1 - intermediate_size / d_ff), before, after)

    return plan_with


def _plan_at_solved_ffn_width(plan_with, exact: float, per_neuron: float, target: float, multiple: int, full: int,
                              reach):
    """Parameters are affine in the FFN width: ``exact`` hits the target; round it to an aligned width, else to an
    integer one, and refuse a plan still more than 0.5 points off."""
    plan = plan_with(aligned_width(exact, multiple, full))
    if abs(plan.achieved_ratio - target) > TARGET_TOLERANCE:
        plan = plan_with(aligned_width(exact, 1, full))
    if plan.achieved_ratio - target > TARGET_TOLERANCE:
        raise RatioTooLowError(reach.too_low_message())
    if abs(plan.achieved_ratio - target) > TARGET_TOLERANCE:
        # Tiny models only: one FFN neuron per layer is worth more than a point of the whole model.
        neighbours = sorted(plan_with(min(full, max(1, width))).achieved_ratio
                            for width in (math.floor(exact), math.ceil(exact)))
        raise RatioUnreachableError(
            f"ratio={target} cannot be met within 0.5 points on this model: one FFN neuron in every pruned layer is "
            f"{per_neuron / plan.parameters_before:.2%} of the parameters, and the nearest plans remove "
            f"{neighbours[0]:.2%} and {neighbours[-1]:.2%}. Pass ratio={neighbours[-1]:.4f} or "
            f"ratio={neighbours[0]:.4f}, or pin qk_ratio/vo_ratio to change the attention's share."
        )
    return plan


def _value_rounding(head_dim: int, vo_ratio: float, multiple: int) -> str:
    """For error messages: how ``dimension_multiple`` moved the value width, or "" when it did not."""
    exact, rounded = value_width(head_dim, vo_ratio), value_width(head_dim, vo_ratio, multiple)
    if exact == rounded:
        return ""
    return f"dimension_multiple={multiple} rounds each value head to {rounded} of {head_dim} channels, not {exact}"


# The hardest Q/K and V/O ratios the reference split uses: past them a projection keeps next to nothing.
HARDEST_ATTENTION = 0.99


def _highest_with_hardest_attention(config, branch_parameters: int, skip_layers, multiple: int) -> float:
    """The fraction of parameters removed with Q/K and V/O at `HARDEST_ATTENTION` and one FFN neuron per layer."""
    d_h = config.attention_head_dim
    value_head_dim = value_width(d_h, HARDEST_ATTENTION, multiple)
    layers = [
        LayerDimensions(None, None, d_h, config.intermediate_size, 0) if layer in skip_layers else LayerDimensions(
            factored_rank(config.num_attention_heads * d_h, config.hidden_size, HARDEST_ATTENTION, multiple),
            factored_rank(config.num_key_value_heads * d_h, config.hidden_size, HARDEST_ATTENTION, multiple),
            value_head_dim, 1, 0,
        )
        for layer in range(config.num_hidden_layers)
    ]
    after = config.from_base_config(config, **per_layer_lists(layers)).count_parameters() + branch_parameters
    return 1.0 - after / config.count_parameters()


@dataclass(frozen=True)
class _Reach:
    """What a recipe's Q/K and V/O ratios allow: the targets between keeping the whole FFN and keeping one neuron."""

    target: float
    qk: float
    vo: float
    qk_pinned: bool
    vo_pinned: bool
    lowest: float  # the fraction removed with the FFN kept whole
    highest: float  # the fraction removed with one FFN neuron per layer
    value_rounding: str = ""  # how dimension_multiple moved the value width (`_value_rounding`)

    def _ratios(self) -> str:
        pinned = [name for name, flag in (("qk_ratio", self.qk_pinned), ("vo_ratio", self.vo_pinned)) if flag]
        notes = [f"{' and '.join(pinned)} as given" if pinned else "the reference split of ratio"]
        notes += [self.value_rounding] if self.value_rounding else []
        return f"qk_ratio={self.qk:.3g} and vo_ratio={self.vo:.3g} ({'; '.join(notes)})"

    def _range(self) -> str:
        return f"these attention ratios allow ratio from {self.lowest:.1%} to {self.highest:.1%}"

    def too_low_message(self) -> str:
        pinned = [name for name, flag in (("qk_ratio", self.qk_pinned), ("vo_ratio", self.vo_pinned)) if flag]
        change = (
            f"lower {'/'.join(pinned)} (or leave {'them' if len(pinned) > 1 else 'it'} unset to follow ratio)"
            if pinned else "pin a lower qk_ratio/vo_ratio"
        )
        return (
            f"ratio={self.target} cannot be reached: {self._ratios()} alone remove {self.lowest:.1%} of the "
            f"parameters with the FFN kept whole; {self._range()}. To prune {self.target:.1%}, {change}; or raise "
            f"ratio to at least {self.lowest:.1%}{'; or lower dimension_multiple' if self.value_rounding else ''}."
        )

    def too_high_message(self, neurons: int, hardest: float, unrounded: float | None = None, multiple: int = 1) -> str:
        """``hardest``: the fraction removed with qk_ratio and vo_ratio at their limit and one FFN neuron per layer;
        ``unrounded``: the same with exact widths, when ``dimension_multiple`` (``multiple``) > 1 rounds them."""
        advice = f"Lower the ratio to at most {self.highest:.1%}"
        # Only the parts below the limit can be pruned harder, and only worth advising when that reaches the target.
        softer = [name for name, value in (("qk_ratio", self.qk), ("vo_ratio", self.vo)) if value < HARDEST_ATTENTION]
        if softer and hardest >= self.target:
            advice += (
                f", or prune attention harder: raise {' and '.join(softer)} (up to {HARDEST_ATTENTION}, which allows "
                f"up to {hardest:.1%})"
            )
        elif softer:
            advice += (
                f" (pruning attention harder is not enough: {' and '.join(softer)} at {HARDEST_ATTENTION} would allow "
                f"at most {hardest:.1%}; embeddings and norms are never pruned)"
            )
        if multiple > 1 and unrounded is not None and hardest < self.target <= unrounded:
            # The rounding of the attention widths, not the model, is what stops the target.
            advice += (
                f", or lower dimension_multiple={multiple} (with exact widths, qk_ratio and vo_ratio at "
                f"{HARDEST_ATTENTION} allow up to {unrounded:.1%})"
            )
        return (
            f"ratio={self.target} is too high for this model: with {self._ratios()} the FFN would keep {neurons} "
            f"neurons per layer; {self._range()}. {advice}."
        )


__all__ = [
    "LayerDimensions",
    "PartRatios",
    "PruningPlan",
    "RatioTooHighError",
    "RatioTooLowError",
    "aligned_width",
    "aligned_widths_with_total",
    "factored_rank",
    "per_layer_lists",
    "plan_dimensions",
    "plan_with_ffn_widths",
    "reference_split",
    "value_width",
]
