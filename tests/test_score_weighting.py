"""The pure functions behind qk_score_weighting, against brute force: transformers' own RoPE over angles that cover
the circle for the rotary pair mean, explicit score errors for the weights, and an eigendecomposition route and
perturbations for the output-weighted low rank."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from optimum_olica import olica_math as om


def _rotated(vectors: torch.Tensor, angles: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``vectors`` `(tokens, heads, head_dim)` turned by transformers' RoPE at every position ``m``, pair ``p`` by
    ``angles[m] * (p + 1)``: `(tokens, heads, positions, head_dim)`."""
    frequencies = torch.arange(1, head_dim // 2 + 1, dtype=torch.float64)
    phase = angles[:, None] * frequencies[None, :]  # (positions, head_dim / 2)
    cos, sin = torch.cat([phase.cos(), phase.cos()], -1)[None], torch.cat([phase.sin(), phase.sin()], -1)[None]
    spread = vectors[:, :, None, :].expand(-1, -1, len(angles), -1)  # (batch=tokens, heads, seq=positions, d)
    turned, _ = apply_rotary_pos_emb(spread, spread, cos, sin)
    return turned


def test_rotary_pair_mean_is_the_mean_square_over_positions_whose_angles_cover_the_circle():
    generator = torch.Generator().manual_seed(0)
    heads, head_dim = 3, 8
    vectors = torch.randn(50, heads, head_dim, generator=generator, dtype=torch.float64)
    vectors *= torch.rand(heads, head_dim, generator=generator, dtype=torch.float64) * 3  # unequal channels
    angles = 2 * math.pi * torch.arange(11, dtype=torch.float64) / 11  # every pair's angles: 11 evenly spaced
    brute = _rotated(vectors, angles, head_dim).square().mean(dim=(0, 2)).reshape(-1)
    moment = vectors.square().mean(dim=0).reshape(-1)
    torch.testing.assert_close(om.rotary_pair_mean(moment, head_dim), brute)
    assert not torch.allclose(moment, brute)  # the pairing matters


def test_score_weights_are_the_mean_squared_score_error_per_unit_error():
    """With emphasis 1, a unit error in query channel j of head h changes the score q.R k by (R k)_j: its mean square
    over keys and positions is weight^2; a unit key error meets every query head of its group."""
    generator = torch.Generator().manual_seed(1)
    heads, kv_heads, head_dim, tokens = 4, 2, 6, 40
    queries = torch.randn(tokens, heads, head_dim, generator=generator, dtype=torch.float64) * torch.rand(
        heads, head_dim, generator=generator, dtype=torch.float64)
    keys = torch.randn(tokens, kv_heads, head_dim, generator=generator, dtype=torch.float64) * torch.rand(
        kv_heads, head_dim, generator=generator, dtype=torch.float64)
    angles = 2 * math.pi * torch.arange(7, dtype=torch.float64) / 7
    query_weights, key_weights = om.attention_score_weights(
        queries.square().mean(0).reshape(-1), keys.square().mean(0).reshape(-1), heads, kv_heads, head_dim, 1.0)
    # Relative rotations act like absolute ones here: each pair's angles cover the circle either way.
    turned_keys = _rotated(keys, angles, head_dim).square().mean(dim=(0, 2))  # (kv_heads, head_dim)
    turned_queries = _rotated(queries, angles, head_dim).square().mean(dim=(0, 2))  # (heads, head_dim)
    group = heads // kv_heads
    torch.testing.assert_close(query_weights.square(), turned_keys.repeat_interleave(group, 0).reshape(-1))
    torch.testing.assert_close(key_weights.square(), turned_queries.reshape(kv_heads, group, -1).sum(1).reshape(-1))
    half = om.attention_score_weights(queries.square().mean(0).reshape(-1), keys.square().mean(0).reshape(-1),
                                      heads, kv_heads, head_dim, 0.5)[0]
    torch.testing.assert_close(half.square(), 0.5 * query_weights.square() + 0.5 * query_weights.square().mean())
    flat = om.attention_score_weights(queries.square().mean(0).reshape(-1), keys.square().mean(0).reshape(-1),
                                      heads, kv_heads, head_dim, 0.0)[0]
    assert torch.allclose(flat, flat[0].expand_as(flat))
    with pytest.raises(ValueError, match="emphasis"):
        om.attention_score_weights(flat, key_weights, heads, kv_heads, head_dim, 1.5)


@pytest.mark.parametrize("whitened", [True, False])
def test_output_weighted_low_rank_is_optimal(whitened):
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(12, 9, generator=generator, dtype=torch.float64)
    inputs = torch.randn(300, 9, generator=generator, dtype=torch.float64) @ torch.randn(9, 9, generator=generator,
                                                                                           dtype=torch.float64)
    outputs = torch.rand(12, generator=generator, dtype=torch.float64)
    outputs[3] = 0.0  # an output nobody reads
    if whitened:
        second = inputs.T @ inputs / inputs.shape[0]
        down, up = om.whitened_low_rank(weight, om.whitening_factor(second), 4, outputs)
    else:
        second = torch.diag(inputs.square().mean(0))
        down, up = om.activation_weighted_low_rank(weight, torch.diagonal(second), 4, outputs)
    values, vectors = torch.linalg.eigh(second)
    root = vectors @ torch.diag(values.sqrt()) @ vectors.T

    def error(candidate):
        return float((outputs[:, None] * (weight - candidate) @ root).square().sum())

    u, singular, vh = torch.linalg.svd(outputs[:, None] * weight @ root)
    assert error(up @ down) == pytest.approx(float(singular[4:].square().sum()), rel=1e-9)
    for _ in range(20):
        nudged = (up + 1e-3 * torch.randn(up.shape, generator=generator, dtype=torch.float64)) @ down
        assert error(nudged) >= error(up @ down)
    assert torch.isfinite(up).all() and torch.isfinite(down).all()
    with pytest.raises(ValueError, match="output_weights"):
        om.whitened_low_rank(weight, om.whitening_factor(torch.eye(9, dtype=torch.float64)), 4, -outputs)
