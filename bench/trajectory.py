"""Refit targets from the dense model's own trajectory (issue 15 screening, not in the library).

Olica's refits target what the dense layer computes on the pruned model's inputs: each layer repairs its own error
and nothing upstream. Here the targets move (by ``share``) toward the dense model's own hidden states at that depth,
so a layer's refit also absorbs the error the earlier pruned layers let through:

- ``o_proj``: the dense residual after the attention, minus the pruned layer's input (what the attention must add);
- ``down_proj``: the dense layer's output (the library then subtracts the pruned residual, as it always does).

The dense trajectory is one forward of the dense model over the calibration sequences, before pruning, kept in host
memory (two tensors of calibration size per layer). ``TrajectoryAlgorithm.prepare`` computes it; the screen calls
it on the dense model before ``prune_model``.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from common import forward_in_batches, olica_layer_settings
from optimum_olica.olica import OlicaLayerPruner
from optimum_olica.sources import decoder_layers


@torch.no_grad()
def dense_trajectory(model, input_ids: torch.Tensor, batch_size: int = 8
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per decoder layer, the dense residual stream after its attention and after the whole layer, over ``input_ids``
    (float32, host memory)."""
    layers = decoder_layers(model)
    middles: list[list[torch.Tensor]] = [[] for _ in layers]
    outputs: list[list[torch.Tensor]] = [[] for _ in layers]
    handles = []
    for index, layer in enumerate(layers):
        handles.append(layer.post_attention_layernorm.register_forward_pre_hook(
            lambda module, args, index=index: middles[index].append(args[0].detach().float().cpu())))
        handles.append(layer.register_forward_hook(
            lambda module, args, output, index=index: outputs[index].append(
                (output[0] if isinstance(output, tuple) else output).detach().float().cpu())))
    forward_in_batches(model, input_ids, batch_size, handles)
    return [torch.cat(parts) for parts in middles], [torch.cat(parts) for parts in outputs]


@dataclass
class TrajectoryLayerPruner(OlicaLayerPruner):
    """Olica with refit targets moved by ``share`` toward the dense trajectory (``attention``/``mlp``: which refits)."""

    trajectory: tuple | None = None  # (middles, outputs) of dense_trajectory
    share: float = 1.0
    attention: bool = True
    mlp: bool = True

    @contextmanager
    def observe_dense(self, layer, layer_idx: int):
        inputs = []
        handle = layer.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
        try:
            with super().observe_dense(layer, layer_idx):
                yield
        finally:
            handle.remove()
        if layer_idx in self.skip_layers:
            return
        middles, outputs = (part[layer_idx] for part in self.trajectory)
        start = 0
        for batch, layer_input in enumerate(inputs):
            rows = slice(start, start + layer_input.shape[0])
            start = rows.stop
            if self.attention and self._dense_attention_outputs:
                target = middles[rows].to(layer_input) - layer_input
                own = self._dense_attention_outputs[batch]
                self._dense_attention_outputs[batch] = self._store((1 - self.share) * own + self.share * target.to(own))
            if self.mlp and self._dense_layer_outputs:
                own = self._dense_layer_outputs[batch]
                self._dense_layer_outputs[batch] = self._store(
                    (1 - self.share) * own + self.share * outputs[rows].to(own))


@dataclass
class DenseStreamLayerPruner(OlicaLayerPruner):
    """One dense pass per layer, over the dense model's own inputs instead of the pruned model's: the statistics that
    choose what is cut are the dense model's, and the refits aim wholly at its hidden states (the ``trajectory``
    targets with ``share=1``), for the cost of the shipped pipeline."""

    trajectory: tuple | None = None

    @contextmanager
    def observe_dense(self, layer, layer_idx: int):
        if layer_idx == 0:  # the first layer's inputs are the same in both models
            with super().observe_dense(layer, layer_idx):
                yield
            return
        outputs = self.trajectory[1][layer_idx - 1]
        pruned_inputs, start = [], 0

        def dense_input(module, args):
            nonlocal start
            pruned_inputs.append(args[0])
            rows = slice(start, start + args[0].shape[0])
            start = rows.stop
            return (outputs[rows].to(args[0]), *args[1:])

        handle = layer.register_forward_pre_hook(dense_input)
        try:
            with super().observe_dense(layer, layer_idx):
                yield
        finally:
            handle.remove()
        if layer_idx in self.skip_layers or not self._dense_attention_outputs:
            return
        start = 0
        for batch, pruned_input in enumerate(pruned_inputs):  # the attention's target starts from the pruned input
            rows = slice(start, start + pruned_input.shape[0])
            start = rows.stop
            own = self._dense_attention_outputs[batch]
            self._dense_attention_outputs[batch] = own + (outputs[rows].to(own) - pruned_input.to(own))


class TrajectoryAlgorithm:
    """``prune_model``'s ``layer_algorithm``: Olica's settings with trajectory targets; ``prepare`` first."""

    def __init__(self, share: float = 1.0, attention: bool = True, mlp: bool = True, dense_statistics: bool = False):
        self.share, self.attention, self.mlp, self.dense_statistics = share, attention, mlp, dense_statistics
        self.trajectory = None

    def prepare(self, model, input_ids: torch.Tensor) -> None:
        self.trajectory = dense_trajectory(model, input_ids)

    def release(self) -> None:
        self.trajectory = None

    def __call__(self, plan_config, config):
        if self.trajectory is None:
            raise RuntimeError("TrajectoryAlgorithm.prepare(dense_model, calibration_ids) must run before pruning.")
        settings = olica_layer_settings(plan_config, config)
        if self.dense_statistics:
            return DenseStreamLayerPruner(plan_config, **settings, trajectory=self.trajectory)
        return TrajectoryLayerPruner(plan_config, **settings, trajectory=self.trajectory, share=self.share,
                                     attention=self.attention, mlp=self.mlp)


__all__ = ["DenseStreamLayerPruner", "TrajectoryAlgorithm", "TrajectoryLayerPruner", "dense_trajectory"]
