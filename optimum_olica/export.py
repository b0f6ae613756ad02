"""Exact export of an Olica-pruned model to its base family's stock architecture (``LlamaForCausalLM``, ...).

Serving engines (vLLM, TGI, SGLang, llama.cpp's converter) read one head size and one FFN width per model, and plain
transformers loads only the stock families without custom code. Factored Q/K and narrow value heads have an exact
stock form (`optimum_olica.conversion.to_stock_model`: dense Q/K, value heads zero-padded to ``head_dim``), and so
have per-layer FFN widths (every FFN zero-padded to the widest): each costs parameters, so the export is larger than
the Olica checkpoint (`StockExport` reports both counts). Linear-calibration branches have no stock counterpart: they
are refused, naming the layers (``config.to_base_config()``), never approximated. `export_to_stock` is the I/O around the conversion: read a
checkpoint folder, refuse early, write the stock checkpoint with its tokenizer and provenance.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["StockExport", "export_to_stock"]

RECIPE_NAME = "olica_config.json"
REPORT_NAME = "olica_report.json"


@dataclass(frozen=True)
class StockExport:
    """What `export_to_stock` wrote.

    Attributes:
        directory: the exported checkpoint folder.
        architecture: its class, e.g. ``LlamaForCausalLM``.
        olica_parameters: parameters of the Olica model it was exported from.
        stock_parameters: parameters of the export (more when Q/K were factored or value heads narrowed).
        has_tokenizer: whether a tokenizer was saved with it.
        conversions: what the export converted at a parameter cost (``config.stock_incompatibilities()``).
    """

    directory: Path
    architecture: str
    olica_parameters: int
    stock_parameters: int
    has_tokenizer: bool
    conversions: tuple[str, ...] = ()

    def summary(self) -> str:
        """The lines ``optimum-cli olica export`` prints."""
        growth = self.stock_parameters / self.olica_parameters - 1
        why = f": {'; '.join(_COST_OF[reason] for reason in self.conversions)}" if self.conversions else ""
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


# config.stock_incompatibilities() reasons with an exact stock form -> what the export did about each.
_COST_OF = {
    "some q_proj/k_proj are factored": "Q/K stored dense",
    "some value heads are narrower than head_dim": "value heads zero-padded to head_dim",
    "FFN widths differ between layers": ("every FFN zero-padded to the widest layer's width (prune with "
                                         "layer_allocation='uniform' for a smaller export)"),
}


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
        ValueError: the model has a linear-calibration branch (the message names the layers and the alternatives),
            or it is not an Olica model. FFN widths that differ between layers are zero-padded to the widest.
        FileExistsError: ``output_dir`` is not empty and ``overwrite`` is False, or is the checkpoint folder itself.
    """
    # Imported here: reading this module (the CLI's --help) must not import torch and transformers.
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

    from .atomic_io import prepare_output_directory
    from .checkpoint import save_pruned_model
    from .conversion import to_stock_model
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
    return StockExport(directory, architecture, olica_parameters, stock_parameters, tokenizer is not None,
                       tuple(model.config.stock_incompatibilities()))
