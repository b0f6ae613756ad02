"""Exact export of an Olica-pruned model to its base family's stock architecture (``LlamaForCausalLM``, ...).

Serving engines (vLLM, TGI, SGLang, llama.cpp's converter) read one head size and one FFN width per model, and plain
transformers loads only the stock families without custom code. The Olica architecture departs from them in two ways
that can be undone exactly:

- a factored ``q_proj``/``k_proj``, ``x -> up(down(x))``, is the dense matrix ``up.weight @ down.weight`` (the bias
  is ``up``'s);
- a value head ``d_v`` wide is a ``head_dim``-wide head whose extra channels are zero: zero rows in ``v_proj`` (and
  zero bias entries), zero columns in ``o_proj``. Those channels carry exactly zero through the attention product and
  ``o_proj`` ignores them, so every output is the same sum.

Both cost parameters: the export is larger than the Olica checkpoint (`StockExport` reports both counts). Per-layer
FFN widths and linear-calibration branches have no stock counterpart: they are refused, naming the layers
(``config.to_base_config()``), never approximated.

The conversion is pure functions on tensors (`dense_from_factors`, `zero_pad_heads`, `stock_state_dict`);
``checkpoint.to_stock_model`` builds the stock model from them (the same path saves FFN-only recipes as stock), and
`export_to_stock` is the I/O around it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional

__all__ = ["StockExport", "dense_from_factors", "export_to_stock", "stock_state_dict", "zero_pad_heads"]

RECIPE_NAME = "olica_config.json"
REPORT_NAME = "olica_report.json"


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


def _densify(tensors: dict[str, torch.Tensor], projection: str) -> None:
    """Replace ``<projection>.down/up`` by ``<projection>.weight`` (and ``.bias``, from ``up``) in ``tensors``."""
    down = tensors.pop(f"{projection}.down.weight")
    up = tensors.pop(f"{projection}.up.weight")
    tensors[f"{projection}.weight"] = dense_from_factors(up, down)
    bias = tensors.pop(f"{projection}.up.bias", None)
    if bias is not None:
        tensors[f"{projection}.bias"] = bias


def stock_state_dict(state_dict: Mapping[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """The stock architecture's weights for an Olica causal LM's ``state_dict``.

    Factored ``q_proj``/``k_proj`` become dense; narrow value heads are zero-padded to ``head_dim`` in ``v_proj`` and
    ``o_proj``. Every other tensor is passed through as the same object (no copy); the input is not modified.

    Args:
        state_dict: the Olica model's tensors (``model.layers.<i>.self_attn.q_proj.down.weight``, ...).
        config: its Olica config, whose per-layer fields say which layers to convert. Layers with a
            linear-calibration branch have no stock form (``config.to_base_config()`` refuses them first).
    """
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
    return stock


@dataclass(frozen=True)
class StockExport:
    """What `export_to_stock` wrote.

    Attributes:
        directory: the exported checkpoint folder.
        architecture: its class, e.g. ``LlamaForCausalLM``.
        olica_parameters: parameters of the Olica model it was exported from.
        stock_parameters: parameters of the export (more when Q/K were factored or value heads narrowed).
        has_tokenizer: whether a tokenizer was saved with it.
    """

    directory: Path
    architecture: str
    olica_parameters: int
    stock_parameters: int
    has_tokenizer: bool

    def summary(self) -> str:
        """The lines ``optimum-cli olica export`` prints."""
        growth = self.stock_parameters / self.olica_parameters - 1
        why = ": Q/K stored dense, value heads zero-padded to head_dim" if growth else ""
        lines = [
            f"Olica model   {self.olica_parameters:,} parameters",
            f"Stock export  {self.stock_parameters:,} parameters ({growth:+.1%}{why}; the same outputs)",
            f"Stock {self.architecture} checkpoint written to {self.directory}: it loads with plain transformers "
            "(no plugin, no trust_remote_code) and engines that read the stock family.",
        ]
        if not self.has_tokenizer:
            lines.append("No tokenizer was found or given, so the export has none: copy the base model's tokenizer "
                         "files into it.")
        return "\n".join(lines)


def _checkpoint_folder(checkpoint: str | os.PathLike) -> Path:
    from .loading import check_model_location

    check_model_location(checkpoint)
    folder = Path(checkpoint).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{os.fspath(checkpoint)!r} is not a local folder: the export reads a checkpoint folder. Download a Hub "
            f"checkpoint first (hf download {os.fspath(checkpoint)} --local-dir DIR) and export DIR."
        )
    return folder


def _check_is_olica(config, source: str) -> None:
    from .modeling import OlicaDimensionsMixin

    if isinstance(config, OlicaDimensionsMixin):
        return
    raise ValueError(
        f"{source} is not an Olica-pruned model (model_type={getattr(config, 'model_type', None)!r}). A stock "
        "checkpoint, such as the one an FFN-only recipe writes, already loads with plain transformers: there is "
        "nothing to export."
    )


def _provenance_files(folder: Path | None, model, export_record: dict) -> dict[str, str]:
    """``olica_config.json`` and ``olica_report.json`` for the export: the checkpoint's own, the report with an
    ``"export"`` entry added (so ``optimum-cli olica inspect`` tells the export from the pruned checkpoint)."""
    files = {}
    recipe = getattr(model.config, "olica_recipe", None)
    if folder is not None and (folder / RECIPE_NAME).is_file():
        files[RECIPE_NAME] = (folder / RECIPE_NAME).read_text(encoding="utf-8")
    elif isinstance(recipe, dict):
        files[RECIPE_NAME] = json.dumps(recipe, sort_keys=True, indent=2) + "\n"
    if folder is not None and (folder / REPORT_NAME).is_file():
        report = json.loads((folder / REPORT_NAME).read_text(encoding="utf-8"))
        report["export"] = export_record
        files[REPORT_NAME] = json.dumps(report, indent=2, sort_keys=True)
    return files


def export_to_stock(
    checkpoint_or_model,
    output_dir: str | os.PathLike,
    *,
    tokenizer=None,
    overwrite: bool = False,
    max_shard_size: str | int = "5GB",
) -> StockExport:
    """Write an Olica-pruned model as its base family's stock checkpoint, with the same outputs.

    Factored Q/K are multiplied back into dense weights and narrow value heads zero-padded to ``head_dim``: exact, and
    larger than the Olica checkpoint. The output folder gets the stock ``config.json`` (e.g. a ``LlamaConfig`` with
    the pruned ``intermediate_size``; no ``auto_map``, no per-layer fields), safetensors weights, the tokenizer,
    ``generation_config.json``, and the checkpoint's ``olica_config.json`` / ``olica_report.json`` for provenance. It
    is written atomically and verified before it is moved into place.

    Args:
        checkpoint_or_model: a local Olica checkpoint folder, or an Olica causal LM (for example
            ``OlicaPruner.pruned_model``).
        output_dir: the folder to write.
        tokenizer: saved with the export (default: the checkpoint folder's own tokenizer; none for a model).
        overwrite: replace a non-empty ``output_dir``.
        max_shard_size: passed to ``save_pretrained``.

    Raises:
        ValueError: the model has FFN widths that differ between layers or a linear-calibration branch (the message
            names the layers and the alternatives), or it is not an Olica model.
        FileExistsError: ``output_dir`` is not empty and ``overwrite`` is False, or is the checkpoint folder itself.
    """
    # checkpoint.py imports this module's `stock_state_dict`: importing it at the top would be circular.
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

    from .atomic_io import prepare_output_directory
    from .checkpoint import save_pruned_model, to_stock_model
    from .loading import TOKENIZER_FILES, load_tokenizer

    folder = None if isinstance(checkpoint_or_model, PreTrainedModel) else _checkpoint_folder(checkpoint_or_model)
    if folder is not None and Path(output_dir).expanduser().resolve() == folder.resolve():
        raise FileExistsError(f"The output folder {folder} is the checkpoint itself; choose another folder.")
    source = str(folder) if folder is not None else type(checkpoint_or_model).__name__
    # Everything that can be refused from config.json is, before the output is touched or the weights are loaded.
    config = AutoConfig.from_pretrained(folder) if folder is not None else checkpoint_or_model.config
    _check_is_olica(config, source)
    config.to_base_config()
    prepare_output_directory(output_dir, overwrite)

    if folder is None:
        model = checkpoint_or_model
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
        if tokenizer is None and any((folder / name).is_file() for name in TOKENIZER_FILES):
            tokenizer = load_tokenizer(folder)
    stock = to_stock_model(model)
    olica_parameters, stock_parameters = model.num_parameters(), stock.num_parameters()
    architecture = type(stock).__name__
    record = {"format": "stock", "architecture": architecture, "parameters": stock_parameters,
              "olica_parameters": olica_parameters}
    directory = save_pruned_model(
        stock, output_dir, tokenizer=tokenizer, max_shard_size=max_shard_size, overwrite=overwrite,
        extra_files=_provenance_files(folder, model, record),
    )
    return StockExport(directory, architecture, olica_parameters, stock_parameters, tokenizer is not None)
