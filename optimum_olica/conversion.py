"""Converting models between the stock architectures and the Olica ones, in memory: pure functions of configs and
tensors, no files.

- `olica_config_from` / `build_olica_model` / `convert_to_olica`: a stock model's config and weights in the Olica
  architecture (full dimensions, or the dimensions a plan gives).
- `stock_state_dict` / `to_stock_model`: the exact stock form of an Olica model. A factored ``q_proj``/``k_proj``,
  ``x -> up(down(x))``, is the dense matrix ``up.weight @ down.weight`` (the bias is ``up``'s); a value head ``d_v``
  wide is a ``head_dim``-wide head whose extra channels are zero: zero rows in ``v_proj`` (and zero bias entries),
  zero columns in ``o_proj``. Those channels carry exactly zero through the attention product and ``o_proj`` ignores
  them, so every output is the same sum. FFN widths that differ between layers become the widest, the others
  zero-padded (`zero_pad_ffn`). All three cost parameters; linear-calibration branches have no stock form at all and
  are refused by ``config.to_base_config()``, naming the layers.

Saving (`checkpoint.save_pruned_model`) and exporting (`export.export_to_stock`, `gguf_export.export_to_gguf`) are
the I/O around these.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from accelerate import init_empty_weights
from torch.nn import functional
from transformers import AutoModelForCausalLM, PreTrainedModel

from .errors import OlicaError
from .modeling import OLICA_CONFIG_FOR_BASE_MODEL_TYPE, OLICA_MODEL_CLASSES, OlicaDecoderLayer, OlicaDimensionsMixin

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "UnsupportedArchitectureError",
    "build_decoder_layer",
    "build_olica_model",
    "causal_lm_class_for",
    "convert_to_olica",
    "dense_from_factors",
    "olica_config_class_for",
    "olica_config_from",
    "stock_state_dict",
    "to_stock_model",
    "zero_pad_ffn",
    "zero_pad_heads",
]


SUPPORTED_MODEL_TYPES = tuple(OLICA_CONFIG_FOR_BASE_MODEL_TYPE)


class UnsupportedArchitectureError(OlicaError):
    """The model's family has no Olica architecture."""


def olica_config_class_for(config) -> type:
    """The Olica config class for a stock (or already Olica) transformers config."""
    if isinstance(config, OlicaDimensionsMixin):
        return type(config)
    model_type = getattr(config, "model_type", None)
    if model_type not in OLICA_CONFIG_FOR_BASE_MODEL_TYPE:
        raise UnsupportedArchitectureError(
            f"Olica does not support model_type={model_type!r} "
            f"({', '.join(getattr(config, 'architectures', None) or [])}). "
            f"Supported families: {', '.join(SUPPORTED_MODEL_TYPES)}."
        )
    return OLICA_CONFIG_FOR_BASE_MODEL_TYPE[model_type]


def olica_config_from(config, **dimensions):
    """The Olica config of a stock config with the given per-layer dimensions (full dimensions by default)."""
    # from_base_config copies every field but the model identity, so it also re-dimensions an Olica config.
    return olica_config_class_for(config).from_base_config(config, **dimensions)


def causal_lm_class_for(olica_config) -> type[PreTrainedModel]:
    return OLICA_MODEL_CLASSES[type(olica_config)][1]


def build_olica_model(olica_config, state_dict: dict[str, torch.Tensor]) -> PreTrainedModel:
    """An Olica causal LM holding exactly the tensors of ``state_dict`` (no copy, no random initialisation)."""
    with init_empty_weights():
        model = causal_lm_class_for(olica_config)(olica_config)
    _load_state_dict_exactly(model, state_dict)
    return model.eval()


def build_decoder_layer(
    config, layer_idx: int, state: dict[str, torch.Tensor], layer_class: type = OlicaDecoderLayer
) -> torch.nn.Module:
    """A decoder layer of ``layer_class`` (an ``OlicaDecoderLayer`` of ``config``'s dimensions by default, or a stock
    family's layer built from its model config) holding exactly the tensors of ``state``."""
    with init_empty_weights():
        layer = layer_class(config, layer_idx)
    layer.load_state_dict(state, strict=True, assign=True)
    return layer.eval()


def convert_to_olica(model: PreTrainedModel) -> PreTrainedModel:
    """The Olica architecture at full dimensions holding the same weights: computes the same function."""
    olica_config = olica_config_from(model.config)
    olica_config._attn_implementation = model.config._attn_implementation
    return build_olica_model(olica_config, model.state_dict())


def to_stock_model(model: PreTrainedModel) -> PreTrainedModel:
    """The stock architecture (e.g. ``LlamaForCausalLM``) computing the same function as an Olica model.

    Factored Q/K are multiplied back into dense weights, narrow value heads zero-padded to ``head_dim`` and narrower
    FFNs to the widest layer's (`stock_state_dict`), so the stock model has more parameters than the Olica one when
    any is used; every other tensor is shared, not copied. The generation config is carried over.

    Raises:
        ValueError: naming the layers, if the model has a linear-calibration branch, which no stock config can
            express.
    """
    stock_config = model.config.to_base_config()
    stock_config._attn_implementation = model.config._attn_implementation
    with init_empty_weights():
        stock = AutoModelForCausalLM.from_config(stock_config)
    _load_state_dict_exactly(stock, stock_state_dict(model.state_dict(), model.config))
    stock.generation_config = copy.deepcopy(model.generation_config)
    return stock.eval()


def _load_state_dict_exactly(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    result = model.load_state_dict(state_dict, strict=False, assign=True)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing = [key for key in result.missing_keys if key not in tied]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"Weights do not fit {type(model).__name__}: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()


def dense_from_factors(up_weight: torch.Tensor, down_weight: torch.Tensor) -> torch.Tensor:
    """The dense weight ``(out, in)`` of the factored projection ``x -> up(down(x))``: ``up (out, rank) @ down (rank,
    in)``.

    The product is formed in float64 and rounded once to the factors' dtype: a bfloat16 checkpoint gets the nearest
    representable dense weight, not one with ``rank`` roundings accumulated in low precision.
    """
    if up_weight.shape[1] != down_weight.shape[0]:
        raise ValueError(
            f"Factors do not chain: up {tuple(up_weight.shape)} needs down with {up_weight.shape[1]} rows, got "
            f"{tuple(down_weight.shape)}."
        )
    dtype = torch.promote_types(up_weight.dtype, down_weight.dtype)
    return (up_weight.double() @ down_weight.double()).to(dtype)


def zero_pad_heads(tensor: torch.Tensor, dim: int, num_heads: int, head_width: int, padded_width: int) -> torch.Tensor:
    """``tensor`` with each of ``num_heads`` consecutive blocks of ``head_width`` entries along ``dim`` followed by
    zeros up to ``padded_width``.

    Attention lays heads out one after the other, each head's channels together (``view(..., heads, width)``), so:
    ``v_proj``'s weight ``(g*d_v, d)`` and bias ``(g*d_v,)`` are padded along dim 0 per KV head (``num_heads`` =
    ``num_key_value_heads``), ``o_proj``'s weight ``(d, h*d_v)`` along dim 1 per attention head.
    """
    if tensor.shape[dim] != num_heads * head_width or not 0 < head_width <= padded_width:
        raise ValueError(
            f"Cannot pad {num_heads} heads of {head_width} to {padded_width}: dimension {dim} of the tensor has "
            f"{tensor.shape[dim]} entries."
        )
    # (..., heads * head_width) -> (..., heads, head_width) -> (..., heads, padded_width) -> (..., heads * padded_width)
    per_head = tensor.movedim(dim, -1).unflatten(-1, (num_heads, head_width))
    padded = functional.pad(per_head, (0, padded_width - head_width))
    return padded.flatten(-2).movedim(-1, dim)


def zero_pad_ffn(state_dict: Mapping[str, torch.Tensor], width: int) -> dict[str, torch.Tensor]:
    """A stock ``state_dict`` whose FFNs have ``width`` neurons: zero rows appended to every ``gate_proj`` and
    ``up_proj`` (weights and biases), zero columns to every ``down_proj``. Exact: a zero neuron's activation is
    ``act(0) * 0 = 0``, and its ``down_proj`` column is zero anyway."""
    padded = dict(state_dict)
    for name, tensor in state_dict.items():
        if name.endswith(("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.gate_proj.bias", "mlp.up_proj.bias")):
            dim = 0
        elif name.endswith("mlp.down_proj.weight"):
            dim = 1
        else:
            continue
        if tensor.shape[dim] > width:
            raise ValueError(f"Cannot pad {name} of {tensor.shape[dim]} FFN neurons to {width}.")
        padded[name] = functional.pad(tensor.movedim(dim, -1), (0, width - tensor.shape[dim])).movedim(-1, dim)
    return padded


def _densify(tensors: dict[str, torch.Tensor], projection: str) -> None:
    """Replace ``<projection>.down/up`` by ``<projection>.weight`` (and ``.bias``, from ``up``) in ``tensors``."""
    down = tensors.pop(f"{projection}.down.weight")
    up = tensors.pop(f"{projection}.up.weight")
    tensors[f"{projection}.weight"] = dense_from_factors(up, down)
    bias = tensors.pop(f"{projection}.up.bias", None)
    if bias is not None:
        tensors[f"{projection}.bias"] = bias


def stock_state_dict(
    state_dict: Mapping[str, torch.Tensor], config, ffn_widths: list[int] | None = None
) -> dict[str, torch.Tensor]:
    """The stock architecture's weights for an Olica causal LM's ``state_dict``.

    Factored ``q_proj``/``k_proj`` become dense; narrow value heads are zero-padded to ``head_dim`` in ``v_proj`` and
    ``o_proj``; each layer's FFN is zero-padded to its entry of ``ffn_widths`` (`zero_pad_ffn`). Every other tensor is
    passed through as the same object (no copy); the input is not modified.

    Args:
        state_dict: the Olica model's tensors (``model.layers.<i>.self_attn.q_proj.down.weight``, ...).
        config: its Olica config, whose per-layer fields say which layers to convert. Layers with a
            linear-calibration branch have no stock form (``config.to_base_config()`` refuses them first).
        ffn_widths: the FFN width of each layer in the result, at least the layer's own; default the widest layer's
            width in every layer (what a stock config, with one ``intermediate_size``, holds). Per-layer widths are
            for formats that hold them (llama.cpp's ``deci`` architecture).
    """
    widths = ffn_widths or [max(config.intermediate_sizes)] * config.num_hidden_layers
    stock = dict(state_dict)
    head_dim = config.attention_head_dim
    for layer in range(config.num_hidden_layers):
        attention = f"model.layers.{layer}.self_attn"
        for projection, rank in (("q_proj", config.query_ranks[layer]), ("k_proj", config.key_ranks[layer])):
            if rank is not None:
                _densify(stock, f"{attention}.{projection}")
        value_head_dim = config.value_head_dims[layer]
        if value_head_dim == head_dim:
            continue
        for name in (f"{attention}.v_proj.weight", f"{attention}.v_proj.bias"):
            if name in stock:
                stock[name] = zero_pad_heads(stock[name], 0, config.num_key_value_heads, value_head_dim, head_dim)
        name = f"{attention}.o_proj.weight"  # o_proj's bias is per output feature: unchanged
        stock[name] = zero_pad_heads(stock[name], 1, config.num_attention_heads, value_head_dim, head_dim)
    for layer, (width, padded) in enumerate(zip(config.intermediate_sizes, widths)):
        if width != padded:
            prefix = f"model.layers.{layer}.mlp."
            stock.update(zero_pad_ffn({name: t for name, t in stock.items() if name.startswith(prefix)}, padded))
    return stock
