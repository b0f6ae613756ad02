"""The adaptive allocation of FFN widths between layers (``layer_allocation="adaptive"``).

The math against brute force (a direct log-and-standardize, a global sort of every neuron, exhaustive properties of
the rounding); the pruner's widths against scores taken from the dense model's own forward in plain transformers
(hooks on a full ``model(input_ids)``, not the pipeline's layer-by-layer replay).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optimum_olica import olica_math as om
from optimum_olica.allocation import aligned_widths_with_total, plan_dimensions, plan_with_ffn_widths
from optimum_olica.configuration import OlicaConfig
from optimum_olica.conversion import olica_config_from
from optimum_olica.olica import FfnNeuronScores
from optimum_olica.pruner import ALLOCATION_SHARE, prune_model

from conftest import make_tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")


# ---- comparable scores --------------------------------------------------------------------------------------------


def test_comparable_scores_are_the_standardized_logs():
    scores = torch.rand(50, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.1
    logs = [math.log(value) for value in scores.tolist()]
    mean = sum(logs) / len(logs)
    std = math.sqrt(sum((value - mean) ** 2 for value in logs) / (len(logs) - 1))
    expected = torch.tensor([(value - mean) / std for value in logs], dtype=torch.float64)
    torch.testing.assert_close(om.comparable_neuron_scores(scores), expected, rtol=1e-12, atol=1e-12)


def test_comparable_scores_ignore_a_layer_s_scale():
    """A layer whose scores are all 100x larger (a deeper, louder residual stream) ranks its neurons the same."""
    scores = torch.rand(40, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.01
    torch.testing.assert_close(om.comparable_neuron_scores(100 * scores), om.comparable_neuron_scores(scores))


def test_a_dead_neuron_ranks_last_and_stays_finite():
    scores = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64)
    comparable = om.comparable_neuron_scores(scores)
    assert torch.isfinite(comparable).all()
    assert int(comparable.argmin()) == 0
    assert om.comparable_neuron_scores(torch.ones(5)).eq(0).all()


@pytest.mark.parametrize("scores", [torch.tensor([1.0]), torch.ones(2, 2), torch.tensor([1.0, -1.0]),
                                    torch.tensor([1.0, float("nan")])])
def test_comparable_scores_refuse_bad_input(scores):
    with pytest.raises(ValueError):
        om.comparable_neuron_scores(scores)


# ---- neurons kept per layer ----------------------------------------------------------------------------------------


def _kept_by_brute_force(scores: list[torch.Tensor], keep_total: int, minimum: int) -> list[int]:
    """Every neuron as (score, layer, rank in its layer); each layer's ``minimum`` best kept; the rest sorted."""
    counts = [minimum] * len(scores)
    rest = []
    for layer, layer_scores in enumerate(scores):
        ordered = sorted(layer_scores.tolist(), reverse=True)
        rest += [(-value, layer, rank) for rank, value in enumerate(ordered[minimum:])]
    for _, layer, _ in sorted(rest)[: keep_total - minimum * len(scores)]:
        counts[layer] += 1
    return counts


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(3, 12), min_size=1, max_size=5), data=st.data())
def test_neurons_kept_per_layer_match_a_global_sort(sizes, data):
    minimum = data.draw(st.integers(1, min(sizes)))
    keep_total = data.draw(st.integers(minimum * len(sizes), sum(sizes)))
    # Scores on a coarse grid: ties across layers happen, and must go to the earlier layer.
    scores = [torch.tensor(data.draw(st.lists(st.integers(0, 6), min_size=n, max_size=n)), dtype=torch.float64)
              for n in sizes]
    counts = om.neurons_kept_per_layer(scores, keep_total, minimum)
    assert counts == _kept_by_brute_force(scores, keep_total, minimum)
    assert sum(counts) == keep_total


def test_neurons_kept_per_layer_refuse_impossible_budgets():
    scores = [torch.rand(4), torch.rand(6)]
    with pytest.raises(ValueError, match="keep_total"):
        om.neurons_kept_per_layer(scores, 11)
    with pytest.raises(ValueError, match="keep_total"):
        om.neurons_kept_per_layer(scores, 3, minimum=2)
    with pytest.raises(ValueError, match="minimum"):
        om.neurons_kept_per_layer(scores, 8, minimum=5)


# ---- rounding with the total kept -----------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(full=st.integers(1, 200), multiple=st.sampled_from([1, 8, 32, 64]), data=st.data())
def test_aligned_widths_keep_the_total_and_the_alignment(full, multiple, data):
    # The pruner keeps at least one multiple per layer (`neurons_kept_per_layer`'s minimum), so counts start there.
    counts = data.draw(st.lists(st.integers(min(multiple, full), full), min_size=1, max_size=8))
    widths = aligned_widths_with_total(counts, multiple, full)
    assert sum(widths) == sum(counts)
    assert all(1 <= width <= full for width in widths)
    if multiple <= full:  # else no width but `full` is a multiple: nothing to align to
        unaligned = [width for width in widths if width % multiple and width != full]
        assert len(unaligned) <= 1
    # Rounding moves no width by two steps of the alignment or more.
    assert all(abs(width - count) < 2 * multiple for width, count in zip(widths, counts))


def test_aligned_widths_of_counts_below_one_multiple_still_sum_to_the_total():
    assert sum(aligned_widths_with_total([1, 1, 5], 8, 96)) == 7


def test_aligned_widths_are_the_counts_when_already_aligned():
    assert aligned_widths_with_total([1160, 1432, 888], 8, 1536) == [1160, 1432, 888]


def test_plan_with_ffn_widths_counts_the_parameters_again():
    config = olica_config_from(make_tiny_model("llama_gqa", num_hidden_layers=4).config)
    uniform = plan_dimensions(config, 0.3, dimension_multiple=1)
    width = uniform.layers[0].intermediate_size
    moved = plan_with_ffn_widths(config, uniform, [width + 8, width - 8, width + 2, width - 2])
    assert moved.parameters_after == uniform.parameters_after  # the same neurons in all
    assert [layer.intermediate_size for layer in moved.layers] == [width + 8, width - 8, width + 2, width - 2]
    skewed = plan_with_ffn_widths(config, uniform, [width + 8, width, width, width])
    assert skewed.parameters_after - uniform.parameters_after == 8 * 3 * config.hidden_size
    assert moved.ratios == uniform.ratios


# ---- the pruner ----------------------------------------------------------------------------------------------------


def _reference_widths(model, calibration: torch.Tensor, keep_total: int, multiple: int) -> list[int]:
    """The widths from the FFN scores of one plain ``model(input_ids)`` over the allocation's share of the batches."""
    layers, moments = model.model.layers, {}
    handles = []
    for index, layer in enumerate(layers):
        moments[index] = {"x": torch.zeros(layer.mlp.gate_proj.in_features, dtype=torch.float64),
                          "a": torch.zeros(layer.mlp.down_proj.in_features, dtype=torch.float64), "n": [0]}

        def on_gate(module, args, m=moments[index]):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            m["x"] += (x * x).sum(0)
            m["n"][0] += x.shape[0]

        def on_down(module, args, m=moments[index]):
            a = args[0].reshape(-1, args[0].shape[-1]).double()
            m["a"] += (a * a).sum(0)

        handles += [layer.mlp.gate_proj.register_forward_pre_hook(on_gate),
                    layer.mlp.down_proj.register_forward_pre_hook(on_down)]
    rows = round(calibration.shape[0] * ALLOCATION_SHARE)
    with torch.no_grad():
        model(input_ids=calibration[:rows], use_cache=False)
    for handle in handles:
        handle.remove()
    scores = []
    for index, layer in enumerate(layers):
        m, mlp = moments[index], layer.mlp
        scores.append(om.comparable_neuron_scores(om.ffn_neuron_scores(
            mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, m["x"] / m["n"][0], m["a"] / m["n"][0])))
    counts = om.neurons_kept_per_layer(scores, keep_total, minimum=min(multiple, layers[0].mlp.down_proj.in_features))
    return aligned_widths_with_total(counts, multiple, layers[0].mlp.down_proj.in_features)


@pytest.mark.parametrize("ratio", [0.2, 0.4])
def test_adaptive_widths_are_those_of_the_dense_model_s_own_forward(ratio):
    # 128 sequences of 128 tokens are 4 batches of 32: the allocation reads the first one.
    model = make_tiny_model("llama_gqa", num_hidden_layers=4)
    calibration = torch.randint(3, 128, (128, 128), generator=torch.Generator().manual_seed(0))
    uniform = prune_model(make_tiny_model("llama_gqa", num_hidden_layers=4),
                          OlicaConfig(ratio=ratio, layer_allocation="uniform"), calibration, progress=False)
    keep_total = sum(uniform.model.config.intermediate_sizes)
    expected = _reference_widths(model, calibration, keep_total, 8)
    result = prune_model(model, OlicaConfig(ratio=ratio), calibration, progress=False)
    widths = result.model.config.intermediate_sizes
    assert widths == expected
    assert len(set(widths)) > 1, "the tiny model's layers should earn different widths"
    assert result.model.num_parameters() == uniform.model.num_parameters()
    assert result.report["layer_allocation"] == "adaptive" and uniform.report["layer_allocation"] == "uniform"
    assert result.report["timings"]["allocation_s"] > 0 and uniform.report["timings"]["allocation_s"] == 0


def test_skipped_layers_keep_their_width_and_take_no_share():
    calibration = torch.randint(3, 128, (16, 32), generator=torch.Generator().manual_seed(0))
    config = OlicaConfig(ratio=0.2, skip_layers=[1])
    result = prune_model(make_tiny_model("llama_gqa", num_hidden_layers=4), config, calibration, progress=False)
    uniform = prune_model(make_tiny_model("llama_gqa", num_hidden_layers=4),
                          OlicaConfig(ratio=0.2, skip_layers=[1], layer_allocation="uniform"), calibration,
                          progress=False)
    widths = result.model.config.intermediate_sizes
    assert widths[1] == 96
    assert sum(widths) == sum(uniform.model.config.intermediate_sizes)


def test_the_stock_recipe_is_uniform():
    assert OlicaConfig(ratio=0.2, architecture="stock").layer_allocation == "uniform"
    assert OlicaConfig(ratio=0.2, architecture="stock", layer_allocation="adaptive").layer_allocation == "uniform"


def test_an_unknown_allocation_is_refused():
    with pytest.raises(ValueError, match="layer_allocation"):
        OlicaConfig(ratio=0.2, layer_allocation="global")


def test_a_budget_below_one_multiple_per_layer_is_shared_without_error():
    # Found by tests/test_properties.py: an FFN of 21 neurons whose uniform plan keeps one per layer (no multiple of 8
    # lands on the target). Every layer keeps at least what the budget allows, and the total is the uniform plan's.
    from transformers import Qwen2Config, Qwen2ForCausalLM

    def model():
        torch.manual_seed(0)
        return Qwen2ForCausalLM(Qwen2Config(
            vocab_size=64, hidden_size=8, intermediate_size=21, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=4, max_position_embeddings=64, initializer_range=0.2,
            tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)).eval()

    calibration = torch.randint(3, 64, (8, 16), generator=torch.Generator().manual_seed(0))
    recipe = {"ratio": 0.375, "num_calibrated_layers": 1, "calibration_rank_ratio": 0.05}
    uniform = prune_model(model(), OlicaConfig(**recipe, layer_allocation="uniform"), calibration, progress=False)
    adaptive = prune_model(model(), OlicaConfig(**recipe), calibration, progress=False)
    assert sum(adaptive.model.config.intermediate_sizes) == sum(uniform.model.config.intermediate_sizes)
    assert adaptive.model.num_parameters() == uniform.model.num_parameters()
    assert min(adaptive.model.config.intermediate_sizes) >= 1


def test_widths_keep_a_budget_smaller_than_one_multiple_per_layer():
    scores = FfnNeuronScores(scores={0: torch.rand(21, generator=torch.Generator().manual_seed(1)) + 0.1,
                                     1: torch.rand(21, generator=torch.Generator().manual_seed(2)) + 0.1})
    assert scores.widths(2, 8) == {0: 1, 1: 1}
    assert sum(scores.widths(10, 8).values()) == 10
