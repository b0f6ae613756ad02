"""Where the dense decoder layers come from: the model's own modules, or the safetensors files one layer at a time.

A source hands the pipeline one dense layer at a time, on the compute device, as a plain module without accelerate
hooks: the pipeline then reads no offloaded weight more than once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from accelerate.utils import align_module_device
from safetensors import safe_open

from .conversion import build_decoder_layer
from .errors import CheckpointVerificationError
from .integrity import read_safetensors_header


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of a causal LM of a supported family (``model.model.layers``)."""
    base = getattr(model, model.base_model_prefix, model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no `{model.base_model_prefix}.layers` decoder stack.")
    return layers


class ModelLayerSource:
    """Dense layers taken from the model itself, wherever accelerate placed them (GPU, CPU or offloaded)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.layers = decoder_layers(model)

    def __len__(self) -> int:
        return len(self.layers)

    @contextmanager
    def dense_layer(self, layer_idx: int, device: torch.device) -> Iterator[torch.nn.Module]:
        layer = self.layers[layer_idx]
        if has_accelerate_hook(layer) or device_of(layer) != device:
            # A hook-free copy on the compute device: offloaded weights are read once, not at every batch.
            # accelerate hooks the leaf modules, so each one is aligned (its offloaded weights loaded) in turn.
            with ExitStack() as stack:
                for module in layer.modules():
                    stack.enter_context(align_module_device(module, device))
                state = {name: tensor.to(device) for name, tensor in layer.state_dict().items()}
            yield build_decoder_layer(self.model.config, layer_idx, state, type(layer))
        else:
            yield layer


class SafetensorsWeights:
    """Read-only access to a checkpoint's tensors by name, across the shards of a safetensors checkpoint."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                self.file_of = {name: self.directory / file for name, file in weight_map.items()}
            except (ValueError, KeyError, TypeError, AttributeError) as error:
                raise CheckpointVerificationError(
                    f"{index} is not a valid shard index ({type(error).__name__}: {error}). Download or save the "
                    "checkpoint again."
                ) from None
        elif (self.directory / "model.safetensors").exists():
            single = self.directory / "model.safetensors"
            self.file_of = {name: single for name in read_safetensors_header(single)}
        else:
            raise FileNotFoundError(
                f"Streaming needs safetensors weights, but {self.directory} has neither model.safetensors nor "
                "model.safetensors.index.json. Convert the checkpoint with save_pretrained(safe_serialization=True)."
            )
        self._check_headers()

    def _check_headers(self) -> None:
        """Headers against file sizes, now: a truncated or corrupted shard fails before any layer is pruned, not
        after an hour (the data itself is read layer by layer, and a damaged read there still names the file)."""
        for file in sorted(set(self.file_of.values())):
            if not file.is_file():
                raise CheckpointVerificationError(
                    f"{file} is named by the shard index but does not exist. Download or save the checkpoint again."
                )
            stored = read_safetensors_header(file)
            absent = [name for name, owner in self.file_of.items() if owner == file and name not in stored]
            if absent:
                raise CheckpointVerificationError(
                    f"{file} lacks tensors its shard index assigns to it ({absent[:3]}). Download or save the "
                    "checkpoint again."
                )

    def names_with_prefix(self, prefix: str) -> list[str]:
        return [name for name in self.file_of if name.startswith(prefix)]

    def load(self, names: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """The named tensors on ``device``; a truncated or corrupted file raises an error naming it."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.file_of[name], []).append(name)
        tensors = {}
        for file, file_names in by_file.items():
            try:
                with safe_open(file, framework="pt", device=str(device)) as handle:
                    for name in file_names:
                        tensors[name] = handle.get_tensor(name)
            except Exception as error:  # safetensors raises its own error types for damaged files
                raise CheckpointVerificationError(
                    f"Could not read {name!r} from {file}: {error}. The file is truncated or corrupted; download or "
                    "save the checkpoint again."
                ) from error
        return tensors


class SafetensorsLayerSource:
    """Streaming: each dense layer is read from the safetensors files only while it is processed."""

    def __init__(self, model: torch.nn.Module, weights: SafetensorsWeights):
        self.model = model
        self.layers = decoder_layers(model)
        self.weights = weights
        self.prefix = f"{model.base_model_prefix}.layers."

    def __len__(self) -> int:
        return len(self.layers)

    @contextmanager
    def dense_layer(self, layer_idx: int, device: torch.device) -> Iterator[torch.nn.Module]:
        prefix = f"{self.prefix}{layer_idx}."
        names = self.weights.names_with_prefix(prefix)
        state = {name[len(prefix):]: tensor for name, tensor in self.weights.load(names, device).items()}
        dtype = next(iter(state.values())).dtype
        layer = build_decoder_layer(self.model.config, layer_idx, state, type(self.layers[layer_idx]))
        yield layer.to(dtype)
        del layer, state


def has_accelerate_hook(module: torch.nn.Module) -> bool:
    return any(hasattr(submodule, "_hf_hook") for submodule in module.modules())


def has_offloaded_weights(module: torch.nn.Module) -> bool:
    return any(param.device.type == "meta" for param in module.parameters())


def device_of(module: torch.nn.Module) -> torch.device:
    for param in module.parameters():
        if param.device.type != "meta":
            return param.device
    return torch.device("cpu")


__all__ = [
    "ModelLayerSource",
    "SafetensorsLayerSource",
    "SafetensorsWeights",
    "decoder_layers",
    "device_of",
    "has_accelerate_hook",
    "has_offloaded_weights",
]
