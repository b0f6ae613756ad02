"""Configurations of Olica-pruned decoder models.

Each supported base family (Llama, Mistral, Qwen2, Qwen3) gets a config class that is the base family's config plus
the per-layer dimensions Olica produces. Every per-layer list has one entry per decoder layer:

- ``query_ranks`` / ``key_ranks``: rank of the factored ``q_proj`` / ``k_proj`` (``None``: the projection is dense).
- ``value_head_dims``: width of each value head (at most ``head_dim``); ``o_proj`` reads ``num_attention_heads *
  value_head_dim`` inputs. Query/key heads keep ``head_dim`` so RoPE and the key cache are unchanged.
- ``intermediate_sizes``: width of the SwiGLU feed-forward block.
- ``calibration_ranks``: rank of the linear-calibration branch added to the feed-forward output (0: no branch).

This module is saved beside the weights of a pruned checkpoint (``trust_remote_code`` loading): it imports nothing
from optimum_olica, only transformers and the standard library.
"""

from dataclasses import dataclass, is_dataclass

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config


def check_transformers_features() -> None:
    """Refuse, with the fix, a transformers release older than the one these two files are written for.

    transformers 5.0 to 5.3 build configs in ``__init__`` (not as dataclasses) and build attention masks from
    ``cache_position``: the configs below would fail with a cryptic ``StrictDataclassDefinitionError`` and the
    models would not run. A checkpoint carries this file, so the check also guards ``trust_remote_code`` loading.
    """
    if is_dataclass(LlamaConfig):
        return
    import transformers

    raise ImportError(
        f"Olica-pruned models need transformers>=5.4,<6 (configs as dataclasses); this environment has "
        f"transformers {transformers.__version__}. Upgrade it: pip install 'transformers>=5.4,<6'."
    )


check_transformers_features()

PER_LAYER_FIELDS = ("query_ranks", "key_ranks", "value_head_dims", "intermediate_sizes", "calibration_ranks")


def olica_tensor_parallel_plan(base_plan: dict[str, str]) -> dict[str, str]:
    """The base family's tensor-parallel plan, extended to factored ``q_proj`` / ``k_proj``.

    A plan names modules with the layer index as ``*``, so one rule covers dense and factored layers alike. A factored
    projection is ``up(down(x))``: ``up`` (rank -> heads * head_dim) is split by head like a dense projection, and
    ``down`` (hidden -> rank) is replicated, since every head needs the whole rank-r code. The ``q_proj`` rule itself
    stays colwise for the dense layers. The ``down`` rules come first: transformers 5.4 shards a weight by the first
    rule found in its name, and ``q_proj`` is found in ``q_proj.down.weight``. Value heads of any width stay whole:
    ``v_proj`` (colwise) and ``o_proj`` (rowwise) split by head when the head counts divide the TP size.
    """
    factored = {}
    for projection in ("q_proj", "k_proj"):
        factored[f"layers.*.self_attn.{projection}.down"] = "replicated_with_grad_allreduce"
        factored[f"layers.*.self_attn.{projection}.up"] = "colwise"
    return {**factored, **base_plan}


def _layer_list(layers: list[int]) -> str:
    """``[1]`` -> ``"layer 1"``, ``[0, 2]`` -> ``"layers 0, 2"``."""
    return ("layer " if len(layers) == 1 else "layers ") + ", ".join(str(layer) for layer in layers)


@dataclass(repr=False, eq=False)
class OlicaDimensionsMixin:
    """Per-layer dimensions of an Olica-pruned decoder, shared by every family's config."""

    query_ranks: list[int | None] | None = None
    key_ranks: list[int | None] | None = None
    value_head_dims: list[int] | None = None
    intermediate_sizes: list[int] | None = None
    calibration_ranks: list[int] | None = None
    olica_recipe: dict | None = None

    # Set by each family: the stock config class this one extends, and what its modules carry.
    base_config_class = None

    @property
    def attention_head_dim(self) -> int:
        # Qwen2Config has no head_dim field; its attention derives it from the hidden size.
        return getattr(self, "head_dim", None) or self.hidden_size // self.num_attention_heads

    @property
    def attention_qkv_bias(self) -> bool:
        return bool(getattr(self, "attention_bias", False))

    @property
    def attention_output_bias(self) -> bool:
        return bool(getattr(self, "attention_bias", False))

    @property
    def mlp_projection_bias(self) -> bool:
        return bool(getattr(self, "mlp_bias", False))

    @property
    def use_qk_norm(self) -> bool:
        return False

    def attention_layer_types(self) -> list[str]:
        """``"full_attention"`` or ``"sliding_attention"`` for each layer, as the base family decides it."""
        return ["full_attention"] * self.num_hidden_layers

    def _fill_default_dimensions(self) -> None:
        # A config built without per-layer dims describes the unpruned model.
        n = self.num_hidden_layers
        if self.query_ranks is None:
            self.query_ranks = [None] * n
        if self.key_ranks is None:
            self.key_ranks = [None] * n
        if self.value_head_dims is None:
            self.value_head_dims = [self.attention_head_dim] * n
        if self.intermediate_sizes is None:
            self.intermediate_sizes = [self.intermediate_size] * n
        if self.calibration_ranks is None:
            self.calibration_ranks = [0] * n

    def validate_olica_dimensions(self):
        """Part of the ``@strict`` validation: every per-layer list is complete and within its module's bounds."""
        n = self.num_hidden_layers
        for name in PER_LAYER_FIELDS:
            values = getattr(self, name)
            if values is None:
                continue
            if len(values) != n:
                raise ValueError(f"`{name}` has {len(values)} entries but the model has num_hidden_layers={n}.")
        head_dim = self.attention_head_dim
        q_out = self.num_attention_heads * head_dim
        k_out = self.num_key_value_heads * head_dim
        for layer in range(n):
            for name, out_features in (("query_ranks", q_out), ("key_ranks", k_out)):
                values = getattr(self, name)
                rank = None if values is None else values[layer]
                if rank is not None and not 1 <= rank <= min(self.hidden_size, out_features):
                    raise ValueError(
                        f"layer {layer}: `{name}[{layer}]`={rank} must be between 1 and "
                        f"{min(self.hidden_size, out_features)} (or null for a dense projection)."
                    )
            bounds = {
                "value_head_dims": (1, head_dim),
                "intermediate_sizes": (1, None),
                "calibration_ranks": (0, self.hidden_size),
            }
            for name, (low, high) in bounds.items():
                values = getattr(self, name)
                if values is None:
                    continue
                value = values[layer]
                if not isinstance(value, int) or value < low or (high is not None and value > high):
                    allowed = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
                    raise ValueError(f"layer {layer}: `{name}[{layer}]`={value!r} must be {allowed}.")

    # ---- parameter accounting -------------------------------------------------------------------------------

    def _projection_parameters(self, in_features: int, out_features: int, rank: int | None, bias: bool) -> int:
        weights = in_features * out_features if rank is None else rank * (in_features + out_features)
        return weights + (out_features if bias else 0)

    def layer_parameter_count(self, layer: int) -> int:
        """Parameters of decoder layer ``layer``, from the config alone."""
        d, h, g, d_h = self.hidden_size, self.num_attention_heads, self.num_key_value_heads, self.attention_head_dim
        d_v, d_ff = self.value_head_dims[layer], self.intermediate_sizes[layer]
        qkv_bias = self.attention_qkv_bias
        count = self._projection_parameters(d, h * d_h, self.query_ranks[layer], qkv_bias)
        count += self._projection_parameters(d, g * d_h, self.key_ranks[layer], qkv_bias)
        count += self._projection_parameters(d, g * d_v, None, qkv_bias)
        count += self._projection_parameters(h * d_v, d, None, self.attention_output_bias)
        if self.use_qk_norm:
            count += 2 * d_h
        mlp_bias = self.mlp_projection_bias
        count += 2 * self._projection_parameters(d, d_ff, None, mlp_bias)
        count += self._projection_parameters(d_ff, d, None, mlp_bias)
        count += 2 * d * self.calibration_ranks[layer]
        count += 2 * d  # input_layernorm and post_attention_layernorm
        return count

    def count_parameters(self) -> int:
        """Parameters of the whole causal LM (tied embeddings counted once), from the config alone."""
        embeddings = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else embeddings
        layers = sum(self.layer_parameter_count(layer) for layer in range(self.num_hidden_layers))
        return embeddings + head + layers + self.hidden_size  # final norm

    # ---- conversion to and from the stock architecture ------------------------------------------------------

    @classmethod
    def from_base_config(cls, base_config, **dimensions):
        """The Olica config of ``base_config`` with the given per-layer dimensions (full dimensions by default)."""
        values = base_config.to_dict()
        for key in ("model_type", "architectures", "auto_map", "transformers_version", "quantization_config"):
            values.pop(key, None)
        values.update(dimensions)
        return cls(**values)

    @property
    def has_factored_projection(self) -> bool:
        """Whether some layer's ``q_proj`` or ``k_proj`` is stored as two factors."""
        return any(rank is not None for rank in list(self.query_ranks) + list(self.key_ranks))

    def stock_incompatibilities(self) -> list[str]:
        """Why this model cannot be saved as the plain base architecture with its own weights (empty list: it can).

        Factored Q/K, narrow value heads and FFN widths that differ between layers have an exact stock form with more
        parameters (dense Q/K, value heads zero-padded to ``head_dim``, every FFN zero-padded to the widest:
        ``optimum_olica.export_to_stock``); the other reasons have none at all (`inexpressible_in_stock`).
        """
        reasons = []
        if self.has_factored_projection:
            reasons.append("some q_proj/k_proj are factored")
        if any(d_v != self.attention_head_dim for d_v in self.value_head_dims):
            reasons.append("some value heads are narrower than head_dim")
        if len(set(self.intermediate_sizes)) > 1:
            reasons.append("FFN widths differ between layers")
        return reasons + self.inexpressible_in_stock()

    def inexpressible_in_stock(self) -> list[str]:
        """What no config of the base family can express, naming the layers (empty list: an exact export exists).

        A stock config has no linear-calibration branch. (Its one ``intermediate_size`` is not a reason: narrower FFNs
        are zero-padded to the widest, exactly.)
        """
        reasons = []
        calibrated = [layer for layer, rank in enumerate(self.calibration_ranks) if rank > 0]
        if calibrated:
            verb = "has" if len(calibrated) == 1 else "have"
            reasons.append(f"{_layer_list(calibrated)} {verb} a linear-calibration branch")
        return reasons

    def to_base_config(self):
        """The stock config (e.g. a ``LlamaConfig`` with a smaller ``intermediate_size``) that computes this model's
        function once factored Q/K are multiplied back into dense weights, narrow value heads are zero-padded to
        ``head_dim`` (the base family's own head size, which this config keeps) and every FFN is zero-padded to the
        widest layer's width (``intermediate_size``).

        Raises:
            ValueError: naming the layers, if the model has a linear-calibration branch (`inexpressible_in_stock`).
        """
        reasons = self.inexpressible_in_stock()
        if reasons:
            raise ValueError(
                f"This pruned model has no exact stock {self.base_config_class.__name__} equivalent: "
                + "; ".join(reasons)
                + ". A stock config has no calibration branch, and an approximation would change the model. Prune "
                "again with num_calibrated_layers=0, or keep the Olica format (load it with `import optimum_olica` or "
                "trust_remote_code=True)."
            )
        values = self.to_dict()
        for key in (*PER_LAYER_FIELDS, "olica_recipe", "model_type", "architectures", "auto_map",
                    "transformers_version"):
            values.pop(key, None)
        values["intermediate_size"] = max(self.intermediate_sizes)
        return self.base_config_class(**values)


@strict
class OlicaLlamaConfig(OlicaDimensionsMixin, LlamaConfig):
    """Llama (Llama 2/3, SmolLM2, ...) pruned with Olica. ``attention_bias`` applies to q/k/v/o, ``mlp_bias`` to the FFN."""

    model_type = "olica_llama"
    base_config_class = LlamaConfig
    base_model_tp_plan = olica_tensor_parallel_plan(LlamaConfig.base_model_tp_plan)

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._fill_default_dimensions()


@strict
class OlicaMistralConfig(OlicaDimensionsMixin, MistralConfig):
    """Mistral pruned with Olica: no biases; every layer uses ``sliding_window`` when it is set."""

    model_type = "olica_mistral"
    base_config_class = MistralConfig
    base_model_tp_plan = olica_tensor_parallel_plan(MistralConfig.base_model_tp_plan)

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._fill_default_dimensions()

    def attention_layer_types(self) -> list[str]:
        kind = "full_attention" if self.sliding_window is None else "sliding_attention"
        return [kind] * self.num_hidden_layers


@strict
class OlicaQwen2Config(OlicaDimensionsMixin, Qwen2Config):
    """Qwen2 pruned with Olica: q/k/v carry a bias, o_proj does not; per-layer ``layer_types``."""

    model_type = "olica_qwen2"
    base_config_class = Qwen2Config
    base_model_tp_plan = olica_tensor_parallel_plan(Qwen2Config.base_model_tp_plan)

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._fill_default_dimensions()

    @property
    def attention_qkv_bias(self) -> bool:
        return True

    @property
    def attention_output_bias(self) -> bool:
        return False

    def attention_layer_types(self) -> list[str]:
        return list(self.layer_types)


@strict
class OlicaQwen3Config(OlicaDimensionsMixin, Qwen3Config):
    """Qwen3 pruned with Olica: RMSNorm on each query/key head (``q_norm``/``k_norm``); per-layer ``layer_types``."""

    model_type = "olica_qwen3"
    base_config_class = Qwen3Config
    base_model_tp_plan = olica_tensor_parallel_plan(Qwen3Config.base_model_tp_plan)

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._fill_default_dimensions()

    @property
    def use_qk_norm(self) -> bool:
        return True

    def attention_layer_types(self) -> list[str]:
        return list(self.layer_types)


OLICA_CONFIG_FOR_BASE_MODEL_TYPE = {
    "llama": OlicaLlamaConfig,
    "mistral": OlicaMistralConfig,
    "qwen2": OlicaQwen2Config,
    "qwen3": OlicaQwen3Config,
}

__all__ = [
    "OLICA_CONFIG_FOR_BASE_MODEL_TYPE",
    "OlicaDimensionsMixin",
    "OlicaLlamaConfig",
    "OlicaMistralConfig",
    "OlicaQwen2Config",
    "OlicaQwen3Config",
]
