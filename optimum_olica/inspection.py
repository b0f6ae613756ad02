"""Reading a pruned checkpoint folder back: what it is, how it was made, what was measured.

`OlicaCheckpoint.from_directory` reads the three JSON files the pruner writes beside the weights (``config.json``,
``olica_config.json``, ``olica_report.json``) and refuses, with a message naming the missing file, a folder that is
not an Olica checkpoint. `describe_checkpoint` turns it into the text ``optimum-cli olica inspect`` prints; the Hub
model card (`optimum_olica.hub`) is built from the same object.

Measured figures live in ``olica_report.json``: the pruner writes the parameter counts, per-layer dimensions and
timings; `record_evaluation` appends what ``optimum-cli olica eval --record`` measures (perplexity, zero-shot
accuracy) under ``"evaluations"``, so ``inspect`` and the model card show it.

Reading a checkpoint (`OlicaCheckpoint`, `record_evaluation`) uses the standard library only: no torch, no weights.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "OlicaCheckpoint",
    "describe_checkpoint",
    "format_evaluation",
    "format_summary",
    "record_evaluation",
]

REPORT_NAME = "olica_report.json"  # the same names as the pruner's (which imports torch, so is not imported here)
RECIPE_NAME = "olica_config.json"
MODEL_CONFIG_NAME = "config.json"

# The Olica architectures have model_type "olica_<family>"; an FFN-only recipe is saved as the stock family.
_OLICA_MODEL_TYPE_PREFIX = "olica_"


def _read_json(path: Path) -> dict:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); the checkpoint is damaged: prune again.") from error
    if not isinstance(content, dict):
        raise ValueError(f"{path} holds a JSON {type(content).__name__}, not an object; the checkpoint is damaged.")
    return content


@dataclass
class OlicaCheckpoint:
    """The description of a pruned checkpoint folder (its JSON files; the weights are not read).

    Attributes:
        directory: the folder.
        model_config: ``config.json`` as a dict.
        recipe: ``olica_config.json`` as a dict (the `OlicaConfig` fields).
        report: ``olica_report.json`` as a dict (what pruning did and measured).
    """

    directory: Path
    model_config: dict
    recipe: dict
    report: dict

    @classmethod
    def from_directory(cls, directory: str | os.PathLike) -> "OlicaCheckpoint":
        """Reads a checkpoint written by ``OlicaPruner`` / ``optimum-cli olica prune``.

        Raises:
            FileNotFoundError: if ``directory`` does not exist or is not a folder.
            ValueError: if it is not an Olica checkpoint (a JSON file is missing or unreadable).
        """
        path = Path(directory).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist; give the folder written by `optimum-cli olica prune`.")
        if not path.is_dir():
            raise FileNotFoundError(
                f"{path} is a file, not a checkpoint folder; give the folder written by the pruner."
            )
        missing = [name for name in (MODEL_CONFIG_NAME, RECIPE_NAME, REPORT_NAME) if not (path / name).is_file()]
        if missing:
            raise ValueError(
                f"{path} is not an Olica checkpoint: it has no {' or '.join(missing)}. Olica checkpoints are written "
                "by `optimum-cli olica prune MODEL OUTPUT` or OlicaPruner.prune(..., save_directory=OUTPUT)."
            )
        report = _read_json(path / REPORT_NAME)
        needed = ("parameters_before", "parameters_after", "achieved_ratio", "target_ratio", "layers", "timings",
                  "calibration_data")
        absent = [key for key in needed if key not in report]
        if absent:
            raise ValueError(f"{path / REPORT_NAME} lacks {absent}: it was not written by optimum-olica's pruner.")
        return cls(path, _read_json(path / MODEL_CONFIG_NAME), _read_json(path / RECIPE_NAME), report)

    @property
    def is_stock_architecture(self) -> bool:
        """True when the checkpoint was saved as the base family (FFN-only recipe): no custom code needed."""
        return not str(self.model_config.get("model_type", "")).startswith(_OLICA_MODEL_TYPE_PREFIX)

    @property
    def architecture(self) -> str:
        architectures = self.model_config.get("architectures") or ["?"]
        return f"{architectures[0]} (model_type {self.model_config.get('model_type', '?')!r})"

    @property
    def evaluations(self) -> list[dict]:
        return list(self.report.get("evaluations", []))


def _percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def format_summary(report: dict) -> str:
    """A plain-text table of what pruning did, per layer and in total."""
    header = f"{'layer':>5} {'q rank':>7} {'k rank':>7} {'v dim':>6} {'ffn':>6} {'lc rank':>7} {'params':>10} {'time s':>7}"
    lines = [header, "-" * len(header)]
    per_layer = report["timings"]["per_layer_s"]
    for record, seconds in zip(report["layers"], per_layer):
        q = record["query_rank"] if record["query_rank"] is not None else "dense"
        k = record["key_rank"] if record["key_rank"] is not None else "dense"
        lines.append(
            f"{record['layer']:>5} {q!s:>7} {k!s:>7} {record['value_head_dim']:>6} {record['intermediate_size']:>6} "
            f"{record['calibration_rank']:>7} {record['parameters']:>10,} {seconds:>7.2f}"
        )
    before, after = report["parameters_before"], report["parameters_after"]
    lines.append("-" * len(header))
    lines.append(
        f"parameters: {before:,} -> {after:,} (removed {100 * report['achieved_ratio']:.2f}%, target "
        f"{100 * report['target_ratio']:.1f}%); pruning took {report['runtime_s']:.1f} s"
    )
    lines.append(f"calibration data: {_calibration_data(report['calibration_data'])}")
    return "\n".join(lines)


def _calibration_data(data: dict) -> str:
    """``source: N x L tokens = T tokens, seed S``, and how many sequences the model wrote, in how long."""
    text = (f"{data.get('source')}: {data.get('num_samples')} x {data.get('sequence_length')} tokens "
            f"= {data.get('num_tokens', 0):,} tokens, seed {data.get('seed')}")
    generated = data.get("self_generated_samples")
    if generated and data.get("source") != "self-generated":
        text += f", of which {generated} sequences written by the model itself"
        if data.get("refit_on") == "data":
            text += " (what is cut only: the refits fit the data alone)"
    if generated:
        text += f" (generated in {data.get('generation_s', 0.0):.1f} s, apart from the pruning time)"
    return text


def describe_checkpoint(checkpoint: OlicaCheckpoint) -> str:
    """The text ``optimum-cli olica inspect`` prints: identity, parameters, recipe, calibration data, per-layer
    dimensions (`format_summary`'s table) and recorded evaluations."""
    report, recipe = checkpoint.report, checkpoint.recipe
    before, after = report["parameters_before"], report["parameters_after"]
    loading = (
        "stock architecture: loads in plain transformers and any engine that reads the base family"
        if checkpoint.is_stock_architecture
        else "Olica architecture: `import optimum_olica`, or from_pretrained(..., trust_remote_code=True)"
    )
    lines = [
        f"Olica checkpoint {checkpoint.directory}",
        f"  architecture      {checkpoint.architecture}; {loading}",
        f"  base model        {report.get('base_model') or 'unknown'} ({report.get('base_model_type', '?')})",
        f"  parameters        {before:,} -> {after:,} (removed {_percent(report['achieved_ratio'])}, "
        f"target {_percent(report['target_ratio'])})",
    ]
    export = report.get("export")  # written by export_to_stock: these weights are the stock form of the pruned model
    if export:
        lines.append(
            f"  exported          to the stock {export.get('architecture')}: {export.get('parameters', 0):,} "
            "parameters (Q/K dense, value heads zero-padded to head_dim; the same outputs)"
        )
    parts = report.get("part_ratios") or {}
    if parts:
        lines.append("  part ratios       " + ", ".join(f"{name} {_percent(value)}" for name, value in parts.items()))
    lines.append(
        f"  calibrated layers {report.get('calibrated_layers', [])} (rank {report.get('calibration_rank', 0)})"
    )
    lines.append(f"  calibration data  {_calibration_data(report['calibration_data'])}")
    lines.append(
        f"  pruning run       method {report.get('method', 'olica')}, {report.get('runtime_s', 0.0):.1f} s on "
        f"{report.get('device', '?')}{', streaming' if report.get('streaming') else ''}"
    )
    lines.append("")
    lines.append("Recipe (olica_config.json):")
    width = max((len(key) for key in recipe), default=0)
    lines.extend(f"  {key:<{width}}  {json.dumps(value)}" for key, value in sorted(recipe.items()))
    lines.append("")
    lines.append("Per layer (olica_report.json):")
    lines.append(format_summary(report))
    lines.append("")
    evaluations = checkpoint.evaluations
    if evaluations:
        lines.append("Evaluations (olica_report.json):")
        lines.extend(f"  {format_evaluation(entry)}" for entry in evaluations)
    else:
        lines.append("Evaluations: none recorded (measure with `optimum-cli olica eval DIR --record`).")
    return "\n".join(lines)


def format_evaluation(entry: dict) -> str:
    """One line for a recorded evaluation entry (see `record_evaluation`)."""
    if entry.get("kind") == "perplexity":
        dense = (
            f", {entry['ratio_to_dense']:.3f}x dense ({entry['dense_value']:.3f})"
            if entry.get("ratio_to_dense") is not None else ""
        )
        return (
            f"perplexity {entry['value']:.3f} on {entry.get('dataset')} ({entry.get('num_tokens', 0):,} tokens, "
            f"windows of {entry.get('sequence_length')}){dense}"
        )
    stderr = f" ± {entry['stderr']:.4f}" if entry.get("stderr") is not None else ""
    samples = f", {entry['num_samples']} examples" if entry.get("num_samples") is not None else ""
    shots = entry.get("num_fewshot") or 0
    return f"{entry.get('task')} {entry.get('metric', 'acc')} {entry['value']:.4f}{stderr} ({shots}-shot{samples})"


def record_evaluation(directory: str | os.PathLike, entries: list[dict[str, Any]]) -> Path:
    """Appends evaluation results to ``directory/olica_report.json`` under ``"evaluations"``.

    Each entry is a JSON-safe dict with at least ``kind`` (``"perplexity"`` or ``"zero_shot"``) and ``value``; an
    entry measured the same way as an existing one (same fields but ``value`` and ``stderr``) replaces it, so
    re-running an evaluation does not pile up duplicates. The file is replaced atomically (temporary file, then rename).

    Returns:
        The path of the report.
    """
    checkpoint = OlicaCheckpoint.from_directory(directory)
    for entry in entries:
        if "kind" not in entry or "value" not in entry:
            raise ValueError(f"An evaluation entry needs 'kind' and 'value', got {sorted(entry)}.")
    report = dict(checkpoint.report)

    def identity(entry: dict) -> dict:
        return {key: value for key, value in entry.items() if key not in ("value", "stderr")}

    kept = [old for old in report.get("evaluations", []) if all(identity(old) != identity(new) for new in entries)]
    report["evaluations"] = kept + [dict(entry) for entry in entries]
    path = checkpoint.directory / REPORT_NAME
    handle, temporary = tempfile.mkstemp(prefix=".olica-tmp-report-", dir=checkpoint.directory)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            json.dump(report, file, indent=2, sort_keys=True)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
