"""trajectory_weight: the o_proj/down_proj refits aim between the dense layer's output on the pruned model's inputs and
the dense model's own hidden states. Checked against least squares built from plain transformers forwards of the
dense model and of the pruned model the run returns, never from the pipeline's own replay."""

from __future__ import annotations

import pytest
import torch
from conftest import forward_capturing, make_tiny_model

from optimum_olica import OlicaConfig, prune_model
from optimum_olica.errors import OlicaConfigError

pytestmark = pytest.mark.usefixtures("single_thread")

LAYER = 1  # the first layer whose inputs differ between the dense and the pruned model
DAMPING = 1e-7  # relative: the pull towards the unrefitted weights (which the test cannot see) is negligible


def _least_squares(features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    features = features.reshape(-1, features.shape[-1]).double()
    targets = targets.reshape(-1, targets.shape[-1]).double()
    gram = features.T @ features
    damped = gram + DAMPING * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=torch.float64)
    return torch.linalg.solve(damped, features.T @ targets).T


@pytest.mark.parametrize("family", ["llama_gqa", "llama_bias", "mistral", "qwen3"])
def test_the_refits_aim_between_the_dense_layer_and_the_dense_models_own_states(family):
    ids = torch.randint(3, 128, (32, 32), generator=torch.Generator().manual_seed(0))
    recipe = {"ratio": 0.3, "num_samples": 32, "sequence_length": 32, "refit_damping": DAMPING,
              "layer_allocation": "uniform"}
    weight = 0.5
    pruned = prune_model(make_tiny_model(family), OlicaConfig(**recipe, trajectory_weight=weight), ids,
                         progress=False).model
    aimed_at_the_layer = prune_model(make_tiny_model(family), OlicaConfig(**recipe, trajectory_weight=0.0), ids,
                                     progress=False).model

    layer = pruned.model.layers[LAYER]
    seen = forward_capturing(pruned, ids, {
        "input": (layer, "input"), "middle": (layer.post_attention_layernorm, "input"),
        "attention_features": (layer.self_attn.o_proj, "input"), "ffn_features": (layer.mlp.down_proj, "input"),
    })
    dense = make_tiny_model(family)
    dense_layer = dense.model.layers[LAYER]
    own = dense_layer.post_attention_layernorm, dense_layer
    trajectory = forward_capturing(dense, ids, {"middle": (own[0], "input"), "output": (own[1], "output")})
    # The dense layer on the pruned model's input: the model's own forward with that one input replaced.
    on_pruned_input = forward_capturing(dense, ids, {"replace": (dense_layer, "replace", seen["input"]),
                                                     "attention": (dense_layer.self_attn, "output"),
                                                     "output": (dense_layer, "output")})

    def bias(projection):
        return 0.0 if projection.bias is None else projection.bias.double()

    attention_target = torch.lerp(on_pruned_input["attention"].double(),
                                  (trajectory["middle"] - seen["input"]).double(), weight)
    expected_o = _least_squares(seen["attention_features"], attention_target - bias(layer.self_attn.o_proj))
    ffn_target = torch.lerp(on_pruned_input["output"].double(), trajectory["output"].double(), weight)
    ffn_target = ffn_target - seen["middle"].double() - bias(layer.mlp.down_proj)  # the pruned residual is there
    expected_down = _least_squares(seen["ffn_features"], ffn_target)

    torch.testing.assert_close(layer.self_attn.o_proj.weight.double(), expected_o, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.mlp.down_proj.weight.double(), expected_down, rtol=1e-4, atol=1e-4)
    other = aimed_at_the_layer.model.layers[LAYER]
    assert not torch.allclose(other.self_attn.o_proj.weight.double(), expected_o, atol=1e-3)


def test_without_a_refit_the_weight_changes_nothing():
    ids = torch.randint(3, 128, (8, 16), generator=torch.Generator().manual_seed(0))
    recipe = {"ratio": 0.3, "num_samples": 8, "sequence_length": 16, "refit_damping": None}
    results = [prune_model(make_tiny_model(), OlicaConfig(**recipe, trajectory_weight=weight), ids,
                           progress=False).model for weight in (0.0, 1.0)]
    for first, second in zip(*(result.state_dict().values() for result in results)):
        assert torch.equal(first, second)


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), "half", True])
def test_a_weight_outside_zero_one_is_refused(value):
    with pytest.raises(OlicaConfigError, match="trajectory_weight"):
        OlicaConfig(trajectory_weight=value)
