"""Moving models between the stock and the Olica architectures, and saving a pruned model (written atomically by
`atomic_io`)."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from accelerate import init_empty_weights
from transformers import AutoModelForCausalLM, PreTrainedModel

from .atomic_io import write_directory_atomically
from .errors import OlicaError
from .export import stock_state_dict
from .integrity import verify_saved_checkpoint
from .modeling import OLICA_CONFIG_FOR_BASE_MODEL_TYPE, OLICA_MODEL_CLASSES, OlicaDimensionsMixin


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


def convert_to_olica(model: PreTrainedModel) -> PreTrainedModel:
    """The Olica architecture at full dimensions holding the same weights: computes the same function."""
    olica_config = olica_config_from(model.config)
    olica_config._attn_implementation = model.config._attn_implementation
    return build_olica_model(olica_config, model.state_dict())


def to_stock_model(model: PreTrainedModel) -> PreTrainedModel:
    """The stock architecture (e.g. ``LlamaForCausalLM``) computing the same function as an Olica model.

    Factored Q/K are multiplied back into dense weights and narrow value heads zero-padded to ``head_dim``
    (`optimum_olica.export.stock_state_dict`), so the stock model has more parameters than the Olica one when either
    is used; every other tensor is shared, not copied. The generation config is carried over.

    Raises:
        ValueError: naming the layers, if the model has FFN widths that differ between layers or a linear-calibration
            branch, which no stock config can express.
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


def save_pruned_model(
    model: PreTrainedModel,
    save_directory: str | os.PathLike,
    *,
    tokenizer=None,
    max_shard_size: str | int = "5GB",
    prefer_stock: bool = True,
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
    expected_parameters: int | None = None,
) -> Path:
    """Write a pruned model as a safetensors checkpoint that reloads with ``from_pretrained``.

    When ``prefer_stock`` and the pruned model is expressible in the base architecture (uniform FFN width, nothing
    factored, full value heads, no calibration branch), it is saved as the stock family (e.g. a ``LlamaConfig`` with a
    smaller ``intermediate_size``) so any engine that reads stock checkpoints can serve it. Otherwise it is saved as
    the Olica architecture with its modeling code beside the weights (``trust_remote_code`` loading).

    Args:
        model: an Olica causal LM.
        save_directory: target directory, written atomically.
        tokenizer: saved beside the weights when given.
        max_shard_size: passed to ``save_pretrained``.
        prefer_stock: save stock-representable models as the stock architecture.
        overwrite: replace an existing non-empty directory.
        extra_files: ``{file name: text}`` written beside the weights (recipe, report, model card).
        expected_parameters: the parameter count the written checkpoint must have (default: the model's own count);
            checked, with the safetensors headers against the architecture, before the directory is moved into place.
    """
    to_save = model
    if prefer_stock and isinstance(model.config, OlicaDimensionsMixin) and not model.config.stock_incompatibilities():
        to_save = to_stock_model(model)

    def write(directory: Path) -> None:
        to_save.save_pretrained(directory, max_shard_size=max_shard_size, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
        for name, text in (extra_files or {}).items():
            (directory / name).write_text(text, encoding="utf-8")

    expected = model.num_parameters() if expected_parameters is None else expected_parameters
    return write_directory_atomically(
        save_directory, write, overwrite=overwrite, verify=lambda staging: verify_saved_checkpoint(staging, expected)
    )


__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "UnsupportedArchitectureError",
    "build_olica_model",
    "causal_lm_class_for",
    "convert_to_olica",
    "olica_config_class_for",
    "olica_config_from",
    "save_pruned_model",
    "to_stock_model",
    "verify_saved_checkpoint",
]
