"""Tests of optimum_olica.olica_math against dense or brute-force references on small float64 problems."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from optimum_olica.olica_math import (
    LinearCalibrationFit,
    StreamingMoments,
    activation_weighted_low_rank,
    ffn_neuron_scores,
    fit_linear_calibration,
    keep_top_neurons,
    low_rank_saves_parameters,
    prune_ffn,
    prune_value_output,
    choose_refit_damping,
    refit_output_projection,
    ridge_least_squares,
    rotate_value_output,
    rotated_value_second_moment,
    shrink_to_diagonal,
    value_neuron_scores,
    value_output_rotation,
    whitened_low_rank,
    whitening_factor,
)
from optimum_olica.olica_math import _channel_correlations

F64 = torch.float64
# Attention geometry of the tiny GQA tests: 4 query heads in 2 KV groups.
HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 12, 4, 2, 4


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed: int = 0, generator=None) -> torch.Tensor:
    return torch.randn(*shape, generator=generator or gen(seed), dtype=F64)


# ----------------------------------------------------------------------------------------------------- statistics


BATCH_PRODUCT_TOLERANCE = {"rtol": 1e-6, "atol": 1e-6}


def test_streaming_moments_match_direct_computation_with_mask_and_low_precision():
    g = gen(1)
    x1, t1 = randn(2, 5, 6, generator=g), randn(2, 5, 3, generator=g)
    x2, t2 = randn(7, 6, generator=g), randn(7, 3, generator=g)
    mask1 = torch.rand(2, 5, generator=g) > 0.3
    moments = StreamingMoments(6, gram=True, target_dim=3)
    moments.update(x1.to(torch.bfloat16), t1.to(torch.bfloat16), mask=mask1)
    moments.update(x2, t2)
    x = torch.cat([x1.to(torch.bfloat16).double()[mask1], x2])
    t = torch.cat([t1.to(torch.bfloat16).double()[mask1], t2])
    assert moments.count == x.shape[0]
    # Non-float64 batches are multiplied in float32 (then accumulated in float64): float32 rounding per batch.
    torch.testing.assert_close(moments.mean, x.mean(0), **BATCH_PRODUCT_TOLERANCE)
    torch.testing.assert_close(moments.second_moment, x.square().mean(0), **BATCH_PRODUCT_TOLERANCE)
    torch.testing.assert_close(moments.gram, x.T @ x, **BATCH_PRODUCT_TOLERANCE)
    torch.testing.assert_close(moments.cross, x.T @ t, **BATCH_PRODUCT_TOLERANCE)
    torch.testing.assert_close(moments.target_mean, t.mean(0), **BATCH_PRODUCT_TOLERANCE)
    torch.testing.assert_close(moments.target_second_moment, t.square().mean(0), **BATCH_PRODUCT_TOLERANCE)
    torch.testing.assert_close(moments.target_sum_squares, t.square().sum(0), **BATCH_PRODUCT_TOLERANCE)
    assert moments.mean.dtype == F64


def test_absorb_gives_the_sums_of_both_folds_and_empties_the_other():
    g = gen(11)
    x, t = randn(9, 5, generator=g).double(), randn(9, 2, generator=g).double()
    whole, first, second = (StreamingMoments(5, gram=True, target_dim=2) for _ in range(3))
    whole.update(x, t)
    first.update(x[:4], t[:4])
    second.update(x[4:], t[4:])
    first.absorb(second)
    assert first.count == 9 and second.count == 0
    torch.testing.assert_close(first.gram, x.T @ x)
    torch.testing.assert_close(first.cross, x.T @ t)
    torch.testing.assert_close(first.target_sum_squares, whole.target_sum_squares)
    with pytest.raises(RuntimeError):
        second.gram  # emptied: its memory is released
    empty = StreamingMoments(5, gram=True, target_dim=2)
    empty.absorb(first)
    assert empty.count == 9 and first.count == 0
    with pytest.raises(ValueError, match="same dim"):
        empty.absorb(StreamingMoments(4))


def test_streaming_moments_errors():
    moments = StreamingMoments(3)
    with pytest.raises(RuntimeError, match="no token"):
        moments.mean
    bad = torch.ones(4, 3)
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite activations"):
        moments.update(bad)
    assert moments.count == 0
    # A non-finite padding token that the mask drops is fine.
    moments.update(bad, mask=torch.tensor([True, True, False, True]))
    assert moments.count == 3
    with pytest.raises(RuntimeError, match="gram=True"):
        moments.gram
    with pytest.raises(ValueError, match="`x`"):
        moments.update(torch.ones(2, 4))
    with pytest.raises(ValueError, match="`target`"):
        moments.update(torch.ones(2, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="`mask`"):
        moments.update(torch.ones(2, 3), mask=torch.ones(2))
    with pytest.raises(ValueError, match="`dim`"):
        StreamingMoments(0)
    with_target = StreamingMoments(3, target_dim=2)
    with pytest.raises(ValueError, match="non-finite"):
        with_target.update(torch.ones(2, 3), torch.tensor([[1.0, float("inf")], [0.0, 0.0]]))


# ----------------------------------------------------------------------------------------------- §1a low rank


def test_low_rank_saves_parameters():
    assert low_rank_saves_parameters(576, 576, 287)
    assert not low_rank_saves_parameters(576, 576, 288)
    assert not low_rank_saves_parameters(576, 192, 150)  # GQA k_proj: 150 * 768 > 576 * 192
    with pytest.raises(ValueError, match="`rank`"):
        low_rank_saves_parameters(4, 4, -1)


def weighted_error(weight, approx, second_moment):
    return ((weight - approx) * second_moment.sqrt()).norm().item()


def test_activation_weighted_low_rank_is_the_weighted_eckart_young_optimum():
    weight = randn(7, 9, seed=2).float().double()  # exactly representable: the float32 call sees the same matrix
    second_moment = torch.rand(9, generator=gen(3), dtype=F64) * torch.logspace(-3, 3, 9, dtype=F64)
    scale = second_moment.sqrt()
    rank = 3
    down, up = activation_weighted_low_rank(weight.float(), second_moment, rank)
    assert down.shape == (rank, 9) and up.shape == (7, rank) and down.dtype == F64
    # Independent optimum: project W D on the top-r eigenvectors of (W D)(W D)^T.
    weighted = weight * scale
    _, eigenvectors = torch.linalg.eigh(weighted @ weighted.T)
    top = eigenvectors[:, -rank:]
    best = top @ top.T @ weighted
    torch.testing.assert_close((up @ down) * scale, best, rtol=1e-9, atol=1e-9)

    error = weighted_error(weight, up @ down, second_moment)
    u, s, vh = torch.linalg.svd(weight)
    plain = (u[:, :rank] * s[:rank]) @ vh[:rank]
    assert error < weighted_error(weight, plain, second_moment) - 1e-9
    g = gen(4)
    for _ in range(20):
        candidate = randn(7, rank, generator=g) @ randn(rank, 9, generator=g)
        assert error <= weighted_error(weight, candidate, second_moment)


def test_activation_weighted_low_rank_full_rank_and_zero_channels():
    weight = randn(5, 6, seed=5)
    second_moment = torch.rand(6, generator=gen(6), dtype=F64) + 0.1
    down, up = activation_weighted_low_rank(weight, second_moment, 5)
    torch.testing.assert_close(up @ down, weight, rtol=1e-10, atol=1e-10)

    # Silent and denormal channels: finite factors, still optimal on the channels that carry weight.
    second_moment[1] = 0.0
    second_moment[4] = 1e-310
    down, up = activation_weighted_low_rank(weight, second_moment, 2)
    assert torch.isfinite(down).all() and torch.isfinite(up).all()
    live = torch.tensor([0, 2, 3, 5])
    live_down, live_up = activation_weighted_low_rank(weight[:, live], second_moment[live], 2)
    optimum = weighted_error(weight[:, live], live_up @ live_down, second_moment[live])
    assert weighted_error(weight, up @ down, second_moment) <= optimum + 1e-6

    down, up = activation_weighted_low_rank(weight, torch.zeros(6, dtype=F64), 5)
    torch.testing.assert_close(up @ down, weight, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="`rank`"):
        activation_weighted_low_rank(weight, second_moment, 6)
    with pytest.raises(ValueError, match="`second_moment`"):
        activation_weighted_low_rank(weight, -second_moment, 2)
    with pytest.raises(ValueError, match="`second_moment`"):
        activation_weighted_low_rank(weight, second_moment[:5], 2)


def correlated_tokens(count: int, dim: int, seed: int) -> torch.Tensor:
    """Tokens with strongly correlated channels of very different scales, like a layer's normalised input."""
    g = gen(seed)
    mixing = randn(dim, dim, generator=g) * torch.logspace(-1, 1, dim, dtype=F64)
    return randn(count, dim, generator=g) @ mixing


def covariance_weighted_low_rank(weight, second_moments, rank):
    return whitened_low_rank(weight, whitening_factor(second_moments), rank)


def test_covariance_weighted_low_rank_is_the_best_output_on_the_tokens():
    tokens = correlated_tokens(400, 9, seed=7)
    weight = randn(7, 9, seed=8)
    rank = 3
    down, up = covariance_weighted_low_rank(weight.float(), tokens.T @ tokens / 400, rank)
    assert down.shape == (rank, 9) and up.shape == (7, rank) and down.dtype == F64
    # Independent optimum: the best rank-r approximation of the outputs W X^T lies in their top-r left singular
    # space, and is reached by a weight (the outputs' row space is X's when X has full column rank).
    outputs = weight.float().double() @ tokens.T
    u, _, _ = torch.linalg.svd(outputs, full_matrices=False)
    best = u[:, :rank] @ u[:, :rank].T @ outputs
    torch.testing.assert_close(up @ down @ tokens.T, best, rtol=1e-8, atol=1e-8)
    # ... which the diagonal weighting of §1a does not reach on correlated channels.
    diagonal_down, diagonal_up = activation_weighted_low_rank(weight, tokens.square().mean(dim=0), rank)
    error = (outputs - up @ down @ tokens.T).norm()
    assert error < (outputs - diagonal_up @ diagonal_down @ tokens.T).norm() * 0.95


def test_covariance_weighted_low_rank_on_a_diagonal_matrix_is_the_activation_weighted_one():
    weight = randn(6, 8, seed=9)
    second_moment = torch.rand(8, generator=gen(10), dtype=F64) * torch.logspace(-2, 2, 8, dtype=F64)
    down, up = covariance_weighted_low_rank(weight, torch.diag(second_moment), 3)
    reference_down, reference_up = activation_weighted_low_rank(weight, second_moment, 3)
    torch.testing.assert_close(up @ down, reference_up @ reference_down, rtol=1e-8, atol=1e-8)


def test_covariance_weighted_low_rank_singular_and_bad_matrices():
    weight = randn(5, 6, seed=11)
    # Fewer tokens than channels, and a silent channel: C is singular; the factors stay finite and optimal on the
    # tokens (their outputs are reproduced as well as rank 2 allows).
    tokens = correlated_tokens(4, 6, seed=12)
    tokens[:, 2] = 0.0
    down, up = covariance_weighted_low_rank(weight, tokens.T @ tokens / 4, 2)
    assert torch.isfinite(down).all() and torch.isfinite(up).all()
    outputs = weight @ tokens.T
    singular = torch.linalg.svdvals(outputs)
    torch.testing.assert_close((outputs - up @ down @ tokens.T).norm(), singular[2:].norm(), rtol=1e-5, atol=1e-6)
    # An all-zero C: the plain truncated SVD.
    down, up = covariance_weighted_low_rank(weight, torch.zeros(6, 6, dtype=F64), 5)
    torch.testing.assert_close(up @ down, weight, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="positive semi-definite"):
        covariance_weighted_low_rank(weight, torch.full((6, 6), 2.0, dtype=F64) - torch.eye(6, dtype=F64), 2)
    with pytest.raises(ValueError, match="positive semi-definite"):
        covariance_weighted_low_rank(weight, -torch.eye(6, dtype=F64), 2)
    with pytest.raises(ValueError, match="`whitening`"):
        covariance_weighted_low_rank(weight, torch.eye(5, dtype=F64), 2)
    with pytest.raises(ValueError, match="square"):
        whitening_factor(torch.eye(6, dtype=F64)[:, :5])
    with pytest.raises(ValueError, match="finite"):
        covariance_weighted_low_rank(weight, torch.full((6, 6), float("nan"), dtype=F64), 2)
    with pytest.raises(ValueError, match="`rank`"):
        covariance_weighted_low_rank(weight, torch.eye(6, dtype=F64), 6)


def test_shrink_to_diagonal():
    tokens = correlated_tokens(50, 5, seed=13)
    matrix = tokens.T @ tokens / 50
    torch.testing.assert_close(shrink_to_diagonal(matrix, 0.0), matrix)
    torch.testing.assert_close(shrink_to_diagonal(matrix, 1.0), torch.diag(torch.diagonal(matrix)))
    half = shrink_to_diagonal(matrix.float(), 0.5)
    assert half.dtype == F64
    off_diagonal = ~torch.eye(5, dtype=torch.bool)
    torch.testing.assert_close(half[off_diagonal], matrix.float().double()[off_diagonal] / 2)
    torch.testing.assert_close(torch.diagonal(half), torch.diagonal(matrix.float().double()))
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="`shrinkage`"):
            shrink_to_diagonal(matrix, bad)
    with pytest.raises(ValueError, match="square"):
        shrink_to_diagonal(matrix[:, :4], 0.5)


# ------------------------------------------------------------------------------------------------- §1b V/O


def attention(x, q_w, k_w, v_w, v_b, o_w, num_heads, num_kv_heads, qk_dim, v_dim):
    """Plain causal GQA attention; query head i reads KV group i // (num_heads // num_kv_heads)."""
    batch, seq, _ = x.shape
    group_size = num_heads // num_kv_heads
    q = (x @ q_w.T).reshape(batch, seq, num_heads, qk_dim).transpose(1, 2)
    k = (x @ k_w.T).reshape(batch, seq, num_kv_heads, qk_dim).transpose(1, 2)
    v = x @ v_w.T + (0 if v_b is None else v_b)
    v = v.reshape(batch, seq, num_kv_heads, v_dim).transpose(1, 2)
    k, v = k.repeat_interleave(group_size, dim=1), v.repeat_interleave(group_size, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(qk_dim)
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
    z = (probs @ v).transpose(1, 2).reshape(batch, seq, num_heads * v_dim)
    return z @ o_w.T, z


def attention_weights(seed: int, bias: bool):
    g = gen(seed)
    q_w = randn(HEADS * HEAD_DIM, HIDDEN, generator=g)
    k_w = randn(KV_HEADS * HEAD_DIM, HIDDEN, generator=g)
    v_w = randn(KV_HEADS * HEAD_DIM, HIDDEN, generator=g)
    v_b = randn(KV_HEADS * HEAD_DIM, generator=g) if bias else None
    o_w = randn(HIDDEN, HEADS * HEAD_DIM, generator=g)
    return q_w, k_w, v_w, v_b, o_w, randn(2, 5, HIDDEN, generator=g)


def test_value_output_rotation_is_orthogonal_and_matches_stacked_svd():
    o_w = randn(HIDDEN, HEADS * HEAD_DIM, seed=7)
    out_moment = torch.rand(HIDDEN, generator=gen(8), dtype=F64) * 10
    rotations = value_output_rotation(o_w, out_moment, HEADS, KV_HEADS, HEAD_DIM)
    assert rotations.shape == (KV_HEADS, HEAD_DIM, HEAD_DIM)
    eye = torch.eye(HEAD_DIM, dtype=F64).expand(KV_HEADS, -1, -1)
    torch.testing.assert_close(rotations.transpose(1, 2) @ rotations, eye, rtol=0, atol=1e-12)
    group_size = HEADS // KV_HEADS
    for group in range(KV_HEADS):
        blocks = []
        for head in range(group * group_size, (group + 1) * group_size):
            o_i = o_w[:, head * HEAD_DIM : (head + 1) * HEAD_DIM]
            blocks.append(o_i.T * out_moment.sqrt())
        stacked = torch.cat(blocks, dim=1)  # (d_h, G*hidden)
        # Column j of Q_g is the j-th singular direction: its energy in the stacked matrix is sigma_j (descending).
        energies = (rotations[group].T @ stacked).norm(dim=1)
        torch.testing.assert_close(energies, torch.linalg.svdvals(stacked), rtol=1e-10, atol=1e-10)
    # More rows than the stacked matrix has columns: still a square orthogonal Q.
    tiny = value_output_rotation(randn(2, 8, seed=9), torch.ones(2, dtype=F64), 2, 2, 4)
    torch.testing.assert_close(tiny[0].T @ tiny[0], torch.eye(4, dtype=F64), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="`num_heads`"):
        value_output_rotation(o_w, out_moment, 3, 2, HEAD_DIM)


@pytest.mark.parametrize("bias", [False, True])
def test_rotate_value_output_preserves_attention(bias):
    q_w, k_w, v_w, v_b, o_w, x = attention_weights(10, bias)
    out_moment = torch.rand(HIDDEN, generator=gen(11), dtype=F64)
    rotations = value_output_rotation(o_w, out_moment, HEADS, KV_HEADS, HEAD_DIM)
    new_v, new_b, new_o = rotate_value_output(v_w, v_b, o_w, rotations, HEADS, KV_HEADS, HEAD_DIM)
    assert (new_b is None) == (not bias)
    before, _ = attention(x, q_w, k_w, v_w, v_b, o_w, HEADS, KV_HEADS, HEAD_DIM, HEAD_DIM)
    after, _ = attention(x, q_w, k_w, new_v, new_b, new_o, HEADS, KV_HEADS, HEAD_DIM, HEAD_DIM)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    assert not torch.allclose(new_v, v_w)


def test_rotated_value_second_moment_matches_rotated_samples():
    g = gen(12)
    z = randn(300, HEADS * HEAD_DIM, generator=g) @ randn(HEADS * HEAD_DIM, HEADS * HEAD_DIM, generator=g)
    rotations = torch.linalg.qr(randn(KV_HEADS, HEAD_DIM, HEAD_DIM, generator=g)).Q
    heads = z.reshape(300, HEADS, HEAD_DIM)
    head_gram = torch.einsum("nha,nhb->hab", heads, heads) / 300
    expected = torch.stack(
        [(heads[:, i] @ rotations[i // (HEADS // KV_HEADS)]).square().mean(0) for i in range(HEADS)]
    )
    result = rotated_value_second_moment(head_gram, rotations, HEADS, KV_HEADS)
    torch.testing.assert_close(result, expected, rtol=1e-10, atol=1e-10)


def test_value_neuron_scores_match_loop():
    _, _, v_w, _, o_w, _ = attention_weights(13, False)
    s_x = torch.rand(HIDDEN, generator=gen(14), dtype=F64)
    s_o = torch.rand(HEADS, HEAD_DIM, generator=gen(15), dtype=F64)
    scores = value_neuron_scores(v_w, o_w, s_x, s_o, HEADS, KV_HEADS, HEAD_DIM)
    group_size = HEADS // KV_HEADS
    expected = torch.zeros(KV_HEADS, HEAD_DIM, dtype=F64)
    for group in range(KV_HEADS):
        for j in range(HEAD_DIM):
            total = (v_w[group * HEAD_DIM + j] * s_x.sqrt()).norm()
            for head in range(group * group_size, (group + 1) * group_size):
                total += s_o[head, j].sqrt() * o_w[:, head * HEAD_DIM + j].norm()
            expected[group, j] = total
    torch.testing.assert_close(scores, expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="`value_second_moment`"):
        value_neuron_scores(v_w, o_w, s_x, s_o[:, :2], HEADS, KV_HEADS, HEAD_DIM)


def test_keep_top_neurons():
    scores = torch.tensor([0.5, 2.0, 1.0, 2.0, 0.1])
    assert keep_top_neurons(scores, 2).tolist() == [1, 3]
    assert keep_top_neurons(scores, 3).tolist() == [1, 2, 3]
    ties = torch.tensor([[1.0, 1.0, 1.0, 0.0], [3.0, 0.0, 3.0, 3.0]])
    kept = keep_top_neurons(ties, 2)
    assert kept.dtype == torch.int64 and kept.tolist() == [[0, 1], [0, 2]]
    with pytest.raises(ValueError, match="`num_keep`"):
        keep_top_neurons(scores, 6)
    with pytest.raises(ValueError, match="`num_keep`"):
        keep_top_neurons(scores, 0)
    with pytest.raises(ValueError, match="`scores`"):
        keep_top_neurons(torch.ones(2, 2, 2), 1)


@pytest.mark.parametrize("bias", [False, True])
def test_prune_value_output(bias):
    q_w, k_w, v_w, v_b, o_w, x = attention_weights(16, bias)
    everything = torch.arange(HEAD_DIM).expand(KV_HEADS, -1)
    same = prune_value_output(v_w, v_b, o_w, everything, HEADS, KV_HEADS, HEAD_DIM)
    for got, want in zip(same, (v_w, v_b, o_w)):
        assert (got is None and want is None) or torch.equal(got, want)

    keep = torch.tensor([[0, 2, 3], [1, 2, 3]])
    p_v, p_b, p_o = prune_value_output(v_w, v_b, o_w, keep, HEADS, KV_HEADS, HEAD_DIM)
    assert p_v.shape == (KV_HEADS * 3, HIDDEN) and p_o.shape == (HIDDEN, HEADS * 3)
    pruned, _ = attention(x, q_w, k_w, p_v, p_b, p_o, HEADS, KV_HEADS, HEAD_DIM, 3)
    dropped = torch.ones(KV_HEADS, HEAD_DIM, dtype=torch.bool)
    dropped[torch.arange(KV_HEADS)[:, None], keep] = False
    zeroed_v = v_w.clone()
    zeroed_v[dropped.reshape(-1)] = 0
    zeroed_b = None if v_b is None else v_b.masked_fill(dropped.reshape(-1), 0)
    reference, _ = attention(x, q_w, k_w, zeroed_v, zeroed_b, o_w, HEADS, KV_HEADS, HEAD_DIM, HEAD_DIM)
    torch.testing.assert_close(pruned, reference, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="`keep`"):
        prune_value_output(v_w, v_b, o_w, torch.tensor([[0, 0], [1, 2]]), HEADS, KV_HEADS, HEAD_DIM)
    with pytest.raises(ValueError, match="`keep`"):
        prune_value_output(v_w, v_b, o_w, torch.tensor([[0, 4], [1, 2]]), HEADS, KV_HEADS, HEAD_DIM)


def test_full_ond_pipeline_keeps_the_function_then_prunes_the_least_important():
    """Rotation, rotated moments, scores and pruning compose: pruning by score beats pruning the top channels."""
    q_w, k_w, v_w, v_b, o_w, x = attention_weights(17, True)
    dense, z = attention(x, q_w, k_w, v_w, v_b, o_w, HEADS, KV_HEADS, HEAD_DIM, HEAD_DIM)
    rotations = value_output_rotation(o_w, dense.reshape(-1, HIDDEN).square().mean(0), HEADS, KV_HEADS, HEAD_DIM)
    heads = z.reshape(-1, HEADS, HEAD_DIM)
    head_gram = torch.einsum("nha,nhb->hab", heads, heads) / heads.shape[0]
    s_o = rotated_value_second_moment(head_gram, rotations, HEADS, KV_HEADS)
    r_v, r_b, r_o = rotate_value_output(v_w, v_b, o_w, rotations, HEADS, KV_HEADS, HEAD_DIM)
    scores = value_neuron_scores(r_v, r_o, x.reshape(-1, HIDDEN).square().mean(0), s_o, HEADS, KV_HEADS, HEAD_DIM)
    best = keep_top_neurons(scores, 3)
    worst = keep_top_neurons(-scores, 3)
    errors = []
    for keep in (best, worst):
        p_v, p_b, p_o = prune_value_output(r_v, r_b, r_o, keep, HEADS, KV_HEADS, HEAD_DIM)
        pruned, _ = attention(x, q_w, k_w, p_v, p_b, p_o, HEADS, KV_HEADS, HEAD_DIM, 3)
        errors.append((pruned - dense).norm().item())
    assert errors[0] < errors[1]


# ----------------------------------------------------------------------------------------------------- §2 FFN


def swiglu(x, gate_w, up_w, down_w, gate_b=None, up_b=None):
    gate = x @ gate_w.T + (0 if gate_b is None else gate_b)
    up = x @ up_w.T + (0 if up_b is None else up_b)
    return (torch.nn.functional.silu(gate) * up) @ down_w.T


def ffn_weights(seed: int, hidden: int = 6, d_ff: int = 10):
    g = gen(seed)
    return randn(d_ff, hidden, generator=g), randn(d_ff, hidden, generator=g), randn(hidden, d_ff, generator=g)


def test_ffn_neuron_scores_match_loop():
    gate_w, up_w, down_w = ffn_weights(20)
    s_x, s_a = torch.rand(6, generator=gen(21), dtype=F64), torch.rand(10, generator=gen(22), dtype=F64)
    scores = ffn_neuron_scores(gate_w, up_w, down_w, s_x, s_a)
    expected = torch.tensor(
        [
            (up_w[i] * s_x.sqrt()).norm() + (gate_w[i] * s_x.sqrt()).norm() + s_a[i].sqrt() * down_w[:, i].norm()
            for i in range(10)
        ],
        dtype=F64,
    )
    torch.testing.assert_close(scores, expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="`down_weight`"):
        ffn_neuron_scores(gate_w, up_w, down_w.T, s_x, s_a)


@pytest.mark.parametrize("d_ff, block_elements", [(11, 1), (11, 140), (12, 210), (1, 1), (10, 10**6)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ffn_neuron_scores_in_row_blocks_are_bit_identical_to_one_pass(d_ff, block_elements, dtype, monkeypatch):
    """The gate/up row norms are computed a block of rows at a time (blocks of two or three rows here, a one-row
    remainder merged into the block before it): the scores must be the same bits as the formula in one pass."""
    from optimum_olica import olica_math

    monkeypatch.setattr(olica_math, "_SCORE_BLOCK_ELEMENTS", block_elements)
    hidden = 70  # vectorised row reductions with a remainder
    gate_w, up_w, down_w = (w.to(dtype) for w in ffn_weights(23, hidden=hidden, d_ff=d_ff))
    s_x, s_a = torch.rand(hidden, generator=gen(24), dtype=F64), torch.rand(d_ff, generator=gen(25), dtype=F64)
    sqrt_x = s_x.sqrt()
    one_pass = (up_w.double() * sqrt_x).norm(dim=1) + (gate_w.double() * sqrt_x).norm(dim=1)
    one_pass = one_pass + s_a.sqrt() * down_w.double().norm(dim=0)
    assert torch.equal(ffn_neuron_scores(gate_w, up_w, down_w, s_x, s_a), one_pass)


def test_prune_ffn_equals_zeroing_dropped_neurons():
    gate_w, up_w, down_w = ffn_weights(23)
    g = gen(24)
    gate_b, up_b, x = randn(10, generator=g), randn(10, generator=g), randn(4, 6, generator=g)
    keep = torch.tensor([0, 3, 4, 8])
    p_gate, p_up, p_down, p_gate_b, p_up_b = prune_ffn(gate_w.float(), up_w.float(), down_w.float(), keep,
                                                       gate_b.float(), up_b.float())
    assert p_gate.dtype == torch.float32 and p_gate.shape == (4, 6) and p_down.shape == (6, 4)
    zero = torch.ones(10, dtype=torch.bool)
    zero[keep] = False
    reference = swiglu(x, gate_w, up_w.masked_fill(zero[:, None], 0), down_w, gate_b, up_b.masked_fill(zero, 0))
    pruned = swiglu(x, p_gate.double(), p_up.double(), p_down.double(), p_gate_b.double(), p_up_b.double())
    torch.testing.assert_close(pruned, reference, rtol=1e-5, atol=1e-5)
    assert prune_ffn(gate_w, up_w, down_w, keep)[3:] == (None, None)
    with pytest.raises(ValueError, match="`keep`"):
        prune_ffn(gate_w, up_w, down_w, torch.tensor([0.0, 1.0]))


# ---------------------------------------------------------------------------------------- §3 linear calibration


def test_ridge_least_squares_matches_augmented_lstsq():
    g = gen(30)
    x, e = randn(50, 5, generator=g), randn(50, 3, generator=g)
    ridge = 2.5
    solution = ridge_least_squares(x.T @ x, x.T @ e, ridge)
    augmented_x = torch.cat([x, math.sqrt(ridge) * torch.eye(5, dtype=F64)])
    augmented_e = torch.cat([e, torch.zeros(5, 3, dtype=F64)])
    expected = torch.linalg.lstsq(augmented_x, augmented_e).solution
    torch.testing.assert_close(solution, expected, rtol=1e-10, atol=1e-10)
    vector = ridge_least_squares(x.T @ x, x.T @ e[:, 0], ridge)
    torch.testing.assert_close(vector, expected[:, 0], rtol=1e-10, atol=1e-10)


def test_ridge_least_squares_retries_then_fails():
    indefinite = torch.diag(torch.tensor([1.0, -0.5], dtype=F64))
    cross = torch.ones(2, 1, dtype=F64)
    with pytest.warns(UserWarning, match="ridge 1"):
        solution = ridge_least_squares(indefinite, cross, 0.1)
    torch.testing.assert_close(solution, torch.linalg.solve(indefinite + torch.eye(2, dtype=F64), cross))
    with pytest.warns(UserWarning):
        ridge_least_squares(torch.zeros(2, 2, dtype=F64), cross, 0.0)  # singular, zero ridge
    with pytest.raises(ValueError, match="positive definite"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ridge_least_squares(-1e10 * torch.eye(2, dtype=F64), cross, 1e-3)
    with pytest.raises(ValueError, match="`ridge`"):
        ridge_least_squares(torch.eye(2, dtype=F64), cross, -1.0)


def calibration_moments(x, e, chunks: int = 3):
    moments = StreamingMoments(x.shape[1], gram=True, target_dim=e.shape[1])
    for x_part, e_part in zip(x.chunk(chunks), e.chunk(chunks)):
        moments.update(x_part, e_part)
    return moments


def test_fit_linear_calibration_recovers_an_exact_linear_map():
    g = gen(31)
    x = randn(3000, 6, generator=g) + 0.5
    weight = randn(6, 6, generator=g)
    e = x @ weight + 1e-6 * randn(3000, 6, generator=g)
    moments = calibration_moments(x, e)
    for weighting in (False, True):
        fit = fit_linear_calibration(moments, rank=6, ridge_factor=1e-9, correlation_weighting=weighting)
        assert isinstance(fit, LinearCalibrationFit)
        assert fit.down.shape == (6, 6) and fit.up.shape == (6, 6)
        torch.testing.assert_close((fit.up @ fit.down).T, weight, rtol=1e-5, atol=1e-5)
        assert fit.explained_energy == pytest.approx(1.0, abs=1e-9)
        assert fit.mean_correlation == pytest.approx(1.0, abs=1e-9)
    expected_ridge = 1e-9 * float((x.T @ x).diagonal().mean()) * 16384 / 3000
    assert fit.ridge == pytest.approx(expected_ridge, rel=1e-12)


def noisy_problem(seed: int):
    g = gen(seed)
    x = randn(800, 8, generator=g) * torch.linspace(0.5, 3, 8, dtype=F64) + 0.3
    e = x @ randn(8, 8, generator=g) * torch.linspace(0.1, 2, 8, dtype=F64) + 2 * randn(800, 8, generator=g) + 1.0
    return x, e


def test_streamed_correlation_matches_corrcoef_on_samples():
    x, e = noisy_problem(32)
    moments = calibration_moments(x, e)
    weight = randn(8, 8, seed=33)
    streamed = _channel_correlations(moments, weight)
    prediction = x @ weight
    expected = torch.stack([torch.corrcoef(torch.stack([prediction[:, j], e[:, j]]))[0, 1] for j in range(8)])
    torch.testing.assert_close(streamed, expected, rtol=1e-9, atol=1e-9)

    fit = fit_linear_calibration(moments, rank=8, correlation_weighting=False)
    solution = ridge_least_squares(x.T @ x, x.T @ e, fit.ridge)
    prediction = x @ solution
    expected = torch.stack([torch.corrcoef(torch.stack([prediction[:, j], e[:, j]]))[0, 1] for j in range(8)])
    assert fit.mean_correlation == pytest.approx(expected.mean().item(), abs=1e-9)


def test_truncated_fit_is_best_rank_r_of_ridge_solution_and_energy_is_exact():
    x, e = noisy_problem(34)
    moments = calibration_moments(x, e)
    fit = fit_linear_calibration(moments, rank=3, correlation_weighting=False)
    assert fit.down.shape == (3, 8) and fit.up.shape == (8, 3)
    solution = ridge_least_squares(x.T @ x, x.T @ e, fit.ridge)
    u, s, vh = torch.linalg.svd(solution)
    best = (u[:, :3] * s[:3]) @ vh[:3]
    torch.testing.assert_close((fit.up @ fit.down).T, best, rtol=1e-9, atol=1e-9)
    branch = x @ fit.down.T @ fit.up.T  # as nn.Linear(down) then nn.Linear(up)
    expected = 1 - ((e - branch).square().sum() / e.square().sum()).item()
    assert fit.explained_energy == pytest.approx(expected, abs=1e-9)

    weighted = fit_linear_calibration(moments, rank=3, correlation_weighting=True, temperature=0.05)
    r = _channel_correlations(moments, solution)
    w = torch.sigmoid((r - r.mean()) / 0.05)
    u, s, vh = torch.linalg.svd(solution * w)
    expected_weighted = (u[:, :3] * s[:3]) @ vh[:3] / w
    torch.testing.assert_close((weighted.up @ weighted.down).T, expected_weighted, rtol=1e-9, atol=1e-9)
    branch = x @ weighted.down.T @ weighted.up.T
    expected = 1 - ((e - branch).square().sum() / e.square().sum()).item()
    assert weighted.explained_energy == pytest.approx(expected, abs=1e-9)


def test_fit_linear_calibration_validation():
    x, e = noisy_problem(35)
    with pytest.raises(ValueError, match="`moments`"):
        fit_linear_calibration(StreamingMoments(8, target_dim=8), rank=2)
    moments = calibration_moments(x, e)
    with pytest.raises(ValueError, match="`rank`"):
        fit_linear_calibration(moments, rank=9)
    with pytest.raises(ValueError, match="`temperature`"):
        fit_linear_calibration(moments, rank=2, temperature=0.0)
    with pytest.raises(ValueError, match="`ridge_factor`"):
        fit_linear_calibration(moments, rank=2, ridge_factor=-1.0)
    zero = calibration_moments(x, torch.zeros_like(e))
    fit = fit_linear_calibration(zero, rank=2)
    assert fit.explained_energy == 0.0 and fit.mean_correlation == 0.0


def test_refit_output_projection_matches_damped_least_squares_brute_force():
    generator = torch.Generator().manual_seed(7)
    z = torch.randn(200, 12, dtype=torch.float64, generator=generator)
    y = torch.randn(200, 5, dtype=torch.float64, generator=generator)
    weight = torch.randn(5, 12, dtype=torch.float64, generator=generator)
    damping = 0.3
    refit = refit_output_projection(z.T @ z, z.T @ y, weight, damping)
    lam = damping * float((z.T @ z).diagonal().mean())
    # argmin ||z W^T - y||^2 + lam ||W - weight||^2, as an augmented ordinary least-squares problem
    augmented_z = torch.cat([z, lam**0.5 * torch.eye(12, dtype=torch.float64)])
    augmented_y = torch.cat([y, lam**0.5 * weight.T])
    expected = torch.linalg.lstsq(augmented_z, augmented_y).solution.T
    torch.testing.assert_close(refit, expected, atol=1e-9, rtol=1e-9)
    # a huge damping keeps the pruned weight
    torch.testing.assert_close(refit_output_projection(z.T @ z, z.T @ y, weight, 1e9), weight, atol=1e-6, rtol=0)


def test_choose_refit_damping_prefers_refit_with_data_and_declines_it_without():
    generator = torch.Generator().manual_seed(8)
    true_weight = torch.randn(4, 10, dtype=torch.float64, generator=generator)
    pruned_weight = true_weight + 0.5 * torch.randn(4, 10, dtype=torch.float64, generator=generator)

    def folds(tokens: int, noise: float):
        pairs = []
        for _ in range(2):
            z = torch.randn(tokens, 10, dtype=torch.float64, generator=generator)
            y = z @ true_weight.T + noise * torch.randn(tokens, 4, dtype=torch.float64, generator=generator)
            pairs.append((z.T @ z, z.T @ y))
        return pairs

    candidates = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
    # plenty of clean data: a light damping wins
    assert choose_refit_damping(folds(500, 0.01), pruned_weight, candidates) in (1e-3, 1e-2)
    # targets unrelated to the inputs and very few tokens: the pruned weight is already the best guess
    noise_only = []
    for _ in range(2):
        z = torch.randn(3, 10, dtype=torch.float64, generator=generator)
        y = z @ pruned_weight.T + 5.0 * torch.randn(3, 4, dtype=torch.float64, generator=generator)
        noise_only.append((z.T @ z, z.T @ y))
    assert choose_refit_damping(noise_only, pruned_weight, candidates) in (None, 10.0)


def test_choose_refit_damping_sketch_matches_brute_force_choice_on_wide_outputs():
    """With 300 outputs the 64-probe sketch is active; its choice equals the exact cross-validation's, computed
    here by brute force from the tokens themselves (fit on one fold, squared error on the other)."""
    generator = torch.Generator().manual_seed(3)
    inputs, outputs = 24, 300
    true_weight = torch.randn(outputs, inputs, dtype=torch.float64, generator=generator)
    pruned_weight = true_weight + 0.3 * torch.randn(outputs, inputs, dtype=torch.float64, generator=generator)
    candidates = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
    chosen = []
    for tokens, noise in ((400, 0.05), (30, 3.0), (60, 1.0)):
        data = []
        for _ in range(2):
            z = torch.randn(tokens, inputs, dtype=torch.float64, generator=generator)
            y = z @ true_weight.T + noise * torch.randn(tokens, outputs, dtype=torch.float64, generator=generator)
            data.append((z, y))

        def validation_error(fit_on, score_on, damping):
            (z_fit, y_fit), (z_score, y_score) = data[fit_on], data[score_on]
            if damping is None:
                refit = pruned_weight
            else:
                lam = damping * float((z_fit.T @ z_fit).diagonal().mean())
                # argmin ||Z W^T - Y||^2 + lam ||W - W0||^2 by the normal equations
                refit = torch.linalg.solve(
                    z_fit.T @ z_fit + lam * torch.eye(inputs, dtype=torch.float64), z_fit.T @ y_fit + lam * pruned_weight.T
                ).T
            return float(((z_score @ refit.T - y_score) ** 2).sum())

        errors = {d: validation_error(0, 1, d) + validation_error(1, 0, d) for d in (None, *candidates)}
        brute_force = min(errors, key=errors.get)
        folds = [(z.T @ z, z.T @ y) for z, y in data]
        assert choose_refit_damping(folds, pruned_weight, candidates, num_probes=None) == brute_force
        assert choose_refit_damping(folds, pruned_weight, candidates) == brute_force
        chosen.append(brute_force)
    assert len(set(chosen)) == 3, chosen  # the three regimes call for three different choices


@pytest.mark.parametrize("dim", [5, 200, 397, 1000])
def test_symmetric_gram_equals_the_plain_product(dim):
    from optimum_olica.olica_math import _symmetric_gram

    rows = randn(37, dim, seed=dim)
    torch.testing.assert_close(_symmetric_gram(rows), rows.T @ rows, rtol=1e-12, atol=1e-12)
    rows32 = rows.float()
    torch.testing.assert_close(_symmetric_gram(rows32), rows32.T @ rows32, rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------------------- accumulation and solve memory


def test_streamed_sums_and_refit_match_float64_on_ill_conditioned_data_with_massive_activations():
    """Per-batch float32 products summed in float64 (the scheme `StreamingMoments` uses wherever its sums live)
    against float64 over all tokens at once: bfloat16 activations, two nearly collinear channels (condition number
    of the Gram about 3e10) and one channel at 2,000x on 1% of the tokens, 64 batches."""
    g = gen(16)
    batches, tokens, dim, out = 64, 256, 48, 8
    base = randn(batches * tokens, dim, generator=g)
    base[:, 1] = base[:, 0] + 1e-3 * base[:, 1]
    outliers = torch.rand(batches * tokens, generator=g) < 0.01
    base[outliers, 5] *= 2000.0
    x = base.to(torch.bfloat16)
    weight = randn(out, dim, generator=g)
    e = (x.double() @ weight.T + 0.1 * randn(batches * tokens, out, generator=g)).to(torch.bfloat16)
    gram, cross = x.double().T @ x.double(), x.double().T @ e.double()
    assert torch.linalg.cond(gram) > 1e10
    moments = StreamingMoments(dim, gram=True, target_dim=out)
    for x_batch, e_batch in zip(x.split(tokens), e.split(tokens)):
        moments.update(x_batch, e_batch)
    scale = gram.diagonal().sqrt()
    # Entry errors relative to the Cauchy-Schwarz bound of each entry: measured 2.4e-7 (Gram) and 1.2e-7 (cross).
    assert ((moments.gram - gram) / (scale[:, None] * scale)).abs().max() < 2e-6
    assert ((moments.cross - cross) / (scale[:, None] * e.double().norm(dim=0))).abs().max() < 2e-6
    expected = refit_output_projection(gram, cross, 0.9 * weight, 1e-3)
    refit = refit_output_projection(moments.gram, moments.cross, 0.9 * weight, 1e-3)
    assert (refit - expected).norm() / expected.norm() < 5e-6  # measured 4.6e-7


def test_gram_sums_mirror_their_upper_blocks_after_every_update_and_absorb():
    """Only the blocks on and above the diagonal are summed; reading mirrors them, also after more updates or an
    absorb following a read (the mirrored blocks must not be summed twice)."""
    rows = randn(90, 400, seed=17)  # 400 channels: four column blocks
    targets = randn(90, 3, seed=18)
    first, second = StreamingMoments(400, gram=True, target_dim=3), StreamingMoments(400, gram=True, target_dim=3)
    first.update(rows[:30], targets[:30])
    torch.testing.assert_close(first.gram, rows[:30].T @ rows[:30], rtol=1e-12, atol=1e-12)
    first.update(rows[30:60], targets[30:60])
    torch.testing.assert_close(first.gram, rows[:60].T @ rows[:60], rtol=1e-12, atol=1e-12)
    second.update(rows[60:], targets[60:])
    assert second.gram is not None  # read: mirrored before the absorb
    first.absorb(second)
    torch.testing.assert_close(first.gram, rows.T @ rows, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(first.raw_sum("gram"), rows.T @ rows, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(first.cross, rows.T @ targets, rtol=1e-12, atol=1e-12)


class _SquareFloat64Matrices(torch.utils._python_dispatch.TorchDispatchMode):
    """The most (dim x dim) float64 storages alive at once among those created while active."""

    def __init__(self, dim: int):
        super().__init__()
        self.nbytes, self.live, self.most = dim * dim * 8, set(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import weakref

        output = func(*args, **(kwargs or {}))
        for leaf in torch.utils._pytree.tree_leaves(output):
            if isinstance(leaf, torch.Tensor) and leaf.dtype == F64:
                storage = leaf.untyped_storage()
                if storage.nbytes() == self.nbytes and storage._cdata not in self.live:
                    self.live.add(storage._cdata)
                    weakref.finalize(storage, self.live.discard, storage._cdata)
                    self.most = max(self.most, len(self.live))
        return output


def test_refit_solves_hold_one_square_float64_matrix_at_a_time():
    """The folds' Gram matrices may sit in host memory; every solve of the cross-validation and of the refit works in
    one (in x in) float64 workspace, factored in place (before: a regularised copy and its Cholesky factor, and a
    float64 copy of each float32 fold)."""
    inputs, outputs = 120, 200  # more outputs than probes: the sketched cross-validation
    weight = randn(outputs, inputs, seed=19)
    folds = []
    for seed in (20, 21):
        z = randn(300, inputs, seed=seed)
        y = z @ weight.T + randn(300, outputs, seed=seed + 10)
        folds.append(((z.T @ z).float(), (z.T @ y).float()))  # float32 sums (statistics_dtype="float32")
    for run in (
        lambda: choose_refit_damping(folds, 0.8 * weight, (1e-3, 1e-1, 10.0)),
        lambda: refit_output_projection(folds[0][0], folds[0][1], 0.8 * weight, 0.1),
    ):
        with _SquareFloat64Matrices(inputs) as counter:
            run()
        assert counter.most == 1


def test_refit_retry_solves_with_the_original_prior_and_the_raised_ridge():
    """An indefinite Gram: the ridge is raised tenfold until positive definite (a warning names it); the right-hand
    side is built again for each try (the solve overwrites it) and keeps the asked damping's prior."""
    gram = torch.diag(torch.tensor([1.0, -0.5, 2.0], dtype=F64))
    cross, weight = randn(3, 2, seed=22), randn(2, 3, seed=23)
    lam = 0.01 * float(gram.diagonal().mean())
    with pytest.warns(UserWarning, match="used ridge"):
        refit = refit_output_projection(gram, cross, weight, 0.01)
    raised = lam * 100  # lam and 10 lam leave -0.5 + ridge < 0
    expected = torch.linalg.solve(gram + raised * torch.eye(3, dtype=F64), cross + lam * weight.T).T
    torch.testing.assert_close(refit, expected, rtol=1e-12, atol=1e-12)
