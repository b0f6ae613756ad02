"""value_decomposition="whitened": each KV group's value directions are those that keep the most of o_proj's output
under the second moments of o_proj's input. Checked against an eigendecomposition on explicit tokens, against
statistics measured by plain transformers forwards (never the pipeline's), and against the dense logits when nothing
is cut."""

from __future__ import annotations

import pytest
import torch
from conftest import forward_capturing, make_tiny_model

from optimum_olica import OlicaConfig, olica_math as om, prune_model
from optimum_olica.errors import OlicaConfigError

pytestmark = pytest.mark.usefixtures("single_thread")


def _shrunk(second: torch.Tensor, shrinkage: float) -> torch.Tensor:
    return (1 - shrinkage) * second + shrinkage * torch.diag(torch.diagonal(second))


def _output_error(v_new, o_new, v_weight, o_weight, head_moments, s_out, kv_heads, value_dim, shrinkage):
    """``sum_i tr(E_i^T M E_i)`` with ``E_i = (O_i^T - A B_i^T) D_out``: the group-weighted output error of a
    reduction, ``A`` recovered from the new values by least squares, ``M`` the group's shrunk mean moments."""
    heads, head_dim, _ = head_moments.shape
    group, hidden = heads // kv_heads, o_weight.shape[0]
    total = 0.0
    for g in range(kv_heads):
        rows = slice(g * head_dim, (g + 1) * head_dim)
        # new values = A^T V_g: A^T from the least-squares solve against the old values (V_g has full row rank).
        a_t = torch.linalg.lstsq(v_weight[rows].T, v_new[g * value_dim : (g + 1) * value_dim].T).solution.T
        metric = _shrunk(head_moments[g * group : (g + 1) * group].mean(dim=0), shrinkage)
        for head in range(g * group, (g + 1) * group):
            full = o_weight[:, head * head_dim : (head + 1) * head_dim].T
            kept = a_t.T @ o_new[:, head * value_dim : (head + 1) * value_dim].T
            error = (full - kept) * s_out.sqrt()
            total += float(torch.trace(error.T @ metric @ error))
    return total


def _optimum(o_weight, head_moments, s_out, kv_heads, value_dim, shrinkage):
    """Eckart-Young under the symmetric square root of each group's metric: the sum of the dropped squared singular
    values of ``M^(1/2) [O_1^T D_out, ...]``."""
    heads, head_dim, _ = head_moments.shape
    group = heads // kv_heads
    total = 0.0
    for g in range(kv_heads):
        values, vectors = torch.linalg.eigh(_shrunk(head_moments[g * group : (g + 1) * group].mean(dim=0), shrinkage))
        root = vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T
        stacked = torch.cat([o_weight[:, h * head_dim : (h + 1) * head_dim].T * s_out.sqrt()
                             for h in range(g * group, (g + 1) * group)], dim=1)
        total += float(torch.linalg.svdvals(root @ stacked)[value_dim:].square().sum())
    return total


@pytest.mark.parametrize("shrinkage", [0.0, 0.5, 1.0])
def test_reduction_reaches_the_eckart_young_bound_on_explicit_tokens(shrinkage):
    generator = torch.Generator().manual_seed(0)
    heads, kv_heads, head_dim, hidden, value_dim = 6, 2, 8, 20, 3
    v_weight = torch.randn(kv_heads * head_dim, hidden, generator=generator, dtype=torch.float64)
    v_bias = torch.randn(kv_heads * head_dim, generator=generator, dtype=torch.float64)
    o_weight = torch.randn(hidden, heads * head_dim, generator=generator, dtype=torch.float64)
    # Correlated per-head tokens, each head with its own mixing: the moments differ between the heads of a group.
    tokens = torch.randn(heads, 300, head_dim, generator=generator, dtype=torch.float64)
    mixing = torch.randn(heads, head_dim, head_dim, generator=generator, dtype=torch.float64)
    z = tokens @ mixing
    head_moments = z.transpose(1, 2) @ z / z.shape[1]
    s_out = torch.rand(hidden, generator=generator, dtype=torch.float64) + 0.1
    v_new, b_new, o_new = om.whitened_value_output(v_weight, v_bias, o_weight, head_moments, s_out, heads, kv_heads,
                                                   head_dim, value_dim, shrinkage)
    assert v_new.shape == (kv_heads * value_dim, hidden) and o_new.shape == (hidden, heads * value_dim)
    error = _output_error(v_new, o_new, v_weight, o_weight, head_moments, s_out, kv_heads, value_dim, shrinkage)
    assert error == pytest.approx(_optimum(o_weight, head_moments, s_out, kv_heads, value_dim, shrinkage), rel=1e-8)
    # The bias goes through the same map as the values.
    for g in range(kv_heads):
        rows = slice(g * head_dim, (g + 1) * head_dim)
        a_t = torch.linalg.lstsq(v_weight[rows].T, v_new[g * value_dim : (g + 1) * value_dim].T).solution.T
        torch.testing.assert_close(b_new[g * value_dim : (g + 1) * value_dim], a_t @ v_bias[rows])


def test_full_width_keeps_every_head_product_and_bad_shapes_are_refused():
    generator = torch.Generator().manual_seed(1)
    heads, kv_heads, head_dim, hidden = 4, 2, 6, 10
    v_weight = torch.randn(kv_heads * head_dim, hidden, generator=generator, dtype=torch.float64)
    o_weight = torch.randn(hidden, heads * head_dim, generator=generator, dtype=torch.float64)
    z = torch.randn(heads, 50, head_dim, generator=generator, dtype=torch.float64)
    moments, s_out = z.transpose(1, 2) @ z / 50, torch.rand(hidden, generator=generator, dtype=torch.float64)
    v_new, _, o_new = om.whitened_value_output(v_weight, None, o_weight, moments, s_out, heads, kv_heads, head_dim,
                                               head_dim, 0.0)
    for head in range(heads):
        g = head // (heads // kv_heads)
        rows, columns = slice(g * head_dim, (g + 1) * head_dim), slice(head * head_dim, (head + 1) * head_dim)
        torch.testing.assert_close(o_new[:, columns] @ v_new[rows], o_weight[:, columns] @ v_weight[rows])
    with pytest.raises(ValueError, match="value_dim"):
        om.whitened_value_output(v_weight, None, o_weight, moments, s_out, heads, kv_heads, head_dim, head_dim + 1, 0)
    with pytest.raises(ValueError, match="head_second_moments"):
        om.whitened_value_output(v_weight, None, o_weight, moments[:2], s_out, heads, kv_heads, head_dim, 2, 0)


def _layer0_moments(model, ids):
    """``E[z_i z_i^T]`` per head of layer 0's o_proj input and the mean square of its output, from a plain forward
    of the stock model (layer 0 reads the embeddings, the same for the dense and the pruned model)."""
    attention = model.model.layers[0].self_attn
    seen = forward_capturing(model, ids, {"z": (attention.o_proj, "input"), "out": (attention.o_proj, "output")})
    heads, head_dim = model.config.num_attention_heads, attention.head_dim
    z = seen["z"].double().reshape(-1, heads, head_dim).transpose(0, 1)
    return z.transpose(1, 2) @ z / z.shape[1], seen["out"].double().reshape(-1, model.config.hidden_size).square().mean(0)


@pytest.mark.parametrize("family", ["llama_gqa", "qwen2", "qwen3"])
def test_pipeline_reduction_is_the_optimum_on_statistics_of_a_plain_forward(family):
    """Layer 0 of the pruned model (V/O at half width, nothing else cut, no refit) reaches the bound computed from a
    plain transformers forward of the dense model; the paper's fast OND does not beat it."""
    ids = torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    dense = make_tiny_model(family)
    heads, kv_heads = dense.config.num_attention_heads, dense.config.num_key_value_heads
    moments, s_out = _layer0_moments(dense, ids)
    attention = dense.model.layers[0].self_attn
    v_weight, o_weight = attention.v_proj.weight.detach().double(), attention.o_proj.weight.detach().double()
    recipe = dict(ratio=0.2, qk_ratio=0.0, vo_ratio=0.5, ffn_ratio=0.0, refit_damping=None)
    errors = {}
    for variant in ("whitened", "fast"):
        pruned = prune_model(make_tiny_model(family), OlicaConfig(**recipe, value_decomposition=variant), ids,
                             progress=False).model
        layer = pruned.model.layers[0].self_attn
        value_dim = layer.value_head_dim
        assert value_dim == attention.head_dim // 2
        errors[variant] = _output_error(layer.v_proj.weight.detach().double(), layer.o_proj.weight.detach().double(),
                                        v_weight, o_weight, moments, s_out, kv_heads, value_dim, 0.5)
    optimum = _optimum(o_weight, moments, s_out, kv_heads, attention.head_dim // 2, 0.5)
    assert errors["whitened"] == pytest.approx(optimum, rel=1e-4)
    assert errors["whitened"] <= errors["fast"] * (1 + 1e-9)
    assert heads % kv_heads == 0


@pytest.mark.parametrize("family", ["llama_bias", "qwen2"])
def test_full_width_keeps_the_logits(family):
    """Nothing cut (all part ratios 0, no refit): the whitened map is invertible at full width, so the logits stay
    those of the dense model, v_proj bias included."""
    model = make_tiny_model(family)
    probe = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense_logits = model(input_ids=probe).logits
    config = OlicaConfig(ratio=0.2, qk_ratio=0.0, vo_ratio=0.0, ffn_ratio=0.0, refit_damping=None)
    assert config.value_decomposition == "whitened"
    calibration = torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    result = prune_model(model, config, calibration, progress=False)
    with torch.no_grad():
        logits = result.model(input_ids=probe).logits
    assert torch.allclose(logits, dense_logits, atol=1e-4 * float(dense_logits.abs().max()))


def test_the_shrinkage_is_checked():
    for bad in (-0.1, 1.5, "half", None, float("nan")):
        with pytest.raises(OlicaConfigError, match="value_covariance_shrinkage"):
            OlicaConfig(value_covariance_shrinkage=bad)
    assert OlicaConfig().value_covariance_shrinkage == 0.5
