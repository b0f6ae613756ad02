"""Olica-pruned decoder models for the Llama, Mistral, Qwen2 and Qwen3 families.

The block is the base family's decoder block with the dimensions Olica changes:

- ``q_proj`` / ``k_proj`` may be factored into two linears (``down``: hidden -> rank, ``up``: rank -> heads*head_dim).
  Query and key heads keep ``head_dim``, so RoPE, ``q_norm``/``k_norm`` and the key cache are those of the base model.
- value heads are ``value_head_dim`` wide (at most ``head_dim``); GQA stays GQA. ``o_proj`` reads
  ``num_attention_heads * value_head_dim`` inputs. The KV cache stores keys and values of different widths.
- the SwiGLU block is ``intermediate_size`` wide per layer and may carry a linear-calibration branch
  ``x -> up(down(x))`` of rank ``calibration_rank`` whose output is added to the FFN output.

Norms, rotary embeddings and the attention kernels (eager, sdpa, ...) are transformers' own.
This module is saved beside the weights of a pruned checkpoint (``trust_remote_code`` loading): it imports nothing
from optimum_olica, only transformers, torch and its sibling ``configuration_olica``.
"""

import inspect
import re
from collections.abc import Callable

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_olica import OlicaLlamaConfig, OlicaMistralConfig, OlicaQwen2Config, OlicaQwen3Config


# transformers 5.24 renamed the KV-cache argument and output field `past_key_values` -> `cache` (the old name is
# deprecated until 5.40). This file is saved beside every checkpoint and runs on every 5.x release we declare, so its
# forwards take either name and hand the cache on under the name the installed release reads. The mask builders and
# the output classes were renamed in the same release.
CACHE_ARGUMENT = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


def resolve_cache(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """The KV cache passed under either name (``generate`` uses ``cache`` from 5.24 on, ``past_key_values`` before)."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("Pass the KV cache once, as `cache` (transformers >= 5.24) or `past_key_values`, not both.")
    return cache if cache is not None else past_key_values


class OlicaLowRankLinear(nn.Module):
    """A linear map stored as two factors, ``x -> up(down(x))``, with ``down: in -> rank`` and ``up: rank -> out``."""

    # Tensor parallelism wraps this module in the colwise rule meant for a dense q_proj/k_proj (plans name modules,
    # not layers). With this flag, transformers' DTensor-based wrapper passes plain local tensors through, so the
    # replicated ``down`` and the colwise ``up`` (see ``olica_tensor_parallel_plan``) do the split; older releases
    # pass local tensors anyway and ignore it.
    _hf_quantized_needs_local_tp = True

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(hidden_states))


def make_projection(in_features: int, out_features: int, rank: int | None, bias: bool) -> nn.Module:
    """A dense ``nn.Linear`` when ``rank`` is None, else its rank-``rank`` factorisation."""
    if rank is None:
        return nn.Linear(in_features, out_features, bias=bias)
    return OlicaLowRankLinear(in_features, out_features, rank, bias=bias)


class OlicaMLP(nn.Module):
    """SwiGLU block of width ``intermediate_sizes[layer_idx]``, plus the optional linear-calibration branch."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.intermediate_sizes[layer_idx]
        bias = config.mlp_projection_bias
        self.gate_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=bias)
        self.act_fn = ACT2FN[config.hidden_act]
        calibration_rank = config.calibration_ranks[layer_idx]
        self.linear_calibration = (
            OlicaLowRankLinear(self.hidden_size, self.hidden_size, calibration_rank) if calibration_rank > 0 else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        if self.linear_calibration is not None:
            # The branch models the part of the pruned neurons' output that is linear in the block input.
            output = output + self.linear_calibration(x)
        return output


class OlicaAttention(nn.Module):
    """Grouped-query attention with (optionally) factored q/k projections and narrower value heads."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.attention_head_dim
        self.value_head_dim = config.value_head_dims[layer_idx]
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        layer_type = config.attention_layer_types()[layer_idx]
        self.sliding_window = config.sliding_window if layer_type == "sliding_attention" else None

        d, bias = config.hidden_size, config.attention_qkv_bias
        self.q_proj = make_projection(d, self.num_heads * self.head_dim, config.query_ranks[layer_idx], bias)
        self.k_proj = make_projection(d, self.num_key_value_heads * self.head_dim, config.key_ranks[layer_idx], bias)
        self.v_proj = nn.Linear(d, self.num_key_value_heads * self.value_head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.value_head_dim, d, bias=config.attention_output_bias)
        if config.use_qk_norm:
            self.q_norm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        cache = resolve_cache(cache, past_key_values)
        input_shape = hidden_states.shape[:-1]
        # (batch, seq, heads, head_dim) for queries/keys, (batch, seq, kv_heads, value_head_dim) for values
        qk_shape = (*input_shape, -1, self.head_dim)
        value_shape = (*input_shape, -1, self.value_head_dim)

        query_states = self.q_proj(hidden_states).view(qk_shape)
        key_states = self.k_proj(hidden_states).view(qk_shape)
        if self.q_norm is not None:
            query_states, key_states = self.q_norm(query_states), self.k_norm(key_states)
        query_states, key_states = query_states.transpose(1, 2), key_states.transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(value_shape).transpose(1, 2)

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)

        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx)

        narrow_values = self.value_head_dim < self.head_dim and self.config._attn_implementation != "eager"
        if narrow_values:
            # Fused kernels (SDPA's flash path on CPU, flash-attention on GPU) need one head dim for Q, K and V; with
            # narrower values SDPA falls back to its unfused path (2.4x slower prefill on CPU). Zero value channels
            # only add zero output channels, sliced off below; the cache keeps the narrow values. Decoding pads too:
            # the copy of the value cache costs less than the unfused path (measured up to 2,048 cached tokens).
            value_states = nn.functional.pad(value_states, (0, self.head_dim - self.value_head_dim))
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )
        if narrow_values:
            attn_output = attn_output[..., : self.value_head_dim]
        # (batch, seq, heads, value_head_dim) -> (batch, seq, heads * value_head_dim)
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        attn_output = self.o_proj(attn_output)
        return attn_output, attn_weights


class OlicaDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = OlicaAttention(config=config, layer_idx=layer_idx)
        self.mlp = OlicaMLP(config, layer_idx)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        cache = resolve_cache(cache, past_key_values)
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        return residual + hidden_states


# Which per-layer config field sizes each parameter of a decoder layer.
_FIELD_OF_MODULE = {
    "self_attn.q_proj": "query_ranks",
    "self_attn.k_proj": "key_ranks",
    "self_attn.v_proj": "value_head_dims",
    "self_attn.o_proj": "value_head_dims",
    "mlp.gate_proj": "intermediate_sizes",
    "mlp.up_proj": "intermediate_sizes",
    "mlp.down_proj": "intermediate_sizes",
    "mlp.linear_calibration": "calibration_ranks",
}
_LAYER_PARAMETER = re.compile(r"(?:^|\.)layers\.(\d+)\.(\w+\.\w+)\.")
# Tensors that optimum-quanto's quantized modules put in a state dict: `weight._data`, `weight._scale`, `weight._shift`
# (qint4 packs `weight._data._data`), and the activation scales `input_scale` / `output_scale`.
_QUANTO_TENSOR = re.compile(r"\.weight\._(?:data|scale|shift)(?:\._data)?$|\.(?:input|output)_scale$")


def _layer_field_line(config, name: str, detail: str) -> str | None:
    """The line naming the per-layer config field that sizes parameter ``name``; None outside those modules."""
    match = _LAYER_PARAMETER.search(name)
    if match is None or match.group(2) not in _FIELD_OF_MODULE:
        return None
    layer, field = int(match.group(1)), _FIELD_OF_MODULE[match.group(2)]
    value = getattr(config, field)[layer]
    return f"layer {layer}: `{field}[{layer}]`={value} disagrees with `{name}` ({detail})"


def _shape_line(config, name: str, checkpoint_shape, model_shape) -> str:
    line = f"`{name}`: checkpoint shape {tuple(checkpoint_shape)}, the config gives {tuple(model_shape)}"
    if "embed_tokens" in name or "lm_head" in name:
        line += f" (vocab_size={config.vocab_size}, hidden_size={config.hidden_size})"
    return line


def describe_quanto_checkpoint(unexpected_keys) -> str | None:
    """Why a checkpoint holding optimum-quanto tensors does not load; None when it holds none."""
    quantized = sorted(name for name in unexpected_keys if _QUANTO_TENSOR.search(name))
    if not quantized:
        return None
    return (
        f"The checkpoint holds {len(quantized)} optimum-quanto tensors (`{quantized[0]}`, ...): the model was "
        "quantized with optimum.quanto.quantize and saved with plain save_pretrained, whose weights from_pretrained "
        "cannot read back. Nothing is corrupted. To load this checkpoint: build the model from its config "
        "(AutoModelForCausalLM.from_config), call quantize(model, weights=..., activations=...) with the settings "
        "used before saving, then model.load_state_dict(safetensors.torch.load_file(...)) and freeze(model). To save "
        "a quantized model, use quanto's own format: QuantizedModelForCausalLM.quantize(model, weights=...) and its "
        "save_pretrained, reloaded with QuantizedModelForCausalLM.from_pretrained (import optimum_olica first)."
    )


def describe_checkpoint_mismatch(config, loading_info: dict, ignore_mismatched_sizes: bool = False) -> str | None:
    """Why a checkpoint's weights do not fit the model its config describes; None when they do.

    A wrong shape anywhere is refused, naming the tensor (in a decoder layer, the per-layer config field that sizes
    it), as stock transformers refuses it. Missing or unexpected tensors are refused inside the pruned modules,
    where they mean the config declares another structure (a dense projection where the weights are factored).

    Args:
        config: the Olica config the model was built from.
        loading_info: transformers' loading report: ``mismatched_keys``, ``missing_keys``, ``unexpected_keys``.
        ignore_mismatched_sizes: the caller asked for transformers' behaviour: tensors of the wrong shape are
            re-initialised, not refused.
    """
    unexpected = list(loading_info.get("unexpected_keys", ()))
    quanto = describe_quanto_checkpoint(unexpected)
    if quanto is not None:
        return quanto
    mismatched = [] if ignore_mismatched_sizes else list(loading_info.get("mismatched_keys", ()))
    lines = []
    for name, checkpoint_shape, model_shape in mismatched:
        detail = f"checkpoint shape {tuple(checkpoint_shape)}, expected {tuple(model_shape)}"
        line = _layer_field_line(config, name, detail)
        lines.append(line or _shape_line(config, name, checkpoint_shape, model_shape))
    structural = [(name, "missing from the checkpoint") for name in loading_info.get("missing_keys", ())]
    structural += [(name, "not expected by the config") for name in unexpected]
    lines += [line for name, detail in structural if (line := _layer_field_line(config, name, detail)) is not None]
    if not lines:
        return None
    hint = (
        " (ignore_mismatched_sizes=True loads it anyway and re-initialises the tensors of the wrong shape at random, "
        "as transformers does)"
        if mismatched
        else ""
    )
    return (
        "The checkpoint's config.json does not match its weights:\n  - "
        + "\n  - ".join(sorted(set(lines)))
        + "\nThe checkpoint is corrupted or its config was edited: restore the config.json saved with the weights, "
        + f"or re-save the model with optimum-olica{hint}."
    )


def check_tensor_parallel_heads(config, tp_size: int | None) -> None:
    """Refuse a tensor-parallel size that would cut an attention head in two (the plan splits q/k/v/o by head)."""
    if not tp_size or tp_size == 1:
        return
    counts = {"num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads}
    indivisible = ", ".join(f"{name}={count}" for name, count in counts.items() if count % tp_size)
    if indivisible:
        raise ValueError(
            f"Tensor parallelism over {tp_size} processes splits the attention by head, but {indivisible} is not "
            f"divisible by {tp_size}. Run with a number of processes that divides both head counts, or load the "
            "model without tensor parallelism."
        )


class OlicaPreTrainedModel(PreTrainedModel):
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["OlicaDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_sdpa = True
    # flash_attention_2/3 (and kernels from the Hub) need one head dim for Q, K and V: the attention pads narrow value
    # heads for every implementation but eager (see OlicaAttention.forward).
    _supports_flash_attn = True
    _supports_flex_attn = True
    _can_compile_fullgraph = True
    _supports_attention_backend = True
    _can_record_outputs = {
        "hidden_states": OlicaDecoderLayer,
        "attentions": OlicaAttention,
    }

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        # transformers refuses a wrong shape without saying which pruned dimension is wrong: load with its report
        # (tensors of the wrong shape re-initialised), then refuse with the tensor's name and the config field.
        ignore_mismatched_sizes = kwargs.pop("ignore_mismatched_sizes", False)
        output_loading_info = kwargs.pop("output_loading_info", False)
        model, loading_info = super().from_pretrained(
            *args, ignore_mismatched_sizes=True, output_loading_info=True, **kwargs
        )
        message = describe_checkpoint_mismatch(model.config, loading_info, ignore_mismatched_sizes)
        if message is not None:
            raise ValueError(message)
        check_tensor_parallel_heads(model.config, getattr(model, "_tp_size", None))
        return (model, loading_info) if output_loading_info else model

    def train(self, mode: bool = True):
        # Under tensor parallelism the colwise wrapper of a factored q_proj/k_proj and its colwise `up` both reduce
        # the input gradient across ranks (see olica_tensor_parallel_plan): the forward is exact, the gradients not.
        if mode and (getattr(self, "_tp_size", None) or 1) > 1 and self.config.has_factored_projection:
            raise NotImplementedError(
                "Training under tensor parallelism is not supported for a pruned model with factored q_proj/k_proj: "
                "the TP plan computes the forward exactly but not the factors' gradients. Use tensor parallelism "
                "for inference, and fine-tune without tp_plan (one model per process)."
            )
        return super().train(mode)


class OlicaModel(OlicaPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [OlicaDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.layer_types = config.attention_layer_types()
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        cache = resolve_cache(cache, past_key_values)
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)

        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)

        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        if not isinstance(causal_mask_mapping := attention_mask, dict):
            mask_kwargs = {
                "config": self.config,
                "inputs_embeds": inputs_embeds,
                "attention_mask": attention_mask,
                CACHE_ARGUMENT: cache,
                "position_ids": position_ids,
            }
            causal_mask_mapping = {}
            if "full_attention" in self.layer_types:
                causal_mask_mapping["full_attention"] = create_causal_mask(**mask_kwargs)
            if "sliding_attention" in self.layer_types:
                causal_mask_mapping["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)

        for layer_idx, decoder_layer in enumerate(self.layers[: self.config.num_hidden_layers]):
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=causal_mask_mapping[self.layer_types[layer_idx]],
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                **kwargs,
            )

        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, **{CACHE_ARGUMENT: cache})


class OlicaForCausalLM(OlicaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}
    # Set by each family: the base-model class built inside.
    base_model_class = OlicaModel

    def __init__(self, config):
        super().__init__(config)
        self.model = self.base_model_class(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def save_pretrained(self, save_directory, *args, **kwargs):
        self._map_base_model_for_remote_code()
        return super().save_pretrained(save_directory, *args, **kwargs)

    def save_config_and_code(self, save_directory) -> None:
        """What ``save_pretrained`` writes beside the weights: ``config.json`` and, for ``trust_remote_code``
        loading, the modeling code (used where the weights are written shard by shard, as streaming pruning does)."""
        from transformers.dynamic_module_utils import custom_object_save

        self._map_base_model_for_remote_code()
        if getattr(type(self), "_auto_class", None) is not None:
            custom_object_save(self, save_directory, config=self.config)
        self.config.architectures = [type(self).__name__]
        self.config.save_pretrained(save_directory)

    def _map_base_model_for_remote_code(self) -> None:
        if getattr(type(self), "_auto_class", None) is not None:
            # transformers writes `auto_map` only for the class being saved; add the base model so that
            # `AutoModel.from_pretrained(..., trust_remote_code=True)` works too.
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            auto_map["AutoModel"] = f"modeling_olica.{self.base_model_class.__name__}"
            self.config.auto_map = auto_map

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=resolve_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **{CACHE_ARGUMENT: getattr(outputs, CACHE_ARGUMENT)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


# One base model and one causal LM per family: they differ only in the config class that describes them.
class OlicaLlamaModel(OlicaModel):
    config_class = OlicaLlamaConfig


class OlicaLlamaForCausalLM(OlicaForCausalLM):
    config_class = OlicaLlamaConfig
    base_model_class = OlicaLlamaModel


class OlicaMistralModel(OlicaModel):
    config_class = OlicaMistralConfig


class OlicaMistralForCausalLM(OlicaForCausalLM):
    config_class = OlicaMistralConfig
    base_model_class = OlicaMistralModel


class OlicaQwen2Model(OlicaModel):
    config_class = OlicaQwen2Config


class OlicaQwen2ForCausalLM(OlicaForCausalLM):
    config_class = OlicaQwen2Config
    base_model_class = OlicaQwen2Model


class OlicaQwen3Model(OlicaModel):
    config_class = OlicaQwen3Config


class OlicaQwen3ForCausalLM(OlicaForCausalLM):
    config_class = OlicaQwen3Config
    base_model_class = OlicaQwen3Model


OLICA_MODEL_CLASSES = {
    OlicaLlamaConfig: (OlicaLlamaModel, OlicaLlamaForCausalLM),
    OlicaMistralConfig: (OlicaMistralModel, OlicaMistralForCausalLM),
    OlicaQwen2Config: (OlicaQwen2Model, OlicaQwen2ForCausalLM),
    OlicaQwen3Config: (OlicaQwen3Model, OlicaQwen3ForCausalLM),
}

__all__ = [
    "OLICA_MODEL_CLASSES",
    "OlicaAttention",
    "OlicaDecoderLayer",
    "OlicaForCausalLM",
    "OlicaLowRankLinear",
    "OlicaMLP",
    "OlicaModel",
    "OlicaPreTrainedModel",
    "make_projection",
    *[cls.__name__ for pair in OLICA_MODEL_CLASSES.values() for cls in pair],
]
