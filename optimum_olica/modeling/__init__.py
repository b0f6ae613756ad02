"""The pruned architectures, registered with transformers' Auto classes on import.

Registering twice (for instance after ``importlib.reload``) is harmless: transformers refuses a second registration
of the same name, and we skip it when the class already maps to ours.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_olica import (
    OLICA_CONFIG_FOR_BASE_MODEL_TYPE,
    OlicaDimensionsMixin,
    OlicaLlamaConfig,
    OlicaMistralConfig,
    OlicaQwen2Config,
    OlicaQwen3Config,
)
from .modeling_olica import (
    OLICA_MODEL_CLASSES,
    OlicaAttention,
    OlicaDecoderLayer,
    OlicaForCausalLM,
    OlicaLlamaForCausalLM,
    OlicaLlamaModel,
    OlicaLowRankLinear,
    OlicaMistralForCausalLM,
    OlicaMistralModel,
    OlicaMLP,
    OlicaModel,
    OlicaPreTrainedModel,
    OlicaQwen2ForCausalLM,
    OlicaQwen2Model,
    OlicaQwen3ForCausalLM,
    OlicaQwen3Model,
)


def _register_auto_classes() -> None:
    for config_class, (base_model_class, causal_lm_class) in OLICA_MODEL_CLASSES.items():
        try:
            AutoConfig.register(config_class.model_type, config_class)
        except ValueError:
            pass  # already registered by an earlier import
        for auto_class, model_class in ((AutoModel, base_model_class), (AutoModelForCausalLM, causal_lm_class)):
            try:
                auto_class.register(config_class, model_class)
            except ValueError:
                pass
        # save_pretrained then copies configuration_olica.py / modeling_olica.py beside the weights and writes
        # `auto_map`, so the checkpoint also loads with trust_remote_code=True where this package is not installed.
        config_class.register_for_auto_class()
        base_model_class.register_for_auto_class("AutoModel")
        causal_lm_class.register_for_auto_class("AutoModelForCausalLM")


_register_auto_classes()

__all__ = [
    "OLICA_CONFIG_FOR_BASE_MODEL_TYPE",
    "OLICA_MODEL_CLASSES",
    "OlicaAttention",
    "OlicaDecoderLayer",
    "OlicaDimensionsMixin",
    "OlicaForCausalLM",
    "OlicaLlamaConfig",
    "OlicaLlamaForCausalLM",
    "OlicaLlamaModel",
    "OlicaLowRankLinear",
    "OlicaMLP",
    "OlicaMistralConfig",
    "OlicaMistralForCausalLM",
    "OlicaMistralModel",
    "OlicaModel",
    "OlicaPreTrainedModel",
    "OlicaQwen2Config",
    "OlicaQwen2ForCausalLM",
    "OlicaQwen2Model",
    "OlicaQwen3Config",
    "OlicaQwen3ForCausalLM",
    "OlicaQwen3Model",
]
