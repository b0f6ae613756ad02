"""The Olica algorithm for one decoder layer: which statistics to collect, and how to build the pruned layer.

A thin stateful shell over the pure functions of ``olica_math``: hooks feed ``StreamingMoments``; ``prune`` turns
the moments and the dense weights into the weights of an ``OlicaDecoderLayer``; the linear-calibration fit is
observed on the pruned layer's own FFN inputs. The pipeline decides where layers and activations live.
"""

from __future__ import annotations

from contextlib import contextmanager
import dataclasses
from dataclasses import dataclass, field

import torch
from accelerate import init_empty_weights

from . import olica_math as om
from .modeling import OlicaDecoderLayer, OlicaLowRankLinear


@dataclass
class _DenseStatistics:
    attention_input: om.StreamingMoments
    value_head_gram: torch.Tensor  # (heads, head_dim, head_dim), sum over tokens of o_proj's input per head
    attention_output: om.StreamingMoments
    mlp_input: om.StreamingMoments
    intermediate: om.StreamingMoments
    value_tokens: int = 0


@dataclass
class CalibrationCandidate:
    """A fitted linear-calibration branch for one layer, kept until the layers that get one are chosen."""

    layer_idx: int
    fit: om.LinearCalibrationFit
    residual_energy: float  # mean squared norm of the residual the branch models, per token


@dataclass
class OlicaLayerPruner:
    """Prunes decoder layers one at a time to the dimensions of ``plan_config`` (an Olica config).

    Args:
        plan_config: Olica config whose per-layer lists hold the target dimensions.
        calibration_rank: rank of the linear-calibration branch fitted for each layer (0: none).
        ridge_strength: ridge factor of the least-squares fit (method §3).
        refit_damping: damping of the least-squares refit of ``o_proj`` and ``down_proj``: ``"auto"`` (chosen per
            projection by two-fold cross-validation, which may also decline the refit), a number, or None (no refit).
        storage_device: where per-batch tensors kept between passes live (None: where they are computed).
        statistics_dtype: accumulation dtype of the activation statistics.
        value_decomposition: ``"fast"`` (the fast OND: rotate, score, drop) or ``"exact"`` (truncated SVD of each
            group's activation-weighted V/O product, ``olica_math.exact_value_output_decomposition``).
        skip_layers: layers left dense: their weights are copied bit for bit (no rotation, no refit, no statistics).
    """

    plan_config: object
    calibration_rank: int = 0
    ridge_strength: float = 0.5
    refit_damping: float | str | None = "auto"
    storage_device: torch.device | None = None
    statistics_dtype: torch.dtype = torch.float64
    value_decomposition: str = "fast"
    skip_layers: tuple[int, ...] = ()
    candidates: list[CalibrationCandidate] = field(default_factory=list)
    _stats: _DenseStatistics | None = None
    _dense_attention_outputs: list[torch.Tensor] = field(default_factory=list)
    _dense_layer_outputs: list[torch.Tensor] = field(default_factory=list)
    _ffn_batches: list[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]] = field(default_factory=list)
    _ffn_refit: list[om.StreamingMoments] | None = None
    _attention_values: list[torch.Tensor] = field(default_factory=list)  # o_proj inputs of the pruned attention
    _record: dict = field(default_factory=dict)

    # ---- statistics of the dense layer ----------------------------------------------------------------------

    @contextmanager
    def observe_dense(self, layer, layer_idx: int):
        if layer_idx in self.skip_layers:
            yield  # a skipped layer is copied, not pruned: nothing to measure
            return
        attention, mlp = layer.self_attn, layer.mlp
        device = next(layer.parameters()).device
        d, heads, head_dim = self.plan_config.hidden_size, self.plan_config.num_attention_heads, attention.head_dim
        stats = _DenseStatistics(
            attention_input=om.StreamingMoments(d, device=device, dtype=self.statistics_dtype),
            value_head_gram=torch.zeros(heads, head_dim, head_dim, dtype=self.statistics_dtype, device=device),
            attention_output=om.StreamingMoments(d, device=device, dtype=self.statistics_dtype),
            mlp_input=om.StreamingMoments(d, device=device, dtype=self.statistics_dtype),
            intermediate=om.StreamingMoments(mlp.down_proj.in_features, device=device, dtype=self.statistics_dtype),
        )

        def on_attention_input(module, args):
            stats.attention_input.update(args[0])

        def on_value_output(module, args, output):
            values = args[0].reshape(-1, heads, head_dim).to(self.statistics_dtype)  # (tokens, heads, head_dim)
            stats.value_head_gram += torch.einsum("thi,thj->hij", values, values)
            stats.value_tokens += values.shape[0]
            stats.attention_output.update(output)

        def on_mlp_input(module, args):
            stats.mlp_input.update(args[0])

        def on_intermediate(module, args):
            stats.intermediate.update(args[0])

        def on_attention_output(module, args, output):
            self._dense_attention_outputs.append(self._store(output[0]))

        def on_layer_output(module, args, output):
            output = output[0] if isinstance(output, tuple) else output
            self._dense_layer_outputs.append(self._store(output))

        handles = [
            attention.q_proj.register_forward_pre_hook(on_attention_input),
            attention.o_proj.register_forward_hook(on_value_output),
            mlp.gate_proj.register_forward_pre_hook(on_mlp_input),
            mlp.down_proj.register_forward_pre_hook(on_intermediate),
        ]
        self._dense_attention_outputs, self._dense_layer_outputs = [], []
        if self.refit_damping is not None:
            handles.append(attention.register_forward_hook(on_attention_output))
        if self.refit_damping is not None or self.calibration_rank > 0:
            handles.append(layer.register_forward_hook(on_layer_output))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        self._stats = stats

    # ---- the pruned layer -----------------------------------------------------------------------------------

    @torch.no_grad()
    def prune(self, layer, layer_idx: int) -> OlicaDecoderLayer:
        if layer_idx in self.skip_layers:
            return copy_dense_layer(self.plan_config, layer_idx, layer)
        stats, config = self._stats, self.plan_config
        attention, mlp = layer.self_attn, layer.mlp
        dtype, device = attention.o_proj.weight.dtype, attention.o_proj.weight.device
        heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, attention.head_dim
        s_attention = stats.attention_input.second_moment
        state: dict[str, torch.Tensor] = {}

        # §1a: activation-weighted low rank for Q and K (head count and head dim unchanged: RoPE-safe).
        for name, rank in (("q_proj", config.query_ranks[layer_idx]), ("k_proj", config.key_ranks[layer_idx])):
            projection = getattr(attention, name)
            if rank is None:
                state[f"self_attn.{name}.weight"] = projection.weight
                if projection.bias is not None:
                    state[f"self_attn.{name}.bias"] = projection.bias
                continue
            down, up = om.activation_weighted_low_rank(projection.weight, s_attention, rank)
            state[f"self_attn.{name}.down.weight"] = down
            state[f"self_attn.{name}.up.weight"] = up
            if projection.bias is not None:
                state[f"self_attn.{name}.up.bias"] = projection.bias

        # §1b: rotate each KV group's value neurons by importance (fast OND), then drop the weakest.
        v_proj, o_proj = attention.v_proj, attention.o_proj
        if self.value_decomposition == "exact":
            # The variant the fast OND approximates: truncated SVD of each group's weighted V/O product.
            v_weight, v_bias, o_weight = om.exact_value_output_decomposition(
                v_proj.weight, v_proj.bias, o_proj.weight, s_attention, stats.attention_output.second_moment,
                heads, kv_heads, head_dim, config.value_head_dims[layer_idx],
            )
        else:
            rotations = om.value_output_rotation(
                o_proj.weight, stats.attention_output.second_moment, heads, kv_heads, head_dim
            )
            v_weight, v_bias, o_weight = om.rotate_value_output(
                v_proj.weight, v_proj.bias, o_proj.weight, rotations, heads, kv_heads, head_dim
            )
            value_second_moment = om.rotated_value_second_moment(
                stats.value_head_gram.double() / max(stats.value_tokens, 1), rotations, heads, kv_heads
            )
            value_scores = om.value_neuron_scores(
                v_weight, o_weight, s_attention, value_second_moment, heads, kv_heads, head_dim
            )
            keep_values = om.keep_top_neurons(value_scores, config.value_head_dims[layer_idx])
            v_weight, v_bias, o_weight = om.prune_value_output(
                v_weight, v_bias, o_weight, keep_values, heads, kv_heads, head_dim
            )
        state["self_attn.v_proj.weight"] = v_weight
        if v_bias is not None:
            state["self_attn.v_proj.bias"] = v_bias
        state["self_attn.o_proj.weight"] = o_weight
        if o_proj.bias is not None:
            state["self_attn.o_proj.bias"] = o_proj.bias

        # §2: FFN neuron pruning.
        ffn_scores = om.ffn_neuron_scores(
            mlp.gate_proj.weight,
            mlp.up_proj.weight,
            mlp.down_proj.weight,
            stats.mlp_input.second_moment,
            stats.intermediate.second_moment,
        )
        keep_ffn = om.keep_top_neurons(ffn_scores, config.intermediate_sizes[layer_idx])
        gate, up, down, gate_bias, up_bias = om.prune_ffn(
            mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, keep_ffn,
            mlp.gate_proj.bias, mlp.up_proj.bias,
        )
        state.update({"mlp.gate_proj.weight": gate, "mlp.up_proj.weight": up, "mlp.down_proj.weight": down})
        if gate_bias is not None:
            state.update({"mlp.gate_proj.bias": gate_bias, "mlp.up_proj.bias": up_bias})
        if mlp.down_proj.bias is not None:
            state["mlp.down_proj.bias"] = mlp.down_proj.bias

        for name, tensor in layer.state_dict().items():
            if "norm" in name:
                state[name] = tensor

        self._stats = None
        return assemble_pruned_layer(config, layer_idx, state, device=device, dtype=dtype)

    def _store(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().to(self.storage_device) if self.storage_device is not None else tensor.detach()

    def _store_activation(self, activation: torch.Tensor) -> torch.Tensor:
        """The pruned FFN's activations (``N x f``, the widest tensor kept between passes) wait for ``finish_layer``
        in host memory when they are computed on an accelerator, as the refit sums do: ``finish_layer`` copies each
        batch back once to project it (an exact copy: results unchanged). On a CPU run they stay in place."""
        if activation.device.type == "cpu":
            return self._store(activation)
        # Page-locked from CUDA: both copies run at full bus speed (the CUDA host allocator reuses the blocks).
        pinned = activation.device.type == "cuda"
        host = torch.empty(activation.shape, dtype=activation.dtype, device="cpu", pin_memory=pinned)
        return host.copy_(activation.detach())

    # ---- refit of o_proj: the pruned attention, fitted to the dense attention output -----------------------

    @torch.no_grad()
    def refine(self, dense, pruned, layer_idx: int, replay) -> None:
        """Refit ``o_proj`` so the pruned attention (low-rank Q/K, fewer value channels) matches the dense one.

        ``replay(module)`` runs a module over every calibration batch, as a decoder layer is run.
        """
        if self.refit_damping is None or layer_idx in self.skip_layers:
            return
        o_proj = pruned.self_attn.o_proj
        folds = self._folds(o_proj.in_features, o_proj.out_features, o_proj.weight.device)
        self._attention_values = []

        def on_value_output(module, args):
            # Each target is released once used: the pass ends holding the values, not the targets too.
            target = self._dense_attention_outputs.pop(0).to(args[0].device)
            if o_proj.bias is not None:
                target = target - o_proj.bias  # the refit fits the weight; the bias (the dense one) is added unchanged
            _update_folds(folds, args[0], target)
            # Kept for the propagation pass, which then applies only the refitted o_proj instead of rerunning
            # the attention: the inputs, and so these values, are the same in both passes.
            self._attention_values.append(self._store(args[0]))

        handle = o_proj.register_forward_pre_hook(on_value_output)
        try:
            replay(_AttentionBlock(pruned))
        finally:
            handle.remove()
        self._dense_attention_outputs = []
        weight, damping = self._refit(folds, o_proj.weight)
        self._record = {"o_proj_refit_damping": damping}
        if weight is not None:
            o_proj.weight.copy_(weight.to(o_proj.weight.dtype))

    def _folds(self, in_features: int, out_features: int, device: torch.device) -> list[om.StreamingMoments]:
        """Two folds of refit statistics, summed in host memory: the (in x in) Gram matrices of an FFN-wide
        ``down_proj`` are GBs that the compute device then never holds (it computes each batch's products)."""
        return [_host_moments(in_features, out_features, self.statistics_dtype, device) for _ in range(2)]

    def _refit(self, folds: list[om.StreamingMoments], weight: torch.Tensor) -> tuple[torch.Tensor | None, float]:
        """The refitted weight and its damping, or (None, None) when the refit is disabled or declined."""
        filled = [fold for fold in folds if fold.count > 0]
        if self.refit_damping is None or not filled:
            return None, None
        damping = self.refit_damping
        if damping == "auto":
            if len(filled) < 2:
                damping = max(REFIT_DAMPING_CANDIDATES)  # one sequence: no validation possible, damp strongly
            else:
                # The solves run on the compute device, each in one (in x in) float64 workspace; the folds stay
                # in host memory and are copied into it piece by piece.
                damping = om.choose_refit_damping(
                    [(fold.raw_sum("gram"), fold.raw_sum("cross")) for fold in folds], weight, REFIT_DAMPING_CANDIDATES
                )
                if damping is None:
                    return None, None
        merged = filled[0]
        for fold in filled[1:]:
            merged.absorb(fold)  # in place: no third copy of the (in x in) Gram
        gram, cross = merged.raw_sum("gram"), merged.raw_sum("cross")
        return om.refit_output_projection(gram, cross, weight, damping), damping

    # ---- the FFN on the pruned layer's own inputs: down_proj refit and linear calibration -------------------

    @contextmanager
    def observe_pruned(self, dense, pruned, layer_idx: int):
        """Observe the propagation pass: the FFN inputs the pruned layer really produces (pruned attention included).

        The target is what the FFN must add to the pruned layer's residual stream to reproduce the dense layer's
        output on the same layer input; ``down_proj`` is refitted to it and the linear-calibration branch models
        what remains. ``down_proj`` itself is not run in this pass (its weights are refitted from it):
        ``finish_layer`` adds its final output to the layer outputs, one projection instead of two.
        """
        mlp = pruned.mlp
        self._ffn_batches = []
        self._ffn_refit = self._folds(mlp.down_proj.in_features, mlp.hidden_size, mlp.down_proj.weight.device)
        if (self.refit_damping is None and self.calibration_rank <= 0) or layer_idx in self.skip_layers:
            yield
            return
        down_proj, deferred = mlp.down_proj, _DeferredProjection(mlp.down_proj.out_features)
        attention = pruned.self_attn
        if self._attention_values:
            pruned.self_attn = _CachedAttention(attention.o_proj, self._attention_values)
        bias = down_proj.bias
        residuals = []

        def on_residual(module, args):
            residuals.append(args[0])

        def on_mlp(module, args, output):
            ffn_input, activation = args[0], deferred.inputs.pop()
            # What the FFN must add to the pruned layer's residual stream to give the dense layer's output: the fit
            # then also absorbs what is left of the attention error (measured: better than targeting the dense
            # FFN's output on the same input, 48.2 vs 49.1 on SmolLM2 at 20%, and no dense FFN rerun).
            # Each dense output is released once used (the pass's outputs take its place).
            target = self._dense_layer_outputs.pop(0).to(ffn_input.device) - residuals.pop()
            if bias is not None:
                target = target - bias  # the refit fits the weight; the bias is added unchanged
            if self.refit_damping is not None:
                _update_folds(self._ffn_refit, activation, target)
            # The FFN input and the target feed only the calibration branch's fit: without a branch, keep only what
            # finish_layer projects (N x d_ff instead of N x (2d + d_ff) held across the pass).
            fits_branch = self.calibration_rank > 0
            self._ffn_batches.append((
                self._store(ffn_input) if fits_branch else None,
                self._store_activation(activation),
                self._store(target) if fits_branch else None,
            ))

        handles = [
            pruned.post_attention_layernorm.register_forward_pre_hook(on_residual),
            mlp.register_forward_hook(on_mlp),
        ]
        mlp.down_proj = deferred
        try:
            yield
        finally:
            mlp.down_proj = down_proj
            pruned.self_attn = attention
            for handle in handles:
                handle.remove()
            self._dense_layer_outputs, self._attention_values = [], []

    @torch.no_grad()
    def finish_layer(self, pruned, layer_idx: int, outputs: list[torch.Tensor]) -> dict:
        """Refit ``down_proj``, add its output to ``outputs`` (deferred from the pass), fit the calibration branch."""
        mlp = pruned.mlp
        down = mlp.down_proj
        weight, damping = self._refit(self._ffn_refit, down.weight) if self._ffn_batches else (None, None)
        if weight is not None:
            down.weight.copy_(weight.to(down.weight.dtype))
        record = {**planned_dimensions(self.plan_config, layer_idx), **self._record, "down_proj_refit_damping": damping}
        self._record = {}
        moments = None
        if self.calibration_rank > 0 and self._ffn_batches:
            # Summed in host memory, and the branch is fitted there: a (d x d) solve, once per layer.
            moments = _host_moments(mlp.hidden_size, mlp.hidden_size, self.statistics_dtype, down.weight.device)
        for index, (ffn_input, activation, target) in enumerate(self._ffn_batches):
            projected = down(activation.to(down.weight.device))  # bias included
            outputs[index] += projected.to(outputs[index].device)
            if moments is not None:
                # What the pruned FFN (refitted down_proj included) still misses: the branch's target.
                projected = projected if down.bias is None else projected - down.bias
                moments.update(ffn_input, (target.to(projected.device) - projected).to(ffn_input.device))
        if moments is not None:
            fit = om.fit_linear_calibration(moments, self.calibration_rank, ridge_factor=self.ridge_strength)
            energy = float(moments.target_sum_squares.sum() / moments.count)
            self.candidates.append(CalibrationCandidate(layer_idx, fit, energy))
            record.update(
                calibration_mean_correlation=fit.mean_correlation,
                calibration_explained_energy=fit.explained_energy,
                ffn_residual_energy=energy,
            )
        self._ffn_batches, self._ffn_refit = [], None
        return record

    def choose_calibrated_layers(self, count: int, exclude=()) -> list[CalibrationCandidate]:
        """The ``count`` layers whose branch removes the most residual energy (never the last layer, never a
        layer in ``exclude``, i.e. a skipped layer, which was not pruned)."""
        if count <= 0 or not self.candidates:
            return []
        last = max(candidate.layer_idx for candidate in self.candidates)
        eligible = [c for c in self.candidates if c.layer_idx != last and c.layer_idx not in set(exclude)]
        eligible.sort(key=lambda c: c.fit.explained_energy * c.residual_energy, reverse=True)
        return sorted(eligible[:count], key=lambda c: c.layer_idx)

    # ---- resume: the state carried from one layer to the next (everything else is reset per layer) ---------------

    def state_dict(self) -> dict:
        """The cross-layer state, tensors and plain values only: the calibration candidates fitted so far."""
        return {
            "candidates": [
                {"layer_idx": c.layer_idx, "residual_energy": c.residual_energy, "fit": dataclasses.asdict(c.fit)}
                for c in self.candidates
            ]
        }

    def load_state_dict(self, state: dict) -> None:
        self.candidates = [
            CalibrationCandidate(c["layer_idx"], om.LinearCalibrationFit(**c["fit"]), c["residual_energy"])
            for c in state["candidates"]
        ]


def assemble_pruned_layer(config, layer_idx: int, state: dict[str, torch.Tensor], *, device, dtype):
    """An ``OlicaDecoderLayer`` of ``config``'s dimensions holding ``state`` (cast to ``dtype`` on ``device``)."""
    with init_empty_weights():
        layer = OlicaDecoderLayer(config, layer_idx)
    layer.load_state_dict(
        {name: tensor.to(device=device, dtype=dtype).contiguous() for name, tensor in state.items()},
        strict=True,
        assign=True,
    )
    return layer.eval()


def copy_dense_layer(config, layer_idx: int, layer) -> OlicaDecoderLayer:
    """An ``OlicaDecoderLayer`` at full dimensions holding ``layer``'s own tensors, unchanged (a skipped layer)."""
    reference = layer.self_attn.o_proj.weight
    return assemble_pruned_layer(config, layer_idx, layer.state_dict(), device=reference.device, dtype=reference.dtype)


def planned_dimensions(config, layer_idx: int) -> dict:
    """The report record of one layer's planned dimensions."""
    return {
        "layer": layer_idx,
        "query_rank": config.query_ranks[layer_idx],
        "key_rank": config.key_ranks[layer_idx],
        "value_head_dim": config.value_head_dims[layer_idx],
        "intermediate_size": config.intermediate_sizes[layer_idx],
    }


# Relative dampings tried by the cross-validated refit (multiples of the mean diagonal of Z^T Z).
REFIT_DAMPING_CANDIDATES = (1e-3, 1e-2, 1e-1, 1.0, 10.0)


def _host_moments(dim: int, target_dim: int, dtype: torch.dtype, compute_device: torch.device) -> om.StreamingMoments:
    """Gram and cross sums kept in host memory (page-locked when the batches come from a CUDA device)."""
    pinned = torch.device(compute_device).type == "cuda"
    return om.StreamingMoments(dim, gram=True, target_dim=target_dim, device="cpu", dtype=dtype, pin_memory=pinned)


def _update_folds(folds: list[om.StreamingMoments], inputs: torch.Tensor, targets: torch.Tensor) -> None:
    """Alternate sequences between the two folds (whole batches when a batch holds one sequence)."""
    if inputs.ndim >= 3 and inputs.shape[0] >= 2:
        folds[0].update(inputs[0::2], targets[0::2])
        folds[1].update(inputs[1::2], targets[1::2])
    else:
        min(folds, key=lambda fold: fold.count).update(inputs, targets)


class _DeferredProjection(torch.nn.Module):
    """Stands in for ``down_proj`` during the propagation pass: keeps its inputs and contributes nothing yet."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features
        self.inputs: list[torch.Tensor] = []

    def forward(self, activation: torch.Tensor) -> torch.Tensor:
        self.inputs.append(activation)
        return activation.new_zeros(*activation.shape[:-1], self.out_features)


class _CachedAttention(torch.nn.Module):
    """Stands in for the pruned attention during the propagation pass: ``o_proj`` applied to the values the ``o_proj``
    refit pass computed on the same inputs, batch by batch and in the same order (each is released once used)."""

    def __init__(self, o_proj: torch.nn.Module, values: list[torch.Tensor]):
        super().__init__()
        self.o_proj = o_proj
        self.values = values

    def forward(self, hidden_states: torch.Tensor, **kwargs):
        values = self.values.pop(0).to(hidden_states.device)
        return self.o_proj(values), None


class _AttentionBlock(torch.nn.Module):
    """The attention half of a decoder layer (norm + attention), run on the layer's inputs to refit ``o_proj``."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, hidden_states, **kwargs):
        normed = self.layer.input_layernorm(hidden_states)
        return self.layer.self_attn(hidden_states=normed, **kwargs)[0]


def attach_linear_calibration(layer: OlicaDecoderLayer, fit: om.LinearCalibrationFit) -> None:
    """Give a pruned layer its calibration branch (``mlp.linear_calibration``)."""
    reference = layer.mlp.down_proj.weight
    rank, dim = fit.down.shape
    with init_empty_weights():
        branch = OlicaLowRankLinear(dim, dim, rank)
    branch.load_state_dict(
        {
            "down.weight": fit.down.to(device=reference.device, dtype=reference.dtype).contiguous(),
            "up.weight": fit.up.to(device=reference.device, dtype=reference.dtype).contiguous(),
        },
        assign=True,
    )
    layer.mlp.linear_calibration = branch


__all__ = [
    "CalibrationCandidate",
    "OlicaLayerPruner",
    "assemble_pruned_layer",
    "attach_linear_calibration",
    "copy_dense_layer",
    "planned_dimensions",
]
