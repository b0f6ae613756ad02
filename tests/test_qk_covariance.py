"""qk_covariance_shrinkage: Q/K are factored to the best low rank under the attention input's second-moment matrix
shrunk toward its diagonal. Checked against a reference built from plain transformers forwards (the dense model for
layer 0, the returned pruned model's own forward for layer 1) and an eigendecomposition, never from the pipeline's
statistics."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model

from optimum_olica import OlicaConfig, prune_model
from optimum_olica.errors import OlicaConfigError

pytestmark = pytest.mark.usefixtures("single_thread")


def _projection_inputs(model, ids, module) -> torch.Tensor:
    """What ``module`` reads in a plain forward of ``model`` over ``ids``, as float64 (tokens, features)."""
    seen = []
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    return torch.cat(seen).reshape(-1, seen[0].shape[-1]).double()


def _best_low_rank(weight: torch.Tensor, tokens: torch.Tensor, rank: int, shrinkage: float) -> torch.Tensor:
    """The rank-``rank`` weight closest to ``weight`` under ``M = (1 - s) C + s diag(C)``, ``C`` the tokens' mean
    ``x x^T``: Eckart-Young on ``W M^(1/2)``, with the square root from an eigendecomposition."""
    second = tokens.T @ tokens / tokens.shape[0]
    metric = (1 - shrinkage) * second + shrinkage * torch.diag(torch.diagonal(second))
    values, vectors = torch.linalg.eigh(metric)
    root = vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T
    inverse_root = vectors @ torch.diag(values.clamp_min(1e-12).rsqrt()) @ vectors.T
    u, s, vh = torch.linalg.svd(weight.double() @ root, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank] @ inverse_root


@pytest.mark.parametrize("family", ["llama_gqa", "llama_bias", "qwen3"])
@pytest.mark.parametrize("shrinkage", [0.0, 0.5, 1.0])
def test_query_and_key_are_the_best_low_rank_under_the_shrunk_second_moments(family, shrinkage):
    ids = torch.randint(3, 128, (24, 32), generator=torch.Generator().manual_seed(1))
    recipe = OlicaConfig(ratio=0.3, num_samples=24, sequence_length=32, layer_allocation="uniform",
                         qk_covariance_shrinkage=shrinkage)
    pruned = prune_model(make_tiny_model(family), recipe, ids, progress=False).model
    dense = make_tiny_model(family)
    for layer_idx in (0, 1):
        attention, dense_attention = pruned.model.layers[layer_idx].self_attn, dense.model.layers[layer_idx].self_attn
        # The dense layer's projections read the pruned model's own stream: its q_proj input is the pruned model's.
        tokens = _projection_inputs(pruned, ids, attention.q_proj.down)
        for name in ("q_proj", "k_proj"):
            factored = getattr(attention, name)
            expected = _best_low_rank(getattr(dense_attention, name).weight.detach(), tokens, factored.rank, shrinkage)
            got = (factored.up.weight @ factored.down.weight).detach().double()
            torch.testing.assert_close(got, expected, rtol=2e-4, atol=2e-4 * float(expected.abs().max()))


def test_the_shrinkage_is_checked():
    for bad in (-0.1, 1.5, "half", None, float("nan")):
        with pytest.raises(OlicaConfigError, match="qk_covariance_shrinkage"):
            OlicaConfig(qk_covariance_shrinkage=bad)
    assert OlicaConfig().qk_covariance_shrinkage == 0.5
