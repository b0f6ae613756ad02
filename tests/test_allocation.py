"""Ratio allocation (method §4): the target fraction of all parameters, per-layer dimensions, and its errors."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig, Qwen2Config

from optimum_olica.allocation import (
    RatioTooHighError,
    aligned_width,
    factored_rank,
    plan_dimensions,
    reference_split,
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
