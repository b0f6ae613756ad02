"""The tensor math of Olica (``docs/olica-method.md`` sections 1-3).

Pure functions: tensors in, tensors out; no hooks, no modules, no device moves, no I/O. Decompositions run in
float64 and return float64 (the caller casts back); functions that only select rows or columns keep the input
dtype. Weights follow ``nn.Linear``: `(out_features, in_features)`.

Shared arguments: `v_weight` is `v_proj.weight` `(num_kv_heads * head_dim, hidden)`, `v_bias` its optional bias
`(num_kv_heads * head_dim,)`, `o_weight` is `o_proj.weight` `(hidden, num_heads * head_dim)`; `num_heads` query
heads form `num_kv_heads` groups of ``G = num_heads // num_kv_heads`` and query head ``i`` reads group ``i // G``.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "LinearCalibrationFit", "StreamingMoments", "activation_weighted_low_rank", "whitened_low_rank",
    "whitening_factor", "shrink_to_diagonal", "ffn_neuron_scores",
    "fit_linear_calibration", "keep_top_neurons", "low_rank_saves_parameters", "prune_ffn", "prune_value_output",
    "choose_refit_damping", "refit_output_projection", "ridge_least_squares", "solve_workspace", "rotate_value_output", "rotated_value_second_moment", "value_neuron_scores",
    "value_output_rotation", "exact_value_output_decomposition", "comparable_neuron_scores", "neurons_kept_per_layer",
]

_RIDGE_RETRIES = 6
_SCALE_FLOOR = 1e-8  # relative floor of sqrt(second moment), see activation_weighted_low_rank


def _check_int(name: str, value, minimum: int = 1) -> None:
    # bool is an Integral; rank=True is a mistake, not rank 1.
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")


def _check_real(name: str, value, minimum: float = 0.0) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < minimum:
        raise ValueError(f"`{name}` must be a finite number >= {minimum}, got {value!r}.")


def _check_shape(name: str, tensor: Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"`{name}` must have shape {tuple(shape)}, got {tuple(tensor.shape)}.")


def _matrix_dims(name: str, tensor: Tensor) -> tuple[int, int]:
    if tensor.ndim != 2:
        raise ValueError(f"`{name}` must be 2-D, got shape {tuple(tensor.shape)}.")
    return tensor.shape[0], tensor.shape[1]


def _group_size(num_heads: int, num_kv_heads: int, head_dim: int) -> int:
    for name, value in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
        _check_int(name, value)
    if num_heads % num_kv_heads:
        raise ValueError(f"`num_heads` ({num_heads}) must be a multiple of `num_kv_heads` ({num_kv_heads}).")
    return num_heads // num_kv_heads


def _value_output_dims(v_weight, v_bias, o_weight, num_heads, num_kv_heads, head_dim) -> tuple[int, int]:
    """Validate the V/O weights against the geometry; returns (group_size, hidden)."""
    group_size = _group_size(num_heads, num_kv_heads, head_dim)
    hidden = _matrix_dims("v_weight", v_weight)[1]
    _check_shape("v_weight", v_weight, (num_kv_heads * head_dim, hidden))
    _check_shape("o_weight", o_weight, (hidden, num_heads * head_dim))
    if v_bias is not None:
        _check_shape("v_bias", v_bias, (num_kv_heads * head_dim,))
    return group_size, hidden


def _ffn_dims(gate_weight: Tensor, up_weight: Tensor, down_weight: Tensor) -> tuple[int, int]:
    d_ff, hidden = _matrix_dims("gate_weight", gate_weight)
    _check_shape("up_weight", up_weight, (d_ff, hidden))
    _check_shape("down_weight", down_weight, (hidden, d_ff))
    return d_ff, hidden


def _sqrt_moment(name: str, second_moment: Tensor) -> Tensor:
    moment = second_moment.double()
    if not bool(torch.isfinite(moment).all()) or bool((moment < 0).any()):
        raise ValueError(f"`{name}` must be finite and non-negative.")
    return moment.sqrt()


def _check_keep(keep: Tensor, width: int) -> Tensor:
    if keep.dtype not in (torch.int64, torch.int32, torch.int16):
        raise ValueError(f"`keep` must be an integer index tensor, got dtype {keep.dtype}.")
    if keep.shape[-1] < 1 or bool((keep < 0).any()) or bool((keep >= width).any()):
        raise ValueError(f"`keep` must hold at least one index per row, each in [0, {width}).")
    ordered = keep.long().sort(dim=-1).values
    if bool((ordered[..., 1:] == ordered[..., :-1]).any()):
        raise ValueError("`keep` must not repeat an index.")
    return keep.long()


def _gram_block_edges(dim: int) -> list[int]:
    """Column-block edges of ``_gram_blocks``: 4 blocks from 384 channels, 2 from 192, else 1."""
    parts = 4 if dim >= 384 else 2 if dim >= 192 else 1
    return [round(i * dim / parts) for i in range(parts + 1)]


def _gram_blocks(rows: Tensor):
    """The blocks on and above the diagonal of ``rows^T rows``: ``(row_slice, column_slice, block)``, lazily.

    The blocks below the diagonal are their transposes, so they are never computed. With 4 column blocks that is
    10 of 16 block products; measured on one CPU core, 4,096 tokens x 1,229 channels: 0.10 s instead of 0.20 s for
    the plain product. Yielding one block at a time lets a caller move each block elsewhere (the host) before the
    next is computed, so the full (dim, dim) product never exists on the compute device.
    """
    edges = _gram_block_edges(rows.shape[-1])
    spans = [slice(edges[i], edges[i + 1]) for i in range(len(edges) - 1)]
    for i, first in enumerate(spans):
        for second in spans[i:]:
            yield first, second, rows[:, first].T @ rows[:, second]


def _mirror_upper_blocks(gram: Tensor) -> Tensor:
    """Fill, in place, the blocks below the diagonal of a ``_gram_blocks`` sum with the transposes of those above."""
    edges = _gram_block_edges(gram.shape[-1])
    spans = [slice(edges[i], edges[i + 1]) for i in range(len(edges) - 1)]
    for i, first in enumerate(spans):
        for second in spans[i + 1 :]:
            gram[second, first] = gram[first, second].T
    return gram


def _add_into(total: Tensor, value: Tensor) -> None:
    """``total += value`` where ``total`` lives, in ``total``'s dtype: a wider ``value`` is rounded first (as a cast
    would), a narrower one is widened exactly by ``add_`` element by element."""
    if value.dtype.itemsize > total.dtype.itemsize:
        value = value.to(total.dtype)
    total.add_(value.to(total.device))


def _symmetric_gram(rows: Tensor) -> Tensor:
    """``rows^T rows`` from ``_gram_blocks`` (the blocks below the diagonal are exact transposes)."""
    gram = rows.new_empty(rows.shape[-1], rows.shape[-1])
    for first, second, block in _gram_blocks(rows):
        gram[first, second] = block
    return _mirror_upper_blocks(gram)


class StreamingMoments:
    """Float64 running sums of activation statistics, fed batch by batch (method §1-§3).

    Each batch's products (``X^T X`` block by block, ``X^T E``, the channel sums) are computed in float32 where the
    batch is (float64 batches stay float64) and added into the running sums where those live, in `dtype`. With the
    sums on the host and the batches on an accelerator, the accelerator holds one batch and one Gram block at a
    time; the float64 sums keep the error from growing with the token count, as if they were on the accelerator
    (the same float32 products, the same float64 additions: the sums are bit-identical wherever they live).

    Args:
        dim (`int`): Channel count of `x`.
        gram (`bool`, *optional*, defaults to `False`): Also accumulate ``X^T X`` `(dim, dim)`.
        target_dim (`int`, *optional*): If set, `update` takes a target ``E`` and the sums of E, E**2 and ``X^T E``
            `(dim, target_dim)` are accumulated too.
        device (*optional*): Where the sums live (e.g. ``"cpu"``: host memory); defaults to the device of the first
            batch.
        dtype (*optional*, defaults to `torch.float64`): Accumulation dtype. float32 halves the memory of the sums
            (wherever they live) at the cost of precision; sums are cast to float64 when read.
        pin_memory (`bool`, *optional*, defaults to `False`): Allocate host sums in page-locked memory (faster
            copies to and from a CUDA device; needs CUDA).

    Statistics (all but `count` raise `RuntimeError` before the first token): `count`; `mean` and `second_moment`
    (mean of x**2, the method's ``s``) `(dim,)`; `gram` (raw ``X^T X``); `cross` (raw ``X^T E``); `target_mean`,
    `target_second_moment` (mean of E**2) and `target_sum_squares` (raw sum of E**2) `(target_dim,)`.
    """

    def __init__(
        self, dim: int, *, gram: bool = False, target_dim: int | None = None, device=None,
        dtype: torch.dtype = torch.float64, pin_memory: bool = False,
    ):
        _check_int("dim", dim)
        if target_dim is not None:
            _check_int("target_dim", target_dim)
        if dtype not in (torch.float64, torch.float32):
            raise ValueError(f"`dtype` must be torch.float64 or torch.float32, got {dtype}.")
        self.dim, self.target_dim, self.has_gram, self.device = dim, target_dim, bool(gram), device
        self.dtype, self.pin_memory = dtype, bool(pin_memory)
        self._count = 0
        self._sums: dict[str, Tensor] = {}

    def update(self, x: Tensor, target: Tensor | None = None, mask: Tensor | None = None) -> None:
        """Add a batch of tokens.

        Args:
            x (`torch.Tensor` of shape `(..., dim)`): Activations, any float dtype.
            target (`torch.Tensor` of shape `(..., target_dim)`, *optional*): Required iff `target_dim` was set.
            mask (`torch.BoolTensor` of shape `x.shape[:-1]`, *optional*): True for the tokens to count.

        Raises:
            `ValueError`: on a bad shape, or "non-finite activations" if a counted token holds NaN/Inf (nothing
            is then accumulated).
        """
        if x.ndim < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"`x` must have shape (..., {self.dim}), got {tuple(x.shape)}.")
        if (target is None) != (self.target_dim is None):
            raise ValueError("`target` must be given exactly when `target_dim` was set.")
        leading = tuple(x.shape[:-1])
        parts = [x.reshape(-1, self.dim)]
        if target is not None:
            _check_shape("target", target, (*leading, self.target_dim))
            parts.append(target.reshape(-1, self.target_dim))
        if mask is not None:
            if mask.dtype != torch.bool:
                raise ValueError(f"`mask` must be a bool tensor, got dtype {mask.dtype}.")
            _check_shape("mask", mask, leading)
            parts = [part[mask.reshape(-1)] for part in parts]
        if not self._sums:
            device = self.device if self.device is not None else x.device
            shapes = {"x": (self.dim,), "x2": (self.dim,)}
            if self.has_gram:
                shapes["gram"] = (self.dim, self.dim)
            if self.target_dim is not None:
                shapes.update(t=(self.target_dim,), t2=(self.target_dim,), cross=(self.dim, self.target_dim))
            pin = self.pin_memory and torch.device(device).type == "cpu"
            self._sums = {
                key: torch.zeros(shape, dtype=self.dtype, device=device, pin_memory=pin)
                for key, shape in shapes.items()
            }
        sums = self._sums
        # Per-batch products in float32 (float64 inputs stay float64) where the batch is, accumulated across batches
        # in `dtype` where the sums are: the float64 sums keep error from growing with the token count, at a fraction
        # of float64 GEMM cost. add_ casts each product to `dtype` element by element (no full-size copy).
        batch_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        parts = [part.to(dtype=batch_dtype) for part in parts]
        rows = parts[0]
        batch = {"x": rows.sum(dim=0), "x2": rows.square().sum(dim=0)}
        if target is not None:
            target_rows = parts[1]
            batch.update(t=target_rows.sum(dim=0), t2=target_rows.square().sum(dim=0))
        # A NaN/Inf in any counted token reaches these per-channel sums; checked before touching the accumulated
        # sums, so one bad batch cannot poison what was already accumulated.
        if not all(bool(torch.isfinite(value).all()) for value in batch.values()):
            raise ValueError("non-finite activations: the batch holds NaN or Inf in a counted token.")
        for key, value in batch.items():
            _add_into(sums[key], value)
        if self.has_gram:
            # Only the blocks on and above the diagonal are summed; `raw_sum` mirrors them below.
            for first, second, block in _gram_blocks(rows):
                _add_into(sums["gram"][first, second], block)
        if target is not None:
            _add_into(sums["cross"], rows.T @ target_rows)
        self._count += rows.shape[0]

    def absorb(self, other: "StreamingMoments") -> None:
        """Add ``other``'s sums into this one, in place, and empty ``other``.

        The sums of two folds become the sums of both without allocating a third set (a Gram matrix of a wide FFN
        is hundreds of MB), and ``other`` releases its memory.
        """
        if (other.dim, other.target_dim, other.has_gram) != (self.dim, self.target_dim, self.has_gram):
            raise ValueError("`absorb` needs StreamingMoments of the same dim, target_dim and gram setting.")
        if not other._sums:
            return
        if not self._sums:
            self._sums, self._count = other._sums, other._count
        else:
            for key, value in other._sums.items():
                self._sums[key] += value.to(self._sums[key].device)
            self._count += other._count
        other._sums, other._count = {}, 0

    def raw_sum(self, key: str) -> Tensor:
        """The running sum ``key`` ("gram", "cross", "x", "x2", "t", "t2") itself: in `dtype`, where it lives, not
        copied (a solve can then move it to the compute device piece by piece). Do not modify it."""
        if self._count == 0:
            raise RuntimeError("StreamingMoments has seen no token yet: call `update` with at least one token.")
        if key not in self._sums:
            needed = "gram=True" if key == "gram" else "target_dim set"
            raise RuntimeError(f"This statistic needs a StreamingMoments built with {needed}.")
        value = self._sums[key]
        return _mirror_upper_blocks(value) if key == "gram" else value

    def _read(self, key: str, per_token: bool = False) -> Tensor:
        value = self.raw_sum(key).double()
        return value / self._count if per_token else value

    count = property(lambda self: self._count, doc="Number of tokens counted so far.")
    mean = property(lambda self: self._read("x", True), doc="`(dim,)` mean of x.")
    second_moment = property(lambda self: self._read("x2", True), doc="`(dim,)` mean of x**2.")
    gram = property(lambda self: self._read("gram"), doc="`(dim, dim)` raw sum X^T X.")
    cross = property(lambda self: self._read("cross"), doc="`(dim, target_dim)` raw sum X^T E.")
    target_mean = property(lambda self: self._read("t", True), doc="`(target_dim,)` mean of E.")
    target_second_moment = property(lambda self: self._read("t2", True), doc="`(target_dim,)` mean of E**2.")
    target_sum_squares = property(lambda self: self._read("t2"), doc="`(target_dim,)` raw sum of E**2.")


def low_rank_saves_parameters(in_features: int, out_features: int, rank: int) -> bool:
    """Whether rank-`rank` factors of an (out x in) weight hold fewer parameters than it (method §1a)."""
    _check_int("in_features", in_features)
    _check_int("out_features", out_features)
    _check_int("rank", rank, minimum=0)
    return rank * (in_features + out_features) < in_features * out_features


def activation_weighted_low_rank(weight: Tensor, second_moment: Tensor, rank: int, output_weights: Tensor | None = None
                                 ) -> tuple[Tensor, Tensor]:
    """Rank-`rank` factors minimising ``||diag(w) (W - up @ down) D||_F``, ``D = diag(sqrt(s))`` (method §1a; ``w``
    the `output_weights`, all ones when None).

    ``sqrt(s)`` is floored at 1e-8 times its largest entry: silent channels barely enter the objective, so their
    columns of ``down`` are unconstrained and ``D^-1`` would be infinite (or huge for denormals). With the floor
    the factors stay finite, those columns follow ``W``'s own projection, and the result is exactly optimal for
    the floored ``D``. An all-zero `second_moment` gives the plain truncated SVD.

    Args:
        weight (`torch.Tensor` of shape `(out, in)`): The projection weight.
        second_moment (`torch.Tensor` of shape `(in,)`): Mean squared input per channel.
        rank (`int`): Target rank, ``1 <= rank <= min(out, in)``.
        output_weights (`torch.Tensor` of shape `(out,)`, *optional*): How much an error in each output counts
            (``attention_score_weights``), >= 0.

    Returns:
        `tuple(torch.Tensor, torch.Tensor)`: float64 ``down`` `(rank, in)` and ``up`` `(out, rank)`; the layer
        becomes ``x -> up @ (down @ x)``.
    """
    out_features, in_features = _matrix_dims("weight", weight)
    _check_shape("second_moment", second_moment, (in_features,))
    _check_int("rank", rank)
    if rank > min(out_features, in_features):
        raise ValueError(f"`rank` must be <= {min(out_features, in_features)}, got {rank}.")
    scale = _sqrt_moment("second_moment", second_moment)
    peak = scale.max()
    scale = scale.clamp_min(peak * _SCALE_FLOOR) if peak > 0 else torch.ones_like(scale)
    scaled = weight.double() * scale
    if output_weights is None:
        u, singular, vh = torch.linalg.svd(scaled, full_matrices=False)
        return vh[:rank] / scale, u[:, :rank] * singular[:rank]
    kept = _top_right_singular_vectors(scaled, output_weights, rank)
    return kept / scale, scaled @ kept.T


def _top_right_singular_vectors(matrix: Tensor, output_weights: Tensor, rank: int) -> Tensor:
    """`(rank, in)`: the top right singular vectors of ``diag(w) A``, the row space the best rank-`rank`
    approximation of ``A`` under output weights ``w`` keeps (the best ``up`` is then ``A V_r^T``, which needs no
    division by a weight, so zero weights are fine)."""
    _check_shape("output_weights", output_weights, (matrix.shape[0],))
    weights = output_weights.double()
    if not _all_finite(weights) or bool((weights < 0).any()):
        raise ValueError("`output_weights` must be finite and >= 0.")
    return torch.linalg.svd(weights[:, None] * matrix, full_matrices=False).Vh[:rank]


def rotary_pair_mean(second_moment: Tensor, head_dim: int) -> Tensor:
    """Each channel's second moment averaged with the one RoPE turns it with (channels ``j`` and ``j + head_dim/2``
    of the same head, the ``rotate_half`` layout of transformers' Llama, Mistral and Qwen).

    Over the positions of a sequence the pair turns by angles that cover the circle, so an error in one channel of
    a pair meets, on average, the pair's mean energy in each of its two channels.

    Args:
        second_moment (`torch.Tensor` of shape `(heads * head_dim,)`): Mean square of each channel.
        head_dim (`int`): Even.
    """
    _check_int("head_dim", head_dim)
    if head_dim % 2 or second_moment.ndim != 1 or second_moment.numel() % head_dim:
        raise ValueError(f"`second_moment` must hold whole heads of an even head_dim ({head_dim}), "
                         f"got shape {tuple(second_moment.shape)}.")
    halves = second_moment.double().reshape(-1, 2, head_dim // 2)
    return halves.mean(dim=1, keepdim=True).expand_as(halves).reshape(-1)


def attention_score_weights(
    query_energy: Tensor, key_energy: Tensor, num_heads: int, num_kv_heads: int, head_dim: int, emphasis: float,
    query_gain: Tensor | None = None, key_gain: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Output weights for the Q and K low rank: what an error in each channel does to the attention scores.

    The scores read the queries and keys only as ``q^T R k``: an error ``e`` in query channel ``j`` costs about
    ``E[(e R k)_j^2]``, the energy of the keys' rotary pair (``rotary_pair_mean``) times ``e_j^2``, and a key error
    costs the queries' energy, summed over the heads of its group. With RMSNorm on each head (Qwen3), what reaches
    RoPE is the normed vector and an error in the projection reaches it scaled by the norm's gain. The squared
    weights are blended with their mean, ``emphasis * w^2 + (1 - emphasis) * mean(w^2)``: 0 weighs every output
    alike (the paper's §1a), 1 by the scores alone.

    Args:
        query_energy, key_energy (`torch.Tensor` of shapes `(num_heads * head_dim,)`, `(num_kv_heads * head_dim,)`):
            Mean square of each query and key channel where RoPE reads them (after the per-head norm, if any).
        num_heads, num_kv_heads, head_dim (`int`): Attention geometry.
        emphasis (`float`): In [0, 1].
        query_gain, key_gain (`torch.Tensor`, *optional*): Same shapes: how much a projection error is scaled on its
            way to RoPE (the per-head norm's; None: 1).

    Returns:
        `tuple(torch.Tensor, torch.Tensor)`: float64 weights of the query and key outputs, >= 0.
    """
    group_size = _group_size(num_heads, num_kv_heads, head_dim)
    _check_shape("query_energy", query_energy, (num_heads * head_dim,))
    _check_shape("key_energy", key_energy, (num_kv_heads * head_dim,))
    _check_real("emphasis", emphasis)
    if emphasis > 1:
        raise ValueError(f"`emphasis` must be in [0, 1], got {emphasis}.")
    key_pairs = rotary_pair_mean(key_energy, head_dim).reshape(num_kv_heads, 1, head_dim)
    query_pairs = rotary_pair_mean(query_energy, head_dim).reshape(num_kv_heads, group_size, head_dim)
    squares = [key_pairs.expand(num_kv_heads, group_size, head_dim).reshape(-1), query_pairs.sum(dim=1).reshape(-1)]
    weights = []
    for square, gain in zip(squares, (query_gain, key_gain)):
        if gain is not None:
            _check_shape("gain", gain, square.shape)
            square = square * gain.double().square()
        weights.append((emphasis * square + (1 - emphasis) * square.mean()).clamp_min(0).sqrt())
    return weights[0], weights[1]


def shrink_to_diagonal(second_moments: Tensor, shrinkage: float) -> Tensor:
    """``(1 - shrinkage) * C + shrinkage * diag(C)``, float64: the input's correlations trusted only in part.

    Args:
        second_moments (`torch.Tensor` of shape `(dim, dim)`): ``C``, the input's mean ``x x^T``.
        shrinkage (`float`): In [0, 1]; 1 keeps the diagonal alone (what §1a weighs by), 0 ``C`` as measured.
    """
    dim, other = _matrix_dims("second_moments", second_moments)
    if dim != other:
        raise ValueError(f"`second_moments` must be square, got shape {tuple(second_moments.shape)}.")
    _check_real("shrinkage", shrinkage)
    if shrinkage > 1:
        raise ValueError(f"`shrinkage` must be in [0, 1], got {shrinkage}.")
    # One (dim x dim) float64 allocation: at a 70B model's width a copy is 0.5 GB of the accelerator's memory.
    shrunk = torch.empty(dim, dim, dtype=torch.float64, device=second_moments.device)
    torch.mul(second_moments, 1.0 - shrinkage, out=shrunk)
    shrunk.diagonal().copy_(torch.diagonal(second_moments))
    return shrunk


def whitening_factor(second_moments: Tensor) -> Tensor:
    """Lower-triangular ``L`` with ``L L^T = C + jitter * I`` (Cholesky), float64: what ``whitened_low_rank`` weighs by.

    A singular ``C`` (silent channels, fewer tokens than channels) gets a jitter on its diagonal, from 1e-10 of its
    mean diagonal up to 1e-4, until the factor exists: the directions no token visits then cost almost nothing, and
    the factors stay finite. An all-zero ``C`` gives the identity (no weighting).

    Args:
        second_moments (`torch.Tensor` of shape `(dim, dim)`): ``C``, symmetric positive semi-definite, e.g. the
            mean ``x x^T`` of a projection's input (``shrink_to_diagonal`` of it).

    Raises:
        `ValueError`: if ``C`` is not square, not finite, or further from positive semi-definite than rounding goes.
    """
    dim, other = _matrix_dims("second_moments", second_moments)
    if dim != other:
        raise ValueError(f"`second_moments` must be square, got shape {tuple(second_moments.shape)}.")
    matrix = second_moments.double()
    if not _all_finite(matrix):
        raise ValueError("`second_moments` must be finite.")
    if bool((torch.diagonal(matrix) < 0).any()):
        raise ValueError("`second_moments` must be positive semi-definite (it has a negative diagonal entry).")
    scale = float(torch.diagonal(matrix).mean())
    if scale == 0:
        return torch.eye(dim, dtype=torch.float64, device=matrix.device)
    jitter, shifted = 1e-10 * scale, matrix.clone()
    shifted.diagonal().add_(jitter)
    lower, failed = torch.linalg.cholesky_ex(shifted)
    while int(failed) != 0:
        if jitter > 1e-4 * scale:  # not positive semi-definite: no rounding explains that much
            raise ValueError("`second_moments` must be positive semi-definite.")
        shifted.diagonal().add_(99 * jitter)
        jitter *= 100
        lower, failed = torch.linalg.cholesky_ex(shifted)
    return lower


def whitened_low_rank(weight: Tensor, whitening: Tensor, rank: int, output_weights: Tensor | None = None
                      ) -> tuple[Tensor, Tensor]:
    """Rank-`rank` factors minimising ``||diag(w) (W - up @ down) L||_F``, ``L = whitening_factor(C)`` (§1a with the
    input's correlations; ``w`` the `output_weights`, all ones when None).

    On tokens whose mean ``x x^T`` is ``C = L L^T`` this is the projection's mean squared output error, which §1a's
    diagonal weighting only bounds. The minimiser is the truncated SVD of ``W L`` (Eckart-Young), mapped back through
    ``L^-1``; with a diagonal ``C`` it is ``activation_weighted_low_rank``.

    Args:
        weight (`torch.Tensor` of shape `(out, in)`): The projection weight.
        whitening (`torch.Tensor` of shape `(in, in)`): Lower triangular, invertible (``whitening_factor``).
        rank (`int`): Target rank, ``1 <= rank <= min(out, in)``.
        output_weights (`torch.Tensor` of shape `(out,)`, *optional*): How much an error in each output counts
            (``attention_score_weights``), >= 0.

    Returns:
        `tuple(torch.Tensor, torch.Tensor)`: float64 ``down`` `(rank, in)` and ``up`` `(out, rank)`; the layer
        becomes ``x -> up @ (down @ x)``.
    """
    out_features, in_features = _matrix_dims("weight", weight)
    _check_shape("whitening", whitening, (in_features, in_features))
    _check_int("rank", rank)
    if rank > min(out_features, in_features):
        raise ValueError(f"`rank` must be <= {min(out_features, in_features)}, got {rank}.")
    lower = whitening.double()
    whitened = weight.double() @ lower
    if output_weights is None:
        u, singular, vh = torch.linalg.svd(whitened, full_matrices=False)
        return torch.linalg.solve_triangular(lower, vh[:rank], upper=False, left=False), u[:, :rank] * singular[:rank]
    kept = _top_right_singular_vectors(whitened, output_weights, rank)
    return torch.linalg.solve_triangular(lower, kept, upper=False, left=False), whitened @ kept.T


def value_output_rotation(
    o_weight: Tensor, output_second_moment: Tensor, num_heads: int, num_kv_heads: int, head_dim: int
) -> Tensor:
    """Per-KV-group rotation ordering value neurons by importance (fast OND, method §1b, GQA).

    ``Q_g`` holds the left singular vectors of ``[O_1^T D_out, ..., O_G^T D_out]`` `(head_dim, G * hidden)`,
    ``O_i`` the `o_weight` columns of head ``i`` of group ``g``, ``D_out = diag(sqrt(output_second_moment))``.

    Args:
        o_weight (`torch.Tensor`), num_heads, num_kv_heads, head_dim (`int`): See the module docstring.
        output_second_moment (`torch.Tensor` of shape `(hidden,)`): Second moment of `o_proj`'s OUTPUT.

    Returns:
        `torch.Tensor` of shape `(num_kv_heads, head_dim, head_dim)`: orthogonal float64 ``Q_g``, columns by
        descending singular value.
    """
    group_size = _group_size(num_heads, num_kv_heads, head_dim)
    hidden = _matrix_dims("o_weight", o_weight)[0]
    _check_shape("o_weight", o_weight, (hidden, num_heads * head_dim))
    _check_shape("output_second_moment", output_second_moment, (hidden,))
    # (hidden, h*d_h) -> (h*d_h, hidden): row block i is O_i^T, each column scaled by D_out.
    scaled = o_weight.double().T * _sqrt_moment("output_second_moment", output_second_moment)
    # (h*d_h, hidden) -> (g, G, d_h, hidden) -> (g, d_h, G, hidden) -> (g, d_h, G*hidden)
    stacked = scaled.reshape(num_kv_heads, group_size, head_dim, hidden).transpose(1, 2)
    stacked = stacked.reshape(num_kv_heads, head_dim, group_size * hidden)
    if stacked.shape[-1] < head_dim:
        # Zero columns change no singular vector but make the thin SVD return a square U.
        stacked = torch.nn.functional.pad(stacked, (0, head_dim - stacked.shape[-1]))
    return torch.linalg.svd(stacked, full_matrices=False).U


def rotate_value_output(
    v_weight: Tensor, v_bias: Tensor | None, o_weight: Tensor, rotations: Tensor,
    num_heads: int, num_kv_heads: int, head_dim: int,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """``V_g <- Q_g^T V_g`` (bias too) and ``O_i <- O_i Q_g``: the attention function is unchanged (method §1b).

    Args:
        v_weight, v_bias, o_weight (`torch.Tensor`), num_heads, num_kv_heads, head_dim (`int`): See the module.
        rotations (`torch.Tensor` of shape `(num_kv_heads, head_dim, head_dim)`): Orthogonal ``Q_g``.

    Returns:
        `tuple`: float64 ``(v_weight, v_bias, o_weight)``, shapes unchanged (``v_bias`` None if given None).
    """
    group_size, hidden = _value_output_dims(v_weight, v_bias, o_weight, num_heads, num_kv_heads, head_dim)
    _check_shape("rotations", rotations, (num_kv_heads, head_dim, head_dim))
    q = rotations.double()
    # (g*d_h, hidden) -> (g, d_h, hidden); (Q^T V)[b, :] = sum_a Q[a, b] V[a, :]
    values = torch.einsum("gab,gax->gbx", q, v_weight.double().reshape(num_kv_heads, head_dim, hidden))
    bias = None
    if v_bias is not None:
        bias = torch.einsum("gab,ga->gb", q, v_bias.double().reshape(num_kv_heads, head_dim)).reshape(-1)
    # (hidden, h*d_h) -> (hidden, g, G, d_h): every head of group g shares Q_g.
    outputs = torch.einsum("xgka,gab->xgkb", o_weight.double().reshape(hidden, num_kv_heads, group_size, head_dim), q)
    return values.reshape(-1, hidden), bias, outputs.reshape(hidden, num_heads * head_dim)


def rotated_value_second_moment(head_gram: Tensor, rotations: Tensor, num_heads: int, num_kv_heads: int) -> Tensor:
    """Second moment of the rotated value channels, ``diag(Q_g^T C_i Q_g)`` per head (``s_o`` of method §1b).

    Args:
        head_gram (`torch.Tensor` of shape `(num_heads, head_dim, head_dim)`): ``C_i = E[z_i z_i^T]``, with
            ``z_i`` head ``i``'s slice of `o_proj`'s input before rotation.
        rotations (`torch.Tensor` of shape `(num_kv_heads, head_dim, head_dim)`): ``Q_g``.
        num_heads, num_kv_heads (`int`): Attention geometry.

    Returns:
        `torch.Tensor` of shape `(num_heads, head_dim)`, float64.
    """
    if head_gram.ndim != 3 or head_gram.shape[-1] != head_gram.shape[-2]:
        raise ValueError(f"`head_gram` must have shape (num_heads, d, d), got {tuple(head_gram.shape)}.")
    head_dim = head_gram.shape[-1]
    group_size = _group_size(num_heads, num_kv_heads, head_dim)
    _check_shape("head_gram", head_gram, (num_heads, head_dim, head_dim))
    _check_shape("rotations", rotations, (num_kv_heads, head_dim, head_dim))
    q = rotations.double()
    grams = head_gram.double().reshape(num_kv_heads, group_size, head_dim, head_dim)
    # diag(Q^T C Q)[b] = sum_{a,c} Q[a,b] C[a,c] Q[c,b], without forming Q^T C Q.
    moments = torch.einsum("gab,gkac,gcb->gkb", q, grams, q).reshape(num_heads, head_dim)
    # Rounding can leave -1e-17 where the moment is zero, which a later sqrt would turn into NaN.
    return moments.clamp_min(0)


def value_neuron_scores(
    v_weight: Tensor, o_weight: Tensor, input_second_moment: Tensor, value_second_moment: Tensor,
    num_heads: int, num_kv_heads: int, head_dim: int,
) -> Tensor:
    """Importance of each (rotated) value neuron of each group (method §1b).

    ``I[g, j] = ||V_g[j, :] * sqrt(s_x)|| + sum_{i in g} sqrt(s_o[i, j]) * ||O_i[:, j]||``.

    Args:
        v_weight, o_weight (`torch.Tensor`), num_heads, num_kv_heads, head_dim (`int`): See the module docstring.
        input_second_moment (`torch.Tensor` of shape `(hidden,)`): ``s_x``, of the attention input.
        value_second_moment (`torch.Tensor` of shape `(num_heads, head_dim)`): ``s_o``, of `o_proj`'s input.

    Returns:
        `torch.Tensor` of shape `(num_kv_heads, head_dim)`, float64.
    """
    group_size, hidden = _value_output_dims(v_weight, None, o_weight, num_heads, num_kv_heads, head_dim)
    _check_shape("input_second_moment", input_second_moment, (hidden,))
    _check_shape("value_second_moment", value_second_moment, (num_heads, head_dim))
    sqrt_x = _sqrt_moment("input_second_moment", input_second_moment)
    sqrt_o = _sqrt_moment("value_second_moment", value_second_moment).reshape(num_kv_heads, group_size, head_dim)
    value_term = (v_weight.double().reshape(num_kv_heads, head_dim, hidden) * sqrt_x).norm(dim=-1)
    # (hidden, h*d_h) -> (hidden, g, G, d_h); norms over hidden -> (g, G, d_h)
    column_norms = o_weight.double().reshape(hidden, num_kv_heads, group_size, head_dim).norm(dim=0)
    return value_term + (sqrt_o * column_norms).sum(dim=1)


def keep_top_neurons(scores: Tensor, num_keep: int) -> Tensor:
    """Indices of the `num_keep` highest scores along the last dim, ascending; a tie keeps the lower index (§1b, §2).

    Args:
        scores (`torch.Tensor` of shape `(n,)` or `(rows, n)`): Neuron scores (2-D: one row per KV group).
        num_keep (`int`): How many to keep per row, ``1 <= num_keep <= n``.

    Returns:
        `torch.LongTensor` of shape `(num_keep,)` or `(rows, num_keep)`.
    """
    if scores.ndim not in (1, 2):
        raise ValueError(f"`scores` must be 1-D or 2-D, got shape {tuple(scores.shape)}.")
    _check_int("num_keep", num_keep)
    if num_keep > scores.shape[-1]:
        raise ValueError(f"`num_keep` must be <= {scores.shape[-1]}, got {num_keep}.")
    if bool(torch.isnan(scores).any()):
        raise ValueError("`scores` contains NaN.")
    # A stable descending sort keeps equal scores in index order, so the lower index wins a tie.
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return order[..., :num_keep].sort(dim=-1).values


def comparable_neuron_scores(scores: Tensor) -> Tensor:
    """One layer's neuron scores on a scale shared by every layer: the log scores, standardized within the layer.

    Raw scores grow with depth (the residual stream does), so ranking them across layers would strip the first
    layers; standardizing the raw scores lets a few huge neurons set a layer's spread. On the log scale a layer's
    spread is its relative spread. A dead neuron (score 0) is floored at 1e-6 of the layer's mean score before the
    log, so it ranks last without dragging the layer's statistics to minus infinity.

    Args:
        scores (`torch.Tensor` of shape `(n,)`): Non-negative scores of one layer's neurons, ``n >= 2``.

    Returns:
        `torch.Tensor` of shape `(n,)`, float64, mean 0 and standard deviation 1 (all zeros when every score is
        equal).
    """
    if scores.ndim != 1 or scores.shape[0] < 2:
        raise ValueError(f"`scores` must be 1-D with at least 2 neurons, got shape {tuple(scores.shape)}.")
    scores = scores.detach().double()
    if not bool(torch.isfinite(scores).all()) or bool((scores < 0).any()):
        raise ValueError("`scores` must be finite and non-negative.")
    floor = 1e-6 * float(scores.mean()) if float(scores.mean()) > 0 else 1.0
    logs = scores.clamp_min(floor).log()
    spread = logs.std()
    centred = logs - logs.mean()
    return centred / spread if float(spread) > 0 else torch.zeros_like(centred)


def neurons_kept_per_layer(comparable_scores: list[Tensor], keep_total: int, minimum: int = 1) -> list[int]:
    """How many neurons each layer keeps when the ``keep_total`` highest comparable scores are kept across layers.

    Every layer first keeps its ``minimum`` best neurons (no layer is emptied); the rest of the budget goes to the
    highest remaining scores of all layers together. A tie keeps the earlier layer's neuron.

    Args:
        comparable_scores (list of `torch.Tensor` of shape `(n_i,)`): One entry per layer, on a shared scale
            (`comparable_neuron_scores`).
        keep_total (`int`): Neurons kept in all, ``minimum * layers <= keep_total <= sum(n_i)``.
        minimum (`int`): Neurons every layer keeps, ``1 <= minimum <= min(n_i)``.

    Returns:
        list of `int`: neurons kept per layer, summing to ``keep_total``.
    """
    _check_int("keep_total", keep_total)
    _check_int("minimum", minimum)
    sizes = [scores.shape[0] for scores in comparable_scores]
    if not sizes or any(scores.ndim != 1 for scores in comparable_scores):
        raise ValueError("`comparable_scores` must be a non-empty list of 1-D tensors.")
    if minimum > min(sizes):
        raise ValueError(f"`minimum` must be <= the smallest layer ({min(sizes)} neurons), got {minimum}.")
    if not minimum * len(sizes) <= keep_total <= sum(sizes):
        raise ValueError(f"`keep_total` must be in [{minimum * len(sizes)}, {sum(sizes)}], got {keep_total}.")
    # Each layer's best `minimum` are kept outright: rank only the others.
    rest = [torch.sort(scores.double(), descending=True, stable=True).values[minimum:] for scores in comparable_scores]
    owners = torch.cat([torch.full((len(r),), layer) for layer, r in enumerate(rest)])
    # A stable sort over the concatenation keeps equal scores in layer order, so the earlier layer wins a tie.
    order = torch.sort(torch.cat(rest), descending=True, stable=True).indices
    extra = torch.bincount(owners[order[: keep_total - minimum * len(sizes)]], minlength=len(sizes))
    return [minimum + int(count) for count in extra]


def prune_value_output(
    v_weight: Tensor, v_bias: Tensor | None, o_weight: Tensor, keep: Tensor,
    num_heads: int, num_kv_heads: int, head_dim: int,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Keep each group's `keep` value channels, in `v_proj` and in every head of the group in `o_proj` (§1b).

    Args:
        v_weight, v_bias, o_weight (`torch.Tensor`), num_heads, num_kv_heads, head_dim (`int`): See the module
            docstring (geometry before pruning).
        keep (`torch.LongTensor` of shape `(num_kv_heads, d_v)`): Kept channels of each group.

    Returns:
        `tuple`: ``v_weight`` `(num_kv_heads * d_v, hidden)`, ``v_bias`` `(num_kv_heads * d_v,)` or None,
        ``o_weight`` `(hidden, num_heads * d_v)`, in the input dtypes.
    """
    group_size, hidden = _value_output_dims(v_weight, v_bias, o_weight, num_heads, num_kv_heads, head_dim)
    if keep.ndim != 2 or keep.shape[0] != num_kv_heads:
        raise ValueError(f"`keep` must have shape ({num_kv_heads}, d_v), got {tuple(keep.shape)}.")
    keep = _check_keep(keep, head_dim)
    value_dim = keep.shape[1]
    # (g*d_h, hidden) -> (g, d_h, hidden) -> (g, d_v, hidden)
    values = v_weight.reshape(num_kv_heads, head_dim, hidden)
    values = values.gather(1, keep[:, :, None].expand(num_kv_heads, value_dim, hidden))
    bias = None if v_bias is None else v_bias.reshape(num_kv_heads, head_dim).gather(1, keep).reshape(-1)
    # (hidden, h*d_h) -> (hidden, g, G, d_h) -> (hidden, g, G, d_v): each head takes its group's channels.
    outputs = o_weight.reshape(hidden, num_kv_heads, group_size, head_dim)
    outputs = outputs.gather(3, keep[None, :, None, :].expand(hidden, num_kv_heads, group_size, value_dim))
    return values.reshape(-1, hidden), bias, outputs.reshape(hidden, num_heads * value_dim)


def ffn_neuron_scores(
    gate_weight: Tensor, up_weight: Tensor, down_weight: Tensor,
    input_second_moment: Tensor, intermediate_second_moment: Tensor,
) -> Tensor:
    """SwiGLU neuron importance (method §2).

    ``I[i] = ||W_up[i] * sqrt(s_x)|| + ||W_gate[i] * sqrt(s_x)|| + sqrt(s_a[i]) * ||W_down[:, i]||``.

    Args:
        gate_weight, up_weight (`torch.Tensor` of shape `(d_ff, hidden)`), down_weight (`(hidden, d_ff)`): Weights.
        input_second_moment (`torch.Tensor` of shape `(hidden,)`): ``s_x``, of the FFN input.
        intermediate_second_moment (`torch.Tensor` of shape `(d_ff,)`): ``s_a``, of `down_proj`'s input.

    Returns:
        `torch.Tensor` of shape `(d_ff,)`, float64.
    """
    d_ff, hidden = _ffn_dims(gate_weight, up_weight, down_weight)
    _check_shape("input_second_moment", input_second_moment, (hidden,))
    _check_shape("intermediate_second_moment", intermediate_second_moment, (d_ff,))
    sqrt_x = _sqrt_moment("input_second_moment", input_second_moment)
    sqrt_a = _sqrt_moment("intermediate_second_moment", intermediate_second_moment)
    # Row norms a block of rows at a time: each row's norm is reduced on its own, so the blocks give the same bits as
    # one pass, without two (d_ff x hidden) float64 copies (0.94 GB for Llama-3-8B). Blocks of one row are avoided.
    rows = max(2, _SCORE_BLOCK_ELEMENTS // hidden)
    starts = [start for start in range(0, d_ff, rows) if d_ff - start != 1 or start == 0]
    input_term = torch.cat([
        (up_weight[start:end].double() * sqrt_x).norm(dim=1) + (gate_weight[start:end].double() * sqrt_x).norm(dim=1)
        for start, end in zip(starts, starts[1:] + [d_ff])
    ])
    # Column norms reduce across rows: they stay one pass (one float64 copy of down_proj) for the same bits.
    return input_term + sqrt_a * down_weight.double().norm(dim=0)


_SCORE_BLOCK_ELEMENTS = 1 << 22  # elements per block of rows of ffn_neuron_scores (32 MB in float64)


def prune_ffn(
    gate_weight: Tensor, up_weight: Tensor, down_weight: Tensor, keep: Tensor,
    gate_bias: Tensor | None = None, up_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """Keep the intermediate neurons in `keep`: rows of gate and up, columns of down (method §2).

    Args:
        gate_weight, up_weight (`torch.Tensor` of shape `(d_ff, hidden)`), down_weight (`(hidden, d_ff)`): Weights.
        keep (`torch.LongTensor` of shape `(d_keep,)`): Kept neurons.
        gate_bias, up_bias (`torch.Tensor` of shape `(d_ff,)`, *optional*): Biases.

    Returns:
        `tuple`: ``(gate_weight, up_weight, down_weight, gate_bias, up_bias)`` cut to `d_keep`, in the input
        dtypes. `down_proj`'s bias does not depend on the neurons: the caller keeps it.
    """
    d_ff, _ = _ffn_dims(gate_weight, up_weight, down_weight)
    if keep.ndim != 1:
        raise ValueError(f"`keep` must be 1-D, got shape {tuple(keep.shape)}.")
    keep = _check_keep(keep, d_ff)
    for name, bias in (("gate_bias", gate_bias), ("up_bias", up_bias)):
        if bias is not None:
            _check_shape(name, bias, (d_ff,))
    gate, up = gate_weight.index_select(0, keep), up_weight.index_select(0, keep)
    biases = [None if bias is None else bias.index_select(0, keep) for bias in (gate_bias, up_bias)]
    return gate, up, down_weight.index_select(1, keep), biases[0], biases[1]


_COPY_CHUNK_ELEMENTS = 1 << 20  # elements per piece of a copy to the solving device (8 MB in float64)


def solve_workspace(dim: int, device=None) -> Tensor:
    """The one `(dim, dim)` float64 matrix the refit solves work in (`ridge_least_squares`, `refit_output_projection`,
    `choose_refit_damping`), on the device that runs them: each solve copies its Gram into it, piece by piece, and
    factors it in place, so the Gram matrices themselves can stay in host memory."""
    _check_int("dim", dim)
    return torch.empty(dim, dim, dtype=torch.float64, device=device)


def _all_finite(matrix: Tensor) -> bool:
    """No NaN or Inf in ``matrix`` (float64): its sum is then finite. ``torch.isfinite`` would allocate a copy of
    its size (``abs``) and three masks, GBs for an FFN-wide system; an overflowing sum of finite entries (beyond
    1e308) would be refused too, and no solve of such a system is meaningful."""
    return math.isfinite(float(matrix.sum()))


def _load_gram(workspace: Tensor, gram: Tensor, transpose: bool = False) -> Tensor:
    """Copy ``gram`` (any float dtype, any device), or its transpose, into ``workspace`` piece by piece (no full-size
    temporary on either side), refusing a non-finite value."""
    dim = workspace.shape[0]
    step = max(1, _COPY_CHUNK_ELEMENTS // dim)
    for start in range(0, dim, step):
        rows = slice(start, min(start + step, dim))
        workspace[rows].copy_(gram[:, rows].T if transpose else gram[rows])
        if not _all_finite(workspace[rows]):
            raise ValueError("`gram` and `cross` must be finite.")
    return workspace


def _factor_in_place(workspace: Tensor, gram: Tensor, ridge: float) -> Tensor | None:
    """The lower Cholesky factor of ``gram + ridge I``, computed inside ``workspace``; None if not positive definite.

    The workspace receives ``gram``'s transpose, so its transposed view is a column-major (LAPACK-layout) matrix
    whose lower triangle is ``gram``'s own: factoring that view in place reads exactly what a Cholesky of ``gram``
    reads, and needs no second `(dim, dim)` matrix (measured on CPU: no allocation; a row-major one is copied).
    """
    factor = _load_gram(workspace, gram, transpose=True).T
    factor.diagonal().add_(ridge)
    info = torch.empty((), dtype=torch.int32, device=workspace.device)
    torch.linalg.cholesky_ex(factor, out=(factor, info))
    return factor if int(info) == 0 else None


def _column_major(rows: int, columns: int, device) -> Tensor:
    """An empty `(rows, columns)` float64 matrix in LAPACK's column-major layout (a transposed row-major one)."""
    return torch.empty(columns, rows, dtype=torch.float64, device=device).T


def _solve_in_place(factor: Tensor, right_side: Tensor) -> Tensor:
    """Overwrite the column-major ``right_side`` with ``(L L^T)^-1 right_side``, ``L = factor`` (lower): the two
    triangular solves of LAPACK's potrs (measured bit-identical to ``torch.cholesky_solve``), without its copy."""
    torch.linalg.solve_triangular(factor, right_side, upper=False, out=right_side)
    torch.linalg.solve_triangular(factor.T, right_side, upper=True, out=right_side)
    return right_side


def _ridge_solve(gram: Tensor, cross, ridge: float, workspace: Tensor | None = None) -> tuple[Tensor, float]:
    """`ridge_least_squares` that also returns the ridge finally used.

    ``cross`` may also be a function that builds a fresh `(dim, k)` float64 right-hand side in column-major layout on
    the workspace's device: the solution then overwrites it (one such matrix; it is built again for a retry).
    """
    dim = _matrix_dims("gram", gram)[0]
    _check_shape("gram", gram, (dim, dim))
    if workspace is None:
        workspace = solve_workspace(dim, gram.device)
    _check_shape("workspace", workspace, (dim, dim))
    shape, right_side = None, cross
    if not callable(cross):
        if cross.ndim not in (1, 2) or cross.shape[0] != dim:
            raise ValueError(f"`cross` must have shape ({dim}, target_dim) or ({dim},), got {tuple(cross.shape)}.")
        shape, columns = cross.shape, cross.reshape(dim, -1)
        right_side = lambda: _column_major(dim, columns.shape[1], workspace.device).copy_(columns)  # noqa: E731
    _check_real("ridge", ridge)
    tried = float(ridge)
    for attempt in range(_RIDGE_RETRIES + 1):
        target = right_side()
        if not _all_finite(target):
            raise ValueError("`gram` and `cross` must be finite.")
        factor = _factor_in_place(workspace, gram, tried)
        solution = _solve_in_place(factor, target) if factor is not None else None
        del target
        if solution is not None and _all_finite(solution):
            if attempt:
                message = f"ridge_least_squares: not positive definite with ridge {ridge:.3g}; used ridge {tried:.3g}."
                warnings.warn(message, stacklevel=3)
            return (solution if shape is None else solution.reshape(shape)), tried
        if attempt < _RIDGE_RETRIES:
            # Ten times zero is zero: a zero ridge restarts from a tiny fraction of the Gram scale.
            scale = float(gram.diagonal().double().abs().mean())
            tried = tried * 10 if tried > 0 else 1e-10 * max(scale, 1.0)
    raise ValueError(f"ridge_least_squares: no positive definite system up to ridge {tried:.3g} (asked {ridge:.3g}).")


def ridge_least_squares(gram: Tensor, cross: Tensor, ridge: float, workspace: Tensor | None = None) -> Tensor:
    """Solve ``(G + ridge I) W = C`` by Cholesky in float64 (method §3).

    If that is not positive definite the ridge is multiplied by 10, at most 6 times (a zero ridge restarts at
    ``1e-10 * max(mean|diag G|, 1)``), with a warning naming the ridge used; `ValueError` if all fail.

    Args:
        gram (`torch.Tensor` of shape `(dim, dim)`): ``X^T X``, any float dtype, any device (e.g. host memory).
        cross (`torch.Tensor` of shape `(dim, target_dim)` or `(dim,)`): ``X^T E``.
        ridge (`float`): Damping ``lambda >= 0``.
        workspace (`torch.Tensor` of shape `(dim, dim)`, *optional*): float64 scratch from `solve_workspace`, on the
            device that solves; its contents are overwritten. Default: a new one on `gram`'s device.

    Returns:
        `torch.Tensor` shaped like `cross`, float64, on the workspace's device.
    """
    return _ridge_solve(gram, cross, ridge, workspace)[0]


def refit_output_projection(
    gram: Tensor, cross: Tensor, weight: Tensor, damping: float, workspace: Tensor | None = None
) -> Tensor:
    """Least-squares refit of a pruned output projection to the dense output (our addition to the method).

    After neurons are dropped, the kept ones can compensate: ``W' = argmin ||Z W'^T - Y||^2 + lam ||W' - W||^2`` with
    ``Z`` the pruned projection's inputs and ``Y`` the dense sub-layer's outputs on the same tokens. The damping pulls
    towards the pruned weights ``W`` (not towards zero), so a direction the calibration data never excites keeps its
    original weight. ``lam = damping * mean(diag(Z^T Z))``.

    Args:
        gram (`torch.Tensor` of shape `(in, in)`): ``Z^T Z``.
        cross (`torch.Tensor` of shape `(in, out)`): ``Z^T Y``.
        weight (`torch.Tensor` of shape `(out, in)`): the pruned projection's weight.
        damping (`float`): relative damping, > 0.
        workspace (`torch.Tensor` of shape `(in, in)`, *optional*): float64 scratch from `solve_workspace` on the
            device that solves (the Gram and the cross may stay in host memory). Default: one on `weight`'s device.

    Returns:
        `torch.Tensor` of shape `(out, in)`, float64, on `weight`'s device.
    """
    n_in, n_out = _matrix_dims("cross", cross)
    _check_shape("gram", gram, (n_in, n_in))
    _check_shape("weight", weight, (n_out, n_in))
    _check_real("damping", damping)
    if damping <= 0:
        raise ValueError(f"`damping` must be > 0, got {damping}.")
    if workspace is None:
        workspace = solve_workspace(n_in, weight.device)
    device = workspace.device
    lam = damping * float(gram.diagonal().double().mean().clamp_min(1e-30))

    def cross_plus_prior() -> Tensor:
        # cross + lam * W^T, built a piece at a time into one (in, out) float64 matrix on the solving device, which
        # the solve then overwrites with the solution: no float64 copy of the whole weight or cross, no second matrix.
        target = _column_major(n_in, n_out, device)
        step = max(1, _COPY_CHUNK_ELEMENTS // n_out)
        for start in range(0, n_in, step):
            rows = slice(start, min(start + step, n_in))
            prior = weight.T[rows].to(device=device, dtype=torch.float64, copy=True).mul_(lam)
            target[rows] = cross[rows]  # cast to float64 as it is copied
            target[rows] += prior
        return target

    solution, _ = _ridge_solve(gram, cross_plus_prior, lam, workspace)
    return solution.T


def _squared_error_up_to_constant(weight: Tensor, gram: Tensor, cross: Tensor) -> float:
    # ||Y - Z W^T||^2 = ||Y||^2 - 2 tr(W Z^T Y) + tr(W Z^T Z W^T); ||Y||^2 is the same for every candidate W.
    return float((weight @ gram * weight).sum() - 2.0 * (weight * cross.T).sum())


def choose_refit_damping(
    folds: list[tuple[Tensor, Tensor]], weight: Tensor, candidates: tuple[float, ...], num_probes: int | None = 64,
    seed: int = 0, workspace: Tensor | None = None,
) -> float | None:
    """Pick the refit damping by two-fold cross-validation on the calibration tokens (our addition).

    Each candidate is fitted on one fold and scored on the other, both ways, from the folds' ``(Z^T Z, Z^T Y)``
    alone. Keeping the pruned weight unchanged competes too: with few calibration tokens (fewer than the
    projection's inputs) a refit can overfit, and then no refit is chosen.

    The errors are measured on a Gaussian sketch ``S`` `(out, num_probes)` of the output channels: the refit is
    linear in its targets and its prior, so fitting ``(Z^T Y S, S^T W)`` gives exactly ``S^T W'``, and
    ``E ||M S||^2 = ||M||^2`` (entries of ``S`` with variance ``1 / num_probes``) makes every candidate's error an
    unbiased estimate. One sketch serves all candidates, so their comparison shares its noise; the triangular solves
    and error products shrink by ``out / num_probes`` (on SmolLM2's ``down_proj``, 576 outputs, the whole choice
    costs about a third of the exact one). ``num_probes=None`` or ``>= out`` scores the exact errors.

    Memory: the folds may stay in host memory; the solves and the scores run in one `(in, in)` float64 `workspace`
    on the device of `weight`: every fit copies its fold's Gram into it and factors it in place, then each fold's
    Gram is copied in once more to score the fits of the other fold (2 * len(candidates) + 2 copies).

    Args:
        folds: two ``(gram (in, in), cross (in, out))`` pairs from disjoint halves of the tokens, any float dtype.
        weight (`torch.Tensor` of shape `(out, in)`): the pruned projection's weight.
        candidates: relative dampings to try, each > 0.
        num_probes (`int`, *optional*, defaults to 64): Columns of the sketch; None for exact errors.
        seed (`int`, *optional*, defaults to 0): Seed of the sketch (the choice is deterministic).
        workspace (`torch.Tensor` of shape `(in, in)`, *optional*): float64 scratch from `solve_workspace` on the
            solving device. Default: one on `weight`'s device.

    Returns:
        The best damping, or None when no refit beats the unchanged weight.
    """
    if len(folds) != 2:
        raise ValueError(f"`folds` must hold two (gram, cross) pairs, got {len(folds)}.")
    out_features, in_features = _matrix_dims("weight", weight)
    device = weight.device if workspace is None else workspace.device
    weight = weight.to(device=device, dtype=torch.float64)
    if num_probes is not None:
        _check_int("num_probes", num_probes)
    sketch = None
    if num_probes is not None and num_probes < out_features:
        generator = torch.Generator().manual_seed(seed)
        sketch = torch.randn(out_features, num_probes, dtype=torch.float64, generator=generator) / num_probes**0.5
        weight = sketch.to(device).T @ weight
    grams = [gram for gram, _ in folds]
    crosses = [_sketched_cross(cross, sketch, device) for _, cross in folds]
    if workspace is None:  # allocated once the full-size weight and crosses are sketched (and released)
        workspace = solve_workspace(in_features, device)
    fits = [
        [refit_output_projection(grams[fold], crosses[fold], weight, damping, workspace) for damping in candidates]
        for fold in (0, 1)
    ]
    # Errors on each fold: of the unchanged weight, and of every fit of the other fold, from one copy of its Gram.
    kept_error, fit_errors = [], []
    for fold in (0, 1):
        gram = _load_gram(workspace, grams[fold])
        kept_error.append(_squared_error_up_to_constant(weight, gram, crosses[fold]))
        fit_errors.append([_squared_error_up_to_constant(fit, gram, crosses[fold]) for fit in fits[1 - fold]])
    best, best_error = None, kept_error[0] + kept_error[1]
    for index, damping in enumerate(candidates):
        error = fit_errors[1][index] + fit_errors[0][index]  # (fit on fold 0, scored on 1) + (fit on 1, scored on 0)
        if error < best_error:
            best, best_error = damping, error
    return best


def _sketched_cross(cross: Tensor, sketch: Tensor | None, device) -> Tensor:
    """``cross @ sketch`` in float64 on ``device`` (``cross`` itself without a sketch), moved a piece at a time."""
    if sketch is None:
        return cross.to(device=device, dtype=torch.float64)
    sketch = sketch.to(device)
    if cross.device == sketch.device:
        return cross.double() @ sketch
    rows, columns = cross.shape
    step = max(1, _COPY_CHUNK_ELEMENTS // columns)
    pieces = [
        cross[start : start + step].to(device=device, dtype=torch.float64) @ sketch for start in range(0, rows, step)
    ]
    return torch.cat(pieces)


@dataclass(frozen=True, eq=False)
class LinearCalibrationFit:
    """A linear-calibration branch (method §3): ``x -> up @ (down @ x)``, i.e. ``x @ W*_r`` in row form.

    Attributes:
        down (`torch.Tensor` of shape `(rank, dim)`): First `nn.Linear` weight, float64.
        up (`torch.Tensor` of shape `(target_dim, rank)`): Second `nn.Linear` weight, float64.
        mean_correlation (`float`): Mean over output channels of the Pearson r between ``X W*`` and ``E``.
        explained_energy (`float`): UNCENTRED ``1 - ||E - X W*_r||^2 / ||E||^2`` on the calibration tokens, from
            the streamed statistics; 0.0 when ``E`` is identically zero.
        ridge (`float`): The ridge used (larger than asked if Cholesky needed a retry).
    """

    down: Tensor
    up: Tensor
    mean_correlation: float
    explained_energy: float
    ridge: float


def _channel_correlations(moments: StreamingMoments, weight: Tensor) -> Tensor:
    # Pearson r_j of p = (X W)[:, j] and e = E[:, j] over n tokens from the streamed sums, with w = W[:, j]:
    #   sum p = (sum x) . w,  sum p^2 = w^T (X^T X) w,  sum p e = w^T (X^T E)[:, j];  sum e, sum e^2 are streamed;
    #   r = (n sum pe - sum p sum e) / sqrt((n sum p^2 - (sum p)^2) (n sum e^2 - (sum e)^2)).
    n = moments.count
    sum_p, sum_e = (moments.mean * n) @ weight, moments.target_mean * n
    sum_pp, sum_ee = (weight * (moments.gram @ weight)).sum(dim=0), moments.target_sum_squares
    sum_pe = (weight * moments.cross).sum(dim=0)
    var_p, var_e = n * sum_pp - sum_p.square(), n * sum_ee - sum_e.square()
    # A (numerically) constant channel has no correlation: r = 0. The relative test keeps the cancellation noise
    # of n*sum - sum^2 from posing as signal.
    defined = (var_p > 1e-12 * n * sum_pp) & (var_e > 1e-12 * n * sum_ee)
    denominator = torch.where(defined, (var_p * var_e).clamp_min(0).sqrt(), torch.ones_like(var_p))
    r = ((n * sum_pe - sum_p * sum_e) / denominator).clamp(-1.0, 1.0)
    return torch.where(defined, r, torch.zeros_like(r))


def fit_linear_calibration(
    moments: StreamingMoments, rank: int, ridge_factor: float = 0.5, reference_tokens: int = 16384,
    correlation_weighting: bool = True, temperature: float = 0.05,
) -> LinearCalibrationFit:
    """Low-rank linear map from the FFN input to the FFN pruning residual (method §3).

    ``W* = (X^T X + lambda I)^-1 X^T E``, ``lambda = ridge_factor * mean(diag X^T X) * reference_tokens / n``; with
    `correlation_weighting`, output channel ``j`` is scaled by ``sigmoid((r_j - mean r) / temperature)`` before the
    rank-`rank` SVD and the weights are divided back out of the right factor.

    Args:
        moments (`StreamingMoments`): Built with ``gram=True`` and `target_dim`, fed x = FFN input and
            target = ``E`` (dense minus pruned FFN output).
        rank (`int`): Branch rank, ``1 <= rank <= min(dim, target_dim)``.
        ridge_factor (`float`, *optional*, defaults to 0.5): Damping relative to the mean diagonal of ``X^T X``.
        reference_tokens (`int`, *optional*, defaults to 16384): Token count the damping is normalised to.
        correlation_weighting (`bool`, *optional*, defaults to `True`): Apply the reference's channel weighting.
        temperature (`float`, *optional*, defaults to 0.05): Sigmoid temperature of that weighting.

    Returns:
        `LinearCalibrationFit`
    """
    if not isinstance(moments, StreamingMoments) or not moments.has_gram or moments.target_dim is None:
        raise ValueError("`moments` must be a StreamingMoments built with gram=True and target_dim set.")
    if moments.count == 0:
        raise ValueError("`moments` has seen no token.")
    _check_int("rank", rank)
    if rank > min(moments.dim, moments.target_dim):
        raise ValueError(f"`rank` must be <= min(dim, target_dim) = {min(moments.dim, moments.target_dim)}.")
    _check_real("ridge_factor", ridge_factor)
    _check_int("reference_tokens", reference_tokens)
    _check_real("temperature", temperature)
    if temperature == 0:
        raise ValueError("`temperature` must be > 0.")

    gram, cross = moments.gram, moments.cross
    ridge = ridge_factor * float(gram.diagonal().mean()) * reference_tokens / moments.count
    solution, ridge = _ridge_solve(gram, cross, ridge)  # (dim, target_dim)
    correlations = _channel_correlations(moments, solution)
    weights = torch.ones_like(correlations)
    if correlation_weighting:
        # |r_j - mean r| <= 2: for any sane temperature the weights stay far from float64 underflow.
        weights = torch.sigmoid((correlations - correlations.mean()) / temperature)
    u, singular, vh = torch.linalg.svd(solution * weights, full_matrices=False)
    # Singular values split evenly, so neither factor carries the whole scale into a low-precision dtype.
    root = singular[:rank].sqrt()
    left, right = u[:, :rank] * root, root[:, None] * vh[:rank] / weights  # (dim, rank), (rank, target_dim)
    truncated = left @ right  # W*_r

    # ||E - X W||^2 = sum E^2 - 2 tr(W^T X^T E) + tr(W^T X^T X W), all from the streamed sums.
    total = float(moments.target_sum_squares.sum())
    residual = total - 2 * float((truncated * cross).sum()) + float((truncated * (gram @ truncated)).sum())
    return LinearCalibrationFit(
        down=left.T.contiguous(),
        up=right.T.contiguous(),
        mean_correlation=float(correlations.mean()),
        explained_energy=1.0 - max(residual, 0.0) / total if total > 0 else 0.0,
        ridge=ridge,
    )


def whitened_value_output(
    v_weight: Tensor, v_bias: Tensor | None, o_weight: Tensor, head_second_moments: Tensor,
    output_second_moment: Tensor, num_heads: int, num_kv_heads: int, head_dim: int, value_dim: int,
    shrinkage: float,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """V/O of each KV group reduced to `value_dim` channels under the second moments of `o_proj`'s input (§1b with
    the values' correlations, ``value_decomposition="whitened"``).

    Dropping value directions costs ``sum_i ||Z_i (O_i^T - A B_i^T) D_out||^2`` on the tokens, with ``Z_i`` head
    ``i``'s slice of `o_proj`'s input (the values once the attention has mixed them), ``A`` `(head_dim, value_dim)`
    the group's new value map and ``B_i`` its heads' new output columns. With the group's mean ``E[z z^T]`` over its
    heads in place of each head's own, shrunk by `shrinkage` toward its diagonal (``shrink_to_diagonal``), and
    ``L = whitening_factor`` of it, the minimiser comes from the truncated SVD ``U_r S_r W_r^T`` of
    ``L^T [O_1^T D_out, ..., O_G^T D_out]``: the group's values become ``U_r^T L^-1 V_g`` (its bias too) and each
    head's output columns ``O_i L U_r``. With ``E[z z^T] = I`` it is the fast OND's rotation keeping its top singular
    directions; otherwise the map is not orthogonal.

    Args:
        v_weight, v_bias, o_weight (`torch.Tensor`), num_heads, num_kv_heads, head_dim (`int`): See the module
            docstring (geometry before pruning).
        head_second_moments (`torch.Tensor` of shape `(num_heads, head_dim, head_dim)`): ``E[z_i z_i^T]`` per head.
        output_second_moment (`torch.Tensor` of shape `(hidden,)`): ``s_out``, of `o_proj`'s OUTPUT.
        value_dim (`int`): Value channels kept per group, ``1 <= value_dim <= head_dim``.
        shrinkage (`float`): In [0, 1]; 1 weighs each value channel alone, 0 trusts the measured correlations.

    Returns:
        `tuple`: float64 ``(v_weight, v_bias, o_weight)`` of shapes `(num_kv_heads * value_dim, hidden)`,
        `(num_kv_heads * value_dim,)` or None, `(hidden, num_heads * value_dim)`.
    """
    group_size, hidden = _value_output_dims(v_weight, v_bias, o_weight, num_heads, num_kv_heads, head_dim)
    _check_shape("head_second_moments", head_second_moments, (num_heads, head_dim, head_dim))
    _check_shape("output_second_moment", output_second_moment, (hidden,))
    _check_int("value_dim", value_dim)
    if value_dim > head_dim:
        raise ValueError(f"`value_dim` must be <= head_dim ({head_dim}), got {value_dim}.")
    sqrt_out = _sqrt_moment("output_second_moment", output_second_moment)
    values = v_weight.double().reshape(num_kv_heads, head_dim, hidden)
    biases = None if v_bias is None else v_bias.double().reshape(num_kv_heads, head_dim)
    # (hidden, h*d_h) -> (hidden, g, G, d_h): O_i per head of each group.
    outputs = o_weight.double().reshape(hidden, num_kv_heads, group_size, head_dim)
    group_moments = head_second_moments.double().reshape(num_kv_heads, group_size, head_dim, head_dim).mean(dim=1)
    new_values, new_biases, new_outputs = [], [], []
    for group in range(num_kv_heads):
        lower = whitening_factor(shrink_to_diagonal(group_moments[group], shrinkage))
        # [O_1^T D_out, ..., O_G^T D_out]: (hidden, G, d_h) -> (d_h, G, hidden) -> (d_h, G*hidden)
        scaled = (outputs[:, group] * sqrt_out[:, None, None]).permute(2, 1, 0).reshape(head_dim, -1)
        if scaled.shape[-1] < head_dim:  # zero columns keep the thin SVD's U square (tiny test models)
            scaled = torch.nn.functional.pad(scaled, (0, head_dim - scaled.shape[-1]))
        kept = torch.linalg.svd(lower.T @ scaled, full_matrices=False).U[:, :value_dim]  # U_r, (d_h, d_v)
        # U_r^T L^-1 is the transpose of L^-T U_r, one triangular solve.
        value_map = torch.linalg.solve_triangular(lower.T, kept, upper=True).T  # (d_v, d_h)
        new_values.append(value_map @ values[group])
        if biases is not None:
            new_biases.append(value_map @ biases[group])
        new_outputs.append(outputs[:, group] @ (lower @ kept))  # (hidden, G, d_v)
    bias = None if biases is None else torch.cat(new_biases)
    output_weight = torch.stack(new_outputs, dim=1).reshape(hidden, num_heads * value_dim)
    return torch.cat(new_values), bias, output_weight


def exact_value_output_decomposition(
    v_weight: Tensor, v_bias: Tensor | None, o_weight: Tensor, input_second_moment: Tensor,
    output_second_moment: Tensor, num_heads: int, num_kv_heads: int, head_dim: int, value_dim: int,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Exact orthogonal neuron decomposition of V/O per KV group: the variant the fast OND approximates (§1b).

    Per group ``g`` the activation-weighted value-to-output product ``M_g = D_x V_g^T [O_1^T D_out, ..., O_G^T D_out]``
    `(hidden, G * hidden)`, rank <= `head_dim`, is replaced by its best rank-`value_dim` approximation (truncated
    SVD, top `value_dim` singular triplets), with ``D_x = diag(sqrt(s_x))`` (attention input) and
    ``D_out = diag(sqrt(s_out))`` (`o_proj` output). The weights are un-scaled back without inverting ``D``: with
    ``A = D_x V_g^T`` and ``B = [O_i^T D_out]_i`` and ``M_g = U S W^T``, the new values are ``C^T V_g`` and the new
    output columns ``O_i E``, ``C = B W_r S_r^-1/2``, ``E = A^T U_r S_r^-1/2`` (both `(head_dim, value_dim)`), so
    ``A C E^T B = U_r S_r W_r^T`` and the singular values are split evenly between V and O.

    The result equals the SVD of the full `(hidden, G * hidden)` product (the paper's slow route), but it is computed
    from ``A = Q R`` and the SVD of the `(head_dim, G * hidden)` matrix ``R B``, which share its singular triplets.
    Unlike the fast OND (an orthogonal rotation, then the lowest-scored neurons dropped), the kept subspace is the
    optimum of the weighted product error itself; the transform is not orthogonal.

    Args:
        v_weight, v_bias, o_weight (`torch.Tensor`), num_heads, num_kv_heads, head_dim (`int`): See the module
            docstring (geometry before pruning).
        input_second_moment (`torch.Tensor` of shape `(hidden,)`): ``s_x``, of the attention input.
        output_second_moment (`torch.Tensor` of shape `(hidden,)`): ``s_out``, of `o_proj`'s OUTPUT.
        value_dim (`int`): Value channels kept per group, ``1 <= value_dim <= head_dim``.

    Returns:
        `tuple`: float64 ``(v_weight, v_bias, o_weight)`` of shapes `(num_kv_heads * value_dim, hidden)`,
        `(num_kv_heads * value_dim,)` or None, `(hidden, num_heads * value_dim)`.
    """
    group_size, hidden = _value_output_dims(v_weight, v_bias, o_weight, num_heads, num_kv_heads, head_dim)
    _check_shape("input_second_moment", input_second_moment, (hidden,))
    _check_shape("output_second_moment", output_second_moment, (hidden,))
    _check_int("value_dim", value_dim)
    if value_dim > head_dim:
        raise ValueError(f"`value_dim` must be <= head_dim ({head_dim}), got {value_dim}.")
    sqrt_x = _sqrt_moment("input_second_moment", input_second_moment)
    sqrt_out = _sqrt_moment("output_second_moment", output_second_moment)
    values = v_weight.double().reshape(num_kv_heads, head_dim, hidden)  # V_g, (g, d_h, hidden)
    # (hidden, h*d_h) -> (hidden, g, G, d_h): O_i per head of each group.
    outputs = o_weight.double().reshape(hidden, num_kv_heads, group_size, head_dim)
    scaled_values = values.transpose(1, 2) * sqrt_x[None, :, None]  # A_g = D_x V_g^T, (g, hidden, d_h)
    # B_g = [O_1^T D_out, ..., O_G^T D_out]: (hidden, g, G, d_h) -> (g, d_h, G, hidden) -> (g, d_h, G*hidden)
    scaled_outputs = (outputs * sqrt_out[:, None, None, None]).permute(1, 3, 2, 0)
    scaled_outputs = scaled_outputs.reshape(num_kv_heads, head_dim, group_size * hidden)
    # Zero rows of A and zero columns of B change no singular triplet but keep R square and the thin SVD at
    # head_dim triplets when hidden (or G * hidden) < head_dim, as in tiny test models.
    if hidden < head_dim:
        scaled_values = torch.nn.functional.pad(scaled_values, (0, 0, 0, head_dim - hidden))
    if scaled_outputs.shape[-1] < head_dim:
        scaled_outputs = torch.nn.functional.pad(scaled_outputs, (0, head_dim - scaled_outputs.shape[-1]))
    # M_g = A_g B_g = Q_g (R_g B_g): the SVD of the small R_g B_g gives M_g's singular values and right vectors,
    # and U = Q_g U'.
    r_factor = torch.linalg.qr(scaled_values).R  # (g, d_h, d_h)
    small_left, singular, small_right_t = torch.linalg.svd(r_factor @ scaled_outputs, full_matrices=False)
    singular = singular[:, :value_dim]
    # S^-1/2 of the kept triplets; a (numerically) zero singular value carries nothing, so its factor is zeroed
    # rather than inverted (pseudo-inverse).
    tiny = singular[:, :1] * 1e-12 * max(hidden, head_dim)
    inverse_root = torch.where(singular > tiny, singular.clamp_min(1e-300).rsqrt(), torch.zeros_like(singular))
    # C = B W_r S^-1/2: (g, d_h, G*hidden) @ (g, G*hidden, d_v) -> (g, d_h, d_v)
    value_map = scaled_outputs @ small_right_t[:, :value_dim].transpose(1, 2) * inverse_root[:, None, :]
    # E = A^T U_r S^-1/2 = R^T U'_r S^-1/2 (A^T Q = R^T): (g, d_h, d_h) @ (g, d_h, d_v) -> (g, d_h, d_v)
    output_map = r_factor.transpose(1, 2) @ small_left[:, :, :value_dim] * inverse_root[:, None, :]
    # New V_g = C^T V_g: (g, d_v, d_h) @ (g, d_h, hidden) -> (g, d_v, hidden)
    new_values = value_map.transpose(1, 2) @ values
    bias = None
    if v_bias is not None:
        bias = torch.einsum("gav,ga->gv", value_map, v_bias.double().reshape(num_kv_heads, head_dim)).reshape(-1)
    # New O_i = O_i E_g: (hidden, g, G, d_h) x (g, d_h, d_v) -> (hidden, g, G, d_v)
    new_outputs = torch.einsum("xgka,gav->xgkv", outputs, output_map)
    return new_values.reshape(-1, hidden), bias, new_outputs.reshape(hidden, num_heads * value_dim)
