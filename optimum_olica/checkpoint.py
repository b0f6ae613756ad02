"""Moving models between the stock and the Olica architectures, and writing pruned checkpoints safely."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from accelerate import init_empty_weights
from transformers import AutoModelForCausalLM, PreTrainedModel

from .modeling import OLICA_CONFIG_FOR_BASE_MODEL_TYPE, OLICA_MODEL_CLASSES, OlicaDimensionsMixin


SUPPORTED_MODEL_TYPES = tuple(OLICA_CONFIG_FOR_BASE_MODEL_TYPE)


class UnsupportedArchitectureError(ValueError):
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
    """The stock architecture (e.g. ``LlamaForCausalLM``) holding the same weights as an Olica model.

    Raises:
        ValueError: if the model uses a module the stock architecture cannot express.
    """
    stock_config = model.config.to_base_config()
    stock_config._attn_implementation = model.config._attn_implementation
    with init_empty_weights():
        stock = AutoModelForCausalLM.from_config(stock_config)
    _load_state_dict_exactly(stock, model.state_dict())
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


def prepare_output_directory(save_directory: str | os.PathLike, overwrite: bool) -> Path:
    """Check the target before any work is done, so a bad path fails in seconds, not after pruning."""
    target = Path(save_directory).expanduser().resolve()
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"Output path {target} exists and is a file; choose a directory path.")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(
            f"Output directory {target} is not empty; choose another path or pass overwrite=True (--overwrite)."
        )
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"Cannot write to {parent}; choose a writable output directory.")
    return target


def write_directory_atomically(save_directory: str | os.PathLike, write, overwrite: bool = False) -> Path:
    """Run ``write(tmp_dir)`` in a temporary directory beside the target, then move it into place.

    A crash, a full disk or an exception inside ``write`` leaves the target as it was; an existing non-empty target is
    replaced only with ``overwrite=True``, and only once the new directory is complete.
    """
    target = prepare_output_directory(save_directory, overwrite)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(staging)
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, retired / target.name)
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def save_pruned_model(
    model: PreTrainedModel,
    save_directory: str | os.PathLike,
    *,
    tokenizer=None,
    max_shard_size: str | int = "5GB",
    prefer_stock: bool = True,
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
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

    return write_directory_atomically(save_directory, write, overwrite=overwrite)


__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "UnsupportedArchitectureError",
    "build_olica_model",
    "causal_lm_class_for",
    "convert_to_olica",
    "olica_config_class_for",
    "olica_config_from",
    "prepare_output_directory",
    "save_pruned_model",
    "to_stock_model",
    "write_directory_atomically",
]
