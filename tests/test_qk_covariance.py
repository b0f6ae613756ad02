"""qk_covariance_shrinkage and qk_score_weighting: Q/K are factored to the best low rank under the attention input's
second-moment matrix shrunk toward its diagonal, each output's error weighed by what it does to the attention scores. Checked against a reference built from plain transformers forwards (the dense model for
layer 0, the returned pruned model's own forward for layer 1) and an eigendecomposition, never from the pipeline's
statistics."""

from __future__ import annotations

import pytest
import torch
from conftest import forward_capturing, make_tiny_model

from optimum_olica import OlicaConfig, prune_model
from optimum_olica.errors import OlicaConfigError

pytestmark = pytest.mark.usefixtures("single_thread")


def _projection_inputs(model, ids, module) -> torch.Tensor:
    """What ``module`` reads in a plain forward of ``model`` over ``ids``, as float64 (tokens, features)."""
    inputs = forward_capturing(model, ids, {"inputs": (module, "input")})["inputs"]
    return inputs.reshape(-1, inputs.shape[-1]).double()


def _best_low_rank(weight: torch.Tensor, tokens: torch.Tensor, rank: int, shrinkage: float,
                   output_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The rank-``rank`` weight closest to ``weight`` under ``M = (1 - s) C + s diag(C)``, ``C`` the tokens' mean
    ``x x^T``, each output's error weighed by ``output_weights``: Eckart-Young on ``diag(w) W M^(1/2)``, with the
    square root from an eigendecomposition; the kept row space applied to ``W M^(1/2)`` itself."""
    second = tokens.T @ tokens / tokens.shape[0]
    metric = (1 - shrinkage) * second + shrinkage * torch.diag(torch.diagonal(second))
    values, vectors = torch.linalg.eigh(metric)
    root = vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T
    inverse_root = vectors @ torch.diag(values.clamp_min(1e-12).rsqrt()) @ vectors.T
    weights = torch.ones(weight.shape[0], dtype=torch.float64) if output_weights is None else output_weights
    rows = torch.linalg.svd(weights[:, None] * (weight.double() @ root), full_matrices=False).Vh[:rank]
    return weight.double() @ root @ rows.T @ rows @ inverse_root


def _module_outputs(model, ids, module) -> torch.Tensor:
    """What ``module`` returns in a plain forward of ``model`` over ``ids``, as float64 (tokens, features)."""
    out = forward_capturing(model, ids, {"outputs": (module, "output")})["outputs"]
    if out.ndim == 4:  # a per-head norm's output: (batch, tokens, heads, head_dim)
        out = out.flatten(-2)
    return out.reshape(-1, out.shape[-1]).double()


def _score_weights(model, ids, attention, emphasis: float):
    """Q and K output weights rebuilt from a plain forward: the other side's mean square where RoPE reads it
    (after the per-head norm, if any), averaged over each rotary pair (channel j with j + head_dim/2), summed over
    a group's query heads for a key; times the norm's mean gain; squared weights blended with their mean."""
    heads, kv_heads = model.config.num_attention_heads, model.config.num_key_value_heads
    head_dim = attention.head_dim
    raw = {name: _module_outputs(model, ids, getattr(attention, name)).square().mean(0) for name in ("q_proj", "k_proj")}
    normed = hasattr(attention, "q_norm")
    read = {name: _module_outputs(model, ids, getattr(attention, name)).square().mean(0)
            for name in ("q_norm", "k_norm")} if normed else {"q_norm": raw["q_proj"], "k_norm": raw["k_proj"]}

    def pair_mean(energy):
        halves = energy.reshape(-1, 2, head_dim // 2)
        return torch.cat([halves.mean(1), halves.mean(1)], dim=1)  # (heads, head_dim): [j | j + d/2]

    keys, queries = pair_mean(read["k_norm"]), pair_mean(read["q_norm"]).reshape(kv_heads, heads // kv_heads, head_dim)
    query_square = keys.repeat_interleave(heads // kv_heads, dim=0).reshape(-1)
    key_square = queries.sum(1).reshape(-1)
    if normed:
        query_square = query_square * read["q_norm"] / raw["q_proj"]
        key_square = key_square * read["k_norm"] / raw["k_proj"]
    return [(emphasis * square + (1 - emphasis) * square.mean()).sqrt() for square in (query_square, key_square)]


@pytest.mark.parametrize("family", ["llama_gqa", "llama_bias", "qwen3"])
@pytest.mark.parametrize("shrinkage, emphasis", [(0.0, 0.0), (0.5, 0.0), (1.0, 0.0), (0.5, 0.5), (1.0, 1.0)])
def test_query_and_key_are_the_best_low_rank_under_the_shrunk_second_moments(family, shrinkage, emphasis):
    ids = torch.randint(3, 128, (24, 32), generator=torch.Generator().manual_seed(1))
    recipe = OlicaConfig(ratio=0.3, num_samples=24, sequence_length=32, layer_allocation="uniform",
                         qk_covariance_shrinkage=shrinkage, qk_score_weighting=emphasis)
    pruned = prune_model(make_tiny_model(family), recipe, ids, progress=False).model
    dense = make_tiny_model(family)
    # Layer 0 reads the embeddings, so the dense model's own forward gives its statistics (layer 1's would need the
    # pruned stream through the dense layer; its Q/K inputs alone are checked there, unweighted).
    for layer_idx in (0, 1) if emphasis == 0 else (0,):
        attention, dense_attention = pruned.model.layers[layer_idx].self_attn, dense.model.layers[layer_idx].self_attn
        # The dense layer's projections read the pruned model's own stream: its q_proj input is the pruned model's.
        tokens = _projection_inputs(pruned, ids, attention.q_proj.down)
        weights = _score_weights(dense, ids, dense_attention, emphasis) if emphasis else (None, None)
        for name, output_weights in zip(("q_proj", "k_proj"), weights):
            factored = getattr(attention, name)
            if not hasattr(factored, "rank"):
                continue  # kept dense: factoring it would not save parameters
            expected = _best_low_rank(getattr(dense_attention, name).weight.detach(), tokens, factored.rank, shrinkage,
                                      output_weights)
            got = (factored.up.weight @ factored.down.weight).detach().double()
            torch.testing.assert_close(got, expected, rtol=2e-4, atol=2e-4 * float(expected.abs().max()))


def test_the_shrinkage_is_checked():
    for bad in (-0.1, 1.5, "half", None, float("nan")):
        with pytest.raises(OlicaConfigError, match="qk_covariance_shrinkage"):
            OlicaConfig(qk_covariance_shrinkage=bad)
    assert OlicaConfig().qk_covariance_shrinkage == 0.5


def test_the_score_weighting_is_checked():
    for bad in (-0.1, 1.5, "half", None, float("nan")):
        with pytest.raises(OlicaConfigError, match="qk_score_weighting"):
            OlicaConfig(qk_score_weighting=bad)
    assert OlicaConfig().qk_score_weighting == 0.25
