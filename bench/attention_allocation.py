"""Per-layer attention widths from the calibration data (issue 15 screening, not in the library).

The shipped ``layer_allocation="adaptive"`` moves FFN neurons between layers; the attention keeps the reference
split's Q/K ranks and value head widths in every layer. Here the attention is shared the same way, at the same
totals (so the same parameter count: every layer has the same shapes, a rank or a value channel costs as much in
any of them):

- Q/K ranks: the activation-weighted singular values of each layer's ``q_proj``/``k_proj`` (what §1a truncates),
  made comparable across layers either as each value's share of its layer's energy (``"energy"``: the rank goes where
  truncation loses the largest fraction of the projection's output) or on the FFN's log-standardized scale
  (``"log"``);
- value head widths: the §1b value neuron scores after the fast OND's rotation, log-standardized per layer like the
  FFN scores; a layer's width is its kept neurons over its KV heads. On SmolLM2 at 20% this gave 56 channels to
  nearly every layer (48 to 64), the uniform plan, so it was not screened.

Screened (``shared_qk_energy``, ``shared_qk_log``) and not kept: the energy shares moved ranks far (Q 48 to 248)
and lost in domain; the log scale stayed near the uniform plan and measured the same.

``prepare`` runs the dense model over the first quarter of the calibration sequences (the shipped allocation's
share) and keeps, per layer, the singular values and value scores; ``patched`` wraps the pruner's allocation step so
the plan takes these widths before the first layer is pruned.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from unittest import mock

import torch

from common import forward_in_batches
from optimum_olica import olica_math as om
from optimum_olica import pruner
from optimum_olica.allocation import aligned_widths_with_total, per_layer_lists, PruningPlan
from optimum_olica.conversion import olica_config_from
from optimum_olica.sources import decoder_layers


@torch.no_grad()
def attention_spectra(model, input_ids: torch.Tensor, batch_size: int = 8) -> list[dict]:
    """Per decoder layer: ``query``/``key`` activation-weighted singular values and ``values`` neuron scores
    (``(kv_heads, head_dim)``), from one dense forward over ``input_ids``."""
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    layers = decoder_layers(model)
    head_dim = layers[0].self_attn.head_dim
    moments = [{"input": om.StreamingMoments(config.hidden_size, dtype=torch.float64),
                "output": om.StreamingMoments(config.hidden_size, dtype=torch.float64),
                "gram": torch.zeros(heads, head_dim, head_dim, dtype=torch.float64), "tokens": 0} for _ in layers]
    handles = []
    for layer, stats in zip(layers, moments):
        attention = layer.self_attn

        def on_input(module, args, stats=stats):
            stats["input"].update(args[0])

        def on_output(module, args, output, stats=stats):
            values = args[0].reshape(-1, heads, head_dim).double()
            stats["gram"] += torch.einsum("thi,thj->hij", values, values)
            stats["tokens"] += values.shape[0]
            stats["output"].update(output)

        handles += [attention.q_proj.register_forward_pre_hook(on_input),
                    attention.o_proj.register_forward_hook(on_output)]
    forward_in_batches(model, input_ids, batch_size, handles)
    return [_layer_spectra(layer.self_attn, stats, heads, kv_heads, head_dim) for layer, stats in zip(layers, moments)]


def _layer_spectra(attention, stats: dict, heads: int, kv_heads: int, head_dim: int) -> dict:
    scale = stats["input"].second_moment.clamp_min(0).sqrt()
    scale = scale.clamp_min(scale.max() * 1e-8)
    singular = {name: torch.linalg.svdvals(projection.weight.double() * scale)
                for name, projection in (("query", attention.q_proj), ("key", attention.k_proj))}
    rotations = om.value_output_rotation(attention.o_proj.weight, stats["output"].second_moment, heads, kv_heads,
                                         head_dim)
    v_weight, _, o_weight = om.rotate_value_output(attention.v_proj.weight, None, attention.o_proj.weight, rotations,
                                                   heads, kv_heads, head_dim)
    value_moment = om.rotated_value_second_moment(stats["gram"] / max(stats["tokens"], 1), rotations, heads, kv_heads)
    values = om.value_neuron_scores(v_weight, o_weight, stats["input"].second_moment, value_moment, heads, kv_heads,
                                    head_dim)
    return {**singular, "values": values}


def _energy_shares(singular: torch.Tensor) -> torch.Tensor:
    energy = singular.double() ** 2
    return energy / energy.sum()


def shared_ranks(spectra: list[torch.Tensor], total: int, cap: int, multiple: int, comparable: str) -> list[int]:
    """Per-layer ranks summing to ``total``: the highest singular values across layers on the ``comparable`` scale,
    each layer between one multiple and ``cap`` (above it the factors save nothing)."""
    scale = _energy_shares if comparable == "energy" else om.comparable_neuron_scores
    scores = [scale(values)[:cap] for values in spectra]
    counts = om.neurons_kept_per_layer(scores, total, minimum=multiple)
    return aligned_widths_with_total(counts, multiple, cap)


def shared_value_widths(scores: list[torch.Tensor], total_width: int, head_dim: int, multiple: int) -> list[int]:
    """Per-layer value head widths summing to ``total_width``: the highest log-standardized value scores across
    layers, a layer's kept neurons divided among its KV heads."""
    kv_heads = scores[0].shape[0]
    comparable = [om.comparable_neuron_scores(layer.flatten()) for layer in scores]
    counts = om.neurons_kept_per_layer(comparable, total_width * kv_heads, minimum=multiple * kv_heads)
    exact = [count / kv_heads for count in counts]
    widths = [int(width) for width in exact]
    largest_remainders = sorted(range(len(exact)), key=lambda i: exact[i] - widths[i], reverse=True)
    for layer in largest_remainders[:total_width - sum(widths)]:
        widths[layer] += 1
    return aligned_widths_with_total(widths, multiple, head_dim)


class AttentionAllocation:
    """What the screen calls: ``prepare`` on the dense model, then ``patched()`` around ``prune_model``."""

    def __init__(self, qk: str | None = "energy", values: bool = True):
        self.qk, self.values = qk, values
        self.spectra = None

    def prepare(self, model, input_ids: torch.Tensor) -> None:
        share = max(1, round(input_ids.shape[0] * pruner.ALLOCATION_SHARE))
        self.spectra = attention_spectra(model, input_ids[:share])

    def release(self) -> None:
        self.spectra = None

    @contextmanager
    def patched(self):
        original = pruner._allocate_layers

        def allocate(run, source, activations, progress):
            original(run, source, activations, progress)
            self._reshape(run)

        with mock.patch.object(pruner, "_allocate_layers", allocate):
            yield

    def _reshape(self, run) -> None:
        plan, config = run.plan, run.model.config
        multiple = run.config.dimension_multiple
        layers = list(plan.layers)
        d, head_dim = config.hidden_size, run.plan_config.attention_head_dim
        updates = {}
        if self.qk is not None:
            for name, out in (("query_rank", run.plan_config.num_attention_heads * head_dim),
                              ("key_rank", run.plan_config.num_key_value_heads * head_dim)):
                ranks = [getattr(layer, name) for layer in layers]
                if any(rank is None for rank in ranks):
                    continue  # a projection kept dense: nothing to share
                cap = multiple * ((d * out // (d + out) - 1) // multiple)
                updates[name] = shared_ranks([s[name.split("_")[0]] for s in self.spectra], sum(ranks), cap,
                                             multiple, self.qk)
        if self.values:
            updates["value_head_dim"] = shared_value_widths([s["values"] for s in self.spectra],
                                                            sum(layer.value_head_dim for layer in layers), head_dim,
                                                            multiple)
        layers = tuple(dataclasses.replace(layer, **{name: values[i] for name, values in updates.items()})
                       for i, layer in enumerate(layers))
        olica = olica_config_from(config)
        before_lists = olica.from_base_config(olica, **per_layer_lists(plan.layers)).count_parameters()
        after_lists = olica.from_base_config(olica, **per_layer_lists(layers)).count_parameters()
        run.plan = PruningPlan(layers, plan.ratios, plan.parameters_before,
                               plan.parameters_after - before_lists + after_lists)
        run.plan_config = olica_config_from(config, **run.plan.per_layer_lists())
        run.plan_config._attn_implementation = config._attn_implementation
        run.algorithm = run.make_algorithm(run.plan_config)
