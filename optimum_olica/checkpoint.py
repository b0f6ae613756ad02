"""Saving a pruned model as a checkpoint that reloads with ``from_pretrained``: the stock family when the model has
a stock form of the same size, else the Olica architecture with its modeling code; written atomically (`atomic_io`)
and verified (`integrity`) before it is moved into place."""

from __future__ import annotations

import os
from pathlib import Path

from transformers import PreTrainedModel

from .atomic_io import write_directory_atomically
from .conversion import to_stock_model
from .integrity import verify_saved_checkpoint
from .modeling import OlicaDimensionsMixin


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


__all__ = ["save_pruned_model"]
