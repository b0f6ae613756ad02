"""Resumable pruning: after each finished layer, save what is needed to continue; refuse to mix two runs.

A checkpoint directory (``prune_model(..., checkpoint_dir=...)``, ``OlicaPruner.prune(..., checkpoint_dir=...)``,
``--checkpoint-dir`` on the CLI) holds:

- ``manifest.json``: fingerprints of the run (format version, package version, model config and weights, the recipe,
  the calibration token ids, the method and the mode), written once when the directory is first used;
- ``layer-NNNNN.safetensors``: the pruned weights of each finished layer (kept until the run is complete);
- ``state-NNNNN.safetensors``: after layer ``NNNNN``, the propagated activations (the next layer's inputs; the dense
  model's own as well when the recipe's ``trajectory_weight`` carries them) and the tensors of the algorithm's
  cross-layer state (only the latest is kept);
- ``progress.json``: the commit record: the last finished layer, the per-layer report entries, the timings and the
  JSON part of the algorithm state. Replacing it (write a temporary file, fsync, rename, fsync the directory) is the
  single atomic step that makes a layer count as finished; a file it does not name is ignored and removed.

Temporary files are named ``.olica-tmp-*`` and removed when the directory is next opened. A rerun with the same
arguments continues after the last finished layer and yields bit-identical weights; a rerun whose fingerprints differ
is refused with a ``ResumeMismatchError`` naming what differs. The recipe (``OlicaConfig``) deliberately has no
checkpoint field: where a run keeps its scratch files is a property of one invocation on one machine, not of the
recipe that is saved beside the pruned weights and shared with the model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ._faults import fault_point
from .atomic_io import fsync_file, write_json_atomically
from .errors import CheckpointVerificationError, ResumeMismatchError

RESUME_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
PROGRESS_NAME = "progress.json"
TEMPORARY_PREFIX = ".olica-tmp-"
LOCK_NAME = ".olica-lock"  # held (flock) by the run using the directory; the OS releases it when that process dies
_OUR_FILE_PREFIXES = ("layer-", "state-", TEMPORARY_PREFIX)

# Tensors with at most this many elements are hashed whole; larger ones through an evenly spaced sample, which is
# enough to tell two checkpoints apart (a different model changes nearly every weight) at a cost independent of size.
_WHOLE_TENSOR_ELEMENTS = 1 << 16
_SAMPLED_ELEMENTS = 4096
# Streaming: bytes read from each safetensors file's data section, in evenly spaced chunks.
_FILE_SAMPLE_CHUNKS, _FILE_SAMPLE_CHUNK_BYTES = 16, 1 << 16


# ---- fingerprints -----------------------------------------------------------------------------------------------------


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()


def fingerprint_state_dict(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and (whole or sampled) values; meta tensors contribute their shapes only."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name]
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.device.type == "meta" or tensor.numel() == 0:
            continue
        flat = tensor.detach().reshape(-1)
        if flat.numel() > _WHOLE_TENSOR_ELEMENTS:
            # Integer arithmetic: a float linspace rounds past the last index for tensors of tens of millions.
            positions = torch.arange(_SAMPLED_ELEMENTS, device=flat.device) * (flat.numel() - 1) // (
                _SAMPLED_ELEMENTS - 1
            )
            flat = flat[positions]
        digest.update(_tensor_bytes(flat))
    return digest.hexdigest()


def fingerprint_safetensors_files(files: list[Path]) -> str:
    """SHA-256 over each file's name, size, header and a fixed sample of its data: cheap for any checkpoint size."""
    digest = hashlib.sha256()
    for path in sorted(set(files), key=lambda p: p.name):
        size = path.stat().st_size
        digest.update(f"{path.name}|{size}|".encode())
        with open(path, "rb") as handle:
            header_length = int.from_bytes(handle.read(8), "little")
            digest.update(handle.read(min(header_length, size)))
            data_start, data_size = 8 + header_length, max(size - 8 - header_length, 0)
            for chunk in range(_FILE_SAMPLE_CHUNKS):
                handle.seek(data_start + data_size * chunk // _FILE_SAMPLE_CHUNKS)
                digest.update(handle.read(_FILE_SAMPLE_CHUNK_BYTES))
    return digest.hexdigest()


def fingerprint_model_config(config) -> str:
    """SHA-256 of a transformers config, without the fields that name where it was loaded from."""
    values = config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "_attn_implementation_autoset", "_commit_hash"):
        values.pop(volatile, None)
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint_token_ids(input_ids: torch.Tensor) -> str:
    digest = hashlib.sha256(f"{tuple(input_ids.shape)}|".encode())
    digest.update(_tensor_bytes(input_ids.long()))
    return digest.hexdigest()


def run_manifest(
    *, model_config, weights_fingerprint: str, recipe: dict, input_ids: torch.Tensor, method: str, streaming: bool
) -> dict:
    """What identifies a run: a checkpoint written by a run with any other manifest is not resumed. Where the run
    happens (the compute device, where activations wait) is not part of it: those are not in the recipe."""
    from . import __version__

    return {
        "format_version": RESUME_FORMAT_VERSION,
        "package_version": __version__,
        "model_config": fingerprint_model_config(model_config),
        "model_weights": weights_fingerprint,
        "olica_config": dict(recipe),
        "calibration_token_ids": fingerprint_token_ids(input_ids),
        "method": method,
        "mode": "streaming" if streaming else "in-memory",
    }


_WHAT = {
    "format_version": "the checkpoint format version",
    "package_version": "the optimum-olica version",
    "model_config": "the model's config",
    "model_weights": "the model's weights",
    "calibration_token_ids": "the calibration data (token ids)",
    "method": "the method",
    "mode": "the mode (streaming or in-memory)",
}


# What a run ran with before the field existed, where that is not the field's default today (the default changed
# the behaviour when the field was added): a checkpoint without the field is compared with this value.
_BEFORE_THE_FIELD = {"layer_allocation": "uniform", "self_calibration": 0.0, "qk_covariance_shrinkage": 1.0,
                     "qk_score_weighting": 0.0}


def _recipe_defaults() -> dict:
    """Every OlicaConfig field that has a default, with what a checkpoint without the field ran at."""
    import dataclasses

    from .configuration import OlicaConfig

    defaults = {field_.name: field_.default for field_ in dataclasses.fields(OlicaConfig)
                if field_.default is not dataclasses.MISSING}
    return {**defaults, **_BEFORE_THE_FIELD}


def _saved_recipe(recipe: dict) -> dict:
    """A checkpoint's recipe without the run settings earlier versions kept in it (``streaming`` is the manifest's
    ``mode``; the device and where activations wait never had to match)."""
    from .configuration import RUN_SETTINGS

    return {key: value for key, value in recipe.items() if key not in RUN_SETTINGS}


def _differences(saved: dict, current: dict) -> list[str]:
    differences = []
    for key in current:
        if key == "olica_config":
            old, new = _saved_recipe(saved.get(key) or {}), current[key]
            # A field added after the checkpoint was written ran at its default, which keeps the old behaviour.
            defaults = _recipe_defaults()
            old = {**{name: value for name, value in defaults.items() if name in new}, **old}
            for field_name in sorted(set(old) | set(new)):
                if old.get(field_name) != new.get(field_name):
                    differences.append(
                        f"OlicaConfig.{field_name} is {new.get(field_name)!r}, the checkpoint has {old.get(field_name)!r}"
                    )
        elif saved.get(key) != current[key]:
            if key in ("method", "mode", "package_version", "format_version"):
                differences.append(f"{_WHAT[key]} is {current[key]!r}, the checkpoint has {saved.get(key)!r}")
            else:
                differences.append(f"{_WHAT[key]} differ{'' if key.endswith('s') else 's'}")
    return differences


def _split_tensors(value: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able ``value`` with each tensor replaced by ``{"__tensor__": key}`` and moved into ``tensors``."""
    if isinstance(value, torch.Tensor):
        key = f"{prefix}"
        tensors[key] = value.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(value, dict):
        return {str(k): _split_tensors(v, f"{prefix}.{k}", tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_split_tensors(v, f"{prefix}.{i}", tensors) for i, v in enumerate(value)]
    return value


def _join_tensors(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            return tensors[value["__tensor__"]]
        return {k: _join_tensors(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_join_tensors(v, tensors) for v in value]
    return value


# ---- the checkpoint directory -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class ResumePoint:
    """What a checkpoint restores: layers ``0 .. last_layer`` are finished."""

    last_layer: int
    records: list[dict]
    timings: dict
    algorithm_state: Any
    activations: list[torch.Tensor]
    dense_activations: list[torch.Tensor] | None  # the dense model's own stream, when the run carries it


class LayerCheckpoint:
    """The resume files of one pruning run (see the module docstring for the layout and the commit protocol).

    Args:
        directory: the checkpoint directory; created if missing. A non-empty directory without a manifest is refused
            (it is not ours, and files in it could be removed).
        manifest: ``run_manifest(...)`` of the current run.
    """

    def __init__(self, directory: str | os.PathLike, manifest: dict):
        self.directory = Path(directory).expanduser().resolve()
        self.manifest = manifest

    @staticmethod
    def layer_file(layer_idx: int) -> str:
        return f"layer-{layer_idx:05d}.safetensors"

    @staticmethod
    def state_file(layer_idx: int) -> str:
        return f"state-{layer_idx:05d}.safetensors"

    def open(self) -> ResumePoint | None:
        """Create or check the directory; return where to resume, or None to start at layer 0.

        Raises:
            ResumeMismatchError: the directory holds the progress of a run with other arguments, model or data.
            CheckpointVerificationError: the directory is not a checkpoint directory, or its files are damaged.
        """
        if self.directory.exists() and not self.directory.is_dir():
            raise CheckpointVerificationError(
                f"checkpoint_dir {self.directory} is a file; give a directory path (it is created if missing)."
            )
        self.directory.mkdir(parents=True, exist_ok=True)
        manifest_path = self.directory / MANIFEST_NAME
        if not manifest_path.exists():
            foreign = [p.name for p in self.directory.iterdir() if not p.name.startswith(_OUR_FILE_PREFIXES)
                       and p.name not in (PROGRESS_NAME, LOCK_NAME)]
            if foreign:
                raise CheckpointVerificationError(
                    f"checkpoint_dir {self.directory} is not empty and holds no Olica resume manifest "
                    f"({', '.join(sorted(foreign)[:3])}...): it was not written by an Olica run. Choose an empty or new "
                    "directory for checkpoint_dir."
                )
            self._lock()
            self._remove_files(keep=set())
            (self.directory / PROGRESS_NAME).unlink(missing_ok=True)  # no manifest: nothing here can be trusted
            write_json_atomically(manifest_path, self.manifest, TEMPORARY_PREFIX)
            return None
        try:
            saved = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise CheckpointVerificationError(
                f"The resume manifest {manifest_path} cannot be read ({error}). Delete {self.directory} to start over."
            ) from error
        self._lock()
        differences = _differences(saved, self.manifest)
        if differences:
            raise ResumeMismatchError(
                f"Cannot resume from checkpoint_dir {self.directory}: it holds the progress of a different run ("
                + "; ".join(differences)
                + "). Resuming would mix two runs. Rerun with the original model, recipe and calibration data to "
                f"continue it, or delete {self.directory} (or choose another checkpoint_dir) to start over."
            )
        progress_path = self.directory / PROGRESS_NAME
        if not progress_path.exists():
            self._remove_files(keep=set())
            return None
        try:
            progress = json.loads(progress_path.read_text(encoding="utf-8"))
            last = int(progress["last_layer"])
            keep = {self.layer_file(i) for i in range(last + 1)} | {self.state_file(last)}
            self._remove_files(keep=keep)
            with safe_open(self.directory / self.state_file(last), framework="pt") as handle:
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
            for layer_idx in range(last + 1):
                with safe_open(self.directory / self.layer_file(layer_idx), framework="pt") as handle:
                    handle.keys()
        except Exception as error:  # a damaged file: json, safetensors or a missing key
            raise CheckpointVerificationError(
                f"The resume checkpoint in {self.directory} is damaged ({type(error).__name__}: {error}). Delete "
                f"{self.directory} to start over."
            ) from error
        activations = [tensors[f"activations.{i}"] for i in range(int(progress["num_activation_batches"]))]
        dense_batches = progress.get("num_dense_activation_batches")
        dense = None if dense_batches is None else [tensors[f"dense_activations.{i}"] for i in range(dense_batches)]
        algorithm_state = _join_tensors(progress["algorithm"], tensors)
        return ResumePoint(last, progress["records"], progress["timings"], algorithm_state, activations, dense)

    def _lock(self) -> None:
        """Hold the directory for this run: two runs writing the same checkpoint would mix their layers."""
        try:
            import fcntl
        except ImportError:  # not POSIX: no advisory locks; one run per directory is then the user's to ensure
            return
        handle = open(self.directory / LOCK_NAME, "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise CheckpointVerificationError(
                f"checkpoint_dir {self.directory} is in use by another running pruning job. Wait for it to finish, "
                "or give this run another checkpoint_dir."
            ) from None
        self._lock_handle = handle  # released when this object (or the process) goes away

    def load_layer(self, layer_idx: int) -> dict[str, torch.Tensor]:
        """The pruned weights of a finished layer (names relative to the layer)."""
        with safe_open(self.directory / self.layer_file(layer_idx), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}

    def save_layer(
        self,
        layer_idx: int,
        layer_state: dict[str, torch.Tensor],
        activations: list[torch.Tensor],
        algorithm_state: Any,
        records: list[dict],
        timings: dict,
        dense_activations: list[torch.Tensor] | None = None,
    ) -> None:
        """Commit layer ``layer_idx`` as finished: its weights, the next layer's inputs (the pruned model's, and the
        dense model's own when the run carries them), the algorithm state."""
        tensors: dict[str, torch.Tensor] = {}
        algorithm_json = _split_tensors(algorithm_state, "algorithm", tensors)
        for prefix, batches in (("activations", activations), ("dense_activations", dense_activations or [])):
            for index, batch in enumerate(batches):
                tensors[f"{prefix}.{index}"] = batch.detach().cpu().contiguous()
        progress = {
            "last_layer": layer_idx,
            "num_activation_batches": len(activations),
            **({} if dense_activations is None else {"num_dense_activation_batches": len(dense_activations)}),
            "records": records,
            "timings": timings,
            "algorithm": algorithm_json,
        }
        json.dumps(progress)  # fail before writing anything if a record is not JSON
        written = []
        for name, content in (
            (self.layer_file(layer_idx), {k: v.detach().cpu().contiguous() for k, v in layer_state.items()}),
            (self.state_file(layer_idx), tensors),
        ):
            temporary = self.directory / f"{TEMPORARY_PREFIX}{name}"
            save_file(content, temporary, metadata={"format": "pt"})
            fsync_file(temporary)
            written.append((temporary, self.directory / name))
        fault_point("checkpoint_before_rename", layer_idx)
        for temporary, final in written:
            os.replace(temporary, final)
        fault_point("checkpoint_before_commit", layer_idx)
        write_json_atomically(self.directory / PROGRESS_NAME, progress, TEMPORARY_PREFIX)
        fault_point("layer_checkpointed", layer_idx)
        stale = self.directory / self.state_file(layer_idx - 1)
        if layer_idx > 0 and stale.exists():
            stale.unlink()

    def remove(self) -> None:
        """Delete this run's files (after its output is safely written) and the directory if nothing else is left."""
        if not (self.directory / MANIFEST_NAME).is_file():
            return  # not a checkpoint directory (or already removed): touch nothing
        self._remove_files(keep=set())
        for name in (PROGRESS_NAME, MANIFEST_NAME, LOCK_NAME):
            (self.directory / name).unlink(missing_ok=True)
        try:
            self.directory.rmdir()
        except OSError:
            pass  # something else lives there: leave it

    def _remove_files(self, keep: set[str]) -> None:
        for path in self.directory.iterdir():
            if path.name.startswith(_OUR_FILE_PREFIXES) and path.name not in keep and path.is_file():
                path.unlink()


class ResumableSink:
    """A layer sink that also commits the run's progress after each stored layer, and can restore it.

    Wraps the run's real sink (model or shards): ``restore`` puts the layers a checkpoint finished back into it, with
    the activations, algorithm state and timings that follow them; ``store`` stores a layer in the real sink, then
    saves it with the next layer's inputs (the pipeline stores a layer once ``activations`` hold them).
    """

    def __init__(self, sink, checkpoint: LayerCheckpoint, activations, algorithm, timings, build_layer,
                 num_layers: int):
        self.sink = sink
        self.checkpoint = checkpoint
        self.activations = activations
        self.algorithm = algorithm
        self.timings = timings
        self.build_layer = build_layer  # (layer index, state) -> the pruned layer module
        self.num_layers = num_layers
        self.records: list[dict] = []

    def restore(self, point: ResumePoint | None) -> int:
        """Restore what ``point`` (from ``checkpoint.open()``) finished; returns the first layer still to prune."""
        if point is None:
            return 0
        for layer_idx in range(point.last_layer + 1):
            self.sink.store(layer_idx, self.build_layer(layer_idx, self.checkpoint.load_layer(layer_idx)), None)
        self.activations.hidden_states = [batch.to(self.activations.storage_device) for batch in point.activations]
        if self.activations.dense_hidden_states is not None:  # the recipe, checked by the manifest, asked for it
            self.activations.dense_hidden_states = [batch.to(self.activations.storage_device)
                                                    for batch in point.dense_activations]
        self.algorithm.load_state_dict(point.algorithm_state)
        _restore_timings(self.timings, point.timings)
        self.records = list(point.records)
        return point.last_layer + 1

    def store(self, layer_idx: int, layer: torch.nn.Module, record: dict) -> None:
        self.sink.store(layer_idx, layer, record)
        self.records.append(record)
        last = layer_idx + 1 == self.num_layers
        self.checkpoint.save_layer(
            layer_idx,
            layer.state_dict(),
            [] if last else self.activations.hidden_states,  # the last layer's outputs feed nothing
            self.algorithm.state_dict(),
            self.records,
            dataclasses.asdict(self.timings),
            self._dense_activations_to_save(last),
        )

    def _dense_activations_to_save(self, last: bool) -> list[torch.Tensor] | None:
        """The dense model's own stream when the run carries one (none after the last layer: it feeds nothing)."""
        if self.activations.dense_hidden_states is None:
            return None
        return [] if last else self.activations.dense_hidden_states

    def finish(self, final_config, branches):
        return self.sink.finish(final_config, branches)


def _restore_timings(timings, saved: dict) -> None:
    """Put the saved phase totals back into a ``PipelineTimings``."""
    for field_ in dataclasses.fields(timings):
        if field_.name in saved:
            value = saved[field_.name]
            setattr(timings, field_.name, list(value) if isinstance(value, list) else value)


__all__ = [
    "LayerCheckpoint",
    "MANIFEST_NAME",
    "PROGRESS_NAME",
    "RESUME_FORMAT_VERSION",
    "ResumePoint",
    "ResumableSink",
    "fingerprint_model_config",
    "fingerprint_safetensors_files",
    "fingerprint_state_dict",
    "fingerprint_token_ids",
    "run_manifest",
]
