"""Ratio allocation (method §4): the target fraction of all parameters, per-layer dimensions, and its errors."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig, Qwen2Config

from optimum_olica.allocation import (
    LayerDimensions,
    RatioTooHighError,
    RatioTooLowError,
    aligned_width,
    factored_rank,
    plan_dimensions,
    reference_split,
    value_width,
)
from optimum_olica.conversion import olica_config_from

SMOLLM2_SHAPE = LlamaConfig(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, tie_word_embeddings=True,
)


@pytest.mark.parametrize("target", [0.05, 0.1, 0.2, 0.25, 0.33, 0.4, 0.5])
@pytest.mark.parametrize("calibrated_layers", [0, 6])
def test_plan_hits_the_target_within_half_a_point(target, calibrated_layers):
    config = olica_config_from(SMOLLM2_SHAPE)
    plan = plan_dimensions(config, target, calibration_rank=17, num_calibrated_layers=calibrated_layers)
    assert abs(plan.achieved_ratio - target) < 0.005
    # the plan's count is the model's count: per-layer dims through the config, plus the calibration branches
    planned = olica_config_from(SMOLLM2_SHAPE, **plan.per_layer_lists())
    assert plan.parameters_after == planned.count_parameters() + calibrated_layers * 2 * 576 * 17
    assert plan.parameters_before == 134_515_008


def test_reference_split_and_rank_rule():
    assert reference_split(0.2) == pytest.approx((0.4, 0.1))
    assert reference_split(0.5) == pytest.approx((0.75, 0.25))
    assert factored_rank(576, 576, 0.4) == 173  # ceil(0.6 * 576 / 2)
    assert factored_rank(192, 576, 0.0) is None  # nothing to remove
    assert factored_rank(2, 2, 0.1) is None  # rank 1 * (2 + 2) == 2 * 2: factoring would save nothing


def test_skipped_layers_keep_full_dimensions_and_others_pay():
    config = olica_config_from(SMOLLM2_SHAPE)
    plan = plan_dimensions(config, 0.2, skip_layers=(0, 29))
    free = plan_dimensions(config, 0.2)
    assert plan.layers[0].intermediate_size == 1536 and plan.layers[0].query_rank is None
    assert plan.layers[5].intermediate_size < free.layers[5].intermediate_size
    assert abs(plan.achieved_ratio - 0.2) < 0.005


def test_explicit_part_ratios_are_used_as_given():
    config = olica_config_from(Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    plan = plan_dimensions(config, 0.1, qk_ratio=0.0, vo_ratio=0.0, ffn_ratio=0.5)
    assert all(layer.intermediate_size == 64 and layer.query_rank is None for layer in plan.layers)
    assert all(layer.value_head_dim == 16 for layer in plan.layers)


def test_a_ratio_too_high_for_the_model_is_refused():
    config = olica_config_from(SMOLLM2_SHAPE)
    with pytest.raises(RatioTooHighError, match="too high for this model"):
        plan_dimensions(config, 0.9)


def test_aligned_width_is_the_nearest_allowed_width():
    import itertools

    for exact, multiple, full in itertools.product([0.6, 1.0, 7.4, 12.0, 13.9, 95.5, 96.0, 130.0], [1, 4, 8], [13, 96]):
        width = aligned_width(exact, multiple, full)
        allowed = [w for w in range(1, full + 1) if w % multiple == 0 or w == full]
        assert width in allowed
        assert abs(width - exact) == min(abs(w - exact) for w in allowed), (exact, multiple, full, width)


@pytest.mark.parametrize("target", [0.1, 0.2, 0.33, 0.5])
def test_dimension_multiple_rounds_ranks_and_ffn_widths(target):
    config = olica_config_from(SMOLLM2_SHAPE)
    plan = plan_dimensions(config, target, dimension_multiple=8)
    for layer in plan.layers:
        assert layer.query_rank % 8 == 0 and layer.key_rank % 8 == 0 and layer.intermediate_size % 8 == 0
    assert abs(plan.achieved_ratio - target) < 0.005
    assert factored_rank(576, 576, 0.4, multiple=8) == 176  # 173 rounded to the nearest multiple of 8


def test_dimension_multiple_never_breaks_the_target_promise_on_small_models():
    # Three layers of width 64: one FFN neuron is ~1% of the model, so a step of 8 would miss the target by up to
    # four points; the FFN keeps its exact width instead.
    config = olica_config_from(LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                           num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                           tie_word_embeddings=True))
    for target in (0.1, 0.2, 0.33, 0.5):
        plan = plan_dimensions(config, target, dimension_multiple=8)
        assert abs(plan.achieved_ratio - target) < 0.005
    assert plan_dimensions(config, 0.1, dimension_multiple=8).layers[0].intermediate_size % 8 != 0


TINY_SHAPE = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, tie_word_embeddings=True)  # head_dim 16


def _nearest_allowed_value_width(head_dim: int, vo_ratio: float, multiple: int) -> int:
    """Brute force: the unrounded width keeps every channel that ``vo_ratio`` does not remove (the fewest channels
    with at most ``vo_ratio * head_dim`` removed); the allowed widths are the multiples of ``multiple`` and
    ``head_dim`` itself; the nearest allowed width wins, the narrower one on a tie."""
    exact = min(width for width in range(1, head_dim + 1) if head_dim - width <= vo_ratio * head_dim)
    allowed = [width for width in range(1, head_dim + 1) if width % multiple == 0 or width == head_dim]
    return min(allowed, key=lambda width: (abs(width - exact), width))


@pytest.mark.parametrize("shape", [SMOLLM2_SHAPE, TINY_SHAPE], ids=["smollm2", "tiny"])
@pytest.mark.parametrize("multiple", [1, 8, 32, 64])
def test_value_head_width_is_the_allowed_width_nearest_the_exact_one(shape, multiple):
    config = olica_config_from(shape)
    head_dim = config.attention_head_dim
    for vo_ratio in (0.0, 0.05, 0.1, 0.125, 0.2, 0.25, 0.3, 0.45, 0.6, 0.9, 0.99):
        expected = _nearest_allowed_value_width(head_dim, vo_ratio, multiple)
        assert value_width(head_dim, vo_ratio, multiple) == expected, (vo_ratio, multiple)
    for target in (0.2, 0.33):
        plan = plan_dimensions(config, target, dimension_multiple=multiple)
        expected = _nearest_allowed_value_width(head_dim, reference_split(target)[1], multiple)
        assert {layer.value_head_dim for layer in plan.layers} == {expected}, (target, multiple)


def test_smollm2_value_heads_at_20_percent_are_rounded_to_a_multiple_of_8():
    config = olica_config_from(SMOLLM2_SHAPE)
    assert plan_dimensions(config, 0.2, dimension_multiple=1).layers[0].value_head_dim == 58  # 64 - floor(6.4)
    assert plan_dimensions(config, 0.2, dimension_multiple=8).layers[0].value_head_dim == 56
    assert plan_dimensions(config, 0.2, dimension_multiple=64).layers[0].value_head_dim == 64  # heads kept whole


def _llama_parameters(shape: LlamaConfig, layer, intermediate_size: int | None = None) -> int:
    """Counted by hand from the shapes (not through the config): every layer pruned like ``layer``, with the FFN
    ``intermediate_size`` wide if given; tied embeddings, no biases."""
    d, heads, kv_heads = shape.hidden_size, shape.num_attention_heads, shape.num_key_value_heads
    head_dim, value_width = d // heads, layer.value_head_dim
    ffn = layer.intermediate_size if intermediate_size is None else intermediate_size

    def linear(n_in, n_out, rank):
        return n_in * n_out if rank is None else rank * (n_in + n_out)

    attention = (linear(d, heads * head_dim, layer.query_rank) + linear(d, kv_heads * head_dim, layer.key_rank)
                 + d * kv_heads * value_width + heads * value_width * d)
    return shape.num_hidden_layers * (attention + 3 * d * ffn + 2 * d) + shape.vocab_size * d + d


def _ffn_widths_by_distance(shape: LlamaConfig, layer, target: float, multiple: int):
    """Brute force over every FFN width allowed by ``multiple`` (the attention widths of ``layer`` fixed): the
    widths ordered by how far their parameter count lands from ``target``, and that distance as a function."""
    dense = _llama_parameters(shape, LayerDimensions(None, None, shape.hidden_size // shape.num_attention_heads,
                                                     shape.intermediate_size, 0))

    def miss(width: int) -> float:
        return abs(1 - _llama_parameters(shape, layer, width) / dense - target)

    d_ff = shape.intermediate_size
    allowed = [width for width in range(1, d_ff + 1) if width % multiple == 0 or width == d_ff]
    return sorted(allowed, key=miss), miss


@pytest.mark.parametrize("shape", [SMOLLM2_SHAPE, TINY_SHAPE], ids=["smollm2", "tiny"])
@pytest.mark.parametrize("multiple", [1, 8, 32, 64])
def test_every_dimension_multiple_meets_the_target_with_aligned_widths(shape, multiple):
    config = olica_config_from(shape)
    head_dim = config.attention_head_dim
    for target in (0.1, 0.2, 0.33, 0.5):
        plan = plan_dimensions(config, target, dimension_multiple=multiple)
        assert abs(plan.achieved_ratio - target) < 0.005, (target, multiple, plan.achieved_ratio)
        layer = plan.layers[0]
        assert plan.parameters_after == _llama_parameters(shape, layer)
        for rank in (layer.query_rank, layer.key_rank):
            assert rank is None or rank % multiple == 0
        assert layer.value_head_dim % multiple == 0 or layer.value_head_dim == head_dim
        # The FFN, solved after the rounded attention widths, is the aligned width nearest the target (by an
        # independent count of every candidate; on a tie either); when none is within half a point it keeps its
        # exact width.
        ranked, miss = _ffn_widths_by_distance(shape, layer, target, multiple)
        if miss(ranked[0]) < 0.005:
            assert layer.intermediate_size % multiple == 0 or layer.intermediate_size == config.intermediate_size
        else:
            ranked, miss = _ffn_widths_by_distance(shape, layer, target, 1)
        assert miss(layer.intermediate_size) == pytest.approx(miss(ranked[0]), abs=1e-12), (target, multiple)


def test_errors_name_dimension_multiple_when_its_rounding_stops_the_target():
    config = olica_config_from(TINY_SHAPE)
    assert abs(plan_dimensions(config, 0.62, dimension_multiple=1).achieved_ratio - 0.62) < 0.005
    # At 32, head_dim 16 keeps whole value heads and Q/K cannot be factored (rank 32 saves nothing at width 64).
    with pytest.raises(RatioTooHighError, match="16 of 16 channels, not 12") as error:
        plan_dimensions(config, 0.62, dimension_multiple=32)
    assert "lower dimension_multiple=32" in str(error.value)
    # Rounded down (7 channels -> 8 of 16), pinned value heads remove more than a small target allows.
    with pytest.raises(RatioTooLowError, match="8 of 16 channels, not 7") as error:
        plan_dimensions(config, 0.05, vo_ratio=0.6, dimension_multiple=8)
    assert "lower dimension_multiple" in str(error.value)
