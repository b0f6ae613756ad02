"""The exact V/O decomposition (``value_decomposition="exact"``) against a brute-force SVD of the full product."""

from __future__ import annotations

import pytest
import torch

from optimum_olica import olica_math as om
from optimum_olica.configuration import OlicaConfig

from conftest import forward_capturing, make_tiny_model


def _random_attention(num_heads, num_kv_heads, head_dim, hidden, seed=0, bias=False):
    generator = torch.Generator().manual_seed(seed)
    v_weight = torch.randn(num_kv_heads * head_dim, hidden, generator=generator, dtype=torch.float64)
    o_weight = torch.randn(hidden, num_heads * head_dim, generator=generator, dtype=torch.float64)
    v_bias = torch.randn(num_kv_heads * head_dim, generator=generator, dtype=torch.float64) if bias else None
    # Second moments spread over three orders of magnitude, as real activations are.
    s_x = torch.rand(hidden, generator=generator, dtype=torch.float64).pow(6) + 1e-3
    s_out = torch.rand(hidden, generator=generator, dtype=torch.float64).pow(6) + 1e-3
    return v_weight, v_bias, o_weight, s_x, s_out


def _weighted_products(v_weight, o_weight, s_x, s_out, num_heads, num_kv_heads):
    """The (hidden, G * hidden) matrix D_x V_g^T [O_1^T D_out, ..., O_G^T D_out] of each group, formed in full."""
    hidden = v_weight.shape[1]
    group_size = num_heads // num_kv_heads
    value_dim = v_weight.shape[0] // num_kv_heads
    d_x, d_out = torch.diag(s_x.sqrt()), torch.diag(s_out.sqrt())
    products = []
    for group in range(num_kv_heads):
        v_group = v_weight[group * value_dim : (group + 1) * value_dim]  # (d, hidden)
        blocks = []
        for head in range(group * group_size, (group + 1) * group_size):
            o_head = o_weight[:, head * value_dim : (head + 1) * value_dim]  # (hidden, d)
            blocks.append(d_x @ v_group.T @ o_head.T @ d_out)  # (hidden, hidden)
        products.append(torch.cat(blocks, dim=1))
    return products


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 2), (4, 4), (6, 1)])
@pytest.mark.parametrize("value_dim", [1, 3, 6])
def test_exact_decomposition_is_the_truncated_svd_of_the_full_product(num_heads, num_kv_heads, value_dim):
    head_dim, hidden = 8, 24
    v_weight, _, o_weight, s_x, s_out = _random_attention(num_heads, num_kv_heads, head_dim, hidden)
    new_v, new_bias, new_o = om.exact_value_output_decomposition(
        v_weight, None, o_weight, s_x, s_out, num_heads, num_kv_heads, head_dim, value_dim
    )
    assert new_bias is None
    assert new_v.shape == (num_kv_heads * value_dim, hidden)
    assert new_o.shape == (hidden, num_heads * value_dim)
    dense = _weighted_products(v_weight, o_weight, s_x, s_out, num_heads, num_kv_heads)
    pruned = _weighted_products(new_v, new_o, s_x, s_out, num_heads, num_kv_heads)
    for full, approximation in zip(dense, pruned):
        u, singular, vh = torch.linalg.svd(full)  # the brute-force route: SVD of the (hidden, G*hidden) product
        best = u[:, :value_dim] * singular[:value_dim] @ vh[:value_dim]
        scale = float(full.norm())
        assert torch.allclose(approximation, best, atol=1e-9 * scale, rtol=0)
        # Eckart-Young: the error is exactly the energy of the dropped singular values.
        error = float((full - approximation).norm() ** 2)
        assert error == pytest.approx(float(singular[value_dim:].square().sum()), rel=1e-8, abs=1e-12 * scale**2)


def test_full_width_keeps_the_attention_function_bias_included():
    num_heads, num_kv_heads, head_dim, hidden = 4, 2, 8, 24
    v_weight, v_bias, o_weight, s_x, s_out = _random_attention(num_heads, num_kv_heads, head_dim, hidden, bias=True)
    new_v, new_bias, new_o = om.exact_value_output_decomposition(
        v_weight, v_bias, o_weight, s_x, s_out, num_heads, num_kv_heads, head_dim, head_dim
    )
    # Every head's value-to-output map O_i (V_g x + b_g) is unchanged when nothing is dropped.
    x = torch.randn(5, hidden, dtype=torch.float64)
    group_size = num_heads // num_kv_heads
    for head in range(num_heads):
        group = head // group_size
        rows, cols = slice(group * head_dim, (group + 1) * head_dim), slice(head * head_dim, (head + 1) * head_dim)
        before = (x @ v_weight[rows].T + v_bias[rows]) @ o_weight[:, cols].T
        after = (x @ new_v[rows].T + new_bias[rows]) @ new_o[:, cols].T
        assert torch.allclose(after, before, atol=1e-9 * float(before.abs().max()))


def test_exact_error_is_never_above_the_fast_decomposition():
    """The exact variant is the optimum of the weighted product error; the fast OND is an approximation of it."""
    num_heads, num_kv_heads, head_dim, hidden, value_dim = 6, 2, 8, 24, 4
    v_weight, _, o_weight, s_x, s_out = _random_attention(num_heads, num_kv_heads, head_dim, hidden, seed=3)
    exact_v, _, exact_o = om.exact_value_output_decomposition(
        v_weight, None, o_weight, s_x, s_out, num_heads, num_kv_heads, head_dim, value_dim
    )
    rotations = om.value_output_rotation(o_weight, s_out, num_heads, num_kv_heads, head_dim)
    rotated_v, _, rotated_o = om.rotate_value_output(v_weight, None, o_weight, rotations, num_heads, num_kv_heads,
                                                     head_dim)
    head_gram = torch.eye(head_dim, dtype=torch.float64).expand(num_heads, head_dim, head_dim)
    scores = om.value_neuron_scores(
        rotated_v, rotated_o, s_x, om.rotated_value_second_moment(head_gram, rotations, num_heads, num_kv_heads),
        num_heads, num_kv_heads, head_dim,
    )
    keep = om.keep_top_neurons(scores, value_dim)
    fast_v, _, fast_o = om.prune_value_output(rotated_v, None, rotated_o, keep, num_heads, num_kv_heads, head_dim)
    dense = _weighted_products(v_weight, o_weight, s_x, s_out, num_heads, num_kv_heads)
    exact = _weighted_products(exact_v, exact_o, s_x, s_out, num_heads, num_kv_heads)
    fast = _weighted_products(fast_v, fast_o, s_x, s_out, num_heads, num_kv_heads)
    exact_error = sum(float((d - e).norm() ** 2) for d, e in zip(dense, exact))
    fast_error = sum(float((d - f).norm() ** 2) for d, f in zip(dense, fast))
    assert exact_error < fast_error


def test_silent_channels_and_degenerate_rank_stay_finite():
    num_heads, num_kv_heads, head_dim, hidden = 4, 2, 8, 24
    v_weight, _, o_weight, s_x, s_out = _random_attention(num_heads, num_kv_heads, head_dim, hidden)
    s_x[:5] = 0.0  # channels the calibration data never excites
    v_weight[:head_dim] = v_weight[:1]  # group 0's values have rank 1: most singular values are zero
    new_v, _, new_o = om.exact_value_output_decomposition(
        v_weight, None, o_weight, s_x, s_out, num_heads, num_kv_heads, head_dim, 4
    )
    assert torch.isfinite(new_v).all() and torch.isfinite(new_o).all()
    dense = _weighted_products(v_weight, o_weight, s_x, s_out, num_heads, num_kv_heads)
    pruned = _weighted_products(new_v, new_o, s_x, s_out, num_heads, num_kv_heads)
    # Group 0 has rank 1, so 4 kept triplets reproduce its weighted product exactly.
    assert torch.allclose(pruned[0], dense[0], atol=1e-9 * float(dense[0].norm()))


def test_hidden_narrower_than_head_dim():
    num_heads, num_kv_heads, head_dim, hidden = 2, 1, 8, 4
    v_weight, _, o_weight, s_x, s_out = _random_attention(num_heads, num_kv_heads, head_dim, hidden)
    new_v, _, new_o = om.exact_value_output_decomposition(
        v_weight, None, o_weight, s_x, s_out, num_heads, num_kv_heads, head_dim, 3
    )
    full = _weighted_products(v_weight, o_weight, s_x, s_out, num_heads, num_kv_heads)[0]
    u, singular, vh = torch.linalg.svd(full)
    best = u[:, :3] * singular[:3] @ vh[:3]
    approximation = _weighted_products(new_v, new_o, s_x, s_out, num_heads, num_kv_heads)[0]
    assert torch.allclose(approximation, best, atol=1e-9 * float(full.norm()))


def test_bad_value_dim_is_refused():
    v_weight, _, o_weight, s_x, s_out = _random_attention(4, 2, 8, 24)
    with pytest.raises(ValueError, match="value_dim"):
        om.exact_value_output_decomposition(v_weight, None, o_weight, s_x, s_out, 4, 2, 8, 9)
    with pytest.raises(ValueError, match="value_dim"):
        om.exact_value_output_decomposition(v_weight, None, o_weight, s_x, s_out, 4, 2, 8, 0)


def test_config_option_is_validated_and_round_trips(tmp_path):
    assert OlicaConfig().value_decomposition == "whitened"
    config = OlicaConfig(value_decomposition="exact")
    config.save_pretrained(tmp_path)
    assert OlicaConfig.from_pretrained(tmp_path).value_decomposition == "exact"
    with pytest.raises(ValueError, match="value_decomposition"):
        OlicaConfig(value_decomposition="svd")


def _layer0_attention_second_moments(model, input_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """``s_x`` (mean square of q_proj's input) and ``s_out`` (of o_proj's output) of layer 0 over every calibration
    token, measured by this test's own hooks on the stock model."""
    attention = model.model.layers[0].self_attn
    seen = forward_capturing(model, input_ids, {"x": (attention.q_proj, "input"), "out": (attention.o_proj, "output")})
    hidden = model.config.hidden_size
    return tuple(seen[key].double().reshape(-1, hidden).square().mean(dim=0) for key in ("x", "out"))


@pytest.mark.parametrize("family", ["llama_gqa", "qwen2"])
def test_pipeline_exact_decomposition_is_the_optimum_on_the_calibration_statistics(family):
    """Layer 0 of the pruned model (V/O cut to half width, nothing else changed) against a brute-force truncated SVD
    of the dense layer's weighted V/O products, with statistics measured independently of the pipeline: "exact" is
    that optimum, and "fast" (the OND) cannot beat it."""
    from optimum_olica.pruner import prune_model

    calibration = torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    dense = make_tiny_model(family)
    heads, kv_heads = dense.config.num_attention_heads, dense.config.num_key_value_heads
    s_x, s_out = _layer0_attention_second_moments(dense, calibration)
    attention = dense.model.layers[0].self_attn
    dense_products = _weighted_products(
        attention.v_proj.weight.detach().double(), attention.o_proj.weight.detach().double(), s_x, s_out, heads,
        kv_heads,
    )
    recipe = dict(ratio=0.2, qk_ratio=0.0, vo_ratio=0.5, ffn_ratio=0.0, num_calibrated_layers=0, refit_damping=None)
    errors = {}
    for variant in ("fast", "exact"):
        config = OlicaConfig(**recipe, value_decomposition=variant)
        pruned = prune_model(make_tiny_model(family), config, calibration, progress=False).model
        pruned_attention = pruned.model.layers[0].self_attn
        value_dim = pruned_attention.value_head_dim
        assert value_dim == attention.head_dim // 2
        v_weight, o_weight = pruned_attention.v_proj.weight.detach(), pruned_attention.o_proj.weight.detach()
        products = _weighted_products(v_weight.double(), o_weight.double(), s_x, s_out, heads, kv_heads)
        errors[variant] = sum(float((full - kept).norm() ** 2) for full, kept in zip(dense_products, products))
        if variant == "exact":
            for full, kept in zip(dense_products, products):
                u, singular, vh = torch.linalg.svd(full)
                best = u[:, :value_dim] * singular[:value_dim] @ vh[:value_dim]
                torch.testing.assert_close(kept, best, atol=1e-5 * float(full.norm()), rtol=0)
            optimum = sum(float(torch.linalg.svdvals(full)[value_dim:].square().sum()) for full in dense_products)
            assert errors["exact"] == pytest.approx(optimum, rel=1e-4)
    print(f"{family}: weighted V/O error, exact {errors['exact']:.4g}, fast {errors['fast']:.4g}")
    assert errors["exact"] <= errors["fast"]
    assert pruned.config.olica_recipe["value_decomposition"] == "exact"


@pytest.mark.parametrize("family", ["llama_gqa", "qwen2"])
def test_pipeline_exact_at_full_width_keeps_the_model(family):
    """Nothing cut (all part ratios 0, no refit, no branch): the exact decomposition must leave the logits as they
    were, v_proj bias included (qwen2); a wrongly wired transform or bias would show here."""
    from optimum_olica.pruner import prune_model

    model = make_tiny_model(family)
    probe = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense_logits = model(input_ids=probe).logits
    config = OlicaConfig(ratio=0.2, qk_ratio=0.0, vo_ratio=0.0, ffn_ratio=0.0, value_decomposition="exact",
                         num_calibrated_layers=0, refit_damping=None)
    calibration = torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    result = prune_model(model, config, calibration, progress=False)
    with torch.no_grad():
        logits = result.model(input_ids=probe).logits
    assert torch.allclose(logits, dense_logits, atol=1e-4 * float(dense_logits.abs().max()))
